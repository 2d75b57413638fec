"""A fake DashScope (Model Studio) Wan video API, from the provider reference §i.

Shapes, each from the Model Studio text-to-video / image-to-video API references unless noted:

- auth: ``Authorization: Bearer <key>``, else 401 ``{request_id, code: "InvalidApiKey", message}``
  (DashScope status-code table); creating without ``X-DashScope-Async: enable`` is 403
  ``AccessDenied`` "current user api does not support synchronous calls";
- ``POST /api/v1/services/aigc/video-generation/video-synthesis``: ``{model, input: {prompt,
  negative_prompt?, img_url?}, parameters: {size | resolution, duration, prompt_extend?, watermark?,
  seed?}}``. Text-to-video models take ``size`` ``"W*H"`` from their table and no image;
  image-to-video models take ``resolution`` and need ``img_url`` (http(s) URL or ``data:`` URI).
  Anything else is 400 ``InvalidParameter``. Answered ``{request_id, output: {task_id,
  task_status: "PENDING"}}``. Prompts with ``[429]`` get 429 ``Throttling.RateQuota``, with
  ``[sensitive]`` 400 ``DataInspectionFailed`` (status-code table);
- ``GET /api/v1/tasks/{task_id}``: one step per poll ``PENDING → SUSPENDED → RUNNING → SUCCEEDED``
  (statuses: dashscope-sdk-python ``common/constants.py`` ``TaskStatus``) with ``video_url``,
  ``submit_time``, ``end_time`` and ``usage``; ``[fail]`` ends FAILED with ``output.code/message``,
  ``[filter]`` FAILED ``DataInspectionFailed``, ``[cancel]`` CANCELED, ``[expire]`` UNKNOWN (the
  task is forgotten, as after 24 h); an unknown id is UNKNOWN too;
- ``POST /api/v1/tasks/{task_id}/cancel`` (dashscope-sdk-python ``client/base_api.py`` ``cancel``):
  PENDING tasks become CANCELED, others are refused with 400 ``UnsupportedOperation``;
- ``video_url`` points at ``/oss/{task_id}.mp4?Expires=…&OSSAccessKeyId=…&Signature=…`` on this
  server, like DashScope's signed OSS links; an expired signature is 403 (OSS XML error).
  ``[stale]`` finishes with an already expired URL.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

STEPS = ("PENDING", "SUSPENDED", "RUNNING", "SUCCEEDED")
CREATE = "/api/v1/services/aigc/video-generation/video-synthesis"

_480 = ("832*480", "480*832", "624*624")
_720 = ("1280*720", "720*1280", "960*960", "1088*832", "832*1088")
_1080 = ("1920*1080", "1080*1920", "1440*1440", "1632*1248", "1248*1632")

# Model → (text-to-video sizes or image-to-video resolutions, durations).
T2V = {
    "wan2.1-t2v-turbo": (_480 + _720, (5,)),
    "wan2.1-t2v-plus": (_720, (5,)),
    "wan2.2-t2v-plus": (_480 + _1080, (5,)),
    "wan2.5-t2v-preview": (_480 + _720 + _1080, (5, 10)),
}
I2V = {
    "wan2.1-i2v-turbo": (("480P", "720P"), (3, 4, 5)),
    "wan2.1-i2v-plus": (("720P",), (5,)),
    "wan2.2-i2v-plus": (("480P", "1080P"), (5,)),
    "wan2.5-i2v-preview": (("480P", "720P", "1080P"), (5, 10)),
}
PARAMETERS = {"size", "resolution", "duration", "prompt_extend", "watermark", "seed"}


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"request_id": str(uuid.uuid4()), "code": code, "message": message}
    return web.json_response(body, status=status, headers=headers)


def _invalid(message: str) -> web.Response:
    return _error(400, "InvalidParameter", message)


def _valid_image(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    if value.startswith(("http://", "https://")):
        return True
    head, _, payload = value.partition(",")
    if not (head.startswith("data:image/") and head.endswith(";base64")):
        return False
    try:
        return bool(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        return False


@dataclass
class FakeDashScope:
    api_key: str
    video: Path
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    creates: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    downloads: list[dict[str, str]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    next_id: str | None = None  # the task ID the next create answers (for odd IDs), then generated again

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post(CREATE, self.create)
        app.router.add_get("/api/v1/tasks/{id}", self.get_task)
        app.router.add_post("/api/v1/tasks/{id}/cancel", self.cancel)
        app.router.add_get("/oss/{name}", self.oss)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/oss/"):
            return await handler(request)
        self.headers.append(dict(request.headers))
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return _error(401, "InvalidApiKey", "Invalid API-key provided.")
        if request.path == CREATE and request.headers.get("X-DashScope-Async") != "enable":
            return _error(403, "AccessDenied", "current user api does not support synchronous calls")
        return await handler(request)

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _invalid("The request body is not valid JSON.")
        self.creates.append(body)
        refusal = self._validate(body)
        if refusal is not None:
            return refusal
        prompt = body["input"]["prompt"]
        if "[429]" in prompt:
            return _error(
                429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later."
            )
        if "[sensitive]" in prompt:
            return _error(400, "DataInspectionFailed", "Input data may contain inappropriate content.")
        task_id = self.next_id if self.next_id is not None else str(uuid.uuid4())
        self.next_id = None
        self.tasks[task_id] = {"status": "PENDING", "prompt": prompt, "polls": 0}
        return web.json_response(
            {"request_id": str(uuid.uuid4()), "output": {"task_id": task_id, "task_status": "PENDING"}}
        )

    def _validate(self, body: Any) -> web.Response | None:
        if not isinstance(body, dict) or set(body) != {"model", "input", "parameters"}:
            return _invalid("The body must have exactly model, input and parameters.")
        model, inputs, parameters = body["model"], body["input"], body["parameters"]
        if model not in T2V and model not in I2V:
            return _invalid("Model not exist.")
        if not isinstance(inputs, dict) or not isinstance(parameters, dict):
            return _invalid("input and parameters must be objects.")
        if not isinstance(inputs.get("prompt"), str) or not inputs["prompt"]:
            return _error(400, "BadRequest.EmptyInput", "Required input parameter missing from request.")
        if not set(inputs) <= {"prompt", "negative_prompt", "img_url"} or not set(parameters) <= PARAMETERS:
            return _invalid(f"Unknown field in input or parameters: {sorted(inputs)} {sorted(parameters)}")
        if model in T2V:
            sizes, durations = T2V[model]
            if "img_url" in inputs or "resolution" in parameters:
                return _invalid(f"Model {model} takes no img_url and no resolution.")
            if parameters.get("size") not in sizes:
                return _invalid(f"The size is not match the model: {parameters.get('size')!r}.")
        else:
            resolutions, durations = I2V[model]
            if not _valid_image(inputs.get("img_url")):
                return _invalid("The img_url must be an http(s) URL or a base64 data URI.")
            if "size" in parameters or parameters.get("resolution") not in resolutions:
                return _invalid(f"The resolution is not supported: {parameters.get('resolution')!r}.")
        duration = parameters.get("duration")
        if type(duration) is not int or duration not in durations:
            return _invalid(f"The duration is not supported: {duration!r}.")
        for flag in ("prompt_extend", "watermark"):
            if flag in parameters and not isinstance(parameters[flag], bool):
                return _invalid(f"{flag} must be a boolean.")
        seed = parameters.get("seed", 0)
        if type(seed) is not int or not 0 <= seed <= 2147483647:
            return _invalid("seed must be an integer in [0, 2147483647].")
        return None

    async def get_task(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]
        task = self.tasks.get(task_id)
        output: dict[str, Any] = {"task_id": task_id, "task_status": "UNKNOWN"}
        if task is None or ("[expire]" in task["prompt"] and task["polls"] >= 2):
            return web.json_response({"request_id": str(uuid.uuid4()), "output": output})
        task["polls"] += 1
        if task["status"] != "CANCELED":
            task["status"] = STEPS[min(task["polls"], len(STEPS) - 1)]
        output.update(task_status=task["status"], submit_time="2026-11-25 10:00:00.000")
        answer: dict[str, Any] = {"request_id": str(uuid.uuid4()), "output": output}
        if task["status"] != "SUCCEEDED":
            return web.json_response(answer)
        prompt = task["prompt"]
        output["end_time"] = "2026-11-25 10:05:00.000"
        if "[fail]" in prompt:
            output.update(task_status="FAILED", code="InternalError.Algo", message="Algorithm process error.")
        elif "[filter]" in prompt:
            output.update(
                task_status="FAILED",
                code="DataInspectionFailed",
                message="Output data may contain inappropriate content.",
            )
        elif "[cancel]" in prompt:
            output["task_status"] = "CANCELED"
        else:
            expires = int(time.time()) + (-60 if "[stale]" in prompt else 86400)
            output["video_url"] = str(
                request.url.with_path(f"/oss/{task_id}.mp4").with_query(
                    Expires=str(expires), OSSAccessKeyId="LTAI-fake", Signature="c2lnbmVk"
                )
            )
            answer["usage"] = {"video_duration": 5, "video_count": 1, "SR": 720}
        task["status"] = output["task_status"]
        return web.json_response(answer)

    async def cancel(self, request: web.Request) -> web.Response:
        task_id = request.match_info["id"]
        task = self.tasks.get(task_id)
        if task is None or task["status"] != "PENDING":
            return _error(
                400,
                "UnsupportedOperation",
                "Failed to cancel the task, please confirm if the task is in PENDING status.",
            )
        task["status"] = "CANCELED"
        self.cancelled.append(task_id)
        return web.json_response({"request_id": str(uuid.uuid4())})

    async def oss(self, request: web.Request) -> web.StreamResponse:
        self.downloads.append(dict(request.headers))
        expires = request.query.get("Expires", "0")
        if not expires.isdigit() or int(expires) < time.time():
            return web.Response(
                status=403,
                text="<Error><Code>AccessDenied</Code><Message>Request has expired.</Message></Error>",
                content_type="application/xml",
            )
        return web.FileResponse(self.video, headers={"Content-Type": "video/mp4"})
