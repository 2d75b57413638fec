"""A fake MiniMax video API v1 (api.minimax.io), after the provider reference §f.

Shapes (QuantumNous/new-api ``relay/channel/task/hailuo/models.go`` and ``constants.go``; the
platform.minimax.io OpenAPI pages "Query Video Generation Task", "Video Download", "Delete File"):

- every API answer is HTTP 200 with ``base_resp: {status_code, status_msg}``; errors are non-zero codes:
  no/odd ``Authorization`` → 1004, a wrong key → 2049, a malformed body → 2013;
- ``POST /v1/video_generation {model, prompt, duration, resolution, first_frame_image?, prompt_optimizer?,
  fast_pretreatment?, aigc_watermark?}`` → ``{task_id, base_resp}``, validated per model (durations per
  resolution, i2v-only models and tiers, ``first_frame_image`` an http(s) URL or an image data URL);
  prompts steer refusals: ``[1002]`` rate limit, ``[1008]`` no balance, ``[1026]`` input sensitive;
- ``GET /v1/query/video_generation?task_id=`` moves one step per poll ``Queueing → Processing →
  Processing → Success`` (``file_id``, ``video_width``, ``video_height``: portrait when the first frame
  is a portrait PNG, as the output follows the image); ``[fail]`` ends ``Fail``,
  ``[1027]`` ends ``Fail`` with ``base_resp`` 1027 (output sensitive); ``[busy]`` answers 1002 once;
- ``GET /v1/files/retrieve?file_id=`` → ``{file: {file_id, bytes, created_at, filename, purpose,
  download_url}, base_resp}``; every call mints a new signed URL and expires the previous one, whose
  download then answers 403 like an expired OSS signature; an unknown file_id answers 2013;
- ``POST /v1/files/delete {file_id, purpose}`` → ``{file_id, base_resp}``.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import secrets
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

STEPS = ("Preparing", "Queueing", "Processing", "Processing", "Success")

# Model → (resolution → durations, text-only creates allowed, takes an image, resolutions only i2v offers).
MODELS: dict[str, tuple[dict[str, tuple[int, ...]], bool, bool, frozenset[str]]] = {
    "MiniMax-Hailuo-2.3": ({"768P": (6, 10), "1080P": (6,)}, True, True, frozenset()),
    "MiniMax-Hailuo-2.3-Fast": ({"768P": (6, 10), "1080P": (6,)}, False, True, frozenset()),
    "MiniMax-Hailuo-02": (
        {"512P": (6, 10), "768P": (6, 10), "1080P": (6,)},
        True,
        True,
        frozenset({"512P"}),
    ),
    "T2V-01": ({"720P": (6,)}, True, False, frozenset()),
    "T2V-01-Director": ({"720P": (6,)}, True, False, frozenset()),
    "I2V-01": ({"720P": (6,)}, False, True, frozenset()),
    "I2V-01-Director": ({"720P": (6,)}, False, True, frozenset()),
    "I2V-01-live": ({"720P": (6,)}, False, True, frozenset()),
}
FIELDS = {
    "model",
    "prompt",
    "prompt_optimizer",
    "fast_pretreatment",
    "duration",
    "resolution",
    "first_frame_image",
    "aigc_watermark",
}
PIXELS = {"512P": (912, 512), "720P": (1280, 720), "768P": (1366, 768), "1080P": (1920, 1080)}


def answer(code: int = 0, message: str = "success", **fields: Any) -> web.Response:
    return web.json_response({**fields, "base_resp": {"status_code": code, "status_msg": message}})


class Invalid(Exception):
    pass


@dataclass
class FakeMiniMax:
    api_key: str
    video: Path
    base_url: str = ""
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file_id → the one valid signature
    creates: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    minted: list[str] = field(default_factory=list)
    deleted: list[Any] = field(default_factory=list)
    next_id: str | None = None  # the task ID the next create answers (for odd IDs), then generated again
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(335797537439947))

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v1/video_generation", self.create)
        app.router.add_get("/v1/query/video_generation", self.query)
        app.router.add_get("/v1/files/retrieve", self.retrieve_file)
        app.router.add_post("/v1/files/delete", self.delete_file)
        app.router.add_get("/inference_output/{file_id}/output.mp4", self.download)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/inference_output/"):
            return await handler(request)
        self.headers.append(dict(request.headers))
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return answer(
                1004,
                "login fail: Please carry the API secret key in the 'Authorization' field of the request "
                "header",
            )
        if auth != f"Bearer {self.api_key}":
            return answer(2049, "invalid api key")
        return await handler(request)

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await self._json(request)
            self.creates.append(body)
            self._validate(body)
        except Invalid as exc:
            return answer(2013, f"invalid params, {exc}", task_id="")
        prompt = body.get("prompt", "")
        for code, message in (
            (1002, "rate limit exceeded(RPM)"),
            (1008, "insufficient balance"),
            (1026, "input new_sensitive"),
        ):
            if f"[{code}]" in prompt:
                return answer(code, message, task_id="")
        task_id = self.next_id if self.next_id is not None else str(next(self._ids))
        self.next_id = None
        width, height = PIXELS[body["resolution"]]
        image = body.get("first_frame_image", "")
        if image.startswith("data:") and _png_is_portrait(image):
            width, height = height, width
        self.tasks[task_id] = {"prompt": prompt, "polls": 0, "width": width, "height": height}
        return answer(task_id=task_id)

    async def _json(self, request: web.Request) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise Invalid("Content-Type must be application/json")
        try:
            body = await request.json()
        except ValueError:
            raise Invalid("the body is not JSON") from None
        if not isinstance(body, dict):
            raise Invalid("the body must be an object")
        return body

    @staticmethod
    def _validate(body: dict[str, Any]) -> None:
        unknown = set(body) - FIELDS
        if unknown:
            raise Invalid(f"unknown fields {sorted(unknown)}")
        if body.get("model") not in MODELS:
            raise Invalid(f"model {body.get('model')!r} is not supported")
        durations, text, image_ok, image_only = MODELS[body["model"]]
        prompt, image = body.get("prompt"), body.get("first_frame_image")
        if prompt is not None and (not isinstance(prompt, str) or len(prompt) > 2000):
            raise Invalid("prompt must be a string of at most 2000 characters")
        if image is None and not (text and prompt):
            raise Invalid("first_frame_image is required for this model")
        if image is not None:
            if not image_ok:
                raise Invalid("this model takes no first_frame_image")
            _check_image(image)
        resolution, duration = body.get("resolution"), body.get("duration")
        if resolution not in durations or (image is None and resolution in image_only):
            raise Invalid(f"resolution {resolution!r} is not supported by {body['model']}")
        if type(duration) is not int or duration not in durations[resolution]:
            raise Invalid(f"duration {duration!r} is not supported at {resolution}")
        for flag in ("prompt_optimizer", "fast_pretreatment", "aigc_watermark"):
            if flag in body and not isinstance(body[flag], bool):
                raise Invalid(f"{flag} must be a boolean")

    async def query(self, request: web.Request) -> web.Response:
        task_id = request.query.get("task_id", "")
        task = self.tasks.get(task_id)
        if task is None:
            return answer(2013, "invalid params, task not found", task_id=task_id, status="")
        if "[busy]" in task["prompt"] and not task.get("was_busy"):
            task["was_busy"] = True
            return answer(1002, "rate limit exceeded(RPM)", task_id=task_id, status="")
        step = STEPS[min(task["polls"], len(STEPS) - 1)]
        task["polls"] += 1
        if step == "Success" and "[fail]" in task["prompt"]:
            return answer(task_id=task_id, status="Fail", file_id="")
        if step == "Success" and "[1027]" in task["prompt"]:
            return answer(1027, "output video sensitive", task_id=task_id, status="Fail", file_id="")
        if step != "Success":
            return answer(task_id=task_id, status=step, file_id="")
        if "file_id" not in task:
            task["file_id"] = str(next(self._ids))
            self.files[task["file_id"]] = ""
        return answer(
            task_id=task_id,
            status="Success",
            file_id=task["file_id"],
            video_width=task["width"],
            video_height=task["height"],
        )

    async def retrieve_file(self, request: web.Request) -> web.Response:
        file_id = request.query.get("file_id", "")
        if file_id not in self.files:
            return answer(2013, "invalid params, file not found")
        signature = secrets.token_urlsafe(12)
        self.files[file_id] = signature
        expires = int(time.time()) + 9 * 3600
        url = request.url.with_path(f"/inference_output/{file_id}/output.mp4").with_query(
            Expires=str(expires), OSSAccessKeyId="LTAIfake", Signature=signature
        )
        self.minted.append(str(url))
        file = {
            "file_id": int(file_id),
            "bytes": self.video.stat().st_size,
            "created_at": int(time.time()),
            "filename": "output_aigc.mp4",
            "purpose": "video_generation",
            "download_url": str(url),
        }
        return answer(file=file)

    async def delete_file(self, request: web.Request) -> web.Response:
        try:
            body = await self._json(request)
        except Invalid as exc:
            return answer(2013, f"invalid params, {exc}")
        if body.get("purpose") != "video_generation" or not isinstance(body.get("file_id"), int):
            return answer(2013, "invalid params, file_id (integer) and purpose are required")
        self.deleted.append(body["file_id"])
        if self.files.pop(str(body["file_id"]), None) is None:
            return answer(2013, "invalid params, file not found")
        return answer(file_id=body["file_id"])

    async def download(self, request: web.Request) -> web.StreamResponse:
        signature = self.files.get(request.match_info["file_id"])
        if not signature or request.query.get("Signature") != signature:
            return web.Response(
                status=403,
                text="<Error><Code>AccessDenied</Code><Message>Request has expired.</Message></Error>",
                content_type="application/xml",
            )
        return web.FileResponse(self.video, headers={"Content-Type": "video/mp4"})


def _check_image(image: Any) -> None:
    if not isinstance(image, str):
        raise Invalid("first_frame_image must be a string")
    if image.startswith(("http://", "https://")):
        return
    head, _, payload = image.partition(",")
    if not (head.startswith("data:image/") and head.endswith(";base64")):
        raise Invalid("first_frame_image must be a public URL or a data:image/...;base64, URL")
    try:
        base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid("first_frame_image is not valid base64") from None


def _png_is_portrait(data_url: str) -> bool:
    data = base64.b64decode(data_url.partition(",")[2])
    if not data.startswith(b"\x89PNG"):
        return False
    width, height = struct.unpack(">II", data[16:24])
    return height > width
