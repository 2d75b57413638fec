"""A fake Replicate API (api.replicate.com), from replicate/replicate-python and replicate.com's docs
as summarised in the provider reference §g.

- auth: ``Authorization: Bearer <token>`` (401 problem details otherwise); every error is RFC 7807
  ``{type, title, status, detail}`` (``exceptions.py`` ``ReplicateError``);
- ``POST /v1/models/{owner}/{name}/predictions {input}`` (``model.py``), ``POST /v1/predictions
  {version, input}`` (``prediction.py``), ``POST /v1/deployments/{owner}/{name}/predictions {input}``
  (``deployment.py``) → 201 with the prediction; unknown model/version/deployment → 404; a body
  of the wrong shape → 400; an input the model's schema refuses → 422 "Input validation failed"
  (stricter than Replicate: unknown input fields are refused too, so a wrong field name fails);
- the input schemas are those of replicate.com/{owner}/{model}/api for the models in ``SCHEMAS``;
- ``GET /v1/predictions/{id}``: one step per poll, ``starting → starting → processing (logs with a
  tqdm bar at 45 %) → succeeded`` (``output`` a URL; a list of URLs for version predictions).
  Prompt markers: ``[fail]`` ends ``failed`` with an ``error`` string, ``[nsfw]`` fails with
  Replicate's E005 sensitive-content error, ``[cancel]`` ends ``canceled``, ``[abort]`` goes
  from ``starting`` to ``aborted``, ``[nolog]`` logs no percentage, ``[slow]`` stays processing;
- ``POST /v1/predictions/{id}/cancel`` → 200, the prediction ``canceled`` unless it had finished;
- ``POST /v1/files`` (multipart ``content``) → 201 ``{id, …, urls: {get}}`` (``file.py``);
- throttling: prompts with ``[429]`` get 429 ``{"detail": "Request was throttled. Your rate limit
  resets in ~30s."}`` without Retry-After, ``[429h]`` the same with ``Retry-After: 7``;
- :meth:`FakeReplicate.expire` removes an output as Replicate does an hour after completion: either
  ``output: null, data_removed: true`` or the output URL answering 404.
"""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

VERSION_ID = "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"
VERSIONS = {VERSION_ID: "minimax/hailuo-02"}
DEPLOYMENTS = {"acme/hailuo-prod": "minimax/hailuo-02"}

_STR = "string"
_BOOL = "boolean"
_INT = "integer"

# field → a type name or the set of allowed values; REQUIRED lists fields that must be present.
SCHEMAS: dict[str, dict[str, Any]] = {
    "minimax/hailuo-02": {
        "prompt": _STR,
        "first_frame_image": _STR,
        "last_frame_image": _STR,
        "prompt_optimizer": _BOOL,
        "duration": {6, 10},
        "resolution": {"512p", "768p", "1080p"},
    },
    "google/veo-3": {
        "prompt": _STR,
        "image": _STR,
        "negative_prompt": _STR,
        "seed": _INT,
        "aspect_ratio": {"16:9", "9:16"},
        "resolution": {"720p", "1080p"},
    },
    "kwaivgi/kling-v2.1": {
        "prompt": _STR,
        "start_image": _STR,
        "end_image": _STR,
        "negative_prompt": _STR,
        "mode": {"standard", "pro"},
        "duration": {5, 10},
    },
    "wan-video/wan-2.2-t2v-fast": {
        "prompt": _STR,
        "num_frames": range(81, 101),
        "frames_per_second": range(5, 25),
        "aspect_ratio": {"16:9", "9:16"},
        "resolution": {"480p", "720p"},
        "seed": _INT,
        "go_fast": _BOOL,
        "sample_shift": _INT,
    },
}
REQUIRED = {"kwaivgi/kling-v2.1": ("prompt", "start_image")}
_TYPES = {_STR: str, _BOOL: bool, _INT: int}


def problem(status: int, title: str, detail: str, **headers: str) -> web.Response:
    return web.json_response(
        {
            "type": f"https://replicate.com/docs/reference/http#{status}",
            "title": title,
            "status": status,
            "detail": detail,
        },
        status=status,
        content_type="application/problem+json",
        headers=headers,
    )


def _now() -> str:
    """Replicate's timestamp form: ISO 8601, microseconds, ``Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _invalid(model: str, model_input: dict[str, Any]) -> list[str]:
    schema = SCHEMAS[model]
    errors = [
        f"input.{name}: {name} is required"
        for name in REQUIRED.get(model, ("prompt",))
        if name not in model_input
    ]
    for name, value in model_input.items():
        rule = schema.get(name)
        if rule is None:
            errors.append(f"input.{name}: Additional property {name} is not allowed")
        elif isinstance(rule, str):
            wanted = _TYPES[rule]
            if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
                errors.append(f"input.{name}: Invalid type. Expected: {rule}")
        elif isinstance(value, bool) or value not in rule:
            errors.append(f"input.{name}: {name} must be one of the following: {sorted(rule)}")
    return errors


@dataclass
class FakeReplicate:
    api_key: str
    video: Path
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    creates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    uploads: list[dict[str, Any]] = field(default_factory=list)
    gone_outputs: set[str] = field(default_factory=set)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v1/models/{owner}/{name}/predictions", self.create_official)
        app.router.add_post("/v1/predictions", self.create_versioned)
        app.router.add_post("/v1/deployments/{owner}/{name}/predictions", self.create_deployment)
        app.router.add_get("/v1/predictions/{id}", self.get_prediction)
        app.router.add_post("/v1/predictions/{id}/cancel", self.cancel)
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/delivery/{id}/output.mp4", self.output)
        return app

    def expire(self, prediction_id: str, *, url_gone: bool = False) -> None:
        """Remove an output as Replicate does an hour after the prediction finished."""
        if url_gone:
            self.gone_outputs.add(prediction_id)
        else:
            self.predictions[prediction_id]["expired"] = True

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/delivery/"):
            return await handler(request)
        self.headers.append(dict(request.headers))
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return problem(401, "Unauthenticated", "You did not pass a valid authentication token")
        return await handler(request)

    async def create_official(self, request: web.Request) -> web.Response:
        model = f"{request.match_info['owner']}/{request.match_info['name']}"
        return await self._create(request, model, versioned=False)

    async def create_deployment(self, request: web.Request) -> web.Response:
        model = DEPLOYMENTS.get(f"{request.match_info['owner']}/{request.match_info['name']}")
        return await self._create(request, model, versioned=False)

    async def create_versioned(self, request: web.Request) -> web.Response:
        return await self._create(request, None, versioned=True)

    async def _create(self, request: web.Request, model: str | None, *, versioned: bool) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return problem(400, "Bad request", "The request body is not valid JSON.")
        self.creates.append((request.path, body))
        allowed = {"input", "webhook", "webhook_events_filter", "stream"} | (
            {"version"} if versioned else set()
        )
        if not isinstance(body, dict) or not isinstance(body.get("input"), dict) or set(body) - allowed:
            return problem(
                400, "Bad request", f"Unexpected request body fields: {sorted(set(body) - allowed)}"
            )
        if versioned:
            model = VERSIONS.get(str(body.get("version")))
            if model is None:
                return problem(
                    422,
                    "Invalid version",
                    "The specified version does not exist (or perhaps you don't have permission to use it?)",
                )
        if model not in SCHEMAS:
            return problem(404, "Not found", "The requested resource could not be found.")
        model_input = body["input"]
        prompt = str(model_input.get("prompt", ""))
        if "[429" in prompt:
            headers = {"Retry-After": "7"} if "[429h]" in prompt else {}
            return problem(
                429,
                "Request was throttled",
                "Request was throttled. Your rate limit resets in ~30s.",
                **headers,
            )
        errors = _invalid(model, model_input)
        if errors:
            return web.json_response(
                {
                    "title": "Input validation failed",
                    "status": 422,
                    "detail": "".join(f"- {e}\n" for e in errors),
                },
                status=422,
                content_type="application/problem+json",
            )
        prediction_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(26))
        self.predictions[prediction_id] = {
            "id": prediction_id,
            "model": model,
            "version": body.get("version") or "hidden",
            "input": model_input,
            "status": "starting",
            "created_at": _now(),
            "versioned": versioned,
            "polls": 0,
        }
        return web.json_response(self._view(request, self.predictions[prediction_id]), status=201)

    def _view(self, request: web.Request, p: dict[str, Any]) -> dict[str, Any]:
        base = f"{request.scheme}://{request.host}/v1/predictions/{p['id']}"
        view = {k: p.get(k) for k in ("id", "model", "version", "input", "status", "created_at")}
        view.update(
            output=None,
            error=None,
            logs="",
            data_removed=False,
            started_at=None,
            completed_at=None,
            urls={"get": base, "cancel": f"{base}/cancel", "web": f"https://replicate.com/p/{p['id']}"},
        )
        prompt = str(p["input"].get("prompt", ""))
        view["started_at"] = p.get("started_at")
        view["completed_at"] = p.get("completed_at")
        if p["status"] == "processing":
            view["logs"] = (
                "Generating video...\n"
                if "[nolog]" in prompt
                else "Loading model\n 20%|██        | 4/20 [00:04<00:16]"
                "\r 45%|████▌     | 9/20 [00:09<00:11]\n"
            )
        if p["status"] == "failed":
            view["error"] = p["error"]
        if p["status"] == "succeeded":
            url = f"{request.scheme}://{request.host}/delivery/{p['id']}/output.mp4"
            view["output"] = [url] if p["versioned"] else url
            if p.get("expired"):
                view.update(output=None, logs=None, input={}, data_removed=True)
        return view

    async def get_prediction(self, request: web.Request) -> web.Response:
        p = self.predictions.get(request.match_info["id"])
        if p is None:
            return problem(404, "Not found", "The requested resource could not be found.")
        p["polls"] += 1
        if p["status"] in ("starting", "processing"):
            self._advance(p)
            if p["status"] not in ("starting", "aborted"):
                p.setdefault("started_at", _now())
            if p["status"] not in ("starting", "processing"):
                p["completed_at"] = _now()
        return web.json_response(self._view(request, p))

    @staticmethod
    def _advance(p: dict[str, Any]) -> None:
        prompt = str(p["input"].get("prompt", ""))
        if p["polls"] < 2:
            return
        if "[abort]" in prompt:
            p["status"] = "aborted"  # deadline passed while still queued: it never ran
        elif p["polls"] == 2 or "[slow]" in prompt:
            p["status"] = "processing"
        elif "[fail]" in prompt:
            p.update(status="failed", error="CUDA out of memory. Tried to allocate 2.00 GiB")
        elif "[nsfw]" in prompt:
            p.update(
                status="failed",
                error="The input or output was flagged as sensitive. Please try again with different "
                "inputs. (E005)",
            )
        elif "[cancel]" in prompt:
            p["status"] = "canceled"
        else:
            p["status"] = "succeeded"

    async def cancel(self, request: web.Request) -> web.Response:
        p = self.predictions.get(request.match_info["id"])
        if p is None:
            return problem(404, "Not found", "The requested resource could not be found.")
        self.cancels.append(p["id"])
        if p["status"] in ("starting", "processing"):
            p.update(status="canceled", completed_at=_now())
        return web.json_response(self._view(request, p))

    async def upload(self, request: web.Request) -> web.Response:
        if not request.content_type.startswith("multipart/"):
            return problem(400, "Bad request", "Expected a multipart/form-data body.")
        form = await request.post()
        content = form.get("content")
        if not isinstance(content, web.FileField):
            return problem(400, "Bad request", "The 'content' file field is required.")
        data = content.file.read()
        file_id = secrets.token_hex(8)
        self.uploads.append(
            {"filename": content.filename, "content_type": content.content_type, "data": data}
        )
        url = f"{request.scheme}://{request.host}/v1/files/{file_id}"
        return web.json_response(
            {
                "id": file_id,
                "name": content.filename,
                "content_type": content.content_type,
                "size": len(data),
                "etag": file_id,
                "checksums": {},
                "metadata": {},
                "created_at": "2026-11-25T10:00:00Z",
                "expires_at": "2026-11-26T10:00:00Z",
                "urls": {"get": url},
            },
            status=201,
        )

    async def output(self, request: web.Request) -> web.StreamResponse:
        prediction_id = request.match_info["id"]
        if prediction_id in self.gone_outputs or prediction_id not in self.predictions:
            return web.Response(status=404, text="Not Found")
        return web.FileResponse(self.video, headers={"Content-Type": "video/mp4"})
