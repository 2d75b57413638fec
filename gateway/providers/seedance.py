"""ByteDance Seedance on Volcengine Ark (ark.cn-beijing.volces.com/api/v3).

BytePlus ModelArk serves the same API from ``https://ark.ap-southeast.bytepluses.com/api/v3`` (set it
as ``base_url``). Wire format (provider reference §j: Volcengine docs 82379/1520757 create, 1521309
query, 1521675 cancel/delete, 1299023 error codes; new-api ``task/doubao``):

- ``Authorization: Bearer <ARK_API_KEY>``;
- ``POST /contents/generations/tasks`` with ``{model, content: [{type: "text", text},
  {type: "image_url", image_url: {url}, role: "first_frame"}], resolution, ratio, duration, seed?,
  camera_fixed?, watermark?, generate_audio?, return_last_frame?, ...}``, answered ``{"id": "cgt-…"}``.
  ``model`` is a model ID or an endpoint ID (``ep-…``). Older Seedance 1.0 examples put the
  settings in the prompt instead (``"<prompt> --ratio 16:9 --resolution 720p --dur 5"``): with
  ``options.parameter_style: suffix`` resolution, ratio, duration, seed, camera_fixed and watermark
  travel that way; everything else stays a body field;
- ``GET /contents/generations/tasks/{id}`` → ``{id, model, status: queued | running | cancelled |
  succeeded | failed | expired, error: {code, message}, content: {video_url, last_frame_url},
  created_at, updated_at, resolution, ratio, duration}``; no progress is reported, so it is
  synthesised while running. Tasks are queryable for 7 days;
- ``DELETE /contents/generations/tasks/{id}`` cancels a queued task and deletes a finished one's
  record; Ark refuses it for running (older docs) and cancelled tasks. The gateway forgets the video
  either way: a refused cancel leaves the job to finish at Ark, which purges it after 7 days;
- ``content.video_url`` is a TOS presigned URL (``X-Tos-Expires=86400``): the task is fetched again
  for every download. With ``return_last_frame`` (sent unless ``options.last_frame_thumbnail`` is
  false) ``content.last_frame_url`` is the last frame as an image, served as ``variant=thumbnail``;
- errors are ``{"error": {code, message, param, type}}``: 429 ``RateLimitExceeded.*`` and friends →
  429 with Retry-After, ``AuthenticationError`` → 401, ``AccountOverdueError`` → 402,
  ``InvalidParameter*`` → 400 with ``param`` in OpenAI terms, ``InvalidEndpointOrModel.NotFound`` to
  a create → 502 ``upstream_model_not_found`` naming the configured upstream model (a failover),
  ``*SensitiveContentDetected*`` → ``content_filter`` (at create and as a task failure).

``size`` picks ``resolution`` and ``ratio`` from the pixel sizes Ark documents per model family
(Seedance 1.0: 1248x704 for 720p 16:9; Seedance 1.5 pro: 1280x720), plus the usual 16:9 / 9:16
names (864x480, 1280x720, 1920x1080 and their portrait forms) for the same tier. With an
``input_reference`` and no ``size``, ``ratio`` is ``adaptive`` (Ark follows the image) and the
video then reports the pixel size Ark chose. ``seconds`` is ``duration``: 2–12 for Seedance 1.0,
4–12 for 1.5 pro. Prompts may not carry ``--ratio``-style commands of their own: they would
override the validated ``size`` and ``seconds``.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

from gateway.bodies import RequestBody
from gateway.errors import ApiError, UpstreamError, bad_request
from gateway.providers.base import (
    Call,
    UpstreamVideo,
    auth_rejected,
    json_or_none,
    path_segment,
    split_url,
)
from gateway.providers.native import (
    CreateRequest,
    ModelSpec,
    NativeAdapter,
    durations,
    expired_if_gone,
    expired_result,
    field_int,
    ignore_refusals,
    model_must_exist,
    not_offered,
    out_of_quota,
    rate_limited,
    refused,
    synthetic_progress,
)
from gateway.store import Task

TASKS = "/contents/generations/tasks"
RETRY_AFTER_SECONDS = "10"  # Ark limits per minute (RPM) and sends no Retry-After of its own
RESULT_LIFETIME = 86400  # X-Tos-Expires of the presigned result URLs

RATIOS = ("16:9", "4:3", "1:1", "3:4", "9:16", "21:9")

# Pixel sizes per resolution, in RATIOS order (create API doc, "不同宽高比对应的宽高像素值").
_SEEDANCE_1_0 = {
    "480p": ("864x480", "736x544", "640x640", "544x736", "480x864", "960x416"),
    "720p": ("1248x704", "1120x832", "960x960", "832x1120", "704x1248", "1504x640"),
    "1080p": ("1920x1088", "1664x1248", "1440x1440", "1248x1664", "1088x1920", "2176x928"),
}
_SEEDANCE_1_5 = {
    "480p": ("864x496", "752x560", "640x640", "560x752", "496x864", "992x432"),
    "720p": ("1280x720", "1112x834", "960x960", "834x1112", "720x1280", "1470x630"),
    "1080p": ("1920x1080", "1664x1248", "1440x1440", "1248x1664", "1080x1920", "2206x946"),
}
# The usual names of the 16:9 and 9:16 tiers, accepted for every family.
_NOMINAL = {
    "480p": {"864x480": "16:9", "480x864": "9:16"},
    "720p": {"1280x720": "16:9", "720x1280": "9:16"},
    "1080p": {"1920x1080": "16:9", "1080x1920": "9:16"},
}


def _sizes(*families: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, str]]:
    """OpenAI ``size`` → ``{resolution, ratio}``: the documented pixel sizes first, then the usual names."""
    sizes: dict[str, dict[str, str]] = {}
    for family in families:
        for resolution, pixels in family.items():
            for size, ratio in zip(pixels, RATIOS, strict=True):
                sizes.setdefault(size, {"resolution": resolution, "ratio": ratio})
    for resolution, names in _NOMINAL.items():
        for size, ratio in names.items():
            sizes.setdefault(size, {"resolution": resolution, "ratio": ratio})
    return sizes


def _durations(low: int, high: int) -> dict[str, int]:
    return durations(*range(low, high + 1))


_EXTRAS = frozenset({"seed", "camera_fixed", "watermark", "service_tier", "execution_expires_after"})
_AUDIO_EXTRAS = _EXTRAS | {"generate_audio", "draft"}


def _spec(
    sizes: dict[str, dict[str, str]],
    seconds: dict[str, int],
    *,
    text: bool = True,
    image: bool = True,
    extras: frozenset[str] = _EXTRAS,
    expected: float,
) -> ModelSpec:
    return ModelSpec(
        sizes=sizes,
        seconds=seconds,
        default_size="1280x720",
        default_seconds="5",
        text_input=text,
        image_input=image,
        extra_params=extras,
        expected_seconds=expected,
    )


MODELS = {
    "doubao-seedance-1-0-pro-250528": _spec(_sizes(_SEEDANCE_1_0), _durations(2, 12), expected=60),
    "doubao-seedance-1-0-pro-fast-251015": _spec(_sizes(_SEEDANCE_1_0), _durations(2, 12), expected=30),
    "doubao-seedance-1-0-lite-t2v-250428": _spec(
        _sizes(_SEEDANCE_1_0), _durations(2, 12), image=False, expected=45
    ),
    "doubao-seedance-1-0-lite-i2v-250428": _spec(
        _sizes(_SEEDANCE_1_0), _durations(2, 12), text=False, expected=45
    ),
    "doubao-seedance-1-5-pro-251215": _spec(
        _sizes(_SEEDANCE_1_5), _durations(4, 12), extras=_AUDIO_EXTRAS, expected=90
    ),
}

# Endpoint IDs (ep-…) and Seedance versions not listed above: every documented size and duration,
# Ark itself judging what the model behind them takes.
PERMISSIVE = _spec(_sizes(_SEEDANCE_1_0, _SEEDANCE_1_5), _durations(2, 15), extras=_AUDIO_EXTRAS, expected=90)

# Settings the suffix form carries in the prompt, and their command names.
_SUFFIX_EXTRAS = {"seed": "seed", "camera_fixed": "camerafixed", "watermark": "watermark"}
_PROMPT_COMMAND = re.compile(
    r"(?:^|\s)--(resolution|rs|ratio|rt|duration|dur|frames|framespersecond|fps|seed|camerafixed|cf"
    r"|watermark|wm)(?=\s|$)",
    re.IGNORECASE,
)

# Ark's ``param`` → the OpenAI field the client set.
_PARAMS = {"resolution": "size", "ratio": "size", "duration": "seconds", "frames": "seconds"}


def _client_param(param: Any) -> str | None:
    if not isinstance(param, str) or not param:
        return None
    head = re.split(r"[.\[]", param, maxsplit=1)[0]
    if head == "content":
        return "input_reference" if "image" in param else "prompt"
    return _PARAMS.get(head, param)


def _suffix_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _tos_expiry(url: str) -> int | None:
    """When a TOS presigned URL stops working: ``X-Tos-Date`` (UTC) plus ``X-Tos-Expires`` seconds."""
    parts = split_url(url)
    query = parse_qs(parts.query) if parts is not None else {}
    try:
        signed = time.strptime(query["X-Tos-Date"][0], "%Y%m%dT%H%M%SZ")
        return calendar.timegm(signed) + int(query["X-Tos-Expires"][0])
    except (KeyError, IndexError, ValueError):
        return None


def _image_type(url: str) -> str:
    parts = split_url(url)
    path = parts.path.lower() if parts is not None else ""
    if path.endswith(".png"):
        return "image/png"
    if path.endswith(".webp"):
        return "image/webp"
    return "image/jpeg"


class SeedanceAdapter(NativeAdapter):
    kind = "seedance"
    default_base_url = "https://ark.cn-beijing.volces.com/api/v3"
    required_fields = ("api_key",)
    # Results are TOS objects: ark-content-generation-*.tos-cn-beijing.volces.com (Volcengine) and
    # ark-content-generation-*-ap-southeast-1.tos-ap-southeast-1.volces.com or, in BytePlus
    # ModelArk's newer answers, the same bucket on tos-ap-southeast-1.bytepluses.com.
    default_result_hosts = (
        ".tos-cn-beijing.volces.com",
        ".tos-ap-southeast-1.volces.com",
        ".tos-ap-southeast-1.bytepluses.com",
    )
    models = MODELS
    default_spec = PERMISSIVE
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "parameter_style": {
                "enum": ["fields", "suffix"],
                "default": "fields",
                "description": "How resolution/ratio/duration/seed/camera_fixed/watermark reach Ark: body "
                "fields, or '--ratio 16:9 --resolution 720p --dur 5' commands after the prompt (for "
                "models or endpoints that only read those)",
            },
            "last_frame_thumbnail": {
                "type": "boolean",
                "default": True,
                "description": "Ask Ark for the last frame (return_last_frame) and serve it as the "
                "video's thumbnail",
            },
        },
    }

    @classmethod
    def known_spec(cls, upstream_model: str, options: Mapping[str, Any]) -> ModelSpec | None:
        if upstream_model in cls.models or upstream_model.startswith("ep-") or "seedance" in upstream_model:
            return super().known_spec(upstream_model, options)
        return None

    @classmethod
    def unknown_model(cls, upstream_model: str) -> str:
        return f"{super().unknown_model(upstream_model)[:-1]}, or an Ark endpoint ID 'ep-…')"

    @property
    def _suffix_style(self) -> bool:
        return self.config.options.get("parameter_style", "fields") == "suffix"

    @property
    def _last_frame(self) -> bool:
        return bool(self.config.options.get("last_frame_thumbnail", True))

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo:
        request = await self.parse_create(call, body)
        if _PROMPT_COMMAND.search(request.prompt):
            raise bad_request(
                "The prompt carries Seedance '--' parameter commands; use size, seconds and extra "
                "parameters instead.",
                param="prompt",
            )
        adaptive = request.image is not None and not body.get("size")
        payload = self._payload(call.deployment.upstream_model, request, adaptive)
        with model_must_exist("Ark", call.deployment.upstream_model):
            answer = await self.call_json(call, "POST", self.base_url + TASKS, json_body=payload)
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str) or not answer["id"]:
            raise UpstreamError(502, "Upstream error: Ark's answer has no task id.", kind="payload")
        state: dict[str, Any] = {"last_frame": bool(payload.get("return_last_frame"))}
        if adaptive:
            state["adaptive"] = True
        return UpstreamVideo(answer["id"], {"status": "queued", "progress": 0, **request.seed()}, state)

    def _payload(self, upstream_model: str, request: CreateRequest, adaptive: bool) -> dict[str, Any]:
        native = request.native_size
        ratio = "adaptive" if adaptive else native["ratio"]
        extras = dict(request.extras)
        text = request.prompt
        settings: dict[str, Any] = {
            "resolution": native["resolution"],
            "ratio": ratio,
            "duration": request.native_seconds,
        }
        if self._suffix_style:
            commands = {"ratio": ratio, "resolution": native["resolution"], "dur": request.native_seconds}
            for name, command in _SUFFIX_EXTRAS.items():
                if name in extras:
                    commands[command] = extras.pop(name)
            text += "".join(f" --{name} {_suffix_value(value)}" for name, value in commands.items())
            settings = {}
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        if request.image is not None:
            image = request.image
            url = image.url if image.data is None else f"data:{image.mime.lower()};base64,{image.base64()}"
            content.append({"type": "image_url", "image_url": {"url": url}, "role": "first_frame"})
        payload: dict[str, Any] = {"model": upstream_model, "content": content, **settings, **extras}
        if self._last_frame and not extras.get("draft"):
            payload["return_last_frame"] = True
        return payload

    async def _task(self, call: Call, task_id: str) -> dict[str, Any]:
        answer = await self.call_json(call, "GET", f"{self.base_url}{TASKS}/{path_segment(task_id)}")
        if not isinstance(answer, dict) or "status" not in answer:
            raise UpstreamError(502, "Upstream error: Ark's task answer has no status.", kind="payload")
        return answer

    async def retrieve(self, call: Call, task: Task) -> UpstreamVideo:
        answer = await self._task(call, task.upstream_id)
        status = str(answer["status"]).lower()
        fields: dict[str, Any] = {"status": status}
        if status == "queued":
            fields["progress"] = 0
        elif status == "succeeded":
            content = answer.get("content") if isinstance(answer.get("content"), dict) else {}
            url = content.get("video_url")
            updated = field_int(answer.get("updated_at"))
            expires = _tos_expiry(url) if isinstance(url, str) else None
            if expires is None and updated is not None:
                expires = updated + RESULT_LIFETIME
            if expires is not None:
                fields["expires_at"] = expires
        elif status in ("failed", "expired", "cancelled"):
            fields["error"] = self._failure(status, answer.get("error"))
        else:
            # running, or a word this adapter does not know: never end a job on a guess.
            fields["status"] = "in_progress"
            started = field_int(answer.get("created_at")) or task.created_at
            fields["progress"] = synthetic_progress(
                started, self.spec(task.state["upstream_model"]).expected_seconds
            )
        if task.state.get("adaptive"):
            size = self._size_of(task.state["upstream_model"], answer)
            if size is not None:
                fields["size"] = size
        return UpstreamVideo(task.upstream_id, fields)

    @staticmethod
    def _failure(status: str, error: Any) -> dict[str, str]:
        error = error if isinstance(error, dict) else {}
        ark_code = str(error.get("code") or "")
        message = str(error.get("message") or "")
        if status == "expired":
            return {
                "code": "expired",
                "message": message or "The task did not finish within Ark's execution_expires_after window.",
            }
        if status == "cancelled":
            return {"code": "cancelled", "message": message or "The task was cancelled at Ark."}
        if "SensitiveContentDetected" in ark_code:
            return {
                "code": "content_filter",
                "message": f"{message or 'Ark flagged the input or output as sensitive.'} ({ark_code})",
            }
        return {
            "code": ark_code or "generation_failed",
            "message": message or "Ark could not generate this video.",
        }

    def _size_of(self, upstream_model: str, answer: dict[str, Any]) -> str | None:
        """The pixel size Ark picked for an ``adaptive`` ratio, once it reports one."""
        chosen = {"resolution": answer.get("resolution"), "ratio": answer.get("ratio")}
        for size, native in self.spec(upstream_model).sizes.items():
            if native == chosen:
                return size
        return None

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        if variant == "spritesheet" and task.state.get("last_frame"):
            raise ApiError(
                404,
                "The seedance provider offers no 'spritesheet' for videos; 'video' and 'thumbnail' "
                "(the last frame) are available.",
                param="variant",
                code="variant_not_available",
            )
        if variant != "video" and (variant != "thumbnail" or not task.state.get("last_frame")):
            raise not_offered(variant, self.kind)
        with expired_if_gone():
            answer = await self._task(call, task.upstream_id)
        content = answer.get("content") if isinstance(answer.get("content"), dict) else {}
        url = content.get("video_url" if variant == "video" else "last_frame_url")
        if not isinstance(url, str) or not url:
            if variant == "thumbnail":
                raise not_offered(variant, self.kind)
            raise expired_result()
        if variant == "video":
            return await self.stream_result(call, url)
        return await self.stream_result(call, url, content_type=_image_type(url))

    async def relay(
        self, call: Call, upstream: aiohttp.ClientResponse, default_content_type: str | None = None
    ) -> web.StreamResponse:
        """Refuse a "last frame" that is not an image (an error page from the bucket, say)."""
        if default_content_type is not None and default_content_type.startswith("image/"):
            served = upstream.headers.get("Content-Type", "")
            if served and not served.startswith(("image/", "application/octet-stream")):
                raise UpstreamError(
                    502, f"Upstream error: Ark's last frame is '{served}', not an image.", kind="payload"
                )
        return await super().relay(call, upstream, default_content_type)

    async def delete(self, call: Call, task: Task) -> None:
        # Refused for the task's status (running, cancelled) or already gone: forget it anyway.
        with ignore_refusals(400, 403, 404, 409):
            await self.call_json(call, "DELETE", f"{self.base_url}{TASKS}/{path_segment(task.upstream_id)}")

    def provider_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
        parsed = json_or_none(raw)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        if not isinstance(error, dict) or status >= 500:
            return super().provider_error(status, headers, raw)
        code = str(error.get("code") or "")
        text = f"Ark: {error.get('message') or f'HTTP {status}'} ({code or status})"
        if status == 429 or code.startswith(("RateLimitExceeded", "TooManyRequests")):
            retry_after = headers.get("Retry-After") or RETRY_AFTER_SECONDS
            return rate_limited(text, upstream_status=status, retry_after=retry_after)
        if status == 401 or code == "AuthenticationError":
            return auth_rejected("Ark", text, upstream_status=status)
        if code in ("AccountOverdueError", "OperationDenied.ServiceOverdue"):
            return out_of_quota(text, upstream_status=status)
        if code.startswith(("InvalidEndpointOrModel", "ModelNotOpen")):  # Ark has no such model: a create
            return refused(404, text, code=None, upstream_status=404)  # makes it model_must_exist's
        if code.startswith("InvalidImageURL"):  # the image the client sent, whichever field named it
            return refused(400, text, code="invalid_value", upstream_status=status, param="input_reference")
        if "SensitiveContentDetected" in code:
            return refused(400, text, code="content_filter", upstream_status=status)
        if code.startswith(("InvalidParameter", "MissingParameter")):
            return refused(
                400,
                text,
                code="missing_required_parameter" if code.startswith("Missing") else "invalid_value",
                upstream_status=status,
                param=_client_param(error.get("param")),
            )
        return refused(status, text, code=code or None, upstream_status=status)
