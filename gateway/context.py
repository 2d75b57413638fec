"""What one request carries from the envelope (``app.enveloped``) through its handler.

One slotted object under one request key, made by the envelope: each ``request[...]``
costs a few Python calls, and a poll used to make a dozen of them for separate keys.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from gateway import cors

if TYPE_CHECKING:
    from gateway.config import ClientKey
    from gateway.providers.base import Call
    from gateway.routing import RoutingTable
    from gateway.state import Gateway
    from gateway.store import Admission


@dataclass(slots=True, eq=False)
class UpstreamClock:
    """The time a request spent waiting on providers: wall time with at least one upstream call
    open, whether it ended in an answer or a failure. Retries, failovers and a list's parallel
    refreshes all count, each moment once; what is left of the request's time is the gateway's own."""

    seconds: float = 0.0
    _open: int = 0
    _since: float = 0.0

    def start(self) -> None:
        if self._open == 0:
            self._since = time.perf_counter()
        self._open += 1

    def stop(self) -> None:
        self._open -= 1
        if self._open == 0:
            self.seconds += time.perf_counter() - self._since

    def total(self) -> float:
        """:attr:`seconds`, with a wait still open (an answer being relayed) counted up to now."""
        return self.seconds + (time.perf_counter() - self._since if self._open else 0.0)


@dataclass(slots=True, eq=False)
class RequestContext:
    gateway: Gateway
    table: RoutingTable  # the config generation pinned at entry: a reload mid-request changes nothing
    request_id: str
    started: float
    client_key: ClientKey | None = None  # set by the envelope on API routes
    model: str | None = None  # the public model, once known (logs and metrics)
    call: Call | None = None  # the latest upstream call (its status and error)
    upstream: UpstreamClock = field(default_factory=UpstreamClock)  # time spent waiting on providers
    bytes_out: int = 0  # body bytes a streamed answer has sent so far
    admission: Admission | None = None  # the per-key limits a create was admitted under
    changing: bool = False  # a create or delete was sent upstream: see api.shielded
    client_gone: bool = False  # the client's connection broke while its answer was being written
    streaming: bool = False  # a streamed answer has begun (start_answer): no other can be sent
    cors_origin: str | None = None  # on API routes when origins are allowed: cors.allowed_origin
    idempotency: dict[str, str | None] | None = None  # a create's Idempotency-Key and what it names


CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("context")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def request_id(request: web.Request) -> str:
    """The client's X-Request-ID when it is well-formed, else a new one."""
    incoming = request.headers.get("X-Request-ID")
    return incoming if incoming and _REQUEST_ID.match(incoming) else new_request_id()


# Request IDs: a random prefix per process, then a counter, so unique across workers and restarts
# at the cost of one format per request.
_ID_PREFIX = "req_" + secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def context(request: web.Request) -> RequestContext:
    return request[CONTEXT]


def stamp(ctx: RequestContext, response: web.StreamResponse) -> None:
    """``x-request-id`` and the gateway's own time so far, on an answer about to start.

    Every answer goes through here (the envelope sends whole answers, streams call
    :func:`start_answer`) rather than through aiohttp's ``on_response_prepare`` signal, which costs a
    coroutine and a signal dispatch on every poll.
    """
    response.headers["x-request-id"] = ctx.request_id
    if ctx.gateway.draining:
        response.force_close()
    own = time.perf_counter() - ctx.started - ctx.upstream.total()
    response.headers["x-gateway-overhead-ms"] = f"{max(0.0, own) * 1000:.3f}"
    if ctx.cors_origin is not None:
        cors.stamp(response, ctx.cors_origin)


async def start_answer(request: web.Request, response: web.StreamResponse) -> None:
    """Start a streamed answer: stamp it, then send its status and headers."""
    ctx = request[CONTEXT]
    ctx.streaming = True
    stamp(ctx, response)
    await response.prepare(request)


def cut_answer(request: web.Request, response: web.StreamResponse) -> None:
    """End a streamed answer that cannot be finished so that the client sees it cut short: ended
    normally, a chunked answer would pass a truncated video (or event stream) off as whole."""
    response.force_close()
    if request.transport is not None:
        request.transport.close()  # after what is already written; aiohttp's final chunk never goes
