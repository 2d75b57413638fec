"""Handlers of the ``/v1/videos`` API: tenancy and IDs here, provider work in the adapters."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway import metrics
from gateway.auth import check_model_access, client_key
from gateway.bodies import RequestBody, read_body
from gateway.config import Deployment
from gateway.context import BYTES_OUT, CALL, MODEL, REQUEST_ID
from gateway.errors import ApiError, bad_request, video_not_found
from gateway.providers.base import Adapter, Call, EventStream, UpstreamVideo
from gateway.state import Gateway, gateway
from gateway.store import Task
from gateway.videos import build_video, is_terminal, new_character_id, new_video_id

VARIANTS = ("video", "thumbnail", "spritesheet")
LIST_DEFAULT_LIMIT = 20
_LIST_REFRESH_CONCURRENCY = 8


def _json(data: Any, *, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(data), content_type="application/json", headers=headers)


def _call(request: web.Request, deployment: Deployment) -> Call:
    call = Call(request, request[REQUEST_ID], deployment)
    request[CALL] = call
    return call


def _deployment_of(gw: Gateway, task: Task) -> tuple[Deployment, Adapter]:
    """The exact deployment that created a task: follow-ups are never re-balanced."""
    table = gw.table
    deployment = table.deployments.get(task.deployment) or Deployment(
        task.deployment, task.model, task.provider, task.state.get("upstream_model", task.model)
    )
    return deployment, table.adapter(task.provider)


async def _owned(request: web.Request, param: str = "video_id", kind: str = "video") -> Task:
    task_id = request.match_info[param]
    task = await gateway(request).store.get(task_id, client_key(request).name, kind)
    if task is None:
        if kind == "character":
            raise ApiError(
                404, f"No character found with id '{task_id}'.", param=param, code="character_not_found"
            )
        raise video_not_found(task_id)
    return task


def _seed(body: RequestBody) -> dict[str, Any]:
    """What the client asked for, shown until the provider says otherwise."""
    seed = {k: body.get(k) for k in ("prompt", "size", "seconds") if isinstance(body.get(k), str | int)}
    if "seconds" in seed:
        seed["seconds"] = str(seed["seconds"])
    return seed


async def _record(
    request: web.Request,
    gw: Gateway,
    deployment: Deployment,
    upstream: UpstreamVideo,
    seed: dict[str, Any],
    remixed_from: str | None = None,
) -> Task:
    """Give a new upstream job its gateway ID and commit it before the client hears of it."""
    owner = client_key(request).name
    task = Task(
        id=new_video_id(),
        owner=owner,
        model=deployment.model,
        deployment=deployment.name,
        provider=deployment.provider,
        upstream_id=upstream.id,
        created_at=int(time.time()),
        status="queued",
        video=seed,
        state={**upstream.state, "upstream_model": deployment.upstream_model},
    )
    if remixed_from is None:
        remixed_from = await _map_remixed_from(gw, owner, deployment.name, upstream.fields)
    task.video = build_video(task, upstream.fields, remixed_from=remixed_from)
    task.status = task.video["status"]
    await gw.store.add(task)
    metrics.VIDEOS_CREATED.labels(task.model, task.provider).inc()
    if is_terminal(task.status):
        metrics.VIDEOS_FINISHED.labels(task.model, task.provider, task.status).inc()
    return task


async def _map_remixed_from(gw: Gateway, owner: str, deployment: str, fields: dict[str, Any]) -> str | None:
    upstream_source = fields.get("remixed_from_video_id")
    if not isinstance(upstream_source, str) or not upstream_source:
        return None
    source = await gw.store.find_upstream(owner, deployment, upstream_source)
    return source.id if source is not None else None


async def _refresh(request: web.Request, gw: Gateway, task: Task) -> Task:
    """Ask the provider for news about an unfinished video and remember what it said."""
    if is_terminal(task.status):
        return task
    deployment, adapter = _deployment_of(gw, task)
    upstream = await adapter.retrieve(_call(request, deployment), task)
    video = build_video(task, upstream.fields)
    state = {**task.state, **upstream.state}
    if video != task.video or state != task.state:
        task.video, task.status, task.state = video, video["status"], state
        await _save(gw, task)
    return task


async def _save(gw: Gateway, task: Task) -> None:
    if await gw.store.update(task):
        metrics.VIDEOS_FINISHED.labels(task.model, task.provider, task.status).inc()


async def create_video(request: web.Request) -> web.StreamResponse:
    gw = gateway(request)
    body = await read_body(request, gw.config.limits, until=("model",))
    try:
        table = gw.table
        model = table.resolve_model(body.get("model"))
        check_model_access(client_key(request), model)
        deployment = table.pick(model)
        request[MODEL] = model
        result = await table.adapter(deployment.provider).create(_call(request, deployment), body)
        if isinstance(result, EventStream):
            return await _relay_events(request, gw, deployment, result, _seed(body))
        task = await _record(request, gw, deployment, result, _seed(body))
        return _json(task.video)
    finally:
        body.close()


async def _relay_events(
    request: web.Request, gw: Gateway, deployment: Deployment, stream: EventStream, seed: dict[str, Any]
) -> web.StreamResponse:
    """Relay an upstream event stream, giving each video it mentions its gateway ID first."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    tasks: dict[str, Task] = {}
    try:
        await response.prepare(request)
        request[BYTES_OUT] = 0
        async for event in stream.events():
            data = await _translate_event(request, gw, deployment, tasks, seed, event)
            await response.write(data)
            request[BYTES_OUT] += len(data)
        await response.write_eof()
    finally:
        await stream.aclose()
    return response


async def _translate_event(
    request: web.Request,
    gw: Gateway,
    deployment: Deployment,
    tasks: dict[str, Task],
    seed: dict[str, Any],
    event: bytes,
) -> bytes:
    lines = event.rstrip(b"\n").split(b"\n")
    data = b"\n".join(line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:"))
    try:
        payload = json.loads(data) if data else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return event
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str) or "status" not in payload:
        return event
    upstream_id = payload["id"]
    task = tasks.get(upstream_id)
    if task is None:
        task = tasks[upstream_id] = await _record(
            request, gw, deployment, UpstreamVideo(upstream_id, payload), seed
        )
    else:
        task.video = build_video(task, payload)
        task.status = task.video["status"]
        await _save(gw, task)
    other = b"".join(line + b"\n" for line in lines if not line.startswith(b"data:"))
    return other + b"data: " + json.dumps(task.video).encode() + b"\n\n"


async def retrieve_video(request: web.Request) -> web.Response:
    gw = gateway(request)
    task = await _refresh(request, gw, await _owned(request))
    request[MODEL] = task.model
    headers = {}
    if not is_terminal(task.status):
        headers["openai-poll-after-ms"] = str(gw.poll_after_ms(task.provider))
    return _json(task.video, headers=headers)


def _list_params(request: web.Request) -> tuple[str | None, int, str]:
    query = request.query
    after = query.get("after") or None
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("'order' must be 'asc' or 'desc'.", param="order")
    raw_limit = query.get("limit", str(LIST_DEFAULT_LIMIT))
    if not raw_limit.isdigit() or not 0 <= int(raw_limit) <= 100:
        raise bad_request("'limit' must be an integer from 0 to 100.", param="limit")
    return after, int(raw_limit), order


async def list_videos(request: web.Request) -> web.Response:
    gw = gateway(request)
    after, limit, order = _list_params(request)
    try:
        tasks, has_more = await gw.store.list(client_key(request).name, after=after, limit=limit, order=order)
    except KeyError:
        raise bad_request(f"'after' names no video of yours: '{after}'.", param="after") from None
    gate = asyncio.Semaphore(_LIST_REFRESH_CONCURRENCY)

    async def fresh(task: Task) -> dict[str, Any]:
        async with gate:
            try:
                return (await _refresh(request, gw, task)).video
            except ApiError:
                return task.video

    data = await asyncio.gather(*(fresh(t) for t in tasks))
    return _json(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


async def delete_video(request: web.Request) -> web.Response:
    gw = gateway(request)
    task = await _owned(request)
    request[MODEL] = task.model
    deployment, adapter = _deployment_of(gw, task)
    await adapter.delete(_call(request, deployment), task)
    await gw.store.delete(task.id, task.owner)
    return _json({"id": task.id, "object": "video.deleted", "deleted": True})


async def video_content(request: web.Request) -> web.StreamResponse:
    gw = gateway(request)
    variant = request.query.get("variant", "video")
    if variant not in VARIANTS:
        raise bad_request(f"'variant' must be one of: {', '.join(VARIANTS)}.", param="variant")
    task = await _refresh(request, gw, await _owned(request))
    request[MODEL] = task.model
    if task.status != "completed":
        raise ApiError(
            409,
            f"Video '{task.id}' is {task.status}; its content can be downloaded once it is completed.",
            code="video_not_ready",
            headers={"x-should-retry": "false"},
        )
    deployment, adapter = _deployment_of(gw, task)
    return await adapter.content(_call(request, deployment), task, variant)


async def remix_video(request: web.Request) -> web.Response:
    gw = gateway(request)
    source = await _owned(request)
    request[MODEL] = source.model
    check_model_access(client_key(request), source.model)
    body = await read_body(request, gw.config.limits, until=("prompt",))
    try:
        deployment, adapter = _deployment_of(gw, source)
        upstream = await adapter.remix(_call(request, deployment), source, body)
        seed = {"size": source.video.get("size"), "seconds": source.video.get("seconds"), **_seed(body)}
        task = await _record(request, gw, deployment, upstream, seed, remixed_from=source.id)
        return _json(task.video)
    finally:
        body.close()


async def _from_video(
    request: web.Request,
    operation: Callable[[Adapter, Call, Task | None, RequestBody], Awaitable[UpstreamVideo]],
) -> web.Response:
    """Edits and extensions: routed to the deployment that owns the referenced video, if any."""
    gw = gateway(request)
    body = await read_body(request, gw.config.limits, until=("video[id]",))
    try:
        ref = body.get_object("video")
        source: Task | None = None
        if ref is not None and "id" in ref:
            source = await gw.store.get(str(ref["id"]), client_key(request).name)
            if source is None:
                raise video_not_found(str(ref["id"]))
            deployment, adapter = _deployment_of(gw, source)
        elif body.has_file("video") or body.kind == "multipart":
            model = gw.table.resolve_model(body.get("model"))
            deployment = gw.table.pick(model)
            adapter = gw.table.adapter(deployment.provider)
        else:
            raise bad_request("'video' is required: an uploaded file or {\"id\": ...}.", param="video")
        request[MODEL] = deployment.model
        check_model_access(client_key(request), deployment.model)
        upstream = await operation(adapter, _call(request, deployment), source, body)
        seed = {"size": source.video.get("size")} if source else {}
        task = await _record(request, gw, deployment, upstream, {**seed, **_seed(body)})
        return _json(task.video)
    finally:
        body.close()


async def edit_video(request: web.Request) -> web.Response:
    return await _from_video(request, lambda a, c, t, b: a.edit(c, t, b))


async def extend_video(request: web.Request) -> web.Response:
    return await _from_video(request, lambda a, c, t, b: a.extend(c, t, b))


async def create_character(request: web.Request) -> web.Response:
    gw = gateway(request)
    body = await read_body(request, gw.config.limits, until=("model",))
    try:
        model = gw.table.resolve_model(body.get("model"))
        check_model_access(client_key(request), model)
        deployment = gw.table.pick(model)
        request[MODEL] = model
        answer = await gw.table.adapter(deployment.provider).create_character(
            _call(request, deployment), body
        )
        created_at = answer.get("created_at")
        task = Task(
            id=new_character_id(),
            owner=client_key(request).name,
            model=model,
            deployment=deployment.name,
            provider=deployment.provider,
            upstream_id=answer["id"],
            created_at=created_at if isinstance(created_at, int) else int(time.time()),
            status="completed",
            kind="character",
        )
        task.video = {"id": task.id, "name": answer.get("name"), "created_at": task.created_at}
        await gw.store.add(task)
        return _json(task.video)
    finally:
        body.close()


async def get_character(request: web.Request) -> web.Response:
    gw = gateway(request)
    task = await _owned(request, "character_id", kind="character")
    deployment, adapter = _deployment_of(gw, task)
    answer = await adapter.get_character(_call(request, deployment), task)
    return _json(
        {"id": task.id, "name": answer.get("name", task.video.get("name")), "created_at": task.created_at}
    )


async def list_models(request: web.Request) -> web.Response:
    key = client_key(request)
    models = [m for m in gateway(request).table.models if key.models is None or m in key.models]
    return _json({"object": "list", "data": [_model(m) for m in models]})


async def get_model(request: web.Request) -> web.Response:
    key = client_key(request)
    model = request.match_info["model"]
    if model not in gateway(request).table.models or (key.models is not None and model not in key.models):
        raise ApiError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
    return _json(_model(model))


def _model(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "video-gateway"}


def add_routes(app: web.Application, prefix: str) -> None:
    """Literal routes first: aiohttp matches in registration order."""
    videos = f"{prefix}/videos"
    app.router.add_post(f"{videos}/edits", edit_video)
    app.router.add_post(f"{videos}/extensions", extend_video)
    app.router.add_post(f"{videos}/characters", create_character)
    app.router.add_get(f"{videos}/characters/{{character_id}}", get_character)
    app.router.add_post(videos, create_video)
    app.router.add_get(videos, list_videos)
    app.router.add_get(f"{videos}/{{video_id}}", retrieve_video)
    app.router.add_delete(f"{videos}/{{video_id}}", delete_video)
    app.router.add_get(f"{videos}/{{video_id}}/content", video_content)
    app.router.add_post(f"{videos}/{{video_id}}/remix", remix_video)
    app.router.add_get(f"{prefix}/models", list_models)
    app.router.add_get(f"{prefix}/models/{{model}}", get_model)
