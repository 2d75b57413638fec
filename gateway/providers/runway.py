"""Runway (api.dev.runwayml.com): text-to-video and image-to-video tasks.

Wire format (runwayml/sdk-python, see the provider reference §c):
- ``Authorization: Bearer <key>`` and the required ``X-Runway-Version`` header;
- ``POST /v1/text_to_video`` or ``/v1/image_to_video`` with ``{model, promptText, ratio, duration,
  promptImage?}``, answered ``{id}``; ``ratio`` is a pixel ratio such as ``"1280:720"``;
- ``GET /v1/tasks/{id}``: ``PENDING | THROTTLED | RUNNING (progress 0–1) | SUCCEEDED (output: [url])
  | FAILED (failure, failureCode) | CANCELLED``; ``DELETE /v1/tasks/{id}`` cancels or deletes;
- output URLs expire within 24–48 h: the task is fetched again for a fresh one on every download.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.bodies import RequestBody
from gateway.errors import ApiError, UpstreamError, bad_request
from gateway.providers.base import Call, UpstreamVideo, path_segment
from gateway.providers.native import (
    ImageInput,
    ModelSpec,
    NativeAdapter,
    durations,
    ignore_refusals,
    not_offered,
)
from gateway.store import Task

API_VERSION = "2024-11-06"
# A data URI must be under 5 MB, counted in characters (1024 × 1024 × 5, Runway's input docs):
# base64 makes that an image of about 3.7 MiB.
MAX_DATA_URI = 5 * 1024 * 1024
MAX_PROMPT_UTF16 = 1000  # promptText, in UTF-16 code units (an emoji counts two)


def _ratios(*sizes: str) -> dict[str, str]:
    return {size: size.replace("x", ":") for size in sizes}


_EXTRAS = frozenset({"seed", "contentModeration"})

_GEN4_SIZES = ("1280x720", "720x1280", "1104x832", "832x1104", "960x960", "1584x672")

MODELS = {
    "gen4.5": ModelSpec(
        sizes=_ratios(*_GEN4_SIZES),
        seconds=durations(*range(2, 11)),
        default_size="1280x720",
        default_seconds="5",
        extra_params=_EXTRAS,
        expected_seconds=60,
        image_only_sizes=frozenset(_GEN4_SIZES[2:]),  # text-to-video takes 1280:720 and 720:1280 only
    ),
    "gen4_turbo": ModelSpec(
        sizes=_ratios(*_GEN4_SIZES),
        seconds=durations(5, 10),
        default_size="1280x720",
        default_seconds="5",
        text_input=False,
        extra_params=_EXTRAS,
        expected_seconds=40,
    ),
    "veo3.1": ModelSpec(
        sizes=_ratios("1280x720", "720x1280", "1920x1080", "1080x1920"),
        seconds=durations(4, 6, 8),
        default_size="1280x720",
        default_seconds="8",
        extra_params=_EXTRAS | {"audio"},
        expected_seconds=90,
    ),
    "veo3.1_fast": ModelSpec(
        sizes=_ratios("1280x720", "720x1280", "1920x1080", "1080x1920"),
        seconds=durations(4, 6, 8),
        default_size="1280x720",
        default_seconds="8",
        extra_params=_EXTRAS | {"audio"},
        expected_seconds=45,
    ),
    "veo3": ModelSpec(
        sizes=_ratios("1280x720", "720x1280", "1920x1080", "1080x1920"),
        seconds=durations(8),
        default_size="1280x720",
        default_seconds="8",
        extra_params=_EXTRAS,
        expected_seconds=90,
    ),
}


class RunwayAdapter(NativeAdapter):
    kind = "runway"
    provider_name = "Runway"
    default_base_url = "https://api.dev.runwayml.com"
    required_fields = ("api_key",)
    default_result_hosts = (".cloudfront.net", ".runwayml.com")
    # Runway's API reference: "should not expect updates more frequent than once every five seconds"
    default_poll_after_ms = 5000
    models = MODELS
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "api_version": {"type": "string", "description": f"X-Runway-Version (default {API_VERSION})"}
        },
    }

    def auth_headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.config.api_key}",
            "X-Runway-Version": str(self.config.options.get("api_version", API_VERSION)),
        }

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo:
        request = await self.parse_create(call, body)
        if len(request.prompt.encode("utf-16-le")) // 2 > MAX_PROMPT_UTF16:
            raise bad_request(
                f"Runway takes prompts up to {MAX_PROMPT_UTF16} UTF-16 code units (an emoji counts two).",
                param="prompt",
            )
        payload: dict[str, Any] = {
            "model": call.deployment.upstream_model,
            "promptText": request.prompt,
            "ratio": request.native_size,
            "duration": request.native_seconds,
            **request.extras,
        }
        endpoint = "text_to_video"
        if request.image is not None:
            payload["promptImage"] = _prompt_image(request.image)
            endpoint = "image_to_video"
        answer = await self.call_json(call, "POST", f"{self.base_url}/v1/{endpoint}", json_body=payload)
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str) or not answer["id"]:
            raise UpstreamError(502, "Upstream error: Runway's answer has no task id.", kind="payload")
        return UpstreamVideo(answer["id"], {"status": "queued", "progress": 0, **request.seed()})

    async def _task(self, call: Call, task_id: str) -> dict[str, Any]:
        answer = await self.call_json(call, "GET", f"{self.base_url}/v1/tasks/{path_segment(task_id)}")
        if not isinstance(answer, dict) or "status" not in answer:
            raise UpstreamError(502, "Upstream error: Runway's task answer has no status.", kind="payload")
        return answer

    async def retrieve(self, call: Call, task: Task) -> UpstreamVideo:
        answer = await self._task(call, task.upstream_id)
        status = str(answer["status"]).lower()
        fields: dict[str, Any] = {"status": status}
        progress = answer.get("progress")
        if type(progress) in (int, float) and 0 <= progress <= 1:  # a fraction (no bool); else noise
            # 0.997 is not done: 100 is for a finished video, which build_video gives it
            fields["progress"] = min(99, round(progress * 100))
        if status == "failed":
            fields["error"] = _failure(answer)
        elif status == "cancelled":
            fields["error"] = {"code": "cancelled", "message": "The task was cancelled or deleted at Runway."}
        return UpstreamVideo(task.upstream_id, fields)

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        if variant != "video":
            raise not_offered(variant, self.kind)
        answer = await self._task(call, task.upstream_id)
        output = answer.get("output")
        if not isinstance(output, list) or not output or not isinstance(output[0], str):
            raise ApiError(410, "Runway no longer has this video's output.", code="video_expired")
        return await self.stream_result(call, output[0])

    async def delete(self, call: Call, task: Task) -> None:
        with ignore_refusals(404):
            await self.call_json(call, "DELETE", f"{self.base_url}/v1/tasks/{path_segment(task.upstream_id)}")


def _failure(task: dict[str, Any]) -> dict[str, str]:
    """A failed task's error. Runway's moderation codes (``SAFETY.INPUT.TEXT``,
    ``INPUT_PREPROCESSING.SAFETY.IMAGE``...) are ``content_filter``, as every provider's filtered
    job is, with Runway's code kept in the message."""
    code = task.get("failureCode")
    message = str(task.get("failure") or "Runway could not generate this video.")
    if not isinstance(code, str) or not code:
        return {"code": "generation_failed", "message": message}
    if "SAFETY" in code.split("."):
        return {"code": "content_filter", "message": f"{message} ({code})"}
    return {"code": code, "message": message}


def _prompt_image(image: ImageInput) -> str:
    """``promptImage``: an HTTPS URL, or the image as a data URI within Runway's limit."""
    if image.data is None:
        if not str(image.url).startswith("https://"):
            raise bad_request(
                "Runway takes input_reference image URLs over HTTPS only.", param="input_reference"
            )
        return str(image.url)
    uri = image.data_uri()
    if len(uri) >= MAX_DATA_URI:
        raise ApiError(
            413,
            "Runway takes input_reference images up to about 3.7 MiB (5 MB once base64-encoded).",
            param="input_reference",
            code="request_too_large",
        )
    return uri
