"""Limits that protect budgets and upstreams.

Per key: a create rate and a cap on videos in progress. Per deployment: bulkheads.

Only requests that start a video (create, remix, edit, extension) count against a key; polls, lists
and downloads never do. The in-progress count comes from the task store (so it survives restarts)
plus the creates still on their way to an upstream.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from prometheus_client import Counter

from gateway.config import ClientKey, Deployment
from gateway.errors import ApiError

RATE_LIMITED = Counter("gateway_ratelimit_rejections_total", "Creates refused by a per-key limit.", ["limit"])
BULKHEAD_REJECTED = Counter(
    "gateway_bulkhead_rejections_total",
    "Requests refused because a deployment was at its cap.",
    ["deployment", "kind"],
)

WINDOW_SECONDS = 60.0


class KeyLimiter:
    """Sliding one-minute window of creates, and in-flight creates, per key name (one replica)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._creates: dict[str, deque[float]] = {}
        self._pending: dict[str, int] = {}

    def rate_headers(self, key: ClientKey) -> dict[str, str]:
        if key.creates_per_minute is None:
            return {}
        window = self._window(key.name)
        reset = window[0] + WINDOW_SECONDS - self._clock() if window else 0.0
        return {
            "x-ratelimit-limit-requests": str(key.creates_per_minute),
            "x-ratelimit-remaining-requests": str(max(0, key.creates_per_minute - len(window))),
            "x-ratelimit-reset-requests": f"{max(0.0, reset):.0f}s",
        }

    def _window(self, name: str) -> deque[float]:
        window = self._creates.setdefault(name, deque())
        horizon = self._clock() - WINDOW_SECONDS
        while window and window[0] <= horizon:
            window.popleft()
        return window

    @asynccontextmanager
    async def admit(self, key: ClientKey, count_active: Callable[[], Awaitable[int]]) -> AsyncIterator[None]:
        """Admit one create for ``key`` or raise 429; the create counts as in progress meanwhile."""
        if key.creates_per_minute is not None:
            window = self._window(key.name)
            if len(window) >= key.creates_per_minute:
                RATE_LIMITED.labels("creates_per_minute").inc()
                retry = max(1, math.ceil(window[0] + WINDOW_SECONDS - self._clock()))
                raise ApiError(
                    429,
                    f"Rate limit reached: {key.creates_per_minute} video creates per minute for this key.",
                    type="rate_limit_error",
                    code="rate_limit_exceeded",
                    headers={**self.rate_headers(key), "Retry-After": str(retry)},
                )
        if key.max_in_progress is not None:
            active = await count_active() + self._pending.get(key.name, 0)
            if active >= key.max_in_progress:
                RATE_LIMITED.labels("max_in_progress").inc()
                raise ApiError(
                    429,
                    f"Too many videos in progress: this key may have {key.max_in_progress} at once; "
                    "wait for one to finish.",
                    type="rate_limit_error",
                    code="too_many_in_progress",
                    headers={"Retry-After": "5", **self.rate_headers(key)},
                )
        if key.creates_per_minute is not None:
            self._window(key.name).append(self._clock())
        self._pending[key.name] = self._pending.get(key.name, 0) + 1
        try:
            yield
        finally:
            self._pending[key.name] -= 1


class Bulkheads:
    """Per-deployment caps on concurrent upstream calls and on concurrent uploads (creates)."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], int] = {}

    def _cap(self, deployment: Deployment, kind: str) -> int | None:
        return deployment.max_concurrent_uploads if kind == "uploads" else deployment.max_concurrent_requests

    def has_room(self, deployment: Deployment, kind: str) -> bool:
        cap = self._cap(deployment, kind)
        return cap is None or self._open.get((deployment.name, kind), 0) < cap

    @asynccontextmanager
    async def enter(self, deployment: Deployment, kind: str) -> AsyncIterator[None]:
        """Hold a slot or raise 503 with Retry-After at once: a full bulkhead sheds, never queues."""
        if not self.has_room(deployment, kind):
            BULKHEAD_REJECTED.labels(deployment.name, kind).inc()
            raise ApiError(
                503,
                f"The upstream serving this request is at its concurrency limit ({kind}); retry shortly.",
                type="server_error",
                code="upstream_busy",
                headers={"Retry-After": "1"},
            )
        slot = (deployment.name, kind)
        self._open[slot] = self._open.get(slot, 0) + 1
        try:
            yield
        finally:
            self._open[slot] -= 1

    def open(self, deployment: str, kind: str) -> int:
        return self._open.get((deployment, kind), 0)
