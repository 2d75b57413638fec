"""What one request carries from the middleware through its handler.

One slotted object under one request key, made by the envelope middleware: each ``request[...]``
costs a few Python calls, and a poll used to make a dozen of them for separate keys.
"""

from __future__ import annotations

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
    client_key: ClientKey | None = None  # set by the auth middleware on API routes
    model: str | None = None  # the public model, once known (logs and metrics)
    call: Call | None = None  # the latest upstream call (status, error, time spent waiting on it)
    bytes_out: int = 0  # body bytes a streamed answer has sent so far
    admission: Admission | None = None  # the per-key limits a create was admitted under


CONTEXT: web.RequestKey[RequestContext] = web.RequestKey("context")


def context(request: web.Request) -> RequestContext:
    return request[CONTEXT]
