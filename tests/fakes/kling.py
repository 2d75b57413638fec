"""A fake Kling API (api-singapore.klingai.com), from the provider reference §e: Kling's "General
Information" page (JWT auth, the error-code table) and new-api ``relay/channel/task/kling`` (paths,
bodies, answers).

- auth: ``Authorization: Bearer <jwt>``, an HS256 JWT ``{iss, exp, nbf}`` checked here with its own
  decoder: header ``{alg: HS256, typ: JWT}``, HMAC-SHA256 signature with the secret key, ``iss`` the
  access key, ``nbf <= now < exp``. Refusals are HTTP 401 with codes 1001 (no header), 1002 (bad
  token or signature), 1003 (not yet valid), 1004 (expired); ``claims`` and ``tokens`` record what
  was accepted;
- ``POST /v1/videos/text2video`` / ``image2video``: ``{model_name, prompt, negative_prompt?,
  cfg_scale?, mode?, duration: "5"|"10" (string), aspect_ratio (t2v only), image (i2v: raw base64,
  no ``data:`` prefix, or an http(s) URL)}``; anything else is HTTP 400 code 1201. Answer ``{code: 0,
  message: "SUCCEED", request_id, data: {task_id, task_status: "submitted", created_at, updated_at}}``;
- prompt markers: ``[429]`` → HTTP 429 code 1302 (rate), ``[quota]`` → HTTP 429 code 1102 (resource
  pack used up), ``[policy]`` → HTTP 400 code 1301, ``[200-error]`` → HTTP 200 with code 1303,
  ``[5001]`` → HTTP 503 code 5001;
- ``GET /v1/videos/{endpoint}/{task_id}``: only under the endpoint that created the task (else HTTP
  404 code 1203, like an unknown task); ``submitted → processing → succeed`` one step per poll, with
  ``task_result.videos[0].{id, url, duration}``; ``[risk]`` ends ``failed`` with Kling's risk-control
  message, ``[fail]`` ends ``failed`` with an internal error;
- the video URL points at ``/kcdn/{task_id}.mp4`` on this server (no auth, like Kling's CDN);
  ``[gone]`` makes it answer 404, as after the 30-day retention.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

STEPS = ("submitted", "processing", "succeed")
MODELS = {"kling-v1", "kling-v1-6", "kling-v2-master", "kling-v2-1-master", "kling-v2-5-turbo", "kling-v2-6"}
T2V_KEYS = {
    "model_name",
    "prompt",
    "negative_prompt",
    "cfg_scale",
    "mode",
    "duration",
    "aspect_ratio",
    "sound",
}
I2V_KEYS = (T2V_KEYS - {"aspect_ratio"}) | {"image", "image_tail"}
RISK_MESSAGE = "Failure to pass the risk control system"


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _error(status: int, code: int, message: str) -> web.Response:
    return web.json_response(
        {"code": code, "message": message, "request_id": str(uuid.uuid4())}, status=status
    )


@dataclass
class FakeKling:
    access_key: str
    secret_key: str
    video: Path
    base_url: str = ""
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    creates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    claims: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    next_id: str | None = None  # the task ID the next create answers (for odd IDs), then generated again

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v1/videos/{endpoint:text2video|image2video}", self.create)
        app.router.add_get("/v1/videos/{endpoint:text2video|image2video}/{id}", self.get_task)
        app.router.add_get("/kcdn/{name}", self.output)
        return app

    def verify(self, authorization: str | None) -> tuple[int, str] | dict[str, Any]:
        """The token's claims, or the Kling code and message refusing it."""
        if not authorization:
            return 1001, "Authorization is empty"
        scheme, _, token = authorization.partition(" ")
        parts = token.split(".")
        if scheme != "Bearer" or len(parts) != 3:
            return 1002, "Authorization is invalid"
        try:
            header, claims = json.loads(_unb64(parts[0])), json.loads(_unb64(parts[1]))
            signature = _unb64(parts[2])
        except (binascii.Error, ValueError):
            return 1002, "Authorization is invalid"
        if header != {"alg": "HS256", "typ": "JWT"} or not isinstance(claims, dict):
            return 1002, "Authorization is invalid"
        expected = hmac.new(
            self.secret_key.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256
        ).digest()
        if not hmac.compare_digest(signature, expected) or claims.get("iss") != self.access_key:
            return 1002, "Authorization is invalid"
        now = time.time()
        if not isinstance(claims.get("nbf"), int) or not isinstance(claims.get("exp"), int):
            return 1002, "Authorization is invalid"
        if claims["nbf"] > now:
            return 1003, "Authorization is not active yet"
        if claims["exp"] <= now:
            return 1004, "Authorization has expired"
        self.tokens.append(token)
        return claims

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/kcdn/"):
            return await handler(request)
        self.headers.append(dict(request.headers))
        verdict = self.verify(request.headers.get("Authorization"))
        if isinstance(verdict, tuple):
            return _error(401, *verdict)
        self.claims.append(verdict)
        return await handler(request)

    @staticmethod
    def _invalid(endpoint: str, body: Any) -> str | None:
        if not isinstance(body, dict):
            return "body must be a JSON object"
        keys = T2V_KEYS if endpoint == "text2video" else I2V_KEYS
        if set(body) - keys:
            return f"unknown parameters: {sorted(set(body) - keys)}"
        if body.get("model_name") not in MODELS:
            return "model_name is invalid"
        if not isinstance(body.get("prompt"), str) or not 0 < len(body["prompt"]) <= 2500:
            return "prompt is invalid"
        if body.get("duration") not in ("5", "10"):
            return "duration must be the string '5' or '10'"
        if "mode" in body and body["mode"] not in ("std", "pro"):
            return "mode is invalid"
        if "cfg_scale" in body and not (
            isinstance(body["cfg_scale"], int | float) and 0 <= body["cfg_scale"] <= 1
        ):
            return "cfg_scale is invalid"
        if endpoint == "text2video":
            if body.get("aspect_ratio", "16:9") not in ("16:9", "9:16", "1:1"):
                return "aspect_ratio is invalid"
            return None
        image = body.get("image")
        if not isinstance(image, str) or not image:
            return "image is required"
        if image.startswith(("http://", "https://")):
            return None
        try:
            base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            return "image must be raw base64 without a data: prefix, or an URL"
        return None

    async def create(self, request: web.Request) -> web.Response:
        endpoint = request.match_info["endpoint"]
        try:
            body = await request.json()
        except ValueError:
            return _error(400, 1200, "request body is not JSON")
        self.creates.append((endpoint, body))
        problem = self._invalid(endpoint, body)
        if problem is not None:
            return _error(400, 1201, problem)
        prompt = body["prompt"]
        if "[429]" in prompt:
            return _error(429, 1302, "The API request is too fast, please slow down")
        if "[quota]" in prompt:
            return _error(429, 1102, "Resource pack exhausted or expired")
        if "[policy]" in prompt:
            return _error(400, 1301, "Trigger the content security policy of the platform")
        if "[200-error]" in prompt:
            return _error(200, 1303, "Parallel tasks exceed the resource pack limit")
        if "[5001]" in prompt:
            return _error(503, 5001, "Service temporarily unavailable, usually under maintenance")
        task_id = self.next_id if self.next_id is not None else str(uuid.uuid4().int)[:18]
        self.next_id = None
        now_ms = int(time.time() * 1000)
        self.tasks[task_id] = {"endpoint": endpoint, "prompt": prompt, "polls": 0, "created_at": now_ms}
        return web.json_response(
            {
                "code": 0,
                "message": "SUCCEED",
                "request_id": str(uuid.uuid4()),
                "data": {
                    "task_id": task_id,
                    "task_status": "submitted",
                    "task_info": {},
                    "created_at": now_ms,
                    "updated_at": now_ms,
                },
            }
        )

    async def get_task(self, request: web.Request) -> web.Response:
        task = self.tasks.get(request.match_info["id"])
        if task is None or task["endpoint"] != request.match_info["endpoint"]:
            return _error(404, 1203, "The requested resource does not exist")
        task["polls"] += 1
        step = STEPS[min(task["polls"] - 1, len(STEPS) - 1)]
        data: dict[str, Any] = {
            "task_id": request.match_info["id"],
            "task_status": step,
            "task_status_msg": "",
            "task_info": {},
            "created_at": task["created_at"],
            "updated_at": int(time.time() * 1000),
        }
        if step == "succeed":
            if "[risk]" in task["prompt"]:
                data.update(task_status="failed", task_status_msg=RISK_MESSAGE)
            elif "[fail]" in task["prompt"]:
                data.update(task_status="failed", task_status_msg="Internal error, please try again later")
            else:
                video_id = f"v{request.match_info['id']}"
                url = f"{self.base_url}/kcdn/{request.match_info['id']}.mp4?x-kcdn-pid=112452"
                data["task_result"] = {"videos": [{"id": video_id, "url": url, "duration": "5.1"}]}
        return web.json_response(
            {"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": data}
        )

    async def output(self, request: web.Request) -> web.StreamResponse:
        task = self.tasks.get(request.match_info["name"].removesuffix(".mp4"))
        if task is None or "[gone]" in task["prompt"]:
            return web.Response(status=404, text="Not Found")
        return web.FileResponse(self.video, headers={"Content-Type": "video/mp4"})
