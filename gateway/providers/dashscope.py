"""Alibaba Wan (通义万相) video generation on DashScope / Model Studio.

Hosts (keys are region-bound; a key from one region fails on another): Singapore
``https://dashscope-intl.aliyuncs.com`` (the default), Beijing ``https://dashscope.aliyuncs.com``,
Virginia ``https://dashscope-us.aliyuncs.com``, or a workspace host such as
``https://{WorkspaceId}.ap-southeast-1.maas.aliyuncs.com``: set it as ``base_url``.

Wire format (provider reference §i: Model Studio text-to-video and image-to-video API references,
dashscope-sdk-python ``aigc/video_synthesis.py``, ``client/base_api.py`` and ``common/constants.py``,
new-api ``task/ali``):

- ``Authorization: Bearer <key>``; creating also needs ``X-DashScope-Async: enable`` (without it
  DashScope answers "current user api does not support synchronous calls");
- ``POST /api/v1/services/aigc/video-generation/video-synthesis`` with ``{model, input: {prompt,
  negative_prompt?, img_url?}, parameters: {size | resolution, duration, prompt_extend?, watermark?,
  seed?}}``, answered ``{request_id, output: {task_id, task_status: "PENDING"}}``. Text-to-video
  models take ``size`` as ``"W*H"`` (asterisk) from the model's table; image-to-video models take a
  ``resolution`` tier (``480P | 720P | 1080P``) and keep the image's aspect ratio, so for them
  ``size`` only picks the tier. ``img_url`` is a public URL or a ``data:`` URI (≤ 10 MB image);
- ``GET /api/v1/tasks/{task_id}`` → ``{request_id, output: {task_id, task_status: PENDING |
  SUSPENDED | RUNNING | SUCCEEDED | FAILED | CANCELED | UNKNOWN, video_url, code, message,
  submit_time, end_time}, usage}``. Task ids live 24 h; UNKNOWN means not found or expired: expired
  once the task is that old, else taken as the 404 of a task not found (the gateway decides when such
  a task is lost, not one answer). There is no progress, so it is synthesised while running;
- ``POST /api/v1/tasks/{task_id}/cancel`` cancels a PENDING task; DashScope refuses it otherwise;
- ``output.video_url`` is a signed OSS URL (``Expires=<unix time>``, about 24 h); the task is fetched
  again for every download and a gone result is 410;
- errors are HTTP 4xx/5xx with ``{request_id, code, message}``: ``Throttling*`` (429) → 429 with
  Retry-After, ``InvalidApiKey`` → 401, ``Arrearage`` → 402, ``DataInspectionFailed`` →
  ``content_filter`` (at create and as a task failure).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from gateway.bodies import RequestBody
from gateway.errors import ApiError, UpstreamError
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

CREATE = "/api/v1/services/aigc/video-generation/video-synthesis"
TASKS = "/api/v1/tasks"
MAX_IMAGE = 10 * 1024 * 1024
TASK_LIFETIME_SECONDS = 24 * 3600
RETRY_AFTER_SECONDS = "5"  # DashScope limits submissions per second and sends no Retry-After

# Pixel sizes per resolution tier, as the text-to-video reference lists them ("W*H").
TIERS = {
    "480P": ("832*480", "480*832", "624*624"),
    "720P": ("1280*720", "720*1280", "960*960", "1088*832", "832*1088"),
    "1080P": ("1920*1080", "1080*1920", "1440*1440", "1632*1248", "1248*1632"),
}

# Task failure codes that mean the input or output was refused by content moderation.
FILTERED = frozenset({"DataInspectionFailed", "IPInfringementSuspect"})

_EXTRAS = frozenset({"negative_prompt", "prompt_extend", "seed", "watermark"})
_INPUT_EXTRAS = frozenset({"negative_prompt"})


def _t2v_sizes(*tiers: str) -> dict[str, dict[str, str]]:
    return {size.replace("*", "x"): {"size": size} for tier in tiers for size in TIERS[tier]}


def _i2v_sizes(*tiers: str) -> dict[str, dict[str, str]]:
    """Every pixel size of a tier names that tier: the image decides the aspect ratio."""
    return {size.replace("*", "x"): {"resolution": tier} for tier in tiers for size in TIERS[tier]}


def _t2v(*tiers: str, seconds: tuple[int, ...] = (5,), default: str, expected: float) -> ModelSpec:
    return ModelSpec(
        sizes=_t2v_sizes(*tiers),
        seconds=durations(*seconds),
        default_size=default,
        default_seconds="5",
        image_input=False,
        extra_params=_EXTRAS,
        expected_seconds=expected,
    )


def _i2v(*tiers: str, seconds: tuple[int, ...] = (5,), default: str, expected: float) -> ModelSpec:
    return ModelSpec(
        sizes=_i2v_sizes(*tiers),
        seconds=durations(*seconds),
        default_size=default,
        default_seconds="5",
        text_input=False,
        extra_params=_EXTRAS,
        expected_seconds=expected,
    )


# Tiers, durations and defaults per model: the Model Studio model tables (help.aliyun.com
# text-to-video / image-to-video API references).
_T2V_TURBO = _t2v("480P", "720P", default="1280x720", expected=120)
_T2V_PLUS = _t2v("720P", default="1280x720", expected=300)
_I2V_TURBO = _i2v("480P", "720P", seconds=(3, 4, 5), default="1280x720", expected=120)
_I2V_PLUS = _i2v("720P", default="1280x720", expected=300)

MODELS = {
    "wan2.1-t2v-turbo": _T2V_TURBO,
    "wan2.1-t2v-plus": _T2V_PLUS,
    "wan2.2-t2v-plus": _t2v("480P", "1080P", default="1920x1080", expected=240),
    "wan2.5-t2v-preview": _t2v("480P", "720P", "1080P", seconds=(5, 10), default="1920x1080", expected=300),
    "wan2.1-i2v-turbo": _I2V_TURBO,
    "wan2.1-i2v-plus": _I2V_PLUS,
    "wan2.2-i2v-plus": _i2v("480P", "1080P", default="1920x1080", expected=240),
    "wan2.5-i2v-preview": _i2v("480P", "720P", "1080P", seconds=(5, 10), default="1920x1080", expected=300),
    # The Beijing region's names for the 2.1 models.
    "wanx2.1-t2v-turbo": _T2V_TURBO,
    "wanx2.1-t2v-plus": _T2V_PLUS,
    "wanx2.1-i2v-turbo": _I2V_TURBO,
    "wanx2.1-i2v-plus": _I2V_PLUS,
}


def _oss_expiry(url: str) -> int | None:
    """When a signed OSS URL stops working: its ``Expires`` query parameter (unix time)."""
    parts = split_url(url)
    values = parse_qs(parts.query).get("Expires") if parts is not None else None
    return field_int(values[0]) if values else None


class DashScopeAdapter(NativeAdapter):
    kind = "dashscope"
    default_base_url = "https://dashscope-intl.aliyuncs.com"
    required_fields = ("api_key",)
    # video_url points at DashScope's result buckets: the regions of Alibaba's own list of them (for
    # firewalls, "OSS域名列表" in the Model Studio API references; Beijing's Wan videos come from
    # dashscope-result-wlcb-acdr-1.oss-cn-wulanchabu-acdr-1), its accelerated endpoints, and the
    # Singapore and Virginia regions, assumed to serve theirs the same way.
    default_result_hosts = (
        ".oss-accelerate.aliyuncs.com",
        ".oss-accelerate-overseas.aliyuncs.com",
        ".oss-cn-beijing.aliyuncs.com",
        ".oss-cn-hangzhou.aliyuncs.com",
        ".oss-cn-shanghai.aliyuncs.com",
        ".oss-cn-wulanchabu.aliyuncs.com",
        ".oss-cn-wulanchabu-acdr-1.aliyuncs.com",
        ".oss-cn-zhangjiakou.aliyuncs.com",
        ".oss-cn-shenzhen.aliyuncs.com",
        ".oss-cn-heyuan.aliyuncs.com",
        ".oss-cn-chengdu.aliyuncs.com",
        ".oss-cn-guangzhou.aliyuncs.com",
        ".oss-ap-southeast-1.aliyuncs.com",
        ".oss-us-east-1.aliyuncs.com",
    )
    models = MODELS
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "workspace": {
                "type": "string",
                "minLength": 1,
                "description": "Model Studio workspace ID, sent as X-DashScope-WorkSpace (for keys of a "
                "sub-workspace)",
            }
        },
    }

    def auth_headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.config.api_key}"}
        if self.config.options.get("workspace"):
            headers["X-DashScope-WorkSpace"] = str(self.config.options["workspace"])
        return headers

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo:
        request = await self.parse_create(call, body)
        payload = self._payload(call.deployment.upstream_model, request)
        with model_must_exist("DashScope", call.deployment.upstream_model):
            answer = await self.call_json(
                call,
                "POST",
                self.base_url + CREATE,
                json_body=payload,
                headers={"X-DashScope-Async": "enable"},
            )
        output = answer.get("output") if isinstance(answer, dict) else None
        if (
            not isinstance(output, dict)
            or not isinstance(output.get("task_id"), str)
            or not output["task_id"]
        ):
            raise self._refusal_in_answer(call, answer, "DashScope's answer has no task id.")
        fields: dict[str, Any] = {"status": "queued", "progress": 0, **request.seed()}
        return UpstreamVideo(output["task_id"], fields)

    @staticmethod
    def _payload(upstream_model: str, request: CreateRequest) -> dict[str, Any]:
        inputs: dict[str, Any] = {"prompt": request.prompt}
        parameters: dict[str, Any] = {**request.native_size, "duration": request.native_seconds}
        for name, value in request.extras.items():
            (inputs if name in _INPUT_EXTRAS else parameters)[name] = value
        image = request.image
        if image is not None:
            if image.data is not None and len(image.data) > MAX_IMAGE:
                raise ApiError(
                    413,
                    f"DashScope takes input_reference images up to {MAX_IMAGE >> 20} MiB.",
                    param="input_reference",
                    code="request_too_large",
                )
            inputs["img_url"] = image.data_uri()
        return {"model": upstream_model, "input": inputs, "parameters": parameters}

    async def _task(self, call: Call, task_id: str) -> dict[str, Any]:
        answer = await self.call_json(call, "GET", f"{self.base_url}{TASKS}/{path_segment(task_id)}")
        output = answer.get("output") if isinstance(answer, dict) else None
        if not isinstance(output, dict) or "task_status" not in output:
            raise self._refusal_in_answer(call, answer, "DashScope's task answer has no task_status.")
        return output

    async def retrieve(self, call: Call, task: Task) -> UpstreamVideo:
        output = await self._task(call, task.upstream_id)
        status = str(output["task_status"]).lower()
        fields: dict[str, Any] = {"status": status}
        if status in ("pending", "suspended"):
            fields["progress"] = 0
        elif status == "succeeded":
            url = output.get("video_url")
            expires = _oss_expiry(url) if isinstance(url, str) else None
            if expires is not None:
                fields["expires_at"] = expires
        elif status == "unknown" and time.time() - task.created_at < TASK_LIFETIME_SECONDS:
            text = "DashScope does not know this task (UNKNOWN)."
            raise self.error_in_answer(call, refused(404, text, code=None, upstream_status=404))
        elif status in ("failed", "canceled", "unknown"):
            fields.update(self._failure(status, output))
        else:
            # RUNNING, or a word this adapter does not know: never end a job on a guess.
            fields["status"] = "in_progress"
            expected = self.spec(task.state["upstream_model"]).expected_seconds
            fields["progress"] = synthetic_progress(task.created_at, expected)
        return UpstreamVideo(task.upstream_id, fields)

    @staticmethod
    def _failure(status: str, output: dict[str, Any]) -> dict[str, Any]:
        code = str(output.get("code") or "")
        message = str(output.get("message") or "")
        if status == "unknown":
            error = {
                "code": "expired",
                "message": "DashScope no longer knows this task: task ids expire after 24 hours.",
            }
            return {"status": "expired", "error": error}
        if status == "canceled":
            return {
                "error": {"code": "cancelled", "message": message or "The task was cancelled at DashScope."}
            }
        if code in FILTERED:
            text = message or "DashScope's content moderation refused the input or output."
            return {"error": {"code": "content_filter", "message": f"{text} ({code})"}}
        return {
            "error": {
                "code": code or "generation_failed",
                "message": message or "DashScope could not generate this video.",
            }
        }

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        if variant != "video":
            raise not_offered(variant, self.kind)
        with expired_if_gone():
            output = await self._task(call, task.upstream_id)
        url = output.get("video_url")
        if str(output["task_status"]).upper() != "SUCCEEDED" or not isinstance(url, str) or not url:
            raise expired_result()
        return await self.stream_result(call, url)

    async def delete(self, call: Call, task: Task) -> None:
        # Only PENDING tasks can be cancelled; a running or finished one is left to expire at
        # DashScope after 24 hours, and the gateway forgets it either way.
        with ignore_refusals(400, 403, 404, 409):
            await self.call_json(
                call, "POST", f"{self.base_url}{TASKS}/{path_segment(task.upstream_id)}/cancel"
            )

    def _refusal_in_answer(self, call: Call, answer: Any, missing: str) -> ApiError:
        """An HTTP-200 answer without what it should carry: its ``code`` if it has one, else a 502."""
        if isinstance(answer, dict) and answer.get("code"):
            return self.error_in_answer(call, self._refusal(400, {}, answer))
        return UpstreamError(502, f"Upstream error: {missing}", kind="payload")

    def provider_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
        parsed = json_or_none(raw)
        if not isinstance(parsed, dict) or not parsed.get("code") or status >= 500:
            return super().provider_error(status, headers, raw)
        return self._refusal(status, headers, parsed)

    @staticmethod
    def _refusal(status: int, headers: Mapping[str, str], error: dict[str, Any]) -> UpstreamError:
        code = str(error.get("code") or "")
        text = f"DashScope: {error.get('message') or f'HTTP {status}'} ({code})"
        if status == 429 or code.startswith("Throttling"):
            retry_after = headers.get("Retry-After") or RETRY_AFTER_SECONDS
            return rate_limited(text, upstream_status=status, retry_after=retry_after)
        if status == 401 or code == "InvalidApiKey":
            return auth_rejected("DashScope", text, upstream_status=status)
        if code == "Arrearage":
            return out_of_quota(text, upstream_status=status)
        if "model not exist" in str(error.get("message") or "").lower():  # a create's routed model
            return refused(404, text, code=None, upstream_status=404)  # makes it model_must_exist's
        if code in FILTERED:
            return refused(400, text, code="content_filter", upstream_status=status)
        if code.startswith(("InvalidParameter", "BadRequest", "InvalidURL")):
            return refused(400, text, code="invalid_value", upstream_status=status)
        return refused(status, text, code=code or None, upstream_status=status)
