"""Builds the aiohttp application: routes inside the envelope, and the lifetimes of store and adapters."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from aiohttp import ClientConnectionResetError, web
from aiohttp.http import HttpVersion11

from gateway import api, cors, logs, metrics, openapi
from gateway.auth import bearer_token, same_key
from gateway.bodies import size_limit, too_large
from gateway.config import GatewayConfig, ProviderConfig
from gateway.connections import write_whole
from gateway.context import CONTEXT, RequestContext, request_id, stamp
from gateway.errors import ApiError, UpstreamError, from_http_exception, internal_error, store_unavailable
from gateway.health import HealthBoard
from gateway.hosted import HostedFiles
from gateway.limits import Bulkheads
from gateway.logs import log
from gateway.reload import Reloader, build_table
from gateway.state import GATEWAY, Gateway
from gateway.store import SQLiteTaskStore, StoreUnavailable, TaskStore
from gateway.workers import request_reload

API_PREFIXES = ("/v1", "/v1/openai")


def enveloped(handler: web.Handler, route: str) -> web.Handler:
    """``handler`` inside what every request gets: a request ID, authentication of API calls
    (against the keys of the routing table the request pinned), the OpenAI error envelope for every
    failure, metrics and one access log line. ``route`` is the label of its metrics and logs.

    Wrapped around each route as it is added (:class:`Routes`) rather than run as aiohttp middleware,
    which costs every request two more calls, one of them aiohttp's own.
    """

    async def envelope(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        ctx = request[CONTEXT] = RequestContext(gw, gw.table, request_id(request), time.perf_counter())
        logs.REQUEST_ID.set(ctx.request_id)
        if (origins := ctx.table.config.cors_origins) and request.path.startswith("/v1/"):
            ctx.cors_origin = cors.allowed_origin(origins, request.headers.get("Origin"))
        label = route if route != UNMATCHED else (await _other_routes(request))[0]
        series = metrics.route_series(label, request.method)
        series.started()
        gw.in_flight += 1
        response: web.StreamResponse = _CLIENT_GONE
        try:
            try:
                if ctx.cors_origin and cors.is_preflight(request):
                    response = cors.preflight(request)
                else:
                    if request.path.startswith("/v1/"):
                        ctx.client_key = ctx.table.keys.authenticate(request.headers.get("Authorization"))
                    response = await handler(request)
            except ApiError as exc:
                _count_unusable_answer(ctx, exc)
                response = exc.response()
            except web.HTTPException as exc:
                response = from_http_exception(exc).response()
            except StoreUnavailable as exc:
                log.error("store_unavailable", request_id=ctx.request_id, path=request.path, error=str(exc))
                response = store_unavailable().response()
            except Exception:
                log.exception("unhandled_error", request_id=ctx.request_id, path=request.path)
                response = internal_error().response()
            return await _send(request, ctx, response)
        finally:
            gw.in_flight -= 1
            if ctx.client_gone:  # recorded as such; aiohttp still gets the answer it was writing
                response = _CLIENT_GONE
            if response is _CLIENT_GONE and gw.stopping:
                response = _ABANDONED
            _observe(request, ctx, response, label, series, time.perf_counter() - ctx.started)
            # The call holds the request that holds this context: without this cut, each request's
            # objects would wait for the cyclic garbage collector instead of going at once.
            ctx.call = None

    envelope.route = route  # type: ignore[attr-defined]  # build_app checks every route has one
    return envelope


class Routes:
    """How routes are added: each inside the envelope, labelled by its path template."""

    def __init__(self, app: web.Application) -> None:
        self._router = app.router

    def add(self, method: str, path: str, handler: web.Handler, **kwargs: Any) -> None:
        kwargs.setdefault("expect_handler", expect_plain)
        if method == "GET":  # and HEAD, as aiohttp's add_get does
            self._router.add_get(path, enveloped(handler, path), **kwargs)
        else:
            self._router.add_route(method, path, enveloped(handler, path), **kwargs)


UNMATCHED = "unmatched"  # the route label of a path no route has


async def unmatched(request: web.Request) -> web.StreamResponse:
    """404 for a path no route has, 405 (with Allow) for a method its route does not take."""
    allowed = (await _other_routes(request))[1]
    if allowed:  # the envelope turns aiohttp's own exceptions into ours (from_http_exception)
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


async def _other_routes(request: web.Request) -> tuple[str, set[str]]:
    """For a request no route took: the template of a route of its path, which metrics and logs
    label it with (a method that route does not take, a browser's preflight), and the methods the
    routes of its path take; :data:`UNMATCHED` and none for a path no route has."""
    label, allowed = UNMATCHED, set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            methods = (await resource.resolve(request))[1]
            if methods and not allowed:
                label = resource.canonical
            allowed |= methods
    return label, allowed


class _AnyTarget(web.PlainResource):
    """Every request target, registered last to take what no route did: any path (line breaks and
    braces included, which route patterns stop at) and targets that are no path at all
    (``OPTIONS *``), which no pattern can match and aiohttp would answer in text/plain."""

    def __init__(self) -> None:
        super().__init__("/")

    def _match(self, path: str) -> dict[str, str]:
        return {}


# What metrics and logs record when the client went away before an answer (nginx's 499).
_CLIENT_GONE = web.Response(status=499)
# ... and when the gateway gave up on it: cancelled as the server stopped, at the end of a drain.
_ABANDONED = web.Response(status=503)


async def _stopping(app: web.Application) -> None:
    """aiohttp fires ``on_shutdown`` before it cancels the handlers still running, so a request
    cancelled from then on is one the gateway abandoned, not one the client left."""
    app[GATEWAY].stopping = True


async def _send(
    request: web.Request, ctx: RequestContext, response: web.StreamResponse
) -> web.StreamResponse:
    """Finish sending here rather than after the envelope, so the metrics see the whole answer; what
    aiohttp is to finish (a whole answer is written at once, :func:`write_whole`)."""
    if response.prepared:
        return response
    stamp(ctx, response)
    # An answer given before a compressed body was read (a 401, a refusal): aiohttp would go on
    # reading what is left for up to 10 s, inflating it (seconds of CPU for a small gzip bomb), before
    # the next request. The connection closes once the answer is sent instead.
    inflating = not request.content.at_eof() and "Content-Encoding" in request.headers
    if inflating:
        response.force_close()
    try:
        written = write_whole(request, response) if type(response) is web.Response else None
        if written is None:
            await response.prepare(request)
            await response.write_eof()
        if inflating:
            request.protocol.force_close()
    except (ConnectionResetError, ClientConnectionResetError):
        ctx.client_gone = True
        response.force_close()
        return response
    except asyncio.CancelledError:
        # The answer was cut off while it waited to be written: on uvloop a client's hang-up comes
        # so, as the handler's cancellation rather than a reset (or the server abandoned it).
        ctx.client_gone = True
        raise
    return response if written is None else written


def _body_bytes(ctx: RequestContext, response: web.StreamResponse) -> int:
    """Body bytes of an answer: known for whole bodies and files; streams count their own.

    The exact type is tried first: ``isinstance`` against aiohttp's answers, which are abstract base
    classes, costs more than all the rest of this. An answer cut short by its client counts what a
    stream sent until then (a file the kernel was sending: none known)."""
    if response is _CLIENT_GONE or response is _ABANDONED:
        return ctx.bytes_out
    if type(response) is web.Response or isinstance(response, web.Response):
        body = response.body
        return len(body) if isinstance(body, bytes) else 0
    if isinstance(response, web.FileResponse):
        return response.content_length or 0
    return ctx.bytes_out


def _count_unusable_answer(ctx: RequestContext, exc: ApiError) -> None:
    """A provider's answer its adapter could not use (no job ID, not an object...) is an upstream
    error like a 5xx. Adapters raise these in many places; they are counted here, once, unless the
    exchange already counted the answer (one cut off, say)."""
    call = ctx.call
    unusable = isinstance(exc, UpstreamError) and exc.kind == "payload"
    if unusable and call is not None and call.upstream_error != "payload":
        call.upstream_error = "payload"
        metrics.UPSTREAM_ERRORS.labels(call.deployment.provider, "payload").inc()


def _observe(
    request: web.Request,
    ctx: RequestContext,
    response: web.StreamResponse,
    route: str,
    series: metrics.RouteSeries,
    seconds: float,
) -> None:
    """Metrics and the access log line of one finished request."""
    call = ctx.call
    upstream_seconds = ctx.upstream.total()  # a call still open (its client left a create) counts
    bytes_in = request.content.total_bytes
    bytes_out = _body_bytes(ctx, response) if request.method != "HEAD" else 0
    series.record(response.status, seconds, max(0.0, seconds - upstream_seconds), bytes_in, bytes_out)
    if not logs.enabled("info"):
        return
    key = ctx.client_key
    log.info(
        "request",
        request_id=ctx.request_id,
        method=request.method,
        route=route,
        status=response.status,
        model=ctx.model,
        provider=call.deployment.provider if call else None,
        deployment=call.deployment.name if call else None,
        upstream_status=call.upstream_status if call else None,
        upstream_error=call.upstream_error if call else None,
        duration_ms=round(seconds * 1000, 2),
        upstream_ms=round(upstream_seconds * 1000, 2),
        overhead_ms=round((seconds - upstream_seconds) * 1000, 2),
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        key_name=key.name if key is not None else None,
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _json_document(document: dict[str, object]) -> web.Handler:
    """A handler that serves ``document``, serialised once."""
    body = web.json_response(document).body

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    return handler


async def readyz(request: web.Request) -> web.Response:
    """503 while draining, or while the task store cannot serve (a load balancer then sends this
    replica's traffic elsewhere); the body says which."""
    gw = request.app[GATEWAY]
    if gw.draining:
        return web.json_response({"status": "draining"}, status=503)
    problem = await gw.store.health()
    if problem is not None:
        return web.json_response({"status": "store_unavailable", "detail": problem}, status=503)
    return web.json_response({"status": "ready"})


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """For the API's uploads: answer ``Expect: 100-continue`` only after the key and the declared
    size pass. aiohttp's default handler invites any client to send its body before the envelope runs.
    """
    return await _expect(request, uploads=True)


async def expect_plain(request: web.Request) -> web.StreamResponse | None:
    """For every other route: 100-continue is the only expectation, another one a 417 in the
    envelope (aiohttp's default answers it in text/plain, unseen by metrics and logs). An HTTP/1.0
    request's Expect is ignored, as aiohttp's default does (the header is HTTP/1.1's)."""
    if request.version < HttpVersion11:
        return None
    return await _expect(request, uploads=False)


async def _expect(request: web.Request, *, uploads: bool) -> web.StreamResponse | None:
    gw = request.app[GATEWAY]
    table = gw.table
    try:
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise ApiError(417, "Only 'Expect: 100-continue' is supported.", code="expectation_failed")
        if uploads:
            table.keys.authenticate(request.headers.get("Authorization"))
            limit = size_limit(request, table.config.limits)
            if request.content_length is not None and request.content_length > limit:
                raise too_large(limit)
    except ApiError as exc:
        # answered before the envelope runs: stamped, counted and logged here, with a context of its own
        ctx = request[CONTEXT] = RequestContext(gw, table, request_id(request), time.perf_counter())
        response = exc.response()
        stamp(ctx, response)
        response.force_close()
        route: str = request.match_info.route.handler.route  # type: ignore[attr-defined]  # enveloped
        series = metrics.route_series(route, request.method)
        series.started()
        _observe(request, ctx, response, route, series, time.perf_counter() - ctx.started)
        return response
    if request.version >= HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not part of the response
    return None


async def admin_deployments(request: web.Request) -> web.Response:
    gw = _admin(request)
    table = gw.table
    rows = []
    for model, deployments in table.models.items():
        for d, health in zip(deployments, table.health.snapshot([d.name for d in deployments]), strict=True):
            rows.append(
                {
                    "model": model,
                    "provider": d.provider,
                    "upstream_model": d.upstream_model,
                    "priority": d.priority,
                    "weight": d.weight,
                    **health,
                    "open_requests": gw.bulkheads.open(d.name, "requests"),
                    "open_uploads": gw.bulkheads.open(d.name, "uploads"),
                    "max_concurrent_requests": d.max_concurrent_requests,
                    "max_concurrent_uploads": d.max_concurrent_uploads,
                }
            )
    return web.json_response(
        {
            "config": table.config.source,
            "draining": gw.draining,
            "worker": {"pid": os.getpid(), "workers": gw.workers},
            "deployments": rows,
        }
    )


async def admin_reload(request: web.Request) -> web.Response:
    """Reload now; with several workers, check here what each worker's reload would meet (the file,
    adapters that cannot start) and have the supervisor reload all. ``needs_restart`` names the
    changed settings the reload left as they run (a port, the data_dir...)."""
    gw = _admin(request)
    reloader = request.app[RELOADER]
    if gw.workers > 1:
        problems = await reloader.check("admin request")
        ok = not problems and request_reload()
        answer = {"reloaded": ok, "problems": problems, "workers": gw.workers}
    else:
        ok, problems = await reloader.reload("admin request")
        answer = {"reloaded": ok, "problems": problems}
    answer["needs_restart"] = reloader.needs_restart if ok else []
    return web.json_response(answer, status=200 if ok else 422)


def _admin(request: web.Request) -> Gateway:
    gw = request.app[GATEWAY]
    key = gw.table.config.admin_key
    if key is None or not same_key(bearer_token(request.headers.get("Authorization")), key):
        raise ApiError(401, "The admin endpoints need the admin key.", code="invalid_admin_key")
    return gw


RELOADER = web.AppKey("reloader", Reloader)


async def _abandon_left_by_client(state: Gateway) -> None:
    """Cancel what still runs of creates and deletes cut off from their client (``api.shielded``):
    the drain has waited for them, and the adapters and the store are about to close under them."""
    for work in state.left_by_client:
        work.cancel()
    await asyncio.gather(*state.left_by_client, return_exceptions=True)


def _hosted(config: GatewayConfig, signing_key: bytes | None) -> HostedFiles | None:
    if config.public_base_url is None:
        return None
    key = config.signing_key.encode() if config.signing_key else signing_key or secrets.token_bytes(32)
    return HostedFiles(config.data_dir / "hosted", config.public_base_url, key)


def build_app(
    config: GatewayConfig,
    *,
    store: TaskStore | None = None,
    config_path: Path | None = None,
    workers: int = 1,
    signing_key: bytes | None = None,
    retired: Mapping[str, ProviderConfig] | None = None,
) -> web.Application:
    """The gateway for one config. ``store`` defaults to SQLite at ``config.store_path``;
    with ``config_path`` the config can be reloaded (SIGHUP, file watch, ``POST /admin/reload``).
    ``workers``, ``signing_key`` and ``retired`` come from the supervisor when this is one of
    several workers (bulkheads take their share; hosted-file URLs must verify on every worker; the
    providers the others' reloads removed stay reachable for their videos here too)."""
    app = web.Application(handler_args={"max_field_size": 16384})
    state = app[GATEWAY] = Gateway(
        HealthBoard(config.resilience),
        bulkheads=Bulkheads(workers),
        hosted=_hosted(config, signing_key),
        workers=workers,
    )
    reloader = app[RELOADER] = Reloader(state, config_path)
    app.on_shutdown.append(_stopping)
    routes = Routes(app)
    routes.add("GET", "/healthz", healthz)
    routes.add("GET", "/readyz", readyz)
    document = openapi.document(config.metrics_path, hosted=state.hosted is not None)
    routes.add("GET", "/openapi.json", _json_document(document))
    routes.add("GET", "/admin/deployments", admin_deployments)
    routes.add("POST", "/admin/reload", admin_reload)
    if state.hosted is not None:
        routes.add("GET", "/files/{name}", state.hosted.handle)
    if config.metrics_path is not None:
        routes.add("GET", config.metrics_path, metrics.metrics_handler())
    for prefix in API_PREFIXES:
        api.add_routes(routes.add, prefix, expect=expect_continue)
    catch_all = _AnyTarget()  # last
    app.router.register_resource(catch_all)
    catch_all.add_route("*", enveloped(unmatched, UNMATCHED), expect_handler=expect_plain)
    bare = [route for route in app.router.routes() if not hasattr(route.handler, "route")]
    if bare:  # a route added straight to the router would skip authentication and the envelope
        raise RuntimeError(f"routes outside the envelope: {bare}")

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        task_store = store
        if task_store is None:
            sqlite = SQLiteTaskStore(config.store_path)
            await sqlite.open()
            task_store = sqlite
        state.store = task_store
        state.table = await build_table(config, state, None, retired)
        loop = asyncio.get_running_loop()
        background: list[asyncio.Task[None]] = []
        if config_path is not None and config.watch_config:
            background.append(loop.create_task(reloader.watch()))
        if metrics.multiprocess_dir() is not None:
            background.append(loop.create_task(metrics.flush_periodically()))
        log.info("gateway_started", models=sorted(config.models), providers=sorted(config.providers))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await _abandon_left_by_client(state)
            for adapter in state.table.all_adapters().values():
                await adapter.close()
            if store is None:
                await task_store.close()

    app.cleanup_ctx.append(lifetime)
    return app
