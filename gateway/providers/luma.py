"""Luma Dream Machine (api.lumalabs.ai/dream-machine/v1): Ray text-to-video and image-to-video.

Wire format (lumalabs/lumaai-python ``resources/generations``, ``types/generation.py``; the error
shape from lumalabs/lumaai-api ``openapi.yaml``; see the provider reference §d):

- ``Authorization: Bearer <key>``;
- ``POST /generations/video`` with ``{model, prompt, aspect_ratio, resolution, duration: "5s" | "9s",
  keyframes: {frame0: {type: "image", url}}, loop?, concepts?}``, answered 201 with the Generation;
- ``GET /generations/{id}`` → ``{id, state: queued | dreaming | completed | failed, failure_reason,
  created_at, model, assets: {video, image, progress_video}}``; no progress is reported, so it is
  synthesised while dreaming. ``assets.image`` (``assets.thumbnail`` in the first API version) is the
  video's thumbnail, served as ``variant=thumbnail``;
- ``DELETE /generations/{id}`` removes a generation;
- errors are ``{"detail": "..."}`` (a list of ``{loc, msg}`` for body validation).

Luma takes keyframe images only as URLs it downloads itself. An uploaded image (or a data URL) is
therefore stored by the gateway and handed to Luma as a short-lived signed URL under the gateway's
``server.public_base_url`` (``gateway.hosted``); without that setting only http(s) image URLs work.

``size`` is ``aspect_ratio`` plus ``resolution``: the short side names the tier (540p, 720p,
1080p, 4k) and the ratio is one of Luma's seven; 960x960 is also taken for 1:1 at 720p. Ray 1.6
predates ``resolution`` and ``duration``: it takes the 720p sizes and 5 seconds, and neither field is
sent for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.bodies import RequestBody
from gateway.errors import ApiError, UpstreamError, bad_request
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
    expired_if_gone,
    expired_result,
    ignore_refusals,
    not_offered,
    rate_limited,
    refused,
    synthetic_progress,
)
from gateway.store import Task

RETRY_AFTER_SECONDS = "10"  # Luma publishes no limits and sends no Retry-After of its own
HOSTABLE = frozenset({"image/png", "image/jpeg", "image/webp"})  # what gateway.hosted serves as images

RATIOS = ((16, 9), (9, 16), (1, 1), (4, 3), (3, 4), (21, 9), (9, 21))
TIERS = {"540p": 540, "720p": 720, "1080p": 1080, "4k": 2160}


def _sizes(*tiers: str, resolution: bool = True) -> dict[str, dict[str, str]]:
    """OpenAI ``size`` → ``{aspect_ratio, resolution}`` for every Luma ratio at the given tiers."""
    sizes: dict[str, dict[str, str]] = {}
    for tier in tiers:
        short = TIERS[tier]
        for w, h in RATIOS:
            width, height = (short * w // h, short) if w >= h else (short, short * h // w)
            native = {"aspect_ratio": f"{w}:{h}"}
            if resolution:
                native["resolution"] = tier
            sizes[f"{width}x{height}"] = native
        if tier == "720p":
            sizes["960x960"] = sizes["720x720"]
    return sizes


_EXTRAS = frozenset({"loop", "concepts"})

MODELS = {
    "ray-2": ModelSpec(
        sizes=_sizes("540p", "720p", "1080p", "4k"),
        seconds={"5": "5s", "9": "9s"},
        default_size="1280x720",
        default_seconds="5",
        extra_params=_EXTRAS,
        expected_seconds=120,
    ),
    "ray-flash-2": ModelSpec(
        sizes=_sizes("540p", "720p", "1080p", "4k"),
        seconds={"5": "5s", "9": "9s"},
        default_size="1280x720",
        default_seconds="5",
        extra_params=_EXTRAS,
        expected_seconds=45,
    ),
    "ray-1-6": ModelSpec(
        sizes=_sizes("720p", resolution=False),
        seconds={"5": None},
        default_size="1280x720",
        default_seconds="5",
        extra_params=frozenset({"loop"}),
        expected_seconds=120,
    ),
}

# Luma's request field → the OpenAI field the client set.
_PARAMS = {
    "aspect_ratio": "size",
    "resolution": "size",
    "duration": "seconds",
    "keyframes": "input_reference",
    "prompt": "prompt",
    "model": "model",
}
_MODERATION_WORDS = ("moderation", "not allowed", "nsfw", "inappropriate", "safety")


def _is_moderation(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in _MODERATION_WORDS)


def _detail(raw: bytes) -> tuple[str | None, str | None]:
    """Luma's ``detail``: its message and, for body validation errors, the OpenAI field at fault."""
    parsed = json_or_none(raw)
    detail = parsed.get("detail") if isinstance(parsed, dict) else None
    if isinstance(detail, str) and detail:
        return detail, None
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        messages, param = [], None
        for item in detail:
            where = item.get("loc")
            loc = [str(part) for part in where if part != "body"] if isinstance(where, list) else []
            messages.append(f"{'.'.join(loc) or 'body'}: {item.get('msg', 'invalid')}")
            if param is None and loc:
                param = _PARAMS.get(loc[0])
        return "; ".join(messages), param
    return None, None


class LumaAdapter(NativeAdapter):
    kind = "luma"
    default_base_url = "https://api.lumalabs.ai/dream-machine/v1"
    required_fields = ("api_key",)
    default_result_hosts = (".cdn-luma.com", ".lumalabs.ai")
    models = MODELS

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo:
        request = await self.parse_create(call, body)
        native = request.native_size
        payload: dict[str, Any] = {
            "model": call.deployment.upstream_model,
            "prompt": request.prompt,
            **native,
            **request.extras,
        }
        if request.native_seconds is not None:
            payload["duration"] = request.native_seconds
        state: dict[str, Any] = {}
        if request.image is not None:
            url = await self._image_url(request.image)
            payload["keyframes"] = {"frame0": {"type": "image", "url": url}}
            if request.image.data is not None:
                state["hosted_image"] = url  # removed with the video
        answer = await self.call_json(call, "POST", f"{self.base_url}/generations/video", json_body=payload)
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), str) or not answer["id"]:
            raise UpstreamError(502, "Upstream error: Luma's answer has no generation id.", kind="payload")
        return UpstreamVideo(answer["id"], {"status": "queued", "progress": 0, **request.seed()}, state)

    async def _image_url(self, image: ImageInput) -> str:
        """A URL Luma can download the image from: the client's own, or one the gateway signs."""
        if image.data is None:
            assert image.url is not None
            return image.url
        if self.env.hosted is None:
            raise bad_request(
                "Luma takes input_reference only as an image URL it downloads itself. Pass "
                "input_reference.image_url as an https URL, or have the gateway's operator set "
                "server.public_base_url so uploaded images can be served to Luma at a signed URL.",
                param="input_reference",
                code="unsupported_value",
            )
        if image.mime not in HOSTABLE:
            raise bad_request(
                f"input_reference must be a PNG, JPEG or WebP image for Luma (got '{image.mime}').",
                param="input_reference",
                code="invalid_value",
            )
        return await self.env.hosted.put(image.data, image.mime)

    async def _generation(self, call: Call, generation_id: str) -> dict[str, Any]:
        answer = await self.call_json(
            call, "GET", f"{self.base_url}/generations/{path_segment(generation_id)}"
        )
        if not isinstance(answer, dict):
            raise UpstreamError(
                502, "Upstream error: Luma's generation answer is not an object.", kind="payload"
            )
        return answer

    async def retrieve(self, call: Call, task: Task) -> UpstreamVideo:
        answer = await self._generation(call, task.upstream_id)
        state = str(answer.get("state") or "").lower()
        fields: dict[str, Any]
        if state == "queued":
            fields = {"status": "queued", "progress": 0}
        elif state == "completed":
            fields = {"status": "completed"}
        elif state == "failed":
            fields = {"status": "failed", "error": self._failure(answer.get("failure_reason"))}
        else:
            # dreaming, or a word this adapter does not know: never end a job on a guess.
            expected = self.spec(task.state["upstream_model"]).expected_seconds
            fields = {"status": "in_progress", "progress": synthetic_progress(task.created_at, expected)}
        return UpstreamVideo(task.upstream_id, fields)

    @staticmethod
    def _failure(reason: Any) -> dict[str, str]:
        message = str(reason) if isinstance(reason, str) and reason else "Luma could not generate this video."
        if _is_moderation(message):
            return {"code": "content_filter", "message": message}
        return {"code": "generation_failed", "message": message}

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        if variant not in ("video", "thumbnail"):
            raise ApiError(
                404,
                f"The luma provider offers no '{variant}' for videos; 'video' and 'thumbnail' are available.",
                param="variant",
                code="variant_not_available",
            )
        with expired_if_gone():
            answer = await self._generation(call, task.upstream_id)
        assets = answer.get("assets") if isinstance(answer.get("assets"), dict) else {}
        if variant == "video":
            url = assets.get("video")
            if not isinstance(url, str) or not url:
                raise expired_result()
            return await self.stream_result(call, url)
        url = assets.get("image") or assets.get("thumbnail")
        if not isinstance(url, str) or not url:
            raise not_offered(variant, self.kind)
        return await self.stream_result(call, url, content_type="image/jpeg")

    async def delete(self, call: Call, task: Task) -> None:
        # Already gone, or refused for its state: the gateway forgets the video either way.
        with ignore_refusals(400, 404, 409):
            await self.call_json(
                call, "DELETE", f"{self.base_url}/generations/{path_segment(task.upstream_id)}"
            )
        hosted_image = task.state.get("hosted_image")
        if hosted_image and self.env.hosted is not None:
            await self.env.hosted.remove(hosted_image)

    def provider_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
        detail, param = _detail(raw)
        if detail is None or status >= 500:
            return super().provider_error(status, headers, raw)
        text = f"Luma: {detail}"
        if status == 429:
            retry_after = headers.get("Retry-After") or RETRY_AFTER_SECONDS
            return rate_limited(text, upstream_status=status, retry_after=retry_after)
        if status == 401:
            return auth_rejected("Luma", text, upstream_status=status)
        if status in (400, 422):
            code = "content_filter" if _is_moderation(detail) else "invalid_value"
            return refused(400, text, code=code, upstream_status=status, param=param)
        return refused(status, text, code=None, upstream_status=status, param=param)
