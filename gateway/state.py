"""The running gateway's state, shared by handlers through one AppKey."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.auth import KeyRing
from gateway.config import GatewayConfig
from gateway.providers.base import Call
from gateway.routing import RoutingTable
from gateway.store import Task, TaskStore
from gateway.videos import is_terminal


@dataclass
class Gateway:
    """Built with the app; ``table`` and ``store`` are filled in at start-up."""

    config: GatewayConfig
    keys: KeyRing
    table: RoutingTable = field(init=False)
    store: TaskStore = field(init=False)

    def poll_after_ms(self, provider: str) -> int:
        config = self.config.providers.get(provider)
        return config.poll_after_ms if config is not None else 1000

    def observe_status(self, task: Task, previous: str | None) -> None:
        """Called whenever the gateway learns a video's status; metrics hook in here."""
        if is_terminal(task.status) and not (previous and is_terminal(previous)):
            pass


GATEWAY = web.AppKey("gateway", Gateway)
REQUEST_ID = web.RequestKey("request_id", str)
CALL = web.RequestKey("call", Call)
MODEL = web.RequestKey("model", str)


def gateway(request: web.Request) -> Gateway:
    return request.app[GATEWAY]
