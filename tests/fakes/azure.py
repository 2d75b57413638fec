"""A fake Azure OpenAI resource serving sora-2 on the v1 API (reference §b1).

Shapes (MicrosoftDocs/azure-ai-docs ``concepts/video-generation.md`` and the learn module's
``curl -X POST .../openai/v1/videos -H "api-key: ..."``; the Video object and error envelope are
OpenAI's):

- everything lives under ``/openai/v1``; the key is ``api-key``; a wrong or missing one is a 401
  ``{"error": {"code": "401", "message": "Access denied due to invalid subscription key ..."}}``,
  and so is an ``Authorization: Bearer`` header (this resource takes no Entra tokens);
- ``?api-version=`` is optional on v1; when present it must be one this fake knows, else 400;
- ``POST /videos`` (JSON or multipart with an ``input_reference`` file): ``model`` must be a
  deployment of the resource (404 ``DeploymentNotFound`` otherwise), ``size`` one of 1280x720 /
  720x1280 and ``seconds`` one of "4" / "8" / "12" (400 naming ``param`` otherwise);
  ``[429]`` in the prompt → 429 with ``Retry-After`` and Azure's numeric ``code``;
- ``GET /videos/{id}``: ``in_progress`` (33, then 66) → ``completed``, one step per poll;
  ``[fail]`` ends ``failed`` with ``error: {code: "moderation_blocked", message}``;
- ``GET /videos/{id}/content?variant=video|thumbnail|spritesheet`` → the media bytes;
- ``DELETE /videos/{id}`` → ``{"id", "object": "video.deleted", "deleted": true}``;
- ``POST /videos/{id}/remix`` with ``{"prompt"}`` → a new video with ``remixed_from_video_id``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

PREFIX = "/openai/v1"
API_VERSIONS = ("preview", "2025-04-01-preview", "v1")
SIZES = ("1280x720", "720x1280")
SECONDS = ("4", "8", "12")
ACCESS_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a "
    "valid key for an active subscription and use a correct regional API endpoint for your resource."
)
CONTENT_TYPES = {"video": "video/mp4", "thumbnail": "image/webp", "spritesheet": "image/jpeg"}


@dataclass
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]


@dataclass
class FakeAzure:
    api_key: str
    media: dict[str, Path]
    deployments: tuple[str, ...] = ("my-sora-2",)
    received: list[Received] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    videos: dict[str, dict[str, Any]] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=32 * 1024 * 1024)
        app.router.add_post(f"{PREFIX}/videos", self.create)
        app.router.add_get(f"{PREFIX}/videos/{{id}}", self.retrieve)
        app.router.add_delete(f"{PREFIX}/videos/{{id}}", self.delete)
        app.router.add_get(f"{PREFIX}/videos/{{id}}/content", self.content)
        app.router.add_post(f"{PREFIX}/videos/{{id}}/remix", self.remix)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.received.append(
            Received(request.method, request.path, dict(request.query), CIMultiDict(request.headers))
        )
        if "Authorization" in request.headers or request.headers.get("api-key") != self.api_key:
            return _error(401, ACCESS_DENIED, code="401")
        version = request.query.get("api-version")
        if version is not None and version not in API_VERSIONS:
            return _error(400, f"API version not supported: {version}", code="BadRequest")
        return await handler(request)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "multipart/form-data":
            form = await request.post()
            body: dict[str, Any] = {}
            for name, value in form.items():
                body[name] = value if isinstance(value, str) else (value.content_type, value.file.read())
        else:
            body = await request.json()
        self.bodies.append(body)
        return body

    async def create(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if body.get("model") not in self.deployments:
            return _error(
                404,
                "The API deployment for this resource does not exist. If you created the deployment "
                "within the last 5 minutes, please wait a moment and try again.",
                code="DeploymentNotFound",
            )
        if "[429]" in str(body.get("prompt")):
            return _error(
                429,
                "Requests to the Videos_Create Operation under Azure OpenAI API version v1 have exceeded "
                "call rate limit of your current AIServices S0 pricing tier.",
                code="429",
                headers={"Retry-After": "7"},
            )
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            return _error(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing")
        for name, allowed, default in (("size", SIZES, "720x1280"), ("seconds", SECONDS, "4")):
            value = body.setdefault(name, default)
            if value not in allowed:
                quoted = " and ".join(f"'{v}'" for v in allowed)
                return _error(
                    400,
                    f"Invalid value: '{value}'. Supported values are: {quoted}.",
                    param=name,
                    code="invalid_value",
                )
        return web.json_response(self._new(body["model"], body["prompt"], body["size"], body["seconds"]))

    def _new(
        self, model: str, prompt: str, size: str, seconds: str, source: str | None = None
    ) -> dict[str, Any]:
        video = {
            "id": f"video_{secrets.token_hex(12)}",
            "object": "video",
            "model": model,
            "status": "queued",
            "progress": 0,
            "created_at": int(time.time()),
            "completed_at": None,
            "expires_at": None,
            "prompt": prompt,
            "size": size,
            "seconds": seconds,
            "remixed_from_video_id": source,
            "error": None,
        }
        self.videos[video["id"]] = {**video, "polls": 0}
        self.created.append(video["id"])
        return video

    async def retrieve(self, request: web.Request) -> web.Response:
        video = self.videos.get(request.match_info["id"])
        if video is None:
            return _error(404, "Video not found.", code="not_found")
        video["polls"] += 1
        if video["polls"] < 3:
            video.update(status="in_progress", progress=33 * video["polls"])
        elif "[fail]" in video["prompt"]:
            video.update(
                status="failed",
                completed_at=int(time.time()),
                error={
                    "code": "moderation_blocked",
                    "message": "Your request was blocked by our moderation system.",
                },
            )
        else:
            now = int(time.time())
            video.update(status="completed", progress=100, completed_at=now, expires_at=now + 86400)
        return web.json_response({k: v for k, v in video.items() if k != "polls"})

    async def delete(self, request: web.Request) -> web.Response:
        if self.videos.pop(request.match_info["id"], None) is None:
            return _error(404, "Video not found.", code="not_found")
        return web.json_response({"id": request.match_info["id"], "object": "video.deleted", "deleted": True})

    async def content(self, request: web.Request) -> web.StreamResponse:
        video = self.videos.get(request.match_info["id"])
        variant = request.query.get("variant", "video")
        if video is None or video["status"] != "completed":
            return _error(404, "Video not found or not ready.", code="not_found")
        if variant not in CONTENT_TYPES:
            return _error(400, f"Invalid variant: '{variant}'.", param="variant", code="invalid_value")
        return web.FileResponse(self.media[variant], headers={"Content-Type": CONTENT_TYPES[variant]})

    async def remix(self, request: web.Request) -> web.Response:
        source = self.videos.get(request.match_info["id"])
        if source is None:
            return _error(404, "Video not found.", code="not_found")
        body = await self._body(request)
        if not isinstance(body.get("prompt"), str):
            return _error(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing")
        return web.json_response(
            self._new(source["model"], body["prompt"], source["size"], source["seconds"], source["id"])
        )


def _error(
    status: int,
    message: str,
    *,
    code: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if status == 400:
        error.update(type="invalid_request_error", param=param)
    return web.json_response({"error": error}, status=status, headers=headers)
