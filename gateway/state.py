"""The running gateway's state, shared by handlers through one AppKey."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.auth import KeyRing
from gateway.config import GatewayConfig
from gateway.routing import RoutingTable
from gateway.store import TaskStore


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


GATEWAY = web.AppKey("gateway", Gateway)


def gateway(request: web.Request) -> Gateway:
    return request.app[GATEWAY]
