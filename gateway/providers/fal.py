"""fal.ai queue API (queue.fal.run): video endpoints run through fal's request queue.

Wire format (fal-ai/fal ``projects/fal_client/src/fal_client/client.py`` and fal's queue, model-error
and request-error docs; see the provider reference §h):

- ``Authorization: Key <FAL_KEY>`` (a ``key_id:key_secret`` pair is sent the same way);
- ``POST {base}/{endpoint_id}`` with the endpoint's own JSON input, answered ``{request_id,
  response_url, status_url, cancel_url, queue_position?}``. The configured upstream model is the
  endpoint ID, e.g. ``fal-ai/kling-video/v2.5-turbo/pro/text-to-video``;
- follow-ups live under the *app* path, ``{owner}/{alias}`` (a ``workflows/`` or ``comfy/``
  namespace kept), the endpoint's sub-path dropped (``AppId.from_endpoint_id``): ``GET
  …/requests/{id}/status?logs=1``, ``GET …/requests/{id}`` (the result), ``PUT
  …/requests/{id}/cancel``. The URLs fal returns are used only when they lie under the configured
  base URL; otherwise they are built from the app path, so an answer can never send the gateway
  (and its key) to another host;
- status ``IN_QUEUE`` (+``queue_position``) | ``IN_PROGRESS`` | ``COMPLETED`` (+``error``,
  ``error_type`` when the run failed); ``FAILED`` and ``CANCELED`` are handled defensively. A
  ``COMPLETED`` run without ``error`` is confirmed by fetching its result: queues that predate the
  ``error`` field report failed runs as ``COMPLETED`` and only the result tells. fal reports no
  progress; it is synthesised from when the run was first seen in progress;
- the result of a video endpoint is ``{"video": {"url", "content_type", "file_name",
  "file_size"}}`` on fal's CDN (``*.fal.media``); it is fetched again for every download. Its
  lifetime is fal's default unless ``options.result_lifetime_seconds`` sets
  ``X-Fal-Object-Lifecycle-Preference``, which also gives the video an ``expires_at``;
- errors are ``{"detail": "…", "error_type"?}`` (request errors, also in ``X-Fal-Error-Type``) or
  ``{"detail": [{loc, msg, type}]}`` (model errors, 422): a 422 becomes a 400 naming the OpenAI
  field; ``content_policy_violation`` becomes ``content_filter``; 429 keeps its Retry-After.

Inputs differ per endpoint, so each endpoint's ``sizes`` and ``seconds`` map to the native fields
they write (merged into the input): ``{"aspect_ratio": "16:9",
"resolution": "720p"}``, ``{"duration": "8s"}``, ``{"num_frames": 81, "frames_per_second": 16}``...
Endpoints not listed are refused with a 400 naming the known ones: their fields, and how they spell
durations, cannot be guessed, and a wrong guess is either refused after queueing or silently
ignores ``size`` and ``seconds``.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from gateway import jsonio
from gateway.bodies import RequestBody
from gateway.errors import ApiError, UpstreamError, expired_result
from gateway.providers.base import (
    Call,
    UpstreamVideo,
    auth_rejected,
    is_web_url,
    json_or_none,
)
from gateway.providers.native import (
    ModelSpec,
    NativeAdapter,
    expired_if_gone,
    ignore_refusals,
    model_must_exist,
    not_offered,
    rate_limited,
    refused,
    same_origin,
    synthetic_progress,
    upstream_failed,
)
from gateway.store import Task
from gateway.videos import is_terminal

APP_NAMESPACES = ("workflows", "comfy")
RETRY_AFTER_SECONDS = "10"  # when fal's 429 names no Retry-After (none is documented)
IMAGE_FIELD = "image_url"  # where input_reference goes unless an endpoint's spec names its own field
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_NUMERIC_APP = re.compile(r"([0-9]+)-([A-Za-z0-9-]+)")

# Native input fields → the OpenAI field the client set (for a refusal's ``param``).
_PARAMS = {
    "prompt": "prompt",
    "duration": "seconds",
    "num_frames": "seconds",
    "frames_per_second": "seconds",
    "aspect_ratio": "size",
    "resolution": "size",
    "image_url": "input_reference",
}


# A model error's ``type`` → the code of the 400 it becomes.
_REFUSAL_CODES = {"content_policy_violation": "content_filter", "missing": "missing_required_parameter"}


def _sizes(*entries: tuple[str, str, str | None]) -> dict[str, dict[str, str]]:
    """``(size, aspect_ratio, resolution)`` → native fields; a ``None`` resolution is not sent."""
    sizes: dict[str, dict[str, str]] = {}
    for size, ratio, resolution in entries:
        sizes[size] = (
            {"aspect_ratio": ratio}
            if resolution is None
            else {
                "aspect_ratio": ratio,
                "resolution": resolution,
            }
        )
    return sizes


def _durations(template: str, *seconds: int) -> dict[str, dict[str, str]]:
    return {str(s): {"duration": template.format(s)} for s in seconds}


# Kling picks its own resolution (pro: 1080p); size chooses only the aspect ratio.
_KLING_SIZES = _sizes(
    ("1280x720", "16:9", None),
    ("720x1280", "9:16", None),
    ("1920x1080", "16:9", None),
    ("1080x1920", "9:16", None),
    ("1080x1080", "1:1", None),
)
# Image-to-video Kling follows the image's frame: these sizes are nominal and write nothing.
_KLING_IMAGE_SIZES: dict[str, dict[str, str]] = {size: {} for size in _KLING_SIZES}
_VEO_SIZES = _sizes(
    ("1280x720", "16:9", "720p"),
    ("720x1280", "9:16", "720p"),
    ("1920x1080", "16:9", "1080p"),
    ("1080x1920", "9:16", "1080p"),
)
_WAN_25_SIZES = _sizes(
    ("832x480", "16:9", "480p"),
    ("480x832", "9:16", "480p"),
    ("624x624", "1:1", "480p"),
    ("1280x720", "16:9", "720p"),
    ("720x1280", "9:16", "720p"),
    ("960x960", "1:1", "720p"),
    ("1920x1080", "16:9", "1080p"),
    ("1080x1920", "9:16", "1080p"),
    ("1440x1440", "1:1", "1080p"),
)
_WAN_22_SIZES = _sizes(
    ("832x480", "16:9", "480p"),
    ("480x832", "9:16", "480p"),
    ("1280x720", "16:9", "720p"),
    ("720x1280", "9:16", "720p"),
)
# Wan 2.2 A14B counts frames (17–161) at 16 fps: one second is 16 frames, plus the first.
_WAN_22_FRAMES = {str(s): {"num_frames": 16 * s + 1, "frames_per_second": 16} for s in range(1, 11)}

_KLING_EXTRAS = frozenset({"negative_prompt", "cfg_scale"})
_VEO_EXTRAS = frozenset({"negative_prompt", "seed", "generate_audio", "enhance_prompt", "auto_fix"})
_VEO_IMAGE_EXTRAS = frozenset({"negative_prompt", "seed", "generate_audio", "auto_fix"})
_WAN_25_EXTRAS = frozenset({"negative_prompt", "seed", "enable_prompt_expansion", "audio_url"})
_WAN_22_EXTRAS = frozenset(
    {
        "negative_prompt",
        "seed",
        "enable_prompt_expansion",
        "acceleration",
        "guidance_scale",
        "num_inference_steps",
        "enable_safety_checker",
    }
)


def _veo(*, image: bool, expected: float) -> ModelSpec:
    return ModelSpec(
        sizes=_VEO_SIZES,
        seconds=_durations("{}s", 4, 6, 8),
        default_size="1280x720",
        default_seconds="8",
        image_input=image,
        text_input=not image,
        extra_params=_VEO_IMAGE_EXTRAS if image else _VEO_EXTRAS,
        expected_seconds=expected,
    )


def _kling(*, image: bool) -> ModelSpec:
    return ModelSpec(
        sizes=_KLING_IMAGE_SIZES if image else _KLING_SIZES,
        seconds=_durations("{}", 5, 10),
        default_size="1280x720",
        default_seconds="5",
        image_input=image,
        text_input=not image,
        extra_params=_KLING_EXTRAS,
        expected_seconds=90,
    )


MODELS: dict[str, ModelSpec] = {
    "fal-ai/kling-video/v2.5-turbo/pro/text-to-video": _kling(image=False),
    "fal-ai/kling-video/v2.5-turbo/pro/image-to-video": _kling(image=True),
    "fal-ai/veo3.1": _veo(image=False, expected=90),
    "fal-ai/veo3.1/fast": _veo(image=False, expected=50),
    "fal-ai/veo3.1/image-to-video": _veo(image=True, expected=90),
    "fal-ai/veo3.1/fast/image-to-video": _veo(image=True, expected=50),
    "fal-ai/veo3": _veo(image=False, expected=90),
    "fal-ai/veo3/fast": _veo(image=False, expected=50),
    "fal-ai/wan-25-preview/text-to-video": ModelSpec(
        sizes=_WAN_25_SIZES,
        seconds=_durations("{}", 5, 10),
        default_size="1280x720",
        default_seconds="5",
        image_input=False,
        extra_params=_WAN_25_EXTRAS,
        expected_seconds=120,
    ),
    "fal-ai/wan/v2.2-a14b/text-to-video": ModelSpec(
        sizes=_WAN_22_SIZES,
        seconds=_WAN_22_FRAMES,
        default_size="1280x720",
        default_seconds="5",
        image_input=False,
        extra_params=_WAN_22_EXTRAS,
        expected_seconds=60,
    ),
}


def app_path(endpoint_id: str) -> str:
    """The queue's app path of an endpoint: ``[namespace/]owner/alias``, its sub-path dropped."""
    parts = endpoint_id.strip("/").split("/")
    if len(parts) == 1 and (match := _NUMERIC_APP.fullmatch(parts[0])):
        parts = list(match.groups())
    keep = 3 if parts[0] in APP_NAMESPACES else 2
    if len(parts) < keep or not all(parts[:keep]):
        raise ApiError(
            400,
            f"'{endpoint_id}' is not a fal endpoint ID (owner/app[/path]); fix the gateway's routing config.",
            param="model",
            code="unsupported_model",
        )
    return "/".join(parts[:keep])


def _video(result: Any) -> dict[str, Any] | None:
    video = result.get("video") if isinstance(result, dict) else None
    if not isinstance(video, dict) or not isinstance(video.get("url"), str):
        return None
    return video if is_web_url(video["url"]) else None


def _field(loc: Any) -> str | None:
    """The input field a model error points at: ``["body", "duration"]`` → ``duration``."""
    if not isinstance(loc, list):
        return None
    names = [str(part) for part in loc if isinstance(part, str)]
    if names and names[0] in ("body", "query", "path"):
        names = names[1:]
    return names[0] if names else None


def _describe(detail: Any) -> tuple[str | None, str | None, str | None]:
    """fal's ``detail`` as (message, first native field, first error type)."""
    if isinstance(detail, str) and detail:
        return detail, None, None
    if not isinstance(detail, list):
        return None, None, None
    messages, field, kind = [], None, None
    for item in detail:
        if not isinstance(item, dict):
            continue
        name = _field(item.get("loc"))
        msg = str(item.get("msg") or item.get("type") or "invalid input")
        messages.append(f"{name}: {msg}" if name else msg)
        field = field or name
        kind = kind or (str(item["type"]) if item.get("type") else None)
    return ("; ".join(messages) or None), field, kind


def _failure_code(kind: str | None) -> str:
    if kind == "content_policy_violation":
        return "content_filter"
    return kind or "generation_failed"


@dataclass
class _RunFailure:
    """A finished run's own error, as the video's ``error``."""

    code: str
    message: str

    def fields(self) -> dict[str, Any]:
        return {"status": "failed", "error": {"code": self.code, "message": self.message}}


class FalAdapter(NativeAdapter):
    kind = "fal"
    default_base_url = "https://queue.fal.run"
    required_fields = ("api_key",)
    # fal's CDN: v3.fal.media, v3b.fal.media, fal.media.
    default_result_hosts = ("fal.media", ".fal.media")
    models = MODELS
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "priority": {
                "enum": ["normal", "low"],
                "description": "X-Fal-Queue-Priority of every submitted request",
            },
            "result_lifetime_seconds": {
                "type": "integer",
                "minimum": 60,
                "description": "How long fal keeps results (X-Fal-Object-Lifecycle-Preference); also "
                "reported as the video's expires_at",
            },
        },
    }

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Key {self.config.api_key}"} if self.config.api_key else {}

    def _submit_headers(self) -> dict[str, str]:
        headers = {}
        if "priority" in self.config.options:
            headers["X-Fal-Queue-Priority"] = str(self.config.options["priority"])
        lifetime = self.config.options.get("result_lifetime_seconds")
        if lifetime is not None:
            headers["X-Fal-Object-Lifecycle-Preference"] = json.dumps(
                {"expiration_duration_seconds": int(lifetime)}
            )
        return headers

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo:
        request = await self.parse_create(call, body)
        endpoint = call.deployment.upstream_model
        app = app_path(endpoint)
        payload: dict[str, Any] = {
            "prompt": request.prompt,
            **request.native_size,
            **request.native_seconds,
            **request.extras,
        }
        if request.image is not None:
            payload[request.spec.image_field or IMAGE_FIELD] = request.image.data_uri()
        with model_must_exist("fal", endpoint):
            answer = await self.call_json(
                call, "POST", f"{self.base_url}/{endpoint}", json_body=payload, headers=self._submit_headers()
            )
        request_id = answer.get("request_id") if isinstance(answer, dict) else None
        if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
            raise UpstreamError(502, "Upstream error: fal's answer has no usable request_id.", kind="payload")
        state: dict[str, Any] = {"app": app}
        for name, suffix in (("status_url", "/status"), ("response_url", ""), ("cancel_url", "/cancel")):
            if self._ours(answer.get(name), request_id, suffix):
                state[name] = answer[name]
        return UpstreamVideo(request_id, {"status": "queued", "progress": 0, **request.seed()}, state)

    def _ours(self, url: Any, request_id: str, suffix: str) -> bool:
        """A follow-up URL from fal is used only under the configured base URL, for this very request."""
        # urlsplit drops tabs and line breaks, which the request line would keep
        if not isinstance(url, str) or not url.isprintable() or not same_origin(url, self.base_url):
            return False
        got, base = urlsplit(url), urlsplit(self.base_url)
        return (
            not got.query
            and not got.fragment
            and got.path.startswith(base.path.rstrip("/") + "/")
            and got.path.endswith(f"/requests/{request_id}{suffix}")
        )

    def _url(self, task: Task, name: str, suffix: str) -> str:
        stored = task.state.get(name)
        if self._ours(stored, task.upstream_id, suffix):
            return str(stored)
        app = task.state.get("app") or app_path(task.state["upstream_model"])
        return f"{self.base_url}/{app}/requests/{task.upstream_id}{suffix}"

    async def retrieve(self, call: Call, task: Task) -> UpstreamVideo:
        # A 404 here goes up as it is: the gateway decides when a request fal does not know is lost
        # (api._lost), not this one answer, which may be its front's of a moment.
        answer = await self.call_json(call, "GET", self._url(task, "status_url", "/status") + "?logs=1")
        if not isinstance(answer, dict) or not isinstance(answer.get("status"), str):
            raise UpstreamError(502, "Upstream error: fal's status answer has no status.", kind="payload")
        word = answer["status"].upper()
        if word == "IN_QUEUE":
            return UpstreamVideo(task.upstream_id, {"status": "queued", "progress": 0})
        if word == "COMPLETED":
            return UpstreamVideo(task.upstream_id, await self._completed(call, task, answer))
        if word in ("FAILED", "ERROR"):
            error_type = answer.get("error_type")
            failure = _RunFailure(
                _failure_code(str(error_type) if error_type else None),
                str(answer.get("error") or "fal could not run this request."),
            )
            return UpstreamVideo(task.upstream_id, failure.fields())
        if word in ("CANCELED", "CANCELLED"):
            return UpstreamVideo(
                task.upstream_id, _RunFailure("cancelled", "The request was cancelled at fal.").fields()
            )
        # IN_PROGRESS, or a word this adapter does not know: never end a job on a guess.
        started = task.state.get("started_at") or time.time()
        spec = MODELS.get(task.state["upstream_model"])
        progress = synthetic_progress(started, spec.expected_seconds if spec else 90.0)
        return UpstreamVideo(
            task.upstream_id, {"status": "in_progress", "progress": progress}, {"started_at": started}
        )

    async def _completed(self, call: Call, task: Task, status: dict[str, Any]) -> dict[str, Any]:
        if status.get("error"):
            error_type = status.get("error_type")
            code = _failure_code(str(error_type) if error_type else None)
            return _RunFailure(code, str(status["error"])).fields()
        result = await self._result(call, task)
        if isinstance(result, _RunFailure):
            return result.fields()
        if _video(result) is None:
            return _RunFailure("no_output", "fal's result holds no video.").fields()
        fields: dict[str, Any] = {"status": "completed"}
        lifetime = self.config.options.get("result_lifetime_seconds")
        if lifetime is not None:
            fields["expires_at"] = int(time.time()) + int(lifetime)
        return fields

    async def _result(self, call: Call, task: Task) -> Any:
        """The run's output, or its :class:`_RunFailure` (``expired`` when fal says it is gone). A
        404 goes up as it is: the caller decides whether it is a moment's (a poll: api._lost) or
        the result's expiry (a download)."""
        headers = await self.api_headers(call)
        answer = await self.exchange(call, "GET", self._url(task, "response_url", ""), headers=headers)
        if answer.status < 400:
            try:
                return jsonio.loads_shallow(answer.body)
            except jsonio.JSONDecodeError:
                raise UpstreamError(
                    502, "Upstream error: fal's result is not JSON.", kind="payload"
                ) from None
        if answer.status == 404:
            raise refused(404, "fal: no result for this request.", code=None, upstream_status=404)
        if answer.status == 410:
            return _RunFailure("expired", "fal no longer has this request's result.")
        failure = self._run_failure(answer.status, answer.headers, answer.body)
        if failure is None:
            raise self.provider_error(answer.status, answer.headers, answer.body)
        return failure

    @staticmethod
    def _run_failure(status: int, headers: Mapping[str, str], raw: bytes) -> _RunFailure | None:
        """A refused result of a COMPLETED run is the run's failure, unless it is a refusal of the call."""
        if status in (401, 403, 408, 409, 429):
            return None
        parsed = json_or_none(raw)
        body = parsed if isinstance(parsed, dict) else {}
        error_type = headers.get("X-Fal-Error-Type") or body.get("error_type")
        message, _, kind = _describe(body.get("detail"))
        if status >= 500 and not error_type:
            return None  # the gateway in front of fal failed, not the run: try again later
        if message is None and not error_type:
            return None
        return _RunFailure(
            _failure_code(kind or (str(error_type) if error_type else None)),
            message or f"fal could not run this request ({error_type}).",
        )

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        if variant != "video":
            raise not_offered(variant, self.kind)
        with expired_if_gone():
            result = await self._result(call, task)
        if isinstance(result, _RunFailure):
            if result.code == "expired":
                raise expired_result()
            raise UpstreamError(
                502, f"Upstream error: fal reports the run failed: {result.message}", kind="payload"
            )
        video = _video(result)
        if video is None:
            raise UpstreamError(502, "Upstream error: fal's result holds no video.", kind="payload")
        content_type = video.get("content_type")
        if not isinstance(content_type, str) or not content_type.startswith("video/"):
            content_type = "video/mp4"
        return await self.stream_result(call, video["url"], content_type=content_type)

    async def delete(self, call: Call, task: Task) -> None:
        if is_terminal(task.status):
            return  # fal keeps finished results until they expire; there is nothing to cancel
        # Already finished (400 ALREADY_COMPLETED) or gone: forget it anyway.
        with ignore_refusals(400, 404, 409, 410, 422):
            await self.call_json(call, "PUT", self._url(task, "cancel_url", "/cancel"))

    def provider_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
        parsed = json_or_none(raw)
        body = parsed if isinstance(parsed, dict) else {}
        message, field, kind = _describe(body.get("detail"))
        error_type = headers.get("X-Fal-Error-Type") or body.get("error_type")
        if message is None:
            return super().provider_error(status, headers, raw)
        text = f"fal: {message}" + (f" ({error_type})" if error_type else "")
        if status == 429:
            retry_after = headers.get("Retry-After") or RETRY_AFTER_SECONDS
            return rate_limited(text, upstream_status=status, retry_after=retry_after)
        if status == 401:
            return auth_rejected("fal", text, upstream_status=status)
        if status in (400, 422):
            return refused(
                400,
                text,
                code=_REFUSAL_CODES.get(kind or "", "invalid_value"),
                upstream_status=status,
                param=None if field is None else _PARAMS.get(field, field),
            )
        if status < 500:
            return refused(status, text, code=str(error_type) if error_type else None, upstream_status=status)
        return upstream_failed(
            f"Upstream error (HTTP {status}): {text}",
            upstream_status=status,
            status=503 if status == 503 else 502,
            retry_after=headers.get("Retry-After"),
        )
