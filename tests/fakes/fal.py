"""A fake fal.ai queue (queue.fal.run), from fal-ai/fal ``fal_client/client.py``, fal's queue docs and
its model pages, as summarised in the provider reference §h.

- auth: ``Authorization: Key <key>``, else 401 ``{"detail": "..."}``;
- ``POST /{endpoint_id}``: the input is checked against the endpoint's schema (``ENDPOINTS``, from
  each model's llms.txt page: required fields, enums, ranges; unknown fields are refused, which is
  stricter than fal) → 422 ``{"detail": [{loc, msg, type}]}``; accepted → ``{request_id,
  response_url, status_url, cancel_url, queue_position}``, the URLs built on the *app* path
  (``owner/alias``) like fal's. ``[429]`` in the prompt → 429; ``[elsewhere]`` → the URLs name this
  server by another host name (``localhost``), so a test can see whether the gateway followed them;
- ``GET /{owner}/{alias}/requests/{id}/status``: one step per poll ``IN_QUEUE (queue_position) →
  IN_PROGRESS (logs) → COMPLETED (logs, metrics)``; ``[fail]`` ends ``COMPLETED`` with ``error`` and
  ``error_type``; ``[nsfw]`` ends ``COMPLETED`` whose result is a 422 ``content_policy_violation``
  (the older queue shape); ``[cancel]`` ends ``CANCELED``. A request asked for under another app
  path (e.g. with the endpoint's sub-path kept) is 404;
- ``GET /{owner}/{alias}/requests/{id}``: 400 while unfinished, else the result ``{"video": {url,
  content_type, file_name, file_size}}`` with the URL on ``/files/`` of this server (fal's CDN);
- ``PUT /{owner}/{alias}/requests/{id}/cancel`` → 202 ``CANCELLATION_REQUESTED``, or 400
  ``ALREADY_COMPLETED``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

STEPS = ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")

Check = Callable[[Any], str | None]


def one_of(*values: Any) -> Check:
    return lambda v: None if v in values else "Input should be " + " or ".join(repr(x) for x in values)


def text(v: Any) -> str | None:
    return None if isinstance(v, str) else "Input should be a valid string"


def flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "Input should be a valid boolean"


def number(v: Any) -> str | None:
    return None if isinstance(v, int | float) and not isinstance(v, bool) else "Input should be a number"


def integer(low: int, high: int) -> Check:
    def check(v: Any) -> str | None:
        if not isinstance(v, int) or isinstance(v, bool) or not low <= v <= high:
            return f"Input should be an integer from {low} to {high}"
        return None

    return check


def image(v: Any) -> str | None:
    ok = isinstance(v, str) and (v.startswith(("https://", "http://")) or v.startswith("data:image/"))
    return None if ok else "Input should be a URL or a data URI"


@dataclass(frozen=True)
class Schema:
    fields: dict[str, Check]
    required: frozenset[str] = frozenset({"prompt"})


_VEO = {
    "prompt": text,
    "aspect_ratio": one_of("16:9", "9:16"),
    "duration": one_of("4s", "6s", "8s"),
    "resolution": one_of("720p", "1080p"),
    "negative_prompt": text,
    "seed": integer(0, 2**32),
    "generate_audio": flag,
    "enhance_prompt": flag,
    "auto_fix": flag,
}
_KLING = {"prompt": text, "duration": one_of("5", "10"), "negative_prompt": text, "cfg_scale": number}

ENDPOINTS = {
    "fal-ai/kling-video/v2.5-turbo/pro/text-to-video": Schema(
        {**_KLING, "aspect_ratio": one_of("16:9", "9:16", "1:1")}
    ),
    "fal-ai/kling-video/v2.5-turbo/pro/image-to-video": Schema(
        {**_KLING, "image_url": image}, frozenset({"prompt", "image_url"})
    ),
    "fal-ai/veo3.1": Schema(_VEO),
    "fal-ai/veo3.1/image-to-video": Schema(
        {**_VEO, "aspect_ratio": one_of("auto", "16:9", "9:16"), "image_url": image},
        frozenset({"prompt", "image_url"}),
    ),
    "fal-ai/wan-25-preview/text-to-video": Schema(
        {
            "prompt": text,
            "aspect_ratio": one_of("16:9", "9:16", "1:1"),
            "resolution": one_of("480p", "720p", "1080p"),
            "duration": one_of("5", "10"),
            "negative_prompt": text,
            "seed": integer(0, 2**32),
            "enable_prompt_expansion": flag,
            "audio_url": text,
        }
    ),
    "fal-ai/wan/v2.2-a14b/text-to-video": Schema(
        {
            "prompt": text,
            "num_frames": integer(17, 161),
            "frames_per_second": integer(4, 60),
            "resolution": one_of("480p", "580p", "720p"),
            "aspect_ratio": one_of("16:9", "9:16", "1:1"),
            "negative_prompt": text,
            "seed": integer(0, 2**32),
            "enable_prompt_expansion": flag,
        }
    ),
}


def app_of(endpoint: str) -> str:
    return "/".join(endpoint.split("/")[:2])


@dataclass
class FakeFal:
    api_key: str
    video: Path
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    submits: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    calls: list[tuple[str, str, str]] = field(default_factory=list)  # method, host, path?query
    result_misses: int = 0  # result reads still to answer 404, as a replica behind would

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/files/{name}", self.file)
        app.router.add_get("/{owner}/{alias}/requests/{id}/status", self.status)
        app.router.add_get("/{owner}/{alias}/requests/{id}", self.result)
        app.router.add_put("/{owner}/{alias}/requests/{id}/cancel", self.cancel)
        app.router.add_post("/{endpoint:.+}", self.submit)
        app.router.add_route("*", "/{path:.*}", self.not_found)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append((request.method, request.host, request.path_qs))
        if request.path.startswith("/files/"):
            return await handler(request)
        self.headers.append(dict(request.headers))
        if request.headers.get("Authorization") != f"Key {self.api_key}":
            return web.json_response({"detail": "Invalid authentication credentials"}, status=401)
        return await handler(request)

    def _urls(self, request: web.Request, app: str, request_id: str, elsewhere: bool) -> dict[str, str]:
        url = request.url.with_host("localhost") if elsewhere else request.url
        base = str(url.with_path(f"/{app}/requests/{request_id}").with_query(None))
        return {"response_url": base, "status_url": base + "/status", "cancel_url": base + "/cancel"}

    async def submit(self, request: web.Request) -> web.Response:
        endpoint = request.match_info["endpoint"]
        schema = ENDPOINTS.get(endpoint)
        if schema is None:
            return web.json_response({"detail": f"Application '{endpoint}' not found"}, status=404)
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"detail": "Request body is not valid JSON"}, status=400)
        self.submits.append((endpoint, body))
        if not isinstance(body, dict):
            return web.json_response({"detail": "Input should be an object"}, status=400)
        if "[429]" in str(body.get("prompt")):
            return web.json_response(
                {"detail": "Too many concurrent requests for this user."},
                status=429,
                headers={"Retry-After": "12"},
            )
        errors = [
            {"loc": ["body", name], "msg": "Field required", "type": "missing"}
            for name in sorted(schema.required - set(body))
        ]
        for name, value in body.items():
            check = schema.fields.get(name)
            problem = "Extra inputs are not permitted" if check is None else check(value)
            if problem:
                errors.append({"loc": ["body", name], "msg": problem, "type": "value_error"})
        if errors:
            return web.json_response({"detail": errors}, status=422)
        request_id = str(uuid.uuid4())
        if "[odd name]" in body["prompt"]:  # an ID no client could put in a request line as it is
            request_id += "\n"
        app = app_of(endpoint)
        self.requests[request_id] = {"app": app, "prompt": body["prompt"], "polls": 0, "cancelled": False}
        urls = self._urls(request, app, request_id, "[elsewhere]" in body["prompt"])
        if "[tab url]" in body["prompt"]:  # a tab, which URL parsers drop and a request line keeps
            urls["status_url"] = urls["status_url"].replace("/requests/", "/req\tuests/")
        return web.json_response({"request_id": request_id, **urls, "queue_position": 0})

    def _find(self, request: web.Request) -> dict[str, Any] | None:
        job = self.requests.get(request.match_info["id"])
        app = f"{request.match_info['owner']}/{request.match_info['alias']}"
        return job if job is not None and job["app"] == app else None

    @staticmethod
    def _finished(job: dict[str, Any]) -> bool:
        return job["cancelled"] or job["polls"] > len(STEPS) - 1

    async def status(self, request: web.Request) -> web.Response:
        job = self._find(request)
        if job is None:
            return web.json_response({"detail": "Request not found"}, status=404)
        step = STEPS[min(job["polls"], len(STEPS) - 1)]
        job["polls"] += 1
        answer: dict[str, Any] = {"status": step, "request_id": request.match_info["id"]}
        if step == "IN_QUEUE":
            answer["queue_position"] = 2
        elif step == "IN_PROGRESS":
            answer["logs"] = [{"message": "Generating video...", "level": "INFO"}]
        else:
            answer.update(logs=[], metrics={"inference_time": 41.2})
            if job["cancelled"] or "[cancel]" in job["prompt"]:
                answer = {"status": "CANCELED", "request_id": request.match_info["id"]}
            elif "[fail]" in job["prompt"]:
                answer.update(error="Runner disconnected while generating.", error_type="runner_disconnected")
        return web.json_response(answer)

    async def result(self, request: web.Request) -> web.Response:
        job = self._find(request)
        if job is None:
            return web.json_response({"detail": "Request not found"}, status=404)
        if not self._finished(job):
            return web.json_response({"detail": "Request is still in progress"}, status=400)
        if self.result_misses:
            self.result_misses -= 1
            return web.json_response({"detail": "Request not found"}, status=404)
        if "[nsfw]" in job["prompt"]:
            detail = [
                {
                    "loc": ["body", "prompt"],
                    "msg": "The content was flagged by a content checker.",
                    "type": "content_policy_violation",
                }
            ]
            return web.json_response({"detail": detail}, status=422)
        name = f"{request.match_info['id']}.mp4"
        url = str(request.url.with_path(f"/files/{name}").with_query(None))
        video = {
            "url": url,
            "content_type": "video/mp4",
            "file_name": name,
            "file_size": self.video.stat().st_size,
        }
        return web.json_response({"video": video, "seed": 42})

    async def cancel(self, request: web.Request) -> web.Response:
        job = self._find(request)
        if job is None:
            return web.json_response({"detail": "Request not found"}, status=404)
        if self._finished(job):
            return web.json_response({"status": "ALREADY_COMPLETED"}, status=400)
        job["cancelled"] = True
        return web.json_response({"status": "CANCELLATION_REQUESTED"}, status=202)

    async def not_found(self, request: web.Request) -> web.Response:
        return web.json_response({"detail": "Not Found"}, status=404)

    async def file(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.video, headers={"Content-Type": "video/mp4"})
