"""What one request carries from the envelope (``app.enveloped``) through its handler.

One slotted object under one request key, made by the envelope: each ``request[...]``
costs a few Python calls, and a poll used to make a dozen of them for separate keys.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.config import ClientKey
    from gateway.providers.base import Call
    from gateway.routing import RoutingTable
    from gateway.state import Gateway
    from gateway.store import Admission


@dataclass(slots=True, eq=False)
class RequestContext:
    gateway: Gateway
    table: RoutingTable  # the config generation pinned at entry: a reload mid-request changes nothing
    request_id: str
    started: float
    client_key: ClientKey | None = None  # set by the envelope on API routes
    model: str | None = None  # the public model, once known (logs and metrics)
    call: Call | None = None  # the latest upstream call (status, error, time spent waiting on it)
    bytes_out: int = 0  # body bytes a streamed answer has sent so far
    admission: Admission | None = None  # the per-key limits a create was admitted under


CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("context")


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
    call = ctx.call
    own = time.perf_counter() - ctx.started - (call.upstream_seconds if call is not None else 0.0)
    response.headers["x-gateway-overhead-ms"] = f"{max(0.0, own) * 1000:.3f}"


async def start_answer(request: web.Request, response: web.StreamResponse) -> None:
    """Start a streamed answer: stamp it, then send its status and headers."""
    stamp(request[CONTEXT], response)
    await response.prepare(request)
