"""What one request carries from the middleware through its handler, as typed request keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.providers.base import Call
    from gateway.routing import RoutingTable
    from gateway.store import Admission

REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")
STARTED: web.RequestKey[float] = web.RequestKey("started")
MODEL: web.RequestKey[str] = web.RequestKey("model")
CALL: web.RequestKey[Call] = web.RequestKey("call")
BYTES_OUT: web.RequestKey[int] = web.RequestKey("bytes_out")
TABLE: web.RequestKey[RoutingTable] = web.RequestKey("table")
ADMISSION: web.RequestKey[Admission | None] = web.RequestKey("admission")
