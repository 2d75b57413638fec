"""Kling (Kuaishou) video API, ``https://api-singapore.klingai.com`` (``api-beijing`` for mainland keys).

Wire format (provider reference §e: Kling "General Information" page with its error-code table,
new-api ``relay/channel/task/kling``):

- auth: a JWT (HS256) per request, ``{iss: AccessKey, exp: now+1800, nbf: now-5}`` signed with the
  SecretKey, sent as ``Authorization: Bearer <jwt>``. It is built with the standard library (base64url
  JSON + HMAC-SHA256, RFC 7519 §3) rather than PyJWT: a dozen lines, no new dependency. One token
  serves every request for 25 minutes, then a new one is signed;
- ``POST /v1/videos/text2video`` or ``/v1/videos/image2video`` with ``{model_name, prompt,
  negative_prompt?, cfg_scale?, mode?: "std"|"pro", duration: "5"|"10" (a string), aspect_ratio
  (text-to-video only: image-to-video follows the image), image (raw base64 without a ``data:``
  prefix, or an URL)}``, answered ``{code: 0, message, request_id, data: {task_id, task_status:
  "submitted", created_at (ms)}}``;
- ``GET /v1/videos/{text2video|image2video}/{task_id}``: the path depends on the create endpoint,
  kept in the task's state; ``data.task_status`` is ``submitted | processing | succeed | failed``
  (+ ``task_status_msg``), no progress is reported (synthesised while processing);
  ``data.task_result.videos[0].url`` is kept 30 days and fetched again for every download;
- there is no cancel or delete: deleting a video only makes the gateway forget it;
- errors: ``{code, message, request_id}`` with an HTTP status, and a non-zero ``code`` in an HTTP 200
  is a refusal too. The code decides, not the status: Kling answers HTTP 429 both for rate limits
  (1302, 1303: retry later) and for arrears or a used-up resource pack (1101, 1102: retrying cannot
  help, so those become 402 ``insufficient_quota``).

``size`` names the aspect ratio: 1280x720 → 16:9, 720x1280 → 9:16, 720x720 → 1:1 (the 720p ``std``
tier; ``mode: "pro"`` renders the same ratio at 1080p). With an ``input_reference`` the video takes
the image's ratio, so no ``aspect_ratio`` is sent, but ``size`` is still checked against the model.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.bodies import RequestBody
from gateway.errors import ApiError, UpstreamError, bad_request
from gateway.providers.base import Call, UpstreamVideo, auth_rejected, json_or_none, path_segment
from gateway.providers.native import (
    CreateRequest,
    ModelSpec,
    NativeAdapter,
    expired_result,
    field_int,
    not_offered,
    out_of_quota,
    rate_limited,
    refused,
    synthetic_progress,
    upstream_failed,
)
from gateway.store import Task

TOKEN_LIFETIME = 1800
TOKEN_REUSE = 25 * 60  # a new token well before the old one's exp
MAX_PROMPT = 2500
MAX_IMAGE = 10 * 1024 * 1024
IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg")
RESULT_LIFETIME = 30 * 86400
RETRY_AFTER_SECONDS = "5"  # Kling documents no Retry-After of its own
ENDPOINTS = ("text2video", "image2video")

# Service codes (Kling "General Information" error table).
AUTH_FAILED = range(1000, 1005)  # 1003 not yet valid, 1004 expired
ACCOUNT_ABNORMAL = 1100
NO_BALANCE = frozenset({1101, 1102})  # arrears (postpaid), resource pack used up or expired
NO_PERMISSION = 1103
NOT_FOUND = 1203  # a model, or a task Kling no longer has
POLICY = 1300
CONTENT_FILTER = 1301
RATE_LIMITED = frozenset({1302, 1303})
IP_ALLOWLIST = 1304
SERVER_UNAVAILABLE = frozenset({5001, 5002})  # maintenance, backlog

# Words of a ``task_status_msg`` that tell a moderation refusal from any other failure.
_MODERATION_WORDS = ("risk", "content security", "sensitive", "policy", "风控", "安全")

RATIOS = {"1280x720": "16:9", "720x1280": "9:16", "720x720": "1:1"}
DURATIONS = {"5": "5", "10": "10"}
_EXTRAS = frozenset({"negative_prompt", "mode"})


def _spec(expected: float, extras: frozenset[str] = _EXTRAS) -> ModelSpec:
    return ModelSpec(
        sizes=RATIOS,
        seconds=DURATIONS,
        default_size="1280x720",
        default_seconds="5",
        extra_params=extras,
        expected_seconds=expected,
    )


# cfg_scale is a v1 setting: Kling's parameter table says the 2.x models do not support it.
MODELS = {
    "kling-v1": _spec(240, _EXTRAS | {"cfg_scale"}),
    "kling-v1-6": _spec(240, _EXTRAS | {"cfg_scale"}),
    "kling-v2-master": _spec(300),
    "kling-v2-1-master": _spec(300),
    "kling-v2-5-turbo": _spec(120),
    "kling-v2-6": _spec(180, _EXTRAS | {"sound"}),
}


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64url_json(value: Mapping[str, Any]) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


def sign_jwt(access_key: str, secret_key: str, now: float) -> str:
    """Kling's API token: an HS256 JWT naming the access key, valid from 5 s ago for 30 minutes."""
    issued = int(now)
    signing_input = (
        _b64url_json({"alg": "HS256", "typ": "JWT"})
        + "."
        + _b64url_json({"iss": access_key, "exp": issued + TOKEN_LIFETIME, "nbf": issued - 5})
    )
    signature = hmac.new(secret_key.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64url(signature)}"


def refusal(
    code: int, message: str, *, http_status: int, retry_after: str | None = None
) -> UpstreamError | None:
    """A Kling service code as our envelope, Kling's message kept; None for a code not listed here."""
    text = f"Kling: {message or 'error'} (code {code})."
    retry_after = retry_after or RETRY_AFTER_SECONDS
    if code in RATE_LIMITED:
        return rate_limited(text, upstream_status=http_status, retry_after=retry_after)
    if code in AUTH_FAILED:
        return auth_rejected(
            "Kling",
            text,
            upstream_status=http_status,
            credential="credentials (options.access_key / api_key)",
        )
    if code in NO_BALANCE:
        return out_of_quota(text, upstream_status=http_status)
    if code == ACCOUNT_ABNORMAL:
        return refused(
            403, text, code="account_unavailable", upstream_status=http_status, type="insufficient_quota"
        )
    if code in (NO_PERMISSION, IP_ALLOWLIST):
        return refused(
            403, text, code="permission_denied", upstream_status=http_status, type="permission_error"
        )
    if code == NOT_FOUND:
        return refused(404, text, code="upstream_not_found", upstream_status=http_status)
    if code == CONTENT_FILTER:
        return refused(400, text, code="content_filter", upstream_status=http_status)
    if code == POLICY:
        return refused(400, text, code="policy_violation", upstream_status=http_status)
    if code in (1200, 1201):
        return refused(400, text, code="invalid_value", upstream_status=http_status)
    if code in SERVER_UNAVAILABLE:
        return upstream_failed(
            f"Upstream error: {text}",
            upstream_status=http_status,
            status=503,
            code="upstream_unavailable",
            retry_after=retry_after,
        )
    if code == 5000 or code == 1202:
        return upstream_failed(f"Upstream error: {text}", upstream_status=http_status)
    return None


def _envelope(raw: bytes) -> tuple[int, str] | None:
    parsed = json_or_none(raw)
    if not isinstance(parsed, dict) or field_int(parsed.get("code")) is None:
        return None
    return int(parsed["code"]), str(parsed.get("message") or "")


class KlingAdapter(NativeAdapter):
    """Secrets: the SecretKey is ``api_key`` (write it as ``${ENV}``); the AccessKey, which every
    token carries in clear as ``iss``, is ``options.access_key``."""

    kind = "kling"
    default_base_url = "https://api-singapore.klingai.com"
    required_fields = ("api_key", "options")
    # videos[].url: cdn.klingai.com / p*-kling.klingai.com and v*-kling.kechuangai.com.
    default_result_hosts = (".klingai.com", ".kechuangai.com")
    models = MODELS
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["access_key"],
        "properties": {
            "access_key": {
                "type": "string",
                "minLength": 1,
                "description": "Kling AccessKey, the JWT's iss; the SecretKey goes in api_key (${ENV})",
            }
        },
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._token: str | None = None
        self._token_signed_at = 0.0

    def token(self, now: float | None = None) -> str:
        """The current API token, signed again once it is 25 minutes old (it lives 30)."""
        now = time.time() if now is None else now
        if self._token is None or not 0 <= now - self._token_signed_at < TOKEN_REUSE:
            assert self.config.api_key is not None, "the config schema requires api_key for kling"
            self._token = sign_jwt(str(self.config.options["access_key"]), self.config.api_key, now)
            self._token_signed_at = now
        return self._token

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo:
        request = await self.parse_create(call, body)
        self._check(request)
        payload: dict[str, Any] = {
            "model_name": call.deployment.upstream_model,
            "prompt": request.prompt,
            "duration": request.native_seconds,
            **request.extras,
        }
        endpoint = "text2video"
        if request.image is None:
            payload["aspect_ratio"] = request.native_size
        else:
            endpoint = "image2video"
            payload["image"] = request.image.url if request.image.data is None else request.image.base64()
        data = await self._api(call, "POST", f"/v1/videos/{endpoint}", json_body=payload)
        task_id = data.get("task_id")
        if isinstance(task_id, bool) or not isinstance(task_id, str | int) or not str(task_id):
            raise UpstreamError(502, "Upstream error: Kling's answer has no task_id.", kind="payload")
        fields = {"status": str(data.get("task_status") or "submitted").lower(), "progress": 0}
        return UpstreamVideo(str(task_id), {**fields, **request.seed()}, {"endpoint": endpoint})

    @staticmethod
    def _check(request: CreateRequest) -> None:
        """What Kling documents and ModelSpec cannot say, refused here with the parameter named."""
        if len(request.prompt) > MAX_PROMPT:
            raise bad_request(f"Kling takes prompts up to {MAX_PROMPT} characters.", param="prompt")
        extras = request.extras
        if "mode" in extras and extras["mode"] not in ("std", "pro"):
            raise bad_request("mode must be 'std' or 'pro'.", param="mode", code="unsupported_value")
        if "sound" in extras and extras["sound"] not in ("on", "off"):
            raise bad_request("sound must be 'on' or 'off'.", param="sound", code="unsupported_value")
        cfg = extras.get("cfg_scale")
        if "cfg_scale" in extras and (
            isinstance(cfg, bool) or not isinstance(cfg, int | float) or not 0 <= cfg <= 1
        ):
            raise bad_request("cfg_scale must be a number from 0 to 1.", param="cfg_scale")
        negative = extras.get("negative_prompt")
        if "negative_prompt" in extras and (not isinstance(negative, str) or len(negative) > MAX_PROMPT):
            raise bad_request(
                f"negative_prompt must be text of up to {MAX_PROMPT} characters.", param="negative_prompt"
            )
        image = request.image
        if image is None or image.data is None:
            return
        if len(image.data) > MAX_IMAGE:
            raise ApiError(
                413,
                "Kling takes input_reference images up to 10 MiB.",
                param="input_reference",
                code="request_too_large",
            )
        if image.mime not in IMAGE_TYPES:
            raise bad_request(
                f"Kling takes JPEG or PNG input_reference images, not {image.mime}.",
                param="input_reference",
                code="unsupported_value",
            )

    async def retrieve(self, call: Call, task: Task) -> UpstreamVideo:
        data = await self._query(call, task)
        status = str(data.get("task_status") or "").lower()
        fields: dict[str, Any] = {"status": status}
        if status == "processing":
            spec = self.models.get(str(task.state.get("upstream_model")))
            fields["progress"] = synthetic_progress(task.created_at, spec.expected_seconds if spec else 240.0)
        elif status == "succeed":
            created_ms = field_int(data.get("created_at"))
            created = created_ms // 1000 if created_ms else task.created_at
            fields["expires_at"] = created + RESULT_LIFETIME
        elif status == "failed":
            message = str(data.get("task_status_msg") or "") or "Kling could not generate this video."
            moderated = any(word in message.lower() for word in _MODERATION_WORDS)
            fields["error"] = {
                "code": "content_filter" if moderated else "generation_failed",
                "message": message,
            }
        return UpstreamVideo(task.upstream_id, fields)

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        if variant != "video":
            raise not_offered(variant, self.kind)
        try:
            data = await self._query(call, task)
        except UpstreamError as exc:
            if exc.code == "upstream_not_found":
                raise expired_result() from None
            raise
        result = data.get("task_result")
        videos = result.get("videos") if isinstance(result, dict) else None
        first = videos[0] if isinstance(videos, list) and videos and isinstance(videos[0], dict) else {}
        url = first.get("url")
        if not isinstance(url, str) or not url:
            raise expired_result()
        return await self.stream_result(call, url)

    async def _query(self, call: Call, task: Task) -> dict[str, Any]:
        endpoint = task.state.get("endpoint")
        if endpoint not in ENDPOINTS:
            endpoint = "text2video"
        return await self._api(call, "GET", f"/v1/videos/{endpoint}/{path_segment(task.upstream_id)}")

    async def _api(self, call: Call, method: str, path: str, *, json_body: Any = None) -> dict[str, Any]:
        """One Kling call: ``data`` of a ``code: 0`` answer; any other code raised as its error."""
        answer = await self.call_json(call, method, f"{self.base_url}{path}", json_body=json_body)
        if not isinstance(answer, dict):
            raise UpstreamError(502, "Upstream error: Kling's answer is not a JSON object.", kind="payload")
        code = field_int(answer.get("code"))
        if code:
            message = str(answer.get("message") or "")
            error = self._refused(code, message, 200, None) or upstream_failed(
                f"Upstream error: Kling: {message or 'error'} (code {code}).", upstream_status=None
            )
            raise self.error_in_answer(call, error)
        data = answer.get("data")
        if not isinstance(data, dict):
            raise UpstreamError(502, "Upstream error: Kling's answer has no data.", kind="payload")
        return data

    def _refused(self, code: int, message: str, status: int, retry_after: str | None) -> UpstreamError | None:
        if code in AUTH_FAILED:
            self._token = None  # a clock jump or a revoked key: sign afresh next time
        return refusal(code, message, http_status=status, retry_after=retry_after)

    def provider_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
        """Kling's envelope is judged by its ``code``; anything else (a proxy's page) as usual."""
        envelope = _envelope(raw)
        known = None if envelope is None else self._refused(*envelope, status, headers.get("Retry-After"))
        return known or super().provider_error(status, headers, raw)
