"""Google Veo on the Gemini API (generativelanguage.googleapis.com), and what Vertex AI shares with it.

Wire format (provider reference §a1; googleapis/python-genai ``models.py``
``_GenerateVideosParameters_to_mldev``, ``_GenerateVideosConfig_to_mldev``,
``_GenerateVideosOperation_from_mldev``, ``operations.py``, ``files.py`` ``download``):

- ``x-goog-api-key: <key>``;
- ``POST /v1beta/models/{model}:predictLongRunning`` with ``{"instances": [{"prompt", "image"?:
  {"bytesBase64Encoded", "mimeType"}}], "parameters": {"aspectRatio": "16:9"|"9:16",
  "resolution": "720p"|"1080p", "durationSeconds": int, "negativePrompt"?, "personGeneration"?,
  "enhancePrompt"?}}``, answered ``{"name": "models/{model}/operations/{id}"}``. Images are inline
  base64 only: the Gemini API takes no image URLs, so an http(s) ``input_reference`` is refused;
- ``GET /v1beta/{operation name}`` → ``{name, done?, error?: {code, message}, response?:
  {"generateVideoResponse": {"generatedSamples": [{"video": {"uri"}}], "raiMediaFilteredCount",
  "raiMediaFilteredReasons"}}}``. There is no status word and no progress: ``done`` absent or false
  is ``in_progress`` (progress synthesised), ``error`` is ``failed`` with the RPC code's name, a
  finished operation without a video but with a filter count is ``content_filter``;
- the video ``uri`` (``/v1beta/files/{id}:download?alt=media``) needs the API key too: the gateway
  fetches it with the key (only on the API's own origin) and streams it; redirects to Google's
  file hosts are followed without the key. Generated videos are kept for 2 days;
- errors are Google RPC statuses ``{"error": {"code", "message", "status", "details"}}``:
  ``RESOURCE_EXHAUSTED`` (429) → 429 with Retry-After (from ``google.rpc.RetryInfo`` when given);
- there is no cancel or delete for Veo operations: delete only forgets the video.

:class:`VeoBase` holds what both Veo adapters share (sizes, durations, the request body, the
operation's status, Google's errors); ``gateway/providers/veo_vertex.py`` builds on it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import urljoin

from aiohttp import web

from gateway.bodies import RequestBody
from gateway.errors import ApiError, UpstreamError, bad_request
from gateway.providers.base import Call, UpstreamVideo, auth_rejected, error_from_upstream, json_or_none
from gateway.providers.native import (
    CreateRequest,
    ModelSpec,
    NativeAdapter,
    Tier,
    durations,
    expired_if_gone,
    expired_result,
    model_must_exist,
    not_offered,
    rate_limited,
    refused,
    same_origin,
    synthetic_progress,
)
from gateway.store import Task

RETRY_AFTER_SECONDS = "10"  # used when a 429 names no delay of its own
RESULT_LIFETIME = 2 * 24 * 3600  # "Generated videos are stored on the server for 2 days"

# google.rpc.Code numbers, as operation errors carry them (no "status" name there).
RPC_CODES = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    16: "UNAUTHENTICATED",
}


def veo_sizes(*resolutions: str) -> dict[str, dict[str, str]]:
    """OpenAI ``size`` → ``{aspectRatio, resolution}``; no resolution at all for ``"fixed"`` (Veo 2)."""
    pixels = {"720p": ("1280x720", "720x1280"), "1080p": ("1920x1080", "1080x1920")}
    sizes: dict[str, dict[str, str]] = {}
    for resolution in resolutions:
        landscape, portrait = pixels["720p" if resolution == "fixed" else resolution]
        tier = {} if resolution == "fixed" else {"resolution": resolution}
        sizes[landscape] = {"aspectRatio": "16:9", **tier}
        sizes[portrait] = {"aspectRatio": "9:16", **tier}
    return sizes


def veo_spec(
    sizes: dict[str, dict[str, str]], seconds: dict[str, int], extras: frozenset[str], expected: float
) -> ModelSpec:
    # Veo 3.x makes 1080p only as 8-second videos (Gemini API video docs, resolution parameter).
    full_hd = frozenset(size for size, native in sizes.items() if native.get("resolution") == "1080p")
    return ModelSpec(
        sizes=sizes,
        seconds=seconds,
        default_size="1280x720",
        default_seconds="8",
        extra_params=extras,
        expected_seconds=expected,
        tiers=(Tier("1080p", full_hd, frozenset({"8"})),) if full_hd else (),
    )


# The Gemini API refuses seed, generateAudio, fps, storageUri... (python-genai raises "not supported
# in Gemini API" for them); these pass through from the request body.
GEMINI_EXTRAS = frozenset({"negativePrompt", "personGeneration", "enhancePrompt"})

VEO_3 = veo_sizes("720p", "1080p")
VEO_2 = veo_sizes("fixed")  # Veo 2 makes 720p only and takes no resolution parameter

MODELS = {
    "veo-3.1-generate-preview": veo_spec(VEO_3, durations(4, 6, 8), GEMINI_EXTRAS, expected=100),
    "veo-3.1-fast-generate-preview": veo_spec(VEO_3, durations(4, 6, 8), GEMINI_EXTRAS, expected=60),
    "veo-3.0-generate-001": veo_spec(VEO_3, durations(4, 6, 8), GEMINI_EXTRAS, expected=100),
    "veo-3.0-fast-generate-001": veo_spec(VEO_3, durations(4, 6, 8), GEMINI_EXTRAS, expected=60),
    # Gemini API video docs: Veo 2 durationSeconds "5", "6", "8".
    "veo-2.0-generate-001": veo_spec(VEO_2, durations(5, 6, 8), GEMINI_EXTRAS, expected=90),
}

_GEMINI_OPERATION = re.compile(r"models/[A-Za-z0-9.\-]+/operations/[A-Za-z0-9_\-]+")


def rpc_status(error: Mapping[str, Any]) -> str | None:
    """The RPC status name of an error: its ``status``, else its numeric ``code`` by name."""
    status = error.get("status")
    if isinstance(status, str) and status:
        return status
    code = error.get("code")
    return RPC_CODES.get(code) if isinstance(code, int) else None


def _details(error: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The error's ``details`` entries that are objects, as ``google.rpc.Status`` has them."""
    details = error.get("details")
    return [d for d in details if isinstance(d, dict)] if isinstance(details, list) else []


def retry_after(headers: Mapping[str, str], error: Mapping[str, Any]) -> str:
    """Seconds to wait: the Retry-After header, else ``google.rpc.RetryInfo.retryDelay`` ("30s")."""
    if headers.get("Retry-After"):
        return headers["Retry-After"]
    for detail in _details(error):
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                return str(max(1, math.ceil(float(delay[:-1]))))
            except (ValueError, OverflowError):  # not a number, or "infs"
                continue
    return RETRY_AFTER_SECONDS


def google_error(status: int, headers: Mapping[str, str], raw: bytes, product: str) -> ApiError | None:
    """A Google RPC error answer as our envelope: its message kept, its status made meaningful;
    None for an answer in another shape (a front's page, say)."""
    parsed = json_or_none(raw)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return None
    rpc = rpc_status(error) or ""
    text = f"{product}: {error.get('message') or f'HTTP {status}'}" + (f" ({rpc})" if rpc else "")
    reasons = {d["reason"] for d in _details(error) if isinstance(d.get("reason"), str)}
    if status == 429 or rpc == "RESOURCE_EXHAUSTED":
        return rate_limited(text, upstream_status=status, retry_after=retry_after(headers, error))
    if status >= 500:
        return error_from_upstream(status, headers, raw)
    if status == 401 or rpc == "UNAUTHENTICATED" or "API_KEY_INVALID" in reasons:
        return auth_rejected(product, text, upstream_status=status, credential="credential")
    if status == 403 or rpc == "PERMISSION_DENIED":
        return refused(403, text, code="upstream_permission_denied", upstream_status=status)
    if status == 404:  # a job gone (404 video_not_found) or, to a create, a model (model_must_exist)
        return refused(404, text, code=None, upstream_status=status)
    return refused(status, text, code=rpc.lower() or "invalid_value", upstream_status=status)


class VeoBase(NativeAdapter):
    """What the Gemini API and Vertex AI adapters share; it has no ``kind`` of its own."""

    product: ClassVar[str] = "Veo"

    async def parse_veo(self, call: Call, body: RequestBody) -> CreateRequest:
        """``parse_create`` plus what Veo adds: inline images only."""
        request = await self.parse_create(call, body)
        if request.image is not None and request.image.data is None:
            raise bad_request(
                "Veo takes input_reference only as the image itself (a file upload or a data URL); "
                "it does not accept image URLs and this gateway does not fetch them.",
                param="input_reference",
                code="unsupported_value",
            )
        if request.image is not None and not request.image.mime.startswith("image/"):
            raise bad_request(
                "input_reference is not an image Veo can read (PNG or JPEG).", param="input_reference"
            )
        return request

    @staticmethod
    def payload(request: CreateRequest) -> dict[str, Any]:
        instance: dict[str, Any] = {"prompt": request.prompt}
        if request.image is not None:
            instance["image"] = {"bytesBase64Encoded": request.image.base64(), "mimeType": request.image.mime}
        parameters = {**request.native_size, "durationSeconds": request.native_seconds, **request.extras}
        return {"instances": [instance], "parameters": parameters}

    def operation_fields(
        self, task: Task, operation: Mapping[str, Any], result: Mapping[str, Any], videos: list[Any]
    ) -> dict[str, Any]:
        """A long-running operation in OpenAI terms; ``result`` is its GenerateVideoResponse."""
        if not operation.get("done"):
            expected = self.spec(task.state["upstream_model"]).expected_seconds
            return {"status": "in_progress", "progress": synthetic_progress(task.created_at, expected)}
        error = operation.get("error")
        if isinstance(error, dict):
            rpc = rpc_status(error)
            return {
                "status": "failed",
                "error": {
                    "code": rpc.lower() if rpc else "generation_failed",
                    "message": str(error.get("message") or f"{self.product} could not generate this video."),
                },
            }
        if videos:
            return {"status": "completed", "progress": 100}
        filtered = result.get("raiMediaFilteredCount")
        if isinstance(filtered, int) and filtered > 0:
            reasons = [str(r) for r in result.get("raiMediaFilteredReasons") or () if r]
            return {
                "status": "failed",
                "error": {
                    "code": "content_filter",
                    "message": " ".join(reasons)
                    or f"{self.product}'s safety filters blocked the generated video.",
                },
            }
        return {
            "status": "failed",
            "error": {
                "code": "generation_failed",
                "message": f"{self.product} finished the operation without a video.",
            },
        }

    def provider_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
        error = google_error(status, headers, raw, self.product)
        return super().provider_error(status, headers, raw) if error is None else error

    async def _operation(self, call: Call, task: Task) -> dict[str, Any]:
        raise NotImplementedError

    @staticmethod
    def _result(operation: Mapping[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        raise NotImplementedError

    async def completed(self, task: Task, fields: dict[str, Any], found: list[Any]) -> None:
        """Called once a poll finds the operation done with a video (``found``: its result entries)."""

    async def retrieve(self, call: Call, task: Task) -> UpstreamVideo:
        # A 404 goes up as it is: the gateway decides when an operation Google does not know is lost
        # (api._lost), not this one answer, which may be a moment's.
        operation = await self._operation(call, task)
        result, found = self._result(operation)
        fields = self.operation_fields(task, operation, result, found)
        if fields["status"] == "completed":
            await self.completed(task, fields, found)
        return UpstreamVideo(task.upstream_id, fields)


class VeoGeminiAdapter(VeoBase):
    kind = "veo"
    product = "Gemini API"
    default_base_url = "https://generativelanguage.googleapis.com"
    required_fields = ("api_key",)
    credential_header = "x-goog-api-key"
    # The file download answers with a redirect to Google's media hosts (followed without the key).
    default_result_hosts = (".googleusercontent.com", "storage.googleapis.com")
    models = MODELS

    def auth_headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self.config.api_key or ""}

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo:
        request = await self.parse_veo(call, body)
        model = call.deployment.upstream_model
        with model_must_exist("The Gemini API", model):
            answer = await self.call_json(
                call,
                "POST",
                f"{self.base_url}/v1beta/models/{model}:predictLongRunning",
                json_body=self.payload(request),
            )
        name = answer.get("name") if isinstance(answer, dict) else None
        if not isinstance(name, str) or not _GEMINI_OPERATION.fullmatch(name):
            raise UpstreamError(
                502, "Upstream error: the Gemini API's answer has no operation name.", kind="payload"
            )
        return UpstreamVideo(name, {"status": "queued", "progress": 0, **request.seed()})

    async def _operation(self, call: Call, task: Task) -> dict[str, Any]:
        if not _GEMINI_OPERATION.fullmatch(task.upstream_id):
            raise UpstreamError(
                502, "Upstream error: the stored operation name is malformed.", kind="payload"
            )
        answer = await self.call_json(call, "GET", f"{self.base_url}/v1beta/{task.upstream_id}")
        if not isinstance(answer, dict):
            raise UpstreamError(
                502, "Upstream error: the Gemini API's operation is not an object.", kind="payload"
            )
        return answer

    @staticmethod
    def _result(operation: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The GenerateVideoResponse and the URIs of its videos."""
        response = operation.get("response")
        result = response.get("generateVideoResponse") if isinstance(response, dict) else None
        result = result if isinstance(result, dict) else {}
        uris = []
        for sample in result.get("generatedSamples") or ():
            video = sample.get("video") if isinstance(sample, dict) else None
            if isinstance(video, dict) and isinstance(video.get("uri"), str) and video["uri"]:
                uris.append(video["uri"])
        return result, uris

    async def completed(self, task: Task, fields: dict[str, Any], found: list[Any]) -> None:
        fields["expires_at"] = int(time.time()) + RESULT_LIFETIME

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        if variant != "video":
            raise not_offered(variant, self.kind)
        with expired_if_gone():
            operation = await self._operation(call, task)
        _, uris = self._result(operation)
        if not uris:
            raise expired_result()
        return await self.stream_result(call, self._keyed_url(uris[0]), headers=self.auth_headers())

    def _keyed_url(self, uri: str) -> str:
        """The file URL, if it is on the API's own origin: the API key is sent nowhere else."""
        try:
            url = urljoin(self.base_url + "/", uri)
        except ValueError:  # an unclosed IPv6 host, say
            raise UpstreamError(
                502, "Upstream error: the Gemini API named a video file that is no URL.", kind="payload"
            ) from None
        if not same_origin(url, self.base_url):
            raise UpstreamError(
                502,
                "Upstream error: the Gemini API named a video file outside its own origin; the "
                "gateway does not send the API key there.",
                kind="payload",
            )
        return url
