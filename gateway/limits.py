"""Limits that protect budgets and upstreams.

Per key: a create rate and a cap on videos in progress. Per deployment: bulkheads.

Only requests that start a video (create, remix, edit, extension) count against a key; polls, lists
and downloads never do. Key limits are counted in the task store (:meth:`TaskStore.admit`), so they
hold across the workers of a gateway, across replicas sharing a store, and across restarts.
Bulkheads are counted in each worker process, each worker holding its share of the cap.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager

from prometheus_client import Counter

from gateway.config import ClientKey, Deployment
from gateway.errors import ApiError, upstream_busy
from gateway.logs import log
from gateway.store import Admission, StoreUnavailable, TaskStore

RATE_LIMITED = Counter("gateway_ratelimit_rejections_total", "Creates refused by a per-key limit.", ["limit"])
BULKHEAD_REJECTED = Counter(
    "gateway_bulkhead_rejections_total",
    "Requests refused because a deployment was at a cap (its own, or its connection pool's).",
    ["deployment", "kind"],
)


def rate_headers(key: ClientKey, admission: Admission | None) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*-requests`` headers for a key with a create rate."""
    if key.creates_per_minute is None or admission is None:
        return {}
    return {
        "x-ratelimit-limit-requests": str(key.creates_per_minute),
        "x-ratelimit-remaining-requests": str(max(0, key.creates_per_minute - admission.window)),
        "x-ratelimit-reset-requests": f"{max(0.0, admission.reset_seconds):.0f}s",
    }


@asynccontextmanager
async def admit(
    key: ClientKey, store: TaskStore, refresh_active: Callable[[], Awaitable[None]]
) -> AsyncIterator[Admission | None]:
    """Admit one create for ``key`` or raise 429; the create counts as in progress meanwhile.

    When the in-progress cap is reached, ``refresh_active`` asks the providers about the key's
    unfinished videos (some may have finished since last seen) before the create is refused.
    """
    if key.creates_per_minute is None and key.max_in_progress is None:
        yield None
        return
    limits = {"per_minute": key.creates_per_minute, "max_active": key.max_in_progress}
    admission = await store.admit(key.name, **limits)
    if admission.limit == "max_in_progress":
        await refresh_active()
        admission = await store.admit(key.name, **limits)
    if admission.limit is not None:
        RATE_LIMITED.labels(admission.limit).inc()
        headers = rate_headers(key, admission)
        if admission.limit == "creates_per_minute":
            raise ApiError(
                429,
                f"Rate limit reached: {key.creates_per_minute} video creates per minute for this key.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={**headers, "Retry-After": str(max(1, math.ceil(admission.reset_seconds)))},
            )
        raise ApiError(
            429,
            f"Too many videos in progress: this key may have {key.max_in_progress} at once; "
            "wait for one to finish.",
            type="rate_limit_error",
            code="too_many_in_progress",
            headers={"Retry-After": "5", **headers},
        )
    try:
        yield admission
    finally:
        await settle(store, key, admission)


async def settle(store: TaskStore, key: ClientKey, admission: Admission | None) -> None:
    """The admitted create no longer counts as pending: it ended, or its video is in the store
    (where it counts as the video). Settling again is harmless."""
    if admission is None:
        return
    try:
        await store.settle(admission)
    except StoreUnavailable as exc:
        # The create's own answer must stand: its video, or the 503 that tells the client not to
        # retry (the job may exist). Unsettled, the admission stops counting after PENDING_SECONDS
        # (or when this process ends).
        log.warning("admission_not_settled", key_name=key.name, error=str(exc))


class Bulkheads:
    """Per-deployment caps on concurrent upstream calls and on concurrent uploads (the calls that make
    a video or character).

    With several worker processes each holds an equal share of a cap (rounded up), as nginx's
    per-worker limits do: the kernel spreads connections evenly across workers.
    """

    def __init__(self, workers: int = 1) -> None:
        self._open: dict[tuple[str, str], int] = {}
        self._workers = workers

    def enter(self, deployment: Deployment, kind: str) -> _Slot:
        """Hold a slot (``with``) or raise 503 with Retry-After at once: a full bulkhead sheds, never
        queues."""
        key = (deployment.name, kind)
        held = self._open.get(key, 0)
        cap = deployment.max_concurrent_uploads if kind == "uploads" else deployment.max_concurrent_requests
        if cap is not None and held >= math.ceil(cap / self._workers):
            BULKHEAD_REJECTED.labels(deployment.name, kind).inc()
            raise upstream_busy(kind)
        self._open[key] = held + 1
        return _Slot(self._open, key)

    @contextmanager
    def enter_create(self, deployment: Deployment) -> Iterator[ExitStack]:
        """What a call that makes a video or character (a create, remix, edit or extension) holds: an
        upload slot and, as every call to the deployment, a request slot. The request slot is held
        by the stack yielded: a call still open when its upload is over (a streamed create's) keeps
        it past the block with ``pop_all``."""
        with self.enter(deployment, "uploads"), ExitStack() as calling:
            calling.enter_context(self.enter(deployment, "requests"))
            yield calling

    def open(self, deployment: str, kind: str) -> int:
        return self._open.get((deployment, kind), 0)


class _Slot:
    """A held bulkhead slot, given back when the ``with`` block ends (a plain class: every upstream
    call takes one, and a generator-based context manager costs several times as much)."""

    __slots__ = ("_key", "_open")

    def __init__(self, open_slots: dict[tuple[str, str], int], key: tuple[str, str]) -> None:
        self._open, self._key = open_slots, key

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._open[self._key] -= 1
