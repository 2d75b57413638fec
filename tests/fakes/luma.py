"""A fake Luma Dream Machine API, from lumalabs/lumaai-python as summarised in the reference §d.

Served under ``/dream-machine/v1`` like the real one:

- auth: ``Authorization: Bearer <key>``, else 401 ``{"detail": "Invalid API key provided"}``
  (lumaai-api ``openapi.yaml`` ``components.schemas.Error``);
- ``POST /generations/video`` (``resources/generations/generations.py``,
  ``types/generations/video_create_params.py``): ``{model, prompt, aspect_ratio, resolution,
  duration, keyframes: {frame0: {type: "image", url}}, loop, concepts, callback_url}``; anything else,
  or a value outside the SDK's enums, is a 422 with a pydantic-style ``detail`` list. Ray 1.6 refusing
  ``resolution`` and ``duration`` is this fake's reading of the model line (UNVERIFIED). Answered
  201 with the Generation (``state: "queued"``, ``assets: null``);
- a keyframe image URL on loopback is downloaded at create, as Luma downloads it; a failed download
  is a 400. Other hosts are only recorded;
- ``GET /generations/{id}`` (``types/generation.py``): ``queued → dreaming → dreaming →
  completed``, one step per poll (the first poll still sees ``queued``), with ``assets: {video,
  image}`` at the end; prompts with ``[moderation]`` or ``[fail]`` end ``failed`` with a
  ``failure_reason``;
- ``DELETE /generations/{id}`` → 204; unknown generation → 404 ``{"detail": "Generation not found"}``;
- ``[429]`` in a prompt → 429 ``{"detail": ...}`` without Retry-After;
- assets live on ``/cdn/...`` on this server, like ``storage.cdn-luma.com``; :meth:`expire` makes
  them answer 403 as an expired CDN link does.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

PREFIX = "/dream-machine/v1"
STEPS = ("queued", "dreaming", "dreaming", "completed")
MODELS = ("ray-2", "ray-flash-2", "ray-1-6")
ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "21:9", "9:21")
RESOLUTIONS = ("540p", "720p", "1080p", "4k")
FIELDS = {
    "model",
    "prompt",
    "aspect_ratio",
    "resolution",
    "duration",
    "keyframes",
    "loop",
    "concepts",
    "callback_url",
    "generation_type",
}


@dataclass
class Download:
    url: str
    status: int
    content_type: str
    body: bytes


@dataclass
class FakeLuma:
    api_key: str
    media: dict[str, Path]
    generations: dict[str, dict[str, Any]] = field(default_factory=dict)
    creates: list[dict[str, Any]] = field(default_factory=list)
    next_id: str | None = None  # the task ID the next create answers (for odd IDs), then generated again
    headers: list[dict[str, str]] = field(default_factory=list)
    downloads: list[Download] = field(default_factory=list)
    expired: set[str] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post(f"{PREFIX}/generations/video", self.create)
        app.router.add_get(f"{PREFIX}/generations/{{id}}", self.get_generation)
        app.router.add_delete(f"{PREFIX}/generations/{{id}}", self.delete_generation)
        app.router.add_get("/cdn/{id}/{name}", self.asset)
        return app

    def expire(self, generation_id: str) -> None:
        self.expired.add(generation_id)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/cdn/"):
            return await handler(request)
        self.headers.append(dict(request.headers))
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return web.json_response({"detail": "Invalid API key provided"}, status=401)
        return await handler(request)

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.creates.append(body)
        if "[429]" in str(body.get("prompt", "")):
            return web.json_response({"detail": "Too many requests, please slow down"}, status=429)
        problems = self._validate(body)
        if problems:
            return web.json_response(
                {
                    "detail": [
                        {"loc": ["body", name], "msg": msg, "type": "value_error"} for name, msg in problems
                    ]
                },
                status=422,
            )
        frame0 = (body.get("keyframes") or {}).get("frame0")
        if frame0 is not None and not await self._download(frame0["url"]):
            return web.json_response({"detail": "frame0: the image could not be downloaded"}, status=400)
        generation_id = self.next_id if self.next_id is not None else str(uuid.uuid4())
        self.next_id = None
        generation = {
            "id": generation_id,
            "generation_type": "video",
            "state": "queued",
            "failure_reason": None,
            "created_at": "2026-11-25T10:00:00.000000Z",
            "assets": None,
            "model": body["model"],
            "request": body,
        }
        self.generations[generation_id] = {**generation, "polls": 0}
        return web.json_response(generation, status=201)

    @staticmethod
    def _validate(body: dict[str, Any]) -> list[tuple[str, str]]:
        problems = [(name, "extra fields not permitted") for name in body if name not in FIELDS]
        if body.get("model") not in MODELS:
            problems.append(("model", f"must be one of {', '.join(MODELS)}"))
        if not isinstance(body.get("prompt"), str):
            problems.append(("prompt", "field required"))
        if body.get("aspect_ratio", "16:9") not in ASPECT_RATIOS:
            problems.append(("aspect_ratio", "unexpected value"))
        if body.get("resolution", "720p") not in RESOLUTIONS:
            problems.append(("resolution", "unexpected value"))
        if body.get("duration", "5s") not in ("5s", "9s"):
            problems.append(("duration", "unexpected value"))
        if body.get("model") == "ray-1-6":
            problems += [
                (name, "not supported by ray-1-6") for name in ("resolution", "duration") if name in body
            ]
        keyframes = body.get("keyframes")
        if keyframes is not None:
            frame0 = keyframes.get("frame0") if isinstance(keyframes, dict) else None
            if (
                not isinstance(frame0, dict)
                or set(keyframes) - {"frame0", "frame1"}
                or frame0.get("type") != "image"
                or urlsplit(str(frame0.get("url"))).scheme not in ("http", "https")
            ):
                problems.append(("keyframes", "frame0 must be {type: 'image', url: <http(s) URL>}"))
        return problems

    async def _download(self, url: str) -> bool:
        if urlsplit(url).hostname not in ("127.0.0.1", "localhost"):
            self.downloads.append(Download(url, 0, "", b""))
            return True
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            data = await response.read()
            self.downloads.append(Download(url, response.status, response.content_type, data))
            return response.status == 200 and response.content_type.startswith("image/")

    async def get_generation(self, request: web.Request) -> web.Response:
        generation = self.generations.get(request.match_info["id"])
        if generation is None:
            return web.json_response({"detail": "Generation not found"}, status=404)
        generation["polls"] += 1
        answer = {k: v for k, v in generation.items() if k != "polls"}
        answer["state"] = STEPS[min(generation["polls"] - 1, len(STEPS) - 1)]
        if answer["state"] == "completed":
            prompt = answer["request"]["prompt"]
            if "[moderation]" in prompt:
                answer.update(
                    state="failed",
                    failure_reason="400: prompt not allowed because advanced moderation failed",
                )
            elif "[fail]" in prompt:
                answer.update(state="failed", failure_reason="Generation failed due to an internal error")
            else:
                base = request.url.with_path(f"/cdn/{answer['id']}")
                answer["assets"] = {
                    "video": str(base / "video0.mp4"),
                    "image": str(base / "video_0_thumb.jpg"),
                }
        return web.json_response(answer)

    async def delete_generation(self, request: web.Request) -> web.Response:
        if self.generations.pop(request.match_info["id"], None) is None:
            return web.json_response({"detail": "Generation not found"}, status=404)
        return web.Response(status=204)

    async def asset(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["id"] in self.expired:
            return web.Response(status=403, text="<Error><Code>AccessDenied</Code></Error>")
        if request.match_info["name"].endswith(".mp4"):
            return web.FileResponse(self.media["video"], headers={"Content-Type": "video/mp4"})
        # Luma's thumbnails are JPEGs: the media fixture's JPEG stands in for one.
        return web.FileResponse(self.media["spritesheet"], headers={"Content-Type": "image/jpeg"})
