"""A fake Volcengine Ark video-generation API (…/api/v3), from the provider reference §j.

Shapes follow the Volcengine docs (82379/1520757 create, 1521309 query, 1521675 cancel/delete,
1299023 error codes) and new-api ``task/doubao``:

- auth: ``Authorization: Bearer <key>``, else 401 ``AuthenticationError``; every refusal is
  ``{"error": {"code", "message", "param", "type"}}``;
- ``POST /api/v3/contents/generations/tasks``: ``{model, content: [{type: "text", text},
  {type: "image_url", image_url: {url}, role}], resolution, ratio, duration, seed, camera_fixed,
  watermark, generate_audio, return_last_frame, service_tier, execution_expires_after, draft}`` →
  ``{"id": "cgt-…"}``. Settings may come as prompt commands instead (``--ratio 16:9 --resolution 720p
  --dur 5 --seed 1 --camerafixed false``). Unknown fields, wrong types, values outside the model's
  range, data URIs with an upper-case format → 400 ``InvalidParameter`` naming ``param``; an unknown
  model → 404 ``InvalidEndpointOrModel.NotFound``. Prompts with ``[429]`` get a 429
  ``RateLimitExceeded.EndpointRPMExceeded`` (no Retry-After, as Ark sends none), ``[overdue]`` a 403
  ``AccountOverdueError``, ``[sensitive]`` a 400 ``InputTextSensitiveContentDetected``;
- ``GET /api/v3/contents/generations/tasks/{id}``: one step per poll ``queued → queued → running →
  succeeded`` (``content.video_url`` a presigned-looking URL on this server, ``last_frame_url`` too when
  ``return_last_frame`` was set); prompts with ``[fail]`` end ``failed`` (``InternalServiceError``),
  ``[nsfw]`` ``failed`` (``OutputVideoSensitiveContentDetected``), ``[expire]`` ``expired``,
  ``[cancel]`` ``cancelled``; ``adaptive`` becomes the image's nearest ratio;
- ``DELETE …/{id}``: queued → ``cancelled``; succeeded / failed / expired → record deleted; running and
  cancelled → 403 ``OperationDenied.UnsupportedPhase`` (the code Ark's error table has for an operation
  refused in the target's current phase; the exact refusal is not documented); unknown → 404;
- ``/tos/{name}``: the results, like Ark's TOS bucket (``[html]`` prompts get an HTML last frame).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from PIL import Image

API = "/api/v3/contents/generations/tasks"
STEPS = ("queued", "queued", "running", "succeeded")
RESOLUTIONS = ("480p", "720p", "1080p")
RATIOS = {"16:9": 16 / 9, "4:3": 4 / 3, "1:1": 1.0, "3:4": 3 / 4, "9:16": 9 / 16, "21:9": 21 / 9}
# Model → (duration range, takes text only, takes an image only).
MODELS = {
    "doubao-seedance-1-0-pro-250528": ((2, 12), False, False),
    "doubao-seedance-1-0-pro-fast-251015": ((2, 12), False, False),
    "doubao-seedance-1-0-lite-t2v-250428": ((2, 12), True, False),
    "doubao-seedance-1-0-lite-i2v-250428": ((2, 12), False, True),
    "doubao-seedance-1-5-pro-251215": ((4, 12), False, False),
}
FIELDS = {
    "model",
    "content",
    "resolution",
    "ratio",
    "duration",
    "frames",
    "seed",
    "camera_fixed",
    "watermark",
    "generate_audio",
    "return_last_frame",
    "service_tier",
    "execution_expires_after",
    "draft",
    "callback_url",
}
BOOLEANS = ("camera_fixed", "watermark", "generate_audio", "return_last_frame", "draft")
COMMANDS = {
    "rs": "resolution",
    "resolution": "resolution",
    "rt": "ratio",
    "ratio": "ratio",
    "dur": "duration",
    "duration": "duration",
    "seed": "seed",
    "cf": "camera_fixed",
    "camerafixed": "camera_fixed",
    "wm": "watermark",
    "watermark": "watermark",
}


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str, param: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param

    def response(self, headers: dict[str, str] | None = None) -> web.Response:
        kind = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound"}
        body = {
            "error": {
                "code": self.code,
                "message": f"{self.message} Request id: 0217000000000000000000000000000",
                "param": self.param,
                "type": kind.get(self.status, "TooManyRequests"),
            }
        }
        return web.json_response(body, status=self.status, headers=headers)


def invalid(param: str, message: str = "") -> Refused:
    return Refused(
        400,
        "InvalidParameter",
        message or f"The parameter `{param}` specified in the request is not valid.",
        param,
    )


@dataclass
class FakeArk:
    api_key: str
    video: Path
    last_frame: bytes = field(default_factory=lambda: _jpeg(320, 240))
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    creates: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    next_id: str | None = None  # the task ID the next create answers (for odd IDs), then generated again

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post(API, self.create)
        app.router.add_get(API + "/{id}", self.get_task)
        app.router.add_delete(API + "/{id}", self.delete_task)
        app.router.add_get("/tos/{name}", self.result)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/tos/"):
            return await handler(request)
        self.headers.append(dict(request.headers))
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return Refused(
                401, "AuthenticationError", "The API key or AK/SK in the request is missing or invalid."
            ).response()
        try:
            return await handler(request)
        except Refused as refused:
            return refused.response()

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise Refused(400, "InvalidParameter", "The request body is not valid JSON.") from None
        self.creates.append(body)
        if not isinstance(body, dict):
            raise invalid("body")
        for name in body:
            if name not in FIELDS:
                raise invalid(name)
        model = body.get("model")
        if not isinstance(model, str) or not (model in MODELS or model.startswith("ep-")):
            raise Refused(
                404,
                "InvalidEndpointOrModel.NotFound",
                f"The model or endpoint {model} does not exist or you do not have access to it.",
            )
        prompt, image = self._content(body.get("content"))
        settings = self._settings(body, prompt)
        self._check(model, settings, image)
        if "[429]" in prompt:
            raise Refused(
                429,
                "RateLimitExceeded.EndpointRPMExceeded",
                "The Requests Per Minute (RPM) limit of the associated endpoint for your account has "
                "been exceeded.",
            )
        if "[overdue]" in prompt:
            raise Refused(
                403, "AccountOverdueError", "The request failed because your account has an overdue balance."
            )
        if "[sensitive]" in prompt:
            raise Refused(
                400,
                "InputTextSensitiveContentDetected",
                "The request failed because the input text may contain sensitive information.",
            )
        if settings["ratio"] == "adaptive":
            settings["ratio"] = _nearest_ratio(image)
        task_id = (
            self.next_id if self.next_id is not None else f"cgt-20261125100000-{len(self.tasks) + 1:05d}"
        )
        self.next_id = None
        now = int(time.time())
        self.tasks[task_id] = {
            "id": task_id,
            "model": model,
            "prompt": prompt,
            "settings": settings,
            "last_frame": body.get("return_last_frame") is True,
            "created_at": now,
            "updated_at": now,
            "polls": 0,
            "status": "queued",
        }
        return web.json_response({"id": task_id})

    @staticmethod
    def _content(content: Any) -> tuple[str, bytes | str | None]:
        if not isinstance(content, list) or not content:
            raise Refused(400, "MissingParameter", "The required parameter content is missing.", "content")
        first = content[0]
        if not isinstance(first, dict) or set(first) != {"type", "text"} or first["type"] != "text":
            raise invalid("content[0]")
        if not isinstance(first["text"], str) or not first["text"]:
            raise invalid("content[0].text")
        image: bytes | str | None = None
        for i, item in enumerate(content[1:], 1):
            if not isinstance(item, dict) or item.get("type") != "image_url" or image is not None:
                raise invalid(f"content[{i}]")
            if set(item) - {"type", "image_url", "role"} or item.get("role", "first_frame") != "first_frame":
                raise invalid(f"content[{i}].role")
            url = item.get("image_url", {}).get("url") if isinstance(item.get("image_url"), dict) else None
            image = _image(url, f"content[{i}].image_url.url")
        return first["text"], image

    @staticmethod
    def _settings(body: dict[str, Any], prompt: str) -> dict[str, Any]:
        names = ("resolution", "ratio", "duration", "seed", "camera_fixed", "watermark")
        settings = {k: body[k] for k in names if k in body}
        _, _, commands = prompt.partition(" --")
        if commands:
            tokens = ("--" + commands).split()
            if len(tokens) % 2 or not all(t.startswith("--") for t in tokens[::2]):
                raise invalid("content[0].text", "The parameter commands in the prompt are malformed.")
            for flag, raw in zip(tokens[::2], tokens[1::2], strict=True):
                name = COMMANDS.get(flag[2:])
                if name is None or name in body:
                    raise invalid(flag[2:])
                settings[name] = _command_value(name, raw)
        for name in BOOLEANS:
            if name in body and not isinstance(body[name], bool):
                raise invalid(name)
        if "seed" in settings and (
            not isinstance(settings["seed"], int) or not -1 <= settings["seed"] <= 2**32 - 1
        ):
            raise invalid("seed")
        return settings

    @staticmethod
    def _check(model: str, settings: dict[str, Any], image: bytes | str | None) -> None:
        (low, high), text_only, image_only = MODELS.get(model, ((2, 15), False, False))
        settings.setdefault("resolution", "720p")
        settings.setdefault("ratio", "adaptive" if image is not None else "16:9")
        settings.setdefault("duration", 5)
        if settings["resolution"] not in RESOLUTIONS:
            raise invalid("resolution")
        if settings["ratio"] not in RATIOS and settings["ratio"] != "adaptive":
            raise invalid("ratio")
        if settings["ratio"] == "adaptive" and image is None and "1-0" in model:
            raise invalid("ratio", "ratio adaptive is only supported for image-to-video.")
        duration = settings["duration"]
        if not isinstance(duration, int) or isinstance(duration, bool) or not low <= duration <= high:
            raise invalid("duration")
        if text_only and image is not None:
            raise invalid("content", "The model does not support image input.")
        if image_only and image is None:
            raise Refused(400, "MissingParameter", "The required parameter image_url is missing.", "content")

    async def get_task(self, request: web.Request) -> web.Response:
        task = self.tasks.get(request.match_info["id"])
        if task is None:
            raise Refused(404, "NotFound", "The specified task is not found.", "id")
        if task["status"] != "cancelled":
            task["polls"] += 1
            step = STEPS[min(task["polls"], len(STEPS) - 1)]
            if step != task["status"]:
                task["status"], task["updated_at"] = step, int(time.time())
        answer = self._answer(request, task)
        return web.json_response(answer)

    def _answer(self, request: web.Request, task: dict[str, Any]) -> dict[str, Any]:
        settings = task["settings"]
        answer: dict[str, Any] = {
            "id": task["id"],
            "model": task["model"],
            "status": task["status"],
            "error": None,
            "created_at": task["created_at"],
            "updated_at": task["updated_at"],
            "seed": settings.get("seed", 12345),
            "resolution": settings["resolution"],
            "ratio": settings["ratio"],
            "duration": settings["duration"],
            "framespersecond": 24,
            "service_tier": "default",
            "execution_expires_after": 172800,
        }
        if task["status"] != "succeeded":
            return answer
        prompt = task["prompt"]
        if "[fail]" in prompt:
            task["status"] = answer["status"] = "failed"
            answer["error"] = {"code": "InternalServiceError", "message": "The service encountered an error."}
        elif "[nsfw]" in prompt:
            task["status"] = answer["status"] = "failed"
            answer["error"] = {
                "code": "OutputVideoSensitiveContentDetected",
                "message": "The request failed because the output video may contain sensitive information.",
            }
        elif "[expire]" in prompt:
            task["status"] = answer["status"] = "expired"
        elif "[cancel]" in prompt:
            task["status"] = answer["status"] = "cancelled"
        else:
            signed = {
                "X-Tos-Algorithm": "TOS4-HMAC-SHA256",
                "X-Tos-Date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(task["updated_at"])),
                "X-Tos-Expires": "86400",
                "X-Tos-Signature": "0f1e2d",
            }
            content = {"video_url": str(request.url.with_path(f"/tos/{task['id']}.mp4").with_query(signed))}
            if task["last_frame"]:
                frame = request.url.with_path(f"/tos/{task['id']}_last.jpeg").with_query(signed)
                content["last_frame_url"] = str(frame)
            answer["content"] = content
            answer["usage"] = {"completion_tokens": 108900, "total_tokens": 108900}
        return answer

    async def delete_task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]
        task = self.tasks.get(task_id)
        if task is None:
            raise Refused(404, "NotFound", "The specified task is not found.", "id")
        if task["status"] == "queued":
            task["status"] = "cancelled"
        elif task["status"] in ("running", "cancelled"):
            raise Refused(
                403,
                "OperationDenied.UnsupportedPhase",
                "Operation is denied because operation is not supported while the target is in its "
                "current phase.",
            )
        else:
            del self.tasks[task_id]
        self.deleted.append(task_id)
        return web.json_response({})

    async def result(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        task = self.tasks.get(re.sub(r"(_last)?\.\w+$", "", name))
        if task is None or request.query.get("X-Tos-Signature") != "0f1e2d":
            return web.Response(status=403, text="<Error><Code>AccessDenied</Code></Error>")
        if name.endswith(".mp4"):
            return web.FileResponse(self.video, headers={"Content-Type": "video/mp4"})
        if "[html]" in task["prompt"]:
            return web.Response(text="<html>maintenance</html>", content_type="text/html")
        return web.Response(body=self.last_frame, content_type="image/jpeg")


def _jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 30)).save(out, format="JPEG")
    return out.getvalue()


def _image(url: Any, param: str) -> bytes | str:
    if not isinstance(url, str):
        raise Refused(400, "MissingParameter", "The required parameter url is missing.", param)
    if url.startswith(("https://", "http://")):
        return url
    match = re.fullmatch(r"data:image/([a-z]+);base64,(.+)", url, re.DOTALL)
    if match is None:
        raise Refused(400, "InvalidImageURL.InvalidFormat", "Invalid base64 image url", param)
    try:
        data = base64.b64decode(match.group(2), validate=True)
        Image.open(io.BytesIO(data)).verify()
    except (binascii.Error, ValueError, OSError):
        raise Refused(400, "InvalidImageURL.InvalidFormat", "Invalid base64 image url", param) from None
    return data


def _command_value(name: str, raw: str) -> Any:
    if name in ("duration", "seed"):
        try:
            return int(raw)
        except ValueError:
            raise invalid(name) from None
    if name in ("camera_fixed", "watermark"):
        if raw not in ("true", "false"):
            raise invalid(name)
        return raw == "true"
    return raw


def _nearest_ratio(image: bytes | str | None) -> str:
    if not isinstance(image, bytes):
        return "16:9"
    width, height = Image.open(io.BytesIO(image)).size
    return min(RATIOS, key=lambda r: abs(RATIOS[r] - width / height))
