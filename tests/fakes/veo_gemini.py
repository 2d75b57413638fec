"""A fake Gemini API for Veo (generativelanguage.googleapis.com), after the provider reference §a1.

Shapes from googleapis/python-genai (``models.py`` ``_GenerateVideosParameters_to_mldev``,
``_GenerateVideosConfig_to_mldev``, ``_GenerateVideosOperation_from_mldev``; ``errors.py``;
``files.py`` ``download``):

- auth: ``x-goog-api-key``; none → 403 ``PERMISSION_DENIED``, a wrong one → 400 ``INVALID_ARGUMENT``
  with ``ErrorInfo.reason = API_KEY_INVALID`` (what the Gemini API answers for a bad key);
- ``POST /v1beta/models/{model}:predictLongRunning`` ``{"instances": [{"prompt", "image"?:
  {"bytesBase64Encoded", "mimeType"}}], "parameters": {...}}`` → ``{"name":
  "models/{model}/operations/{id}"}``; a malformed body or a parameter the Gemini API refuses
  (``seed``, ``generateAudio``, ``gcsUri`` images...) → 400 ``INVALID_ARGUMENT``; a prompt with
  ``[429]`` → 429 ``RESOURCE_EXHAUSTED`` carrying a ``google.rpc.RetryInfo`` delay;
- ``GET /v1beta/models/{model}/operations/{id}``: one step per poll, ``{name}`` → ``{name, done:
  false}`` → ``{name, done: true, response: {generateVideoResponse: {generatedSamples: [{video:
  {uri}}]}}}``; ``[fail]`` ends with ``error: {code: 13, message}``, ``[filter]`` with no sample and
  ``raiMediaFilteredCount``/``raiMediaFilteredReasons``;
- ``GET /v1beta/files/{id}:download?alt=media`` (API key required) redirects to ``/media/{id}.mp4``,
  which needs no key, like Google's file hosts; a forgotten file is 404.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

ALLOWED_PARAMETERS = {
    "aspectRatio",
    "resolution",
    "durationSeconds",
    "negativePrompt",
    "personGeneration",
    "enhancePrompt",
    "sampleCount",
}


def rpc_error(status: int, rpc: str, message: str, **extra: Any) -> web.Response:
    return web.json_response(
        {"error": {"code": status, "message": message, "status": rpc, **extra}}, status=status
    )


def invalid(message: str) -> web.Response:
    return rpc_error(400, "INVALID_ARGUMENT", message)


def check_image(image: Any, *, gcs: bool) -> str | None:
    """What is wrong with an instance image, or None."""
    if not isinstance(image, dict) or not isinstance(image.get("mimeType"), str):
        return "image must carry mimeType."
    if "gcsUri" in image and gcs:
        return (
            None if set(image) == {"gcsUri", "mimeType"} else "image takes one of bytesBase64Encoded, gcsUri."
        )
    if set(image) != {"bytesBase64Encoded", "mimeType"}:
        return f"Unknown image fields: {sorted(set(image) - {'mimeType'})}."
    try:
        base64.b64decode(image["bytesBase64Encoded"], validate=True)
    except (binascii.Error, TypeError, ValueError):
        return "image.bytesBase64Encoded is not base64."
    return None


def durations_of(model: str) -> tuple[int, ...]:
    """``durationSeconds`` a model takes: 4, 6 or 8 (reference §a1); Veo 2, which the reference does
    not cover, 5 to 8 (Google's Veo 2 model page)."""
    return (5, 6, 7, 8) if model.startswith("veo-2") else (4, 6, 8)


def check_body(body: Any, allowed: set[str], *, durations: tuple[int, ...], gcs: bool = False) -> str | None:
    """The checks Veo makes on a predictLongRunning body (both APIs); a message when it is wrong."""
    if not isinstance(body, dict) or set(body) - {"instances", "parameters"}:
        return "Invalid JSON payload received."
    instances = body.get("instances")
    if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
        return "instances must hold exactly one instance."
    instance = instances[0]
    if set(instance) - {"prompt", "image"} or not isinstance(instance.get("prompt"), str):
        return "instances[0] takes prompt and image."
    if "image" in instance and (problem := check_image(instance["image"], gcs=gcs)):
        return problem
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        return "parameters must be an object."
    for name in parameters:
        if name not in allowed:
            return f"`{name}` isn't supported by this model."
    if parameters.get("aspectRatio") not in ("16:9", "9:16"):
        return "aspectRatio must be 16:9 or 9:16."
    if parameters.get("resolution", "720p") not in ("720p", "1080p"):
        return "resolution must be 720p or 1080p."
    seconds = parameters.get("durationSeconds")
    if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds not in durations:
        return f"durationSeconds must be one of {', '.join(map(str, durations))} for this model."
    return None


@dataclass
class FakeVeoGemini:
    api_key: str
    video: Path
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: set[str] = field(default_factory=set)
    creates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    downloads: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    retired: set[str] = field(default_factory=set)  # models Google no longer serves: 404 NOT_FOUND
    file_uri: str | None = None  # what a finished operation names instead of its file (a broken answer)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/v1beta/models/{model}:predictLongRunning", self.create)
        app.router.add_get("/v1beta/models/{model}/operations/{op}", self.get_operation)
        app.router.add_get("/v1beta/files/{file}:download", self.download)
        app.router.add_get("/media/{file}.mp4", self.media)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.headers.append(dict(request.headers))
        if request.path.startswith("/media/"):
            return await handler(request)
        key = request.headers.get("x-goog-api-key")
        if key is None:
            return rpc_error(403, "PERMISSION_DENIED", "Method doesn't allow unregistered callers.")
        if key != self.api_key:
            reason = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
            return rpc_error(
                400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.", details=[reason]
            )
        return await handler(request)

    async def create(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model in self.retired:
            return rpc_error(
                404,
                "NOT_FOUND",
                f"models/{model} is not found for API version v1beta, or is not supported for "
                "predictLongRunning. Call ListModels to see the list of available models.",
            )
        try:
            body = await request.json()
        except ValueError:
            return invalid("Invalid JSON payload received.")
        self.creates.append((model, body))
        problem = check_body(body, ALLOWED_PARAMETERS, durations=durations_of(model))
        if problem:
            return invalid(problem)
        prompt = body["instances"][0]["prompt"]
        if "[429]" in prompt:
            retry = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "27.5s"}
            return rpc_error(
                429, "RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota).", details=[retry]
            )
        name = f"models/{model}/operations/{uuid.uuid4().hex[:12]}"
        if "[odd name]" in prompt:  # a name no client could put in a request line as it is
            name += "\n"
        self.operations[name] = {"prompt": prompt, "polls": 0}
        return web.json_response({"name": name})

    async def get_operation(self, request: web.Request) -> web.Response:
        name = f"models/{request.match_info['model']}/operations/{request.match_info['op']}"
        operation = self.operations.get(name)
        if operation is None:
            return rpc_error(404, "NOT_FOUND", f"Operation {name} not found.")
        operation["polls"] += 1
        if operation["polls"] < 3:
            return web.json_response(
                {"name": name} if operation["polls"] == 1 else {"name": name, "done": False}
            )
        answer: dict[str, Any] = {"name": name, "done": True}
        prompt = operation["prompt"]
        if "[fail]" in prompt:
            answer["error"] = {"code": 13, "message": "Video generation failed due to an internal error."}
            return web.json_response(answer)
        result: dict[str, Any] = {}
        if "[filter]" in prompt:
            result = {
                "raiMediaFilteredCount": 1,
                "raiMediaFilteredReasons": ["The video was filtered because it may violate our policies."],
            }
        else:
            file_id = name.rsplit("/", 1)[-1]
            if operation["polls"] == 3:  # the file exists from when the operation completed
                self.files.add(file_id)
            uri = str(request.url.with_path(f"/v1beta/files/{file_id}:download").with_query(alt="media"))
            result = {"generatedSamples": [{"video": {"uri": self.file_uri or uri}}]}
        answer["response"] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse",
            "generateVideoResponse": result,
        }
        return web.json_response(answer)

    async def download(self, request: web.Request) -> web.Response:
        file_id = request.match_info["file"]
        self.downloads.append((request.path, dict(request.headers)))
        if request.query.get("alt") != "media":
            return invalid("alt=media is required to download a file.")
        if file_id not in self.files:
            return rpc_error(404, "NOT_FOUND", f"File {file_id} not found.")
        raise web.HTTPFound(f"/media/{file_id}.mp4")

    async def media(self, request: web.Request) -> web.StreamResponse:
        self.downloads.append((request.path, dict(request.headers)))
        if request.match_info["file"] not in self.files:
            return web.Response(status=404)
        return web.FileResponse(self.video, headers={"Content-Type": "video/mp4"})
