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

import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.bodies import RequestBody
from gateway.errors import ApiError, UpstreamError, bad_request, expired_result
from gateway.providers.base import Call, UpstreamVideo, auth_rejected, json_or_none
from gateway.providers.native import (
    ModelSpec,
    NativeAdapter,
    Tier,
    durations,
    field_int,
    not_offered,
    out_of_quota,
    rate_limited,
    refused,
    synthetic_progress,
    upstream_failed,
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

_EXTRAS = frozenset({"prompt_optimizer", "aigc_watermark"})
_HAILUO_EXTRAS = _EXTRAS | {"fast_pretreatment"}


def _spec(
    by_tier: Mapping[str, tuple[int, ...]],
    *,
    text: bool,
    image: bool,
    expected: float,
    extras: frozenset[str] = _EXTRAS,
    image_only_tiers: frozenset[str] = frozenset(),
) -> ModelSpec:
    """A model from its durations per resolution tier. Text-to-video is landscape only and has no
    ``image_only_tiers``; with an image the portrait forms mean the same tier."""
    sizes = {size: tier for tier in by_tier for size in (TIERS[tier] if image else TIERS[tier][:1])}
    image_only = {TIERS[tier][1] for tier in by_tier} | {s for t in image_only_tiers for s in TIERS[t]}
    seconds = sorted({s for allowed in by_tier.values() for s in allowed})
    default_tier = "768P" if "768P" in by_tier else "720P"
    return ModelSpec(
        sizes=sizes,
        seconds=durations(*seconds),
        default_size=TIERS[default_tier][0],
        default_seconds="6",
        text_input=text,
        image_input=image,
        extra_params=extras,
        expected_seconds=expected,
        tiers=tuple(
            Tier(tier, frozenset(s for s in sizes if sizes[s] == tier), frozenset(map(str, allowed)))
            for tier, allowed in by_tier.items()
        ),
        image_only_sizes=frozenset(image_only) if image else frozenset(),
    )


_HAILUO_23 = {"768P": (6, 10), "1080P": (6,)}
_HAILUO_02 = {"512P": (6, 10), "768P": (6, 10), "1080P": (6,)}
_V01 = {"720P": (6,)}

MODELS = {
    "MiniMax-Hailuo-2.3": _spec(_HAILUO_23, text=True, image=True, expected=180, extras=_HAILUO_EXTRAS),
    "MiniMax-Hailuo-2.3-Fast": _spec(_HAILUO_23, text=False, image=True, expected=90, extras=_HAILUO_EXTRAS),
    "MiniMax-Hailuo-02": _spec(
        _HAILUO_02,
        text=True,
        image=True,
        expected=240,
        extras=_HAILUO_EXTRAS,
        image_only_tiers=frozenset({"512P"}),
    ),
    "T2V-01": _spec(_V01, text=True, image=False, expected=180),
    "T2V-01-Director": _spec(_V01, text=True, image=False, expected=180),
    "I2V-01": _spec(_V01, text=False, image=True, expected=180),
    "I2V-01-Director": _spec(_V01, text=False, image=True, expected=180),
    "I2V-01-live": _spec(_V01, text=False, image=True, expected=180),
}


def _base_resp(answer: dict[str, Any]) -> tuple[int, str]:
    base = answer.get("base_resp")
    if not isinstance(base, dict):
        return 0, ""
    return field_int(base.get("status_code")) or 0, str(base.get("status_msg") or "")


def refusal(code: int, message: str, retry_after: str | None = None, http_status: int = 200) -> UpstreamError:
    """A non-zero ``base_resp.status_code`` as our envelope, MiniMax's message kept."""
    text = f"MiniMax: {message or 'error'} (status_code {code})."
    if code in RATE_LIMITED:
        return rate_limited(text, upstream_status=http_status, retry_after=retry_after or RETRY_AFTER_SECONDS)
    if code in BAD_KEY:
        return auth_rejected("MiniMax", text, upstream_status=http_status)
    if code == NO_BALANCE:
        return out_of_quota(text, upstream_status=http_status)
    if code in SENSITIVE:
        return refused(400, text, code="content_filter", upstream_status=http_status)
    if code == INVALID_PARAMS:
        return refused(400, text, code="invalid_value", upstream_status=http_status)
    return upstream_failed(f"Upstream error: {text}", upstream_status=http_status)


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
            raise self.error_in_answer(call, refusal(code, message))
        task_id = answer.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise UpstreamError(502, "Upstream error: MiniMax's answer has no task_id.", kind="payload")
        return UpstreamVideo(task_id, {"status": "queued", "progress": 0, **request.seed()}, state)

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
        if code == INVALID_PARAMS:  # its one parameter is the task_id MiniMax gave: the task is gone
            raise self.error_in_answer(
                call, refused(404, f"MiniMax: {message}", code=None, upstream_status=404)
            )
        if code:
            raise self.error_in_answer(call, refusal(code, message))
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
            raise self.error_in_answer(call, refusal(code, message))
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
        answer, headers = await self.call_json_with_headers(
            call, method, f"{self.base_url}{path}", json_body=json_body, params=params
        )
        if not isinstance(answer, dict):
            raise UpstreamError(502, "Upstream error: MiniMax's answer is not a JSON object.", kind="payload")
        code, message = _base_resp(answer)
        if code in RATE_LIMITED or code in BAD_KEY or code == NO_BALANCE:
            raise self.error_in_answer(call, refusal(code, message, headers.get("Retry-After")))
        return answer

    def provider_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
        """An HTTP 4xx that carries ``base_resp`` is mapped by its code; anything else as usual."""
        parsed = json_or_none(raw)
        if status < 500 and isinstance(parsed, dict):
            code, message = _base_resp(parsed)
            if code:
                return refusal(code, message, headers.get("Retry-After"), http_status=status)
        return super().provider_error(status, headers, raw)
