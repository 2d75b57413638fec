"""MiniMax Hailuo (api.minimax.io), video generation API v1.

Wire format (provider reference §f: QuantumNous/new-api ``relay/channel/task/hailuo``, the
platform.minimax.io OpenAPI pages for query, files/retrieve and files/delete):

- ``Authorization: Bearer <key>``;
- ``POST /v1/video_generation`` with ``{model, prompt, duration: 6|10, resolution: "512P"|"720P"|"768P"|
  "1080P", first_frame_image?, prompt_optimizer?, fast_pretreatment?, aigc_watermark?}``, answered
  ``{task_id, base_resp: {status_code, status_msg}}``;
- ``GET /v1/query/video_generation?task_id=…`` → ``{task_id, status: Preparing | Queueing | Processing |
  Success | Fail, file_id, video_width, video_height, base_resp}``; no progress is reported;
- ``GET /v1/files/retrieve?file_id=…`` → ``{file: {file_id, bytes, created_at, filename, download_url},
  base_resp}``; the signed download URL lives for hours, so it is fetched again for every download;
- ``POST /v1/files/delete {file_id, purpose: "video_generation"}``; there is no task cancel.

Every answer is HTTP 200, errors included: a non-zero ``base_resp.status_code`` is the refusal
(1002 rate limit, 1004/2049 bad key, 1008 no balance, 1026/1027 input/output sensitive, 2013
invalid parameters).

v1 has no aspect-ratio parameter: text-to-video is landscape, image-to-video takes the image's
aspect ratio. ``size`` picks the resolution tier: 1280x720 → 720P, 1366x768 → 768P, 1920x1080 →
1080P, 912x512 → 512P. Text-to-video takes only those landscape sizes; with an ``input_reference``
the portrait forms (720x1280, 768x1366, 1080x1920, 512x912) are accepted too and mean the same tier,
since the image decides the orientation; the video then reports the pixel size MiniMax made.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from yarl import URL

from gateway.bodies import RequestBody
from gateway.errors import ApiError, UpstreamError, bad_request
from gateway.providers.base import Call, UpstreamVideo
from gateway.providers.native import (
    CreateRequest,
    ModelSpec,
    NativeAdapter,
    expired_result,
    field_int,
    not_offered,
    synthetic_progress,
)
from gateway.store import Task

MAX_PROMPT = 2000
RETRY_AFTER_SECONDS = "10"  # MiniMax limits per minute and documents no Retry-After of its own

# base_resp.status_code values (new-api hailuo/constants.go; MiniMax error-code list).
RATE_LIMITED = frozenset({1002, 1041, 2045})
BAD_KEY = frozenset({1004, 2049})
NO_BALANCE = 1008
SENSITIVE = frozenset({1026, 1027})
INVALID_PARAMS = 2013
SERVER_SIDE = frozenset({1000, 1001, 1013})

# Resolution tier → (landscape size, portrait size) in OpenAI's "WxH" form.
TIERS = {
    "512P": ("912x512", "512x912"),
    "720P": ("1280x720", "720x1280"),
    "768P": ("1366x768", "768x1366"),
    "1080P": ("1920x1080", "1080x1920"),
}


@dataclass(frozen=True)
class Hailuo:
    """What one model makes: its durations per resolution tier, and the tiers only i2v offers."""

    durations: Mapping[str, tuple[int, ...]]
    image_only_tiers: frozenset[str] = frozenset()


LIMITS = {
    "MiniMax-Hailuo-2.3": Hailuo({"768P": (6, 10), "1080P": (6,)}),
    "MiniMax-Hailuo-2.3-Fast": Hailuo({"768P": (6, 10), "1080P": (6,)}),
    "MiniMax-Hailuo-02": Hailuo({"512P": (6, 10), "768P": (6, 10), "1080P": (6,)}, frozenset({"512P"})),
    "T2V-01": Hailuo({"720P": (6,)}),
    "T2V-01-Director": Hailuo({"720P": (6,)}),
    "I2V-01": Hailuo({"720P": (6,)}),
    "I2V-01-Director": Hailuo({"720P": (6,)}),
    "I2V-01-live": Hailuo({"720P": (6,)}),
}

_EXTRAS = frozenset({"prompt_optimizer", "aigc_watermark"})
_HAILUO_EXTRAS = _EXTRAS | {"fast_pretreatment"}


def _spec(
    model: str, *, text: bool, image: bool, expected: float, extras: frozenset[str] = _EXTRAS
) -> ModelSpec:
    limits = LIMITS[model]
    sizes = {size: tier for tier in limits.durations for size in (TIERS[tier] if image else TIERS[tier][:1])}
    seconds = sorted({s for durations in limits.durations.values() for s in durations})
    default_tier = "768P" if "768P" in limits.durations else "720P"
    return ModelSpec(
        sizes=sizes,
        seconds={str(s): s for s in seconds},
        default_size=TIERS[default_tier][0],
        default_seconds="6",
        text_input=text,
        image_input=image,
        extra_params=extras,
        expected_seconds=expected,
    )


MODELS = {
    "MiniMax-Hailuo-2.3": _spec(
        "MiniMax-Hailuo-2.3", text=True, image=True, expected=180, extras=_HAILUO_EXTRAS
    ),
    "MiniMax-Hailuo-2.3-Fast": _spec(
        "MiniMax-Hailuo-2.3-Fast", text=False, image=True, expected=90, extras=_HAILUO_EXTRAS
    ),
    "MiniMax-Hailuo-02": _spec(
        "MiniMax-Hailuo-02", text=True, image=True, expected=240, extras=_HAILUO_EXTRAS
    ),
    "T2V-01": _spec("T2V-01", text=True, image=False, expected=180),
    "T2V-01-Director": _spec("T2V-01-Director", text=True, image=False, expected=180),
    "I2V-01": _spec("I2V-01", text=False, image=True, expected=180),
    "I2V-01-Director": _spec("I2V-01-Director", text=False, image=True, expected=180),
    "I2V-01-live": _spec("I2V-01-live", text=False, image=True, expected=180),
}


def _base_resp(answer: dict[str, Any]) -> tuple[int, str]:
    base = answer.get("base_resp")
    if not isinstance(base, dict):
        return 0, ""
    return field_int(base.get("status_code")) or 0, str(base.get("status_msg") or "")


def refusal(code: int, message: str, retry_after: str | None = None, http_status: int = 200) -> UpstreamError:
    """A non-zero ``base_resp.status_code`` as our envelope, MiniMax's message kept."""
    text = f"MiniMax: {message or 'error'} (status_code {code})."
    common: dict[str, Any] = {"kind": "4xx", "upstream_status": http_status, "type": "invalid_request_error"}
    if code in RATE_LIMITED:
        return UpstreamError(
            429,
            text,
            **{**common, "type": "rate_limit_error"},
            code="rate_limited",
            headers={"Retry-After": retry_after or RETRY_AFTER_SECONDS},
        )
    if code in BAD_KEY:
        return UpstreamError(
            401, f"MiniMax rejected the gateway's API key. {text}", **common, code="upstream_auth_failed"
        )
    if code == NO_BALANCE:
        return UpstreamError(402, text, **{**common, "type": "insufficient_quota"}, code="insufficient_quota")
    if code in SENSITIVE:
        return UpstreamError(400, text, **common, code="content_filter")
    if code == INVALID_PARAMS:
        return UpstreamError(400, text, **common, code="invalid_value")
    return UpstreamError(
        502, f"Upstream error: {text}", kind="5xx", upstream_status=http_status, code="upstream_error"
    )


class MiniMaxAdapter(NativeAdapter):
    kind = "minimax"
    default_base_url = "https://api.minimax.io"
    required_fields = ("api_key",)
    # download_url points at signed OSS buckets (US for api.minimax.io, mainland for api.minimaxi.com).
    default_result_hosts = (
        "public-cdn-video-data-algeng-us.oss-us-east-1.aliyuncs.com",
        "public-cdn-video-data-algeng.oss-cn-wulanchabu.aliyuncs.com",
        ".minimax.io",
        ".minimaxi.com",
    )
    models = MODELS
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "group_id": {
                "type": "string",
                "description": "GroupId query parameter for files/retrieve and files/delete (older accounts)",
            }
        },
    }

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo:
        request = await self.parse_create(call, body)
        upstream_model = call.deployment.upstream_model
        if len(request.prompt) > MAX_PROMPT:
            raise bad_request(f"MiniMax takes prompts up to {MAX_PROMPT} characters.", param="prompt")
        self._check_combination(call, LIMITS.get(upstream_model), request)
        payload: dict[str, Any] = {
            "model": upstream_model,
            "prompt": request.prompt,
            "duration": request.native_seconds,
            "resolution": request.native_size,
            **request.extras,
        }
        state: dict[str, Any] = {}
        if request.image is not None:
            payload["first_frame_image"] = request.image.data_uri()
            state["image_to_video"] = True
        answer = await self._api(call, "POST", "/v1/video_generation", json_body=payload)
        code, message = _base_resp(answer)
        if code:
            raise self._counted(call, refusal(code, message))
        task_id = answer.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise UpstreamError(502, "Upstream error: MiniMax's answer has no task_id.", kind="payload")
        return UpstreamVideo(task_id, {"status": "queued", "progress": 0, **request.seed()}, state)

    @staticmethod
    def _check_combination(call: Call, limits: Hailuo | None, request: CreateRequest) -> None:
        """What ModelSpec cannot say: landscape-only t2v, i2v-only tiers, and seconds per tier."""
        if limits is None:
            return
        model, tier = call.deployment.model, request.native_size
        text_sizes = ", ".join(TIERS[t][0] for t in limits.durations if t not in limits.image_only_tiers)
        if request.image is None and request.size != TIERS[tier][0]:
            raise bad_request(
                f"size '{request.size}' is portrait, but MiniMax makes text-to-video landscape only; "
                f"model '{model}' supports without an input_reference: {text_sizes} "
                "(with an image the video takes the image's orientation).",
                param="size",
                code="unsupported_value",
            )
        if request.image is None and tier in limits.image_only_tiers:
            raise bad_request(
                f"size '{request.size}' ({tier}) needs an input_reference image on model '{model}'; "
                f"supported without one: {text_sizes}.",
                param="size",
                code="unsupported_value",
            )
        allowed = limits.durations[tier]
        if request.native_seconds not in allowed:
            fitting = [TIERS[t][0] for t, d in limits.durations.items() if request.native_seconds in d]
            raise bad_request(
                f"size '{request.size}' ({tier}) and seconds '{request.seconds}' cannot be combined on "
                f"model '{model}': at {tier} it makes {' or '.join(map(str, allowed))}-second videos; "
                f"{request.seconds} seconds needs size {' or '.join(fitting)}.",
                param="seconds",
                code="unsupported_value",
            )

    async def retrieve(self, call: Call, task: Task) -> UpstreamVideo:
        answer = await self._query(call, task.upstream_id)
        code, message = _base_resp(answer)
        status = str(answer.get("status") or "").lower()
        if code in SENSITIVE:
            error = {
                "code": "content_filter",
                "message": message or "MiniMax's moderation blocked the video.",
            }
            return UpstreamVideo(task.upstream_id, {"status": "failed", "error": error})
        if status == "fail":
            text = message if code else "MiniMax could not generate this video."
            error = {"code": "generation_failed", "message": text}
            return UpstreamVideo(task.upstream_id, {"status": "failed", "error": error})
        if code:
            raise self._counted(call, refusal(code, message))
        fields: dict[str, Any] = {"status": status}
        state: dict[str, Any] = {}
        if status == "processing":
            since = task.state.get("processing_since")
            if not isinstance(since, int | float):
                since = state["processing_since"] = time.time()
            spec = self.models.get(str(task.state.get("upstream_model")))
            fields["progress"] = synthetic_progress(since, spec.expected_seconds if spec else 180.0)
        elif status == "success":
            if answer.get("file_id"):
                state["file_id"] = str(answer["file_id"])
            width, height = field_int(answer.get("video_width")), field_int(answer.get("video_height"))
            if task.state.get("image_to_video") and width and height:
                fields["size"] = f"{width}x{height}"
        return UpstreamVideo(task.upstream_id, fields, state)

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        """A fresh signed URL from files/retrieve on every download; MiniMax's expire within hours."""
        if variant != "video":
            raise not_offered(variant, self.kind)
        file_id = await self._file_id(call, task)
        if file_id is None:
            raise expired_result()
        answer = await self._api(
            call, "GET", "/v1/files/retrieve", params={"file_id": file_id, **self._group()}
        )
        code, message = _base_resp(answer)
        if code in SERVER_SIDE:
            raise self._counted(call, refusal(code, message))
        file = answer.get("file")
        url = file.get("download_url") if isinstance(file, dict) else None
        if code or not isinstance(url, str) or not url:
            raise expired_result()
        return await self.stream_result(call, url)

    async def delete(self, call: Call, task: Task) -> None:
        """MiniMax cannot cancel a task; a finished video's file is deleted there."""
        file_id = await self._file_id(call, task)
        if file_id is not None:
            body = {"file_id": field_int(file_id) or file_id, "purpose": "video_generation"}
            await self._api(call, "POST", "/v1/files/delete", params=self._group(), json_body=body)

    async def _file_id(self, call: Call, task: Task) -> str | None:
        """The result's file_id: remembered once the task succeeded, else asked for."""
        known = task.state.get("file_id")
        if isinstance(known, str) and known:
            return known
        answer = await self._query(call, task.upstream_id)
        file_id = answer.get("file_id")
        if _base_resp(answer)[0] or str(answer.get("status")).lower() != "success" or not file_id:
            return None
        return str(file_id)

    def _group(self) -> dict[str, str]:
        group = self.config.options.get("group_id")
        return {"GroupId": str(group)} if group else {}

    async def _query(self, call: Call, task_id: str) -> dict[str, Any]:
        return await self._api(call, "GET", "/v1/query/video_generation", params={"task_id": task_id})

    async def _api(
        self,
        call: Call,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
    ) -> dict[str, Any]:
        """One MiniMax call. Refusals of the call itself (rate limit, key, balance) are raised here on
        every endpoint; other codes stay in ``base_resp`` for the caller to judge."""
        url = URL(f"{self.base_url}{path}").with_query(params or {})
        headers = self.upstream_headers(call, forward_client=False)
        headers["Accept"] = "application/json"
        headers["Accept-Encoding"] = "identity"
        data = None
        if json_body is not None:
            data = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        async with self.send(call, method, str(url), headers=headers, data=data) as response:
            answer = await self.read_json(response)
            retry_after = response.headers.get("Retry-After")
        if not isinstance(answer, dict):
            self.count_error("payload")
            raise UpstreamError(502, "Upstream error: MiniMax's answer is not a JSON object.", kind="payload")
        code, message = _base_resp(answer)
        if code in RATE_LIMITED or code in BAD_KEY or code == NO_BALANCE:
            raise self._counted(call, refusal(code, message, retry_after))
        return answer

    def _counted(self, call: Call, error: UpstreamError) -> UpstreamError:
        """An error that came in an HTTP 200, counted as ``send`` counts HTTP errors."""
        self.count_error(error.kind)
        call.upstream_error = error.kind
        if error.kind == "5xx":
            call.outcome("5xx")
        return error

    def provider_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
        """An HTTP 4xx that carries ``base_resp`` is mapped by its code; anything else as usual."""
        try:
            parsed = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            parsed = None
        if status < 500 and isinstance(parsed, dict):
            code, message = _base_resp(parsed)
            if code:
                return refusal(code, message, headers.get("Retry-After"), http_status=status)
        return super().provider_error(status, headers, raw)
