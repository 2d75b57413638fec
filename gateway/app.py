"""Builds the aiohttp application: routes inside the envelope, and the lifetimes of store and adapters."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import ClientConnectionResetError, web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest

from gateway import api, logs, metrics, openapi
from gateway.auth import bearer_token, same_key
from gateway.bodies import too_large
from gateway.config import GatewayConfig
from gateway.context import CONTEXT, RequestContext, stamp
from gateway.errors import ApiError, store_unavailable
from gateway.health import HealthBoard
from gateway.hosted import HostedFiles
from gateway.limits import Bulkheads
from gateway.logs import log
from gateway.reload import Reloader, build_table
from gateway.state import GATEWAY, Gateway
from gateway.store import SQLiteTaskStore, StoreUnavailable, TaskStore
from gateway.workers import request_reload

API_PREFIXES = ("/v1", "/v1/openai")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def enveloped(handler: web.Handler, route: str) -> web.Handler:
    """``handler`` inside what every request gets: a request ID, authentication of API calls
    (against the keys of the routing table the request pinned), the OpenAI error envelope for every
    failure, metrics and one access log line. ``route`` is the label of its metrics and logs.

    Wrapped around each route as it is added (:class:`Routes`) rather than run as aiohttp middleware,
    which costs every request two more calls, one of them aiohttp's own.
    """

    async def envelope(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        ctx = request[CONTEXT] = RequestContext(gw, gw.table, _request_id(request), time.perf_counter())
        series = metrics.route_series(route, request.method)
        series.started()
        gw.in_flight += 1
        response: web.StreamResponse = _CLIENT_GONE
        try:
            try:
                if request.path.startswith("/v1/"):
                    ctx.client_key = ctx.table.keys.authenticate(request.headers.get("Authorization"))
                response = await handler(request)
            except ApiError as exc:
                response = exc.response()
            except web.HTTPException as exc:
                response = _http_exception(exc).response()
            except StoreUnavailable as exc:
                log.error("store_unavailable", request_id=ctx.request_id, path=request.path, error=str(exc))
                response = store_unavailable().response()
            except Exception:
                log.exception("unhandled_error", request_id=ctx.request_id, path=request.path)
                response = ApiError(
                    500,
                    "The gateway failed to handle this request.",
                    type="server_error",
                    code="internal_error",
                ).response()
            await _send(request, ctx, response)
            return response
        finally:
            gw.in_flight -= 1
            if response is _CLIENT_GONE and gw.stopping:
                response = _ABANDONED
            _observe(request, ctx, response, route, series, time.perf_counter() - ctx.started)
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
        if method == "GET":  # and HEAD, as aiohttp's add_get does
            self._router.add_get(path, enveloped(handler, path), **kwargs)
        else:
            self._router.add_route(method, path, enveloped(handler, path), **kwargs)


async def unmatched(request: web.Request) -> web.StreamResponse:
    """404 for a path no route has, 405 (with Allow) for a method its route does not take."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            allowed |= (await resource.resolve(request))[1]
    if allowed:  # the envelope turns aiohttp's own exceptions into ours (_http_exception)
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


class _AnyTarget(web.PlainResource):
    """Every request target, registered last to take what no route did: any path (line breaks and
    braces included, which route patterns stop at) and targets that are no path at all
    (``OPTIONS *``), which no pattern can match and aiohttp would answer in text/plain."""

    def __init__(self) -> None:
        super().__init__("/")

    def _match(self, path: str) -> dict[str, str]:
        return {}


def _request_id(request: web.Request) -> str:
    """The client's X-Request-ID when it is well-formed, else a new one."""
    incoming = request.headers.get("X-Request-ID")
    return incoming if incoming and _REQUEST_ID.match(incoming) else _new_request_id()


# Request IDs: a random prefix per process, then a counter, so unique across workers and restarts
# at the cost of one format per request.
_ID_PREFIX = "req_" + secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


# What metrics and logs record when the client went away before an answer (nginx's 499).
_CLIENT_GONE = web.Response(status=499)
# ... and when the gateway gave up on it: cancelled as the server stopped, at the end of a drain.
_ABANDONED = web.Response(status=503)


async def _stopping(app: web.Application) -> None:
    """aiohttp fires ``on_shutdown`` before it cancels the handlers still running, so a request
    cancelled from then on is one the gateway abandoned, not one the client left."""
    app[GATEWAY].stopping = True


async def _send(request: web.Request, ctx: RequestContext, response: web.StreamResponse) -> None:
    """Finish sending here rather than after the envelope, so the metrics see the whole answer."""
    if response.prepared:
        return
    stamp(ctx, response)
    try:
        await response.prepare(request)
        await response.write_eof()
    except (ConnectionResetError, ClientConnectionResetError):
        response.force_close()


def _body_bytes(ctx: RequestContext, response: web.StreamResponse) -> int:
    """Body bytes of an answer: known for whole bodies and files; streams count their own.

    The exact type is tried first: ``isinstance`` against aiohttp's answers, which are abstract base
    classes, costs more than all the rest of this."""
    if type(response) is web.Response or isinstance(response, web.Response):
        body = response.body
        return len(body) if isinstance(body, bytes) else 0
    if isinstance(response, web.FileResponse):
        return response.content_length or 0
    return ctx.bytes_out


def _http_exception(exc: web.HTTPException) -> ApiError:
    messages = {
        404: ("Unknown route.", "not_found"),
        405: ("Method not allowed on this route.", "method_not_allowed"),
        413: ("The request body is too large.", "request_too_large"),
    }
    message, code = messages.get(exc.status, (exc.reason, None))
    headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
    return ApiError(exc.status, message, code=code, headers=headers)


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
    upstream_seconds = call.upstream_seconds if call is not None else 0.0
    bytes_in = request.content.total_bytes
    bytes_out = _body_bytes(ctx, response)
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
    """Answer ``Expect: 100-continue`` only after the key and the declared size pass.

    aiohttp's default handler invites any client to send its body before the envelope runs.
    """
    gw = request.app[GATEWAY]
    table = gw.table
    try:
        if request.headers.get("Expect", "").lower() != "100-continue":
            raise ApiError(417, "Only 'Expect: 100-continue' is supported.", code="expectation_failed")
        table.keys.authenticate(request.headers.get("Authorization"))
        limit = table.config.limits.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            raise too_large(limit)
    except ApiError as exc:
        # answered before the envelope runs: stamped here, with a context of its own
        ctx = request[CONTEXT] = RequestContext(gw, table, _request_id(request), time.perf_counter())
        response = exc.response()
        stamp(ctx, response)
        response.force_close()
        return response
    if request.version >= HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the interim answer is not part of the response
    return None


class GatewayRunner(web.AppRunner):
    """aiohttp's AppRunner, with connections that answer in the OpenAI envelope what aiohttp
    answers by itself: a request its parser refused, and an error that escaped the envelope."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's start-up runs here
        return _Server(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )


class _Server(web.Server):
    """aiohttp's Server, making a :class:`_Connection` of each client connection."""

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._loop, **self._kwargs)


class _Connection(RequestHandler):
    """One client connection, mending three things aiohttp's own does below the routes.

    - No route or middleware sees a request that aiohttp's parser refused (aiohttp issue 3287): bad
      syntax, a line over the size limit, TLS on the plain port. aiohttp answers it in text/plain that
      quotes the client's bytes; :meth:`handle_error` answers the envelope instead.
    - A request line of HTTP/2.0 or HTTP/0.9 passes the parser: it is refused with 505.
    - A chunked body that breaks off fails the request reading it at once (see
      :meth:`_fail_body_in_progress`).
    """

    def data_received(self, data: bytes) -> None:
        messages = self._messages
        queued = len(messages)
        RequestHandler.data_received(self, data)  # not super(): this runs for every read of a socket
        if len(messages) == queued:
            return  # more of a body, a request line or headers
        last = messages[-1][0]
        if len(messages) == queued + 1 and type(last) is not _ErrInfo and last.version is HttpVersion11:
            return  # the usual case: one more HTTP/1.1 request
        for i in range(queued, len(messages)):
            message = messages[i][0]
            if isinstance(message, _ErrInfo):
                if message.message.startswith(_HTTP2_PREFACE):
                    messages[i] = _version_refusal("HTTP/2")
                else:
                    self._fail_body_in_progress(message)
            elif message.version not in (HttpVersion11, HttpVersion10):
                # aiohttp's parser lets HTTP/2.0 and HTTP/0.9 request lines through, and its answer
                # would name that version in a status line no client of it can read.
                messages[i] = _version_refusal(f"HTTP/{message.version.major}.{message.version.minor}")

    def _fail_body_in_progress(self, refused: _ErrInfo) -> None:
        """aiohttp's C parser raises on a broken chunked body (a bad chunk size, say) without failing
        the body of the request being read, which then waits for more until the idle timeout. Fail it
        here, as aiohttp's Python parser does: its handler answers 400, then the connection closes."""
        request = self._current_request
        if request is None or request.content.is_eof() or not isinstance(refused.exc, HttpProcessingError):
            return  # no body being read, or it was whole: the refusal is the next request's
        request.content.set_exception(RequestPayloadError(_parser_reason(refused.exc)))
        request.content.feed_eof()  # no more will come: aiohttp must not linger reading it
        self.close()  # after this request's answer; the refusal queued behind it gets none

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was started: the connection can only be closed")
        request_id = _new_request_id()
        if isinstance(exc, HttpProcessingError):
            response = _refusal(status, exc, request_id, request.remote)
        else:  # the envelope catches every error of a handler: this is the gateway's own bug
            log.error("unhandled_error", request_id=request_id, path=request.path, exc_info=exc)
            response = ApiError(
                status,
                "The gateway failed to handle this request.",
                type="server_error",
                code="internal_error",
            ).response()
        response.headers["x-request-id"] = request_id
        response.force_close()
        return response


# How llhttp refuses "PRI * HTTP/2.0", the preface of a client speaking HTTP/2 without asking first.
_HTTP2_PREFACE = "Pause on PRI/Upgrade"


def _version_refusal(version: str) -> tuple[_ErrInfo, StreamReader]:
    """A parsed request of an HTTP version the gateway does not speak, as aiohttp queues a refusal."""
    refusal = HttpProcessingError(code=505, message=f"{version} is not supported")
    return _ErrInfo(505, refusal, refusal.message), EMPTY_PAYLOAD


def _refusal(status: int, exc: HttpProcessingError, request_id: str, remote: str | None) -> web.Response:
    """The answer to a request the parser refused (400) or of an HTTP version not spoken (505),
    logged and counted as the route ``malformed``."""
    reason = _parser_reason(exc)
    # Scanners and TLS clients on the plain port are routine on an open port: not a warning.
    say = log.info if isinstance(exc, BadHttpMethod) else log.warning
    say("bad_http_request", request_id=request_id, reason=reason, remote=remote)
    if status == 505:
        error = ApiError(505, f"{reason}: send HTTP/1.1 (or 1.0).", code="http_version_not_supported")
    else:
        error = ApiError(status, f"The request is not valid HTTP: {reason}.", code="invalid_http_request")
    response = error.response()
    series = metrics.route_series("malformed", "other")
    series.started()
    series.record(status, 0.0, 0.0, 0, len(response.body or b""))
    return response


# Where the parser's message starts quoting the client's bytes: b'...', b"..." or bytearray(b'...').
_QUOTED_BYTES = re.compile(r"""[\s:]*(?:bytearray\()?(?<!\w)b['"]""")


def _parser_reason(exc: HttpProcessingError) -> str:
    """The parser's reason, on one line and without the client's bytes that it goes on to quote
    ("Bad status line:\n  Expected CRLF after version:\n\n  b'...'" gives
    "Bad status line: Expected CRLF after version")."""
    reason = " ".join(_QUOTED_BYTES.split(exc.message, maxsplit=1)[0].split()).strip(" :.")
    return reason or type(exc).__name__


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
    adapters that cannot start) and have the supervisor reload all."""
    gw = _admin(request)
    reloader = request.app[RELOADER]
    if gw.workers > 1:
        problems = await reloader.check()
        ok = not problems and request_reload()
        return web.json_response(
            {"reloaded": ok, "problems": problems, "workers": gw.workers}, status=200 if ok else 422
        )
    ok, problems = await reloader.reload("admin request")
    return web.json_response({"reloaded": ok, "problems": problems}, status=200 if ok else 422)


def _admin(request: web.Request) -> Gateway:
    gw = request.app[GATEWAY]
    key = gw.table.config.admin_key
    if key is None or not same_key(bearer_token(request.headers.get("Authorization")), key):
        raise ApiError(401, "The admin endpoints need the admin key.", code="invalid_admin_key")
    return gw


RELOADER = web.AppKey("reloader", Reloader)


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
) -> web.Application:
    """The gateway for one config. ``store`` defaults to SQLite at ``config.store_path``;
    with ``config_path`` the config can be reloaded (SIGHUP, file watch, ``POST /admin/reload``).
    ``workers`` and ``signing_key`` come from the supervisor when this is one of several workers
    (bulkheads take their share; hosted-file URLs must verify on every worker)."""
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
    routes.add("GET", "/openapi.json", _json_document(openapi.document()))
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
    catch_all.add_route("*", enveloped(unmatched, "unmatched"))
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
        state.table = await build_table(config, state, None)
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
            for adapter in state.table.all_adapters().values():
                await adapter.close()
            if store is None:
                await task_store.close()

    app.cleanup_ctx.append(lifetime)
    return app
