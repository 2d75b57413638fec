"""The running gateway's state, shared by handlers through one AppKey."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from gateway.context import CONTEXT
from gateway.errors import ApiError
from gateway.health import HealthBoard
from gateway.hosted import HostedFiles
from gateway.limits import Bulkheads
from gateway.providers.base import Adapter
from gateway.routing import RoutingTable
from gateway.store import Task, TaskStore


@dataclass
class Gateway:
    """What outlives a config reload. ``table`` is the current generation (swapped on reload);
    ``table`` and ``store`` are filled in at start-up."""

    health: HealthBoard
    bulkheads: Bulkheads = field(default_factory=Bulkheads)
    hosted: HostedFiles | None = None
    workers: int = 1
    draining: bool = False  # SIGTERM came: readiness fails, new connections close
    stopping: bool = False  # the drain is over: aiohttp is cancelling what still runs
    in_flight: int = 0
    # The drain's time is up: creates still waiting on their provider answer their clients now
    drain_over: asyncio.Event = field(default_factory=asyncio.Event)
    # Creates and deletes whose client left, still recording what their provider did (api.shielded)
    left_by_client: set[asyncio.Task[web.StreamResponse]] = field(default_factory=set)
    # Each video's news waiting to be saved behind a save of it under way (api._save)
    news_waiting: dict[str, Task] = field(default_factory=dict)
    # When each key at its max_in_progress cap last had its unfinished videos refreshed (api._admit)
    active_refreshed: dict[str, float] = field(default_factory=dict)
    table: RoutingTable = field(init=False)
    store: TaskStore = field(init=False)

    def poll_after_ms(self, provider: str) -> int:
        """openai-poll-after-ms for an unfinished video of ``provider`` (a reload that removed the
        provider keeps its adapter for its videos)."""
        try:
            return self.table.adapter(provider).poll_after_ms
        except ApiError:
            return Adapter.default_poll_after_ms


GATEWAY = web.AppKey("gateway", Gateway)


def gateway(request: web.Request) -> Gateway:
    return request[CONTEXT].gateway
