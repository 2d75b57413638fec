"""Replicate (api.replicate.com): predictions of hosted video models.

Wire format (replicate/replicate-python ``client.py``, ``prediction.py``, ``deployment.py``,
``file.py``, ``exceptions.py`` and replicate.com's prediction lifecycle, data-retention and
rate-limit pages; see the provider reference §g):

- ``Authorization: Bearer <token>``; ``Prefer: wait`` is never sent: video runs take minutes and a
  create must answer at once;
- the configured upstream model picks the route: ``owner/name`` (an official model) → ``POST
  /v1/models/{owner}/{name}/predictions {input}``; ``owner/name:<version>`` or a bare 64-hex version
  id → ``POST /v1/predictions {version, input}``; ``deployments/owner/name`` → ``POST
  /v1/deployments/{owner}/{name}/predictions {input}``. Each answers 201 with the prediction;
- ``GET /v1/predictions/{id}`` → ``{id, status: starting | processing | succeeded | failed |
  canceled | aborted, output (a URL, or a list of them), error, logs, created_at, started_at,
  completed_at, data_removed, urls}``; progress exists only as tqdm bars in ``logs``
  (``45%|████…``), otherwise it is synthesised from ``started_at``;
- ``POST /v1/predictions/{id}/cancel`` stops an unfinished prediction;
- images: an http(s) URL or a data URI in the model's image field; images above
  ``options.data_uri_max_bytes`` are uploaded with ``POST /v1/files`` (multipart ``content``) and
  passed as the file's ``urls.get``, as the official SDK does;
- output files live on ``replicate.delivery`` and are deleted an hour after the prediction finished
  (``data_removed`` then, or the URL answers 404): every download fetches the prediction again for
  its current URL, and a gone output is a 410;
- errors are RFC 7807 problem details ``{type, title, status, detail}``; a throttled call is 429
  ``{"detail": "Request was throttled. Your rate limit resets in ~30s."}``.

``input`` is model-specific, so each model's ``sizes`` and ``seconds`` map to the input fields they
set (merged into ``input``) and its ``image_field`` takes ``input_reference`` (None: text only).
Version ids and deployments say nothing about their schema: ``options.input_schemas`` names the
known model whose input they take.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway.bodies import RequestBody
from gateway.errors import ApiError, UpstreamError
from gateway.providers.base import (
    Call,
    UpstreamVideo,
    auth_rejected,
    json_or_none,
    path_segment,
)
from gateway.providers.native import (
    ImageInput,
    ModelSpec,
    NativeAdapter,
    Tier,
    expired_if_gone,
    expired_result,
    ignore_refusals,
    model_must_exist,
    not_offered,
    out_of_quota,
    rate_limited,
    refused,
    synthetic_progress,
)
from gateway.store import Task

OUTPUT_LIFETIME_SECONDS = 3600  # "output files … are automatically removed after an hour"
DATA_URI_MAX_BYTES = 256 * 1024
RETRY_AFTER_SECONDS = "30"
LOG_TAIL = 4096

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_OFFICIAL = re.compile(rf"({_NAME})/({_NAME})")
_VERSIONED = re.compile(rf"({_NAME})/({_NAME}):([0-9a-f]{{64}})")
_VERSION = re.compile(r"[0-9a-f]{64}")
_DEPLOYMENT = re.compile(rf"deployments/({_NAME})/({_NAME})")
_PREDICTION_ID = re.compile(r"[A-Za-z0-9_-]+")
_PERCENT = re.compile(r"(?<!\d)(\d{1,3})%\|")
# "... available in ~3s": up to a day, in ASCII digits (more digits than a double holds were a 500)
_RESETS_IN = re.compile(r"\bin ~?([0-9]{1,5}(?:\.[0-9]{1,6})?)\s*(?:s|secs?|seconds?)\b", re.IGNORECASE)
_FILTERED = re.compile(r"\bE005\b|flagged as sensitive|\bnsfw\b|content (?:policy|moderation)", re.IGNORECASE)
_STATUSES = frozenset({"starting", "processing", "succeeded", "failed", "canceled", "aborted"})


def _durations(field_name: str, *seconds: int) -> dict[str, dict[str, int]]:
    return {str(s): {field_name: s} for s in seconds}


def _hailuo(tiers: dict[str, tuple[str, str]], *, extras: frozenset[str], expected: float) -> ModelSpec:
    """minimax/hailuo-*: ``resolution`` picks the tier; text-to-video is landscape, an image decides.
    1080p makes 6-second videos only."""
    sizes = {size: {"resolution": tier} for tier, pair in tiers.items() for size in pair}
    seconds = _durations("duration", 6, 10)
    return ModelSpec(
        sizes=sizes,
        seconds=seconds,
        default_size=tiers["768p"][0],
        default_seconds="6",
        extra_params=extras,
        expected_seconds=expected,
        image_field="first_frame_image",
        tiers=tuple(
            Tier(tier, frozenset(pair), frozenset({"6"} if tier == "1080p" else seconds))
            for tier, pair in tiers.items()
        ),
        image_only_sizes=frozenset(pair[1] for pair in tiers.values()),
    )


_HAILUO_TIERS = {
    "512p": ("912x512", "512x912"),
    "768p": ("1366x768", "768x1366"),
    "1080p": ("1920x1080", "1080x1920"),
}

# Input schemas from replicate.com/{owner}/{model}/api (version pages of each model).
MODELS: dict[str, ModelSpec] = {
    "minimax/hailuo-02": _hailuo(
        _HAILUO_TIERS, extras=frozenset({"prompt_optimizer", "last_frame_image"}), expected=240
    ),
    "minimax/hailuo-2.3": _hailuo(
        {k: v for k, v in _HAILUO_TIERS.items() if k != "512p"},
        extras=frozenset({"prompt_optimizer"}),
        expected=180,
    ),
    "google/veo-3": ModelSpec(
        sizes={
            "1280x720": {"aspect_ratio": "16:9", "resolution": "720p"},
            "720x1280": {"aspect_ratio": "9:16", "resolution": "720p"},
            "1920x1080": {"aspect_ratio": "16:9", "resolution": "1080p"},
            "1080x1920": {"aspect_ratio": "9:16", "resolution": "1080p"},
        },
        seconds={"8": {}},  # no duration input: Veo 3 on Replicate makes 8-second videos
        default_size="1280x720",
        default_seconds="8",
        extra_params=frozenset({"negative_prompt", "seed"}),
        expected_seconds=120,
        image_field="image",
    ),
    "kwaivgi/kling-v2.1": ModelSpec(
        # image-to-video only; the video takes the start image's aspect ratio, mode its resolution
        sizes={
            "1280x720": {"mode": "standard"},
            "720x1280": {"mode": "standard"},
            "1920x1080": {"mode": "pro"},
            "1080x1920": {"mode": "pro"},
        },
        seconds=_durations("duration", 5, 10),
        default_size="1280x720",
        default_seconds="5",
        text_input=False,
        extra_params=frozenset({"negative_prompt", "end_image"}),
        expected_seconds=180,
        image_field="start_image",
    ),
    "kwaivgi/kling-v2.1-master": ModelSpec(
        sizes={
            "1920x1080": {"aspect_ratio": "16:9"},
            "1080x1920": {"aspect_ratio": "9:16"},
            "1080x1080": {"aspect_ratio": "1:1"},
        },
        seconds=_durations("duration", 5, 10),
        default_size="1920x1080",
        default_seconds="5",
        extra_params=frozenset({"negative_prompt"}),
        expected_seconds=300,
        image_field="start_image",
    ),
    "wan-video/wan-2.2-t2v-fast": ModelSpec(
        sizes={
            "832x480": {"aspect_ratio": "16:9", "resolution": "480p"},
            "480x832": {"aspect_ratio": "9:16", "resolution": "480p"},
            "1280x720": {"aspect_ratio": "16:9", "resolution": "720p"},
            "720x1280": {"aspect_ratio": "9:16", "resolution": "720p"},
        },
        # length is frames / fps: 81 frames (the model's best) at 20 or 16 fps, 97 frames at 16 fps
        seconds={
            "4": {"num_frames": 81, "frames_per_second": 20},
            "5": {"num_frames": 81, "frames_per_second": 16},
            "6": {"num_frames": 97, "frames_per_second": 16},
        },
        default_size="832x480",
        default_seconds="5",
        image_input=False,
        extra_params=frozenset({"seed", "go_fast", "sample_shift"}),
        expected_seconds=40,
    ),
}


def _route(upstream_model: str) -> tuple[str, dict[str, str]]:
    """The create path and the body fields besides ``input`` for a configured upstream model."""
    if match := _DEPLOYMENT.fullmatch(upstream_model):
        return f"/v1/deployments/{match[1]}/{match[2]}/predictions", {}
    if _VERSION.fullmatch(upstream_model):
        return "/v1/predictions", {"version": upstream_model}
    if match := _VERSIONED.fullmatch(upstream_model):
        return "/v1/predictions", {"version": match[3]}
    if match := _OFFICIAL.fullmatch(upstream_model):
        return f"/v1/models/{match[1]}/{match[2]}/predictions", {}
    raise ApiError(
        400,
        f"'{upstream_model}' is not a Replicate model: use owner/name, owner/name:<version>, a "
        "64-hex version id or deployments/owner/name; fix the gateway's routing config.",
        param="model",
        code="unsupported_model",
    )


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _logged_progress(logs: Any) -> int | None:
    """The last tqdm percentage in the logs, kept below 100 until the prediction succeeded."""
    if not isinstance(logs, str) or not logs:
        return None
    found = _PERCENT.findall(logs[-LOG_TAIL:])
    if not found:
        return None
    return min(99, int(found[-1]))


def _output_url(output: Any) -> str | None:
    """The video's URL: the output itself, or the first URL in a list of them."""
    candidates = output if isinstance(output, list) else [output]
    for item in candidates:
        if isinstance(item, str) and item.startswith(("https://", "http://")):
            return item
    return None


def _failure(status: str, error: Any) -> dict[str, str]:
    if status == "canceled":
        return {"code": "cancelled", "message": "The prediction was canceled at Replicate."}
    if status == "aborted":
        return {
            "code": "aborted",
            "message": "Replicate aborted the prediction: it exceeded its deadline before it could start.",
        }
    message = str(error).strip() if error else "Replicate could not generate this video."
    code = "content_filter" if _FILTERED.search(message) else "generation_failed"
    return {"code": code, "message": message}


def _retry_after(headers: Mapping[str, str], detail: str) -> str:
    if headers.get("Retry-After"):
        return headers["Retry-After"]
    match = _RESETS_IN.search(detail)
    return str(max(1, math.ceil(float(match[1])))) if match else RETRY_AFTER_SECONDS


class ReplicateAdapter(NativeAdapter):
    kind = "replicate"
    default_base_url = "https://api.replicate.com"
    required_fields = ("api_key",)
    default_result_hosts = ("replicate.delivery", ".replicate.delivery")
    models = MODELS
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "input_schemas": {
                "type": "object",
                "description": "Upstream model (a version id or deployments/owner/name) → the known model "
                "whose input it takes",
                "additionalProperties": {"type": "string", "enum": sorted(MODELS)},
            },
            "data_uri_max_bytes": {
                "type": "integer",
                "minimum": 0,
                "description": f"Larger images are uploaded to /v1/files (default {DATA_URI_MAX_BYTES})",
            },
        },
    }

    @classmethod
    def known_spec(cls, upstream_model: str, options: Mapping[str, Any]) -> ModelSpec | None:
        schemas = options.get("input_schemas") or {}
        return cls.models.get(schemas.get(upstream_model) or upstream_model.split(":", 1)[0])

    @classmethod
    def unknown_model(cls, upstream_model: str) -> str:
        return (
            f"the replicate provider does not know the input schema of '{upstream_model}' (known: "
            f"{', '.join(sorted(cls.models))}); name one in the provider's options.input_schemas"
        )

    def upstream_headers(self, call: Call, *, forward_client: bool = True) -> CIMultiDict[str]:
        """Never ``Prefer: wait``, even from the config's headers: creates must not block."""
        headers = super().upstream_headers(call, forward_client=forward_client)
        headers.popall("Prefer", None)
        return headers

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo:
        upstream_model = call.deployment.upstream_model
        path, envelope = _route(upstream_model)
        request = await self.parse_create(call, body)
        spec = request.spec
        model_input: dict[str, Any] = {
            "prompt": request.prompt,
            **request.extras,
            **request.native_size,
            **request.native_seconds,
        }
        if request.image is not None and spec.image_field is not None:
            model_input[spec.image_field] = await self._image_value(call, request.image)
        with model_must_exist("Replicate", upstream_model):
            answer = await self.call_json(
                call, "POST", f"{self.base_url}{path}", json_body={**envelope, "input": model_input}
            )
        prediction_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(prediction_id, str) or not _PREDICTION_ID.fullmatch(prediction_id):
            raise UpstreamError(
                502, "Upstream error: Replicate's answer has no prediction id.", kind="payload"
            )
        status = str(answer.get("status") or "starting").lower()
        fields = {"status": status if status in _STATUSES else "starting", "progress": 0, **request.seed()}
        return UpstreamVideo(prediction_id, fields)

    async def _image_value(self, call: Call, image: ImageInput) -> str:
        """The client's URL as given, a data URI for small images, an uploaded file's URL otherwise."""
        if image.data is None:
            assert image.url is not None
            return image.url
        limit = int(self.config.options.get("data_uri_max_bytes", DATA_URI_MAX_BYTES))
        if len(image.data) <= limit:
            return image.data_uri()
        form = aiohttp.FormData()
        extension = image.mime.split("/")[-1] if image.mime.startswith("image/") else "bin"
        form.add_field(
            "content", image.data, filename=f"input_reference.{extension}", content_type=image.mime
        )
        headers = await self.api_headers(call)
        async with self.send(
            call, "POST", f"{self.base_url}/v1/files", headers=headers, data=form
        ) as response:
            answer = await self.read_json(response)
        urls = answer.get("urls") if isinstance(answer, dict) else None
        url = urls.get("get") if isinstance(urls, dict) else None
        if not isinstance(url, str) or not url:
            raise UpstreamError(502, "Upstream error: Replicate's file upload has no URL.", kind="payload")
        return url

    async def _prediction(self, call: Call, prediction_id: str) -> dict[str, Any]:
        url = f"{self.base_url}/v1/predictions/{path_segment(prediction_id)}"
        answer = await self.call_json(call, "GET", url)
        if not isinstance(answer, dict) or "status" not in answer:
            raise UpstreamError(502, "Upstream error: Replicate's prediction has no status.", kind="payload")
        return answer

    async def retrieve(self, call: Call, task: Task) -> UpstreamVideo:
        answer = await self._prediction(call, task.upstream_id)
        status = str(answer["status"]).lower()
        fields: dict[str, Any] = {"status": status}
        state: dict[str, Any] = {}
        if status == "processing":
            progress = _logged_progress(answer.get("logs"))
            if progress is None:
                since = _timestamp(answer.get("started_at")) or task.state.get("processing_since")
                if not isinstance(since, int | float):
                    since = state["processing_since"] = time.time()
                progress = synthetic_progress(since, self._expected_seconds(task))
            fields["progress"] = progress
        elif status == "succeeded":
            finished = _timestamp(answer.get("completed_at"))
            if finished is not None:
                fields["completed_at"] = int(finished)
                fields["expires_at"] = int(finished) + OUTPUT_LIFETIME_SECONDS
        elif status in ("failed", "canceled", "aborted"):
            fields["error"] = _failure(status, answer.get("error"))
        return UpstreamVideo(task.upstream_id, fields, state)

    def _expected_seconds(self, task: Task) -> float:
        try:
            return self.spec(str(task.state.get("upstream_model"))).expected_seconds
        except ApiError:
            return 180.0

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        """The prediction is fetched again on every download: its output goes an hour after it ended."""
        if variant != "video":
            raise not_offered(variant, self.kind)
        with expired_if_gone():
            answer = await self._prediction(call, task.upstream_id)
        url = _output_url(answer.get("output"))
        if answer.get("data_removed") or str(answer["status"]).lower() != "succeeded" or url is None:
            raise expired_result()
        return await self.stream_result(call, url)

    async def delete(self, call: Call, task: Task) -> None:
        """Cancels an unfinished prediction; a finished one has nothing left to stop."""
        if task.status in ("completed", "failed"):
            return
        url = f"{self.base_url}/v1/predictions/{path_segment(task.upstream_id)}/cancel"
        with ignore_refusals(404, 409):
            await self.call_json(call, "POST", url)

    def provider_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
        """RFC 7807 problem details: ``detail`` (else ``title``) becomes the message."""
        parsed = json_or_none(raw)
        body = parsed if isinstance(parsed, dict) else {}
        detail = next(
            (v.strip() for v in (body.get("detail"), body.get("title")) if isinstance(v, str) and v.strip()),
            None,
        )
        if detail is None or status >= 500:
            return super().provider_error(status, headers, raw)
        text = f"Replicate: {detail}"
        if status == 429:
            return rate_limited(text, upstream_status=status, retry_after=_retry_after(headers, detail))
        if status == 401:
            return auth_rejected("Replicate", text, upstream_status=status, credential="API token")
        if status == 402:
            return out_of_quota(text, upstream_status=status)
        if status == 422 and body.get("title") == "Invalid version":  # the routing config's version
            return refused(404, text, code=None, upstream_status=404)  # makes it model_must_exist's
        if status in (400, 422):
            return refused(400, text, code="invalid_value", upstream_status=status)
        return refused(status, text, code=None, upstream_status=status)
