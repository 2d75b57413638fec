"""The local provider served on its own, speaking the OpenAI Videos dialect.

``video-gateway simulate`` runs it: a realistic upstream for demos, tests and benchmarks, with the
same answers, statuses, error envelope and media as the real API (single tenant, no model list).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.api import list_params
from gateway.auth import bearer_token, same_key
from gateway.bodies import read_body
from gateway.config import Limits
from gateway.context import request_id
from gateway.errors import ApiError, bad_request, from_http_exception
from gateway.providers.base import FileAnswer
from gateway.providers.local import (
    Derivation,
    LocalEngine,
    character_name,
    derived_fields,
    model_field,
    reference_image,
    request_fields,
    uploaded_video,
)
from gateway.videos import VARIANTS

ENGINE = web.AppKey("engine", LocalEngine)
_LIMITS = Limits()


def _engine(request: web.Request) -> LocalEngine:
    return request.app[ENGINE]


async def _job(request: web.Request) -> dict[str, object]:
    job = await _engine(request).get(request.match_info["video_id"])
    if job is None:
        raise ApiError(
            404,
            f"No video found with id '{request.match_info['video_id']}'.",
            param="video_id",
            code="video_not_found",
        )
    return job


async def create(request: web.Request) -> web.Response:
    body = await read_body(request, _LIMITS, until=())
    try:
        await body.read_rest()
        model = model_field(body)
        fields = request_fields(body)
        job = await _engine(request).create(model=model, reference=await reference_image(body), **fields)
        return web.json_response(job)
    finally:
        body.close()


async def retrieve(request: web.Request) -> web.Response:
    job = await _job(request)
    headers = {"openai-poll-after-ms": "200"} if job["status"] in ("queued", "in_progress") else {}
    return web.json_response(job, headers=headers)


async def list_jobs(request: web.Request) -> web.Response:
    after, limit, order = list_params(request)
    try:
        jobs, more = await _engine(request).list(after=after, limit=limit, order=order)
    except KeyError:
        raise bad_request(f"'after' names no video: '{after}'.", param="after") from None
    return web.json_response(
        {
            "object": "list",
            "data": jobs,
            "first_id": jobs[0]["id"] if jobs else None,
            "last_id": jobs[-1]["id"] if jobs else None,
            "has_more": more,
        }
    )


async def delete(request: web.Request) -> web.Response:
    job = await _job(request)
    await _engine(request).delete(str(job["id"]))
    return web.json_response({"id": job["id"], "object": "video.deleted", "deleted": True})


async def content(request: web.Request) -> web.StreamResponse:
    variant = request.query.get("variant", "video")
    if variant not in VARIANTS:
        raise bad_request(f"'variant' must be one of: {', '.join(VARIANTS)}.", param="variant")
    path, content_type = await _engine(request).asset(request.match_info["video_id"], variant)
    return FileAnswer(path, headers={"Content-Type": content_type})  # If-Range by ETag too


async def remix(request: web.Request) -> web.Response:
    source = await _engine(request).source(request.match_info["video_id"], "remix")
    body = await read_body(request, _LIMITS, until=())
    try:
        await body.read_rest()
        fields = derived_fields(body, source, "remix")
        job = await _engine(request).create(
            model=str(source["model"]), remixed_from=str(source["id"]), **fields
        )
        return web.json_response(job)
    finally:
        body.close()


async def _from_video(request: web.Request, kind: Derivation) -> web.Response:
    """Edits and extensions: ``video`` is an uploaded file or ``{"id": ...}`` (``video[id]`` in a form)."""
    body = await read_body(request, _LIMITS, until=())
    try:
        await body.read_rest()
        ref = body.get_object("video")
        if ref is not None:
            source = await _engine(request).source(_video_id(ref), kind)
            model = str(source["model"])
        else:
            source = await uploaded_video(body)
            model = model_field(body)
        fields = derived_fields(body, source, kind)
        return web.json_response(await _engine(request).create(model=model, **fields))
    finally:
        body.close()


def _video_id(ref: dict[str, Any]) -> str:
    video_id = ref.get("id")
    if not isinstance(video_id, str) or not video_id:
        raise bad_request("'video' must be an uploaded file or an object with an 'id'.", param="video")
    return video_id


async def edit(request: web.Request) -> web.Response:
    return await _from_video(request, "edit")


async def extend(request: web.Request) -> web.Response:
    return await _from_video(request, "extension")


async def create_character(request: web.Request) -> web.Response:
    body = await read_body(request, _LIMITS, until=())
    try:
        await body.read_rest()
        return web.json_response(await _engine(request).create_character(await character_name(body)))
    finally:
        body.close()


async def get_character(request: web.Request) -> web.Response:
    character = await _engine(request).get_character(request.match_info["character_id"])
    if character is None:
        raise ApiError(404, "No such character.", param="character_id", code="character_not_found")
    return web.json_response(character)


def build_simulator(
    root: Path, *, api_key: str | None = None, queue_seconds: float = 1.0, run_seconds: float = 3.0
) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler: web.Handler) -> web.StreamResponse:
        """The envelope and ``x-request-id`` on every answer, as the API gives them."""
        try:
            if api_key is not None and not same_key(
                bearer_token(request.headers.get("Authorization")), api_key
            ):
                raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
            response = await handler(request)
        except ApiError as exc:
            response = exc.response()
        except web.HTTPException as exc:
            response = from_http_exception(exc).response()
        if not response.prepared:
            response.headers["x-request-id"] = request_id(request)
        return response

    app = web.Application(middlewares=[errors])
    engine = LocalEngine(root, queue_seconds=queue_seconds, run_seconds=run_seconds, keep_places=True)
    app[ENGINE] = engine

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        yield
        await engine.close()

    app.cleanup_ctx.append(lifetime)
    app.router.add_post("/v1/videos/characters", create_character)
    app.router.add_get("/v1/videos/characters/{character_id}", get_character)
    app.router.add_post("/v1/videos/edits", edit)
    app.router.add_post("/v1/videos/extensions", extend)
    app.router.add_post("/v1/videos", create)
    app.router.add_get("/v1/videos", list_jobs)
    app.router.add_get("/v1/videos/{video_id}", retrieve)
    app.router.add_delete("/v1/videos/{video_id}", delete)
    app.router.add_get("/v1/videos/{video_id}/content", content)
    app.router.add_post("/v1/videos/{video_id}/remix", remix)
    return app
