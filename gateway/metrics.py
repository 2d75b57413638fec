"""Prometheus metrics of the HTTP surface, the upstream calls and the videos' lives.

Labels come only from bounded sets: route templates, methods, status codes, and model, provider and
deployment names from the config; never a key, tenant or video ID. Metrics owned by a feature that
lives elsewhere (failover, ejection, rate limits, reloads) are defined in that feature's module.

The series every request touches (:class:`RouteSeries`, :class:`UpstreamSeries`) tally in plain
Python and reach prometheus_client in batches, as Envoy flushes its stats: an update through
prometheus_client takes a lock and several calls, a dozen of them per poll cost more than the rest
of the metrics work together. Every collection in this process flushes first, so one process's
scrape is exact; with several workers each also flushes every :data:`FLUSH_SECONDS`, so a scrape
shows the other workers' counts as of at most that long ago.
"""

from __future__ import annotations

import asyncio
import os
import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

from aiohttp import web
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.auth import bearer_token, same_key
from gateway.context import CONTEXT
from gateway.errors import ApiError

FLUSH_SECONDS = 1.0

# The merged series of several workers (multiprocess mode) have no ``_created`` samples; one process's
# would. Off in both, so that a scrape has the same series whatever ``server.workers`` says.
disable_created_metrics()


class _Flush(Collector):
    """Registered ahead of the gateway's metrics: a collection first flushes this process's tallies."""

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        flush()
        return ()


_FLUSH = _Flush()
REGISTRY.register(_FLUSH)

# Up to an hour: a 2 GiB upload (the default cap) or download by a slow client takes well over ten
# minutes, which a top bucket of 600 s would report as exactly 600.
DURATION_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
)
# From a poll's tenth of a millisecond to what counts as the gateway's too and takes seconds: reading
# a client's upload before it can be sent on, a file the gateway serves itself.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5, 10, 60
)  # fmt: skip

HTTP_REQUESTS = Counter(
    "gateway_http_requests_total",
    "Requests answered, by route template, method and status code.",
    ["route", "method", "code"],
)
HTTP_DURATION = Histogram(
    "gateway_http_request_duration_seconds",
    "Time from request start to handler end, uploads included.",
    ["route", "method"],
    buckets=DURATION_BUCKETS,
)
HTTP_IN_FLIGHT = Gauge(
    "gateway_http_requests_in_flight", "Requests being handled now.", ["route"], multiprocess_mode="livesum"
)
OVERHEAD = Histogram(
    "gateway_overhead_seconds",
    "Time the gateway itself spent on a request: total minus upstream.",
    ["route"],
    buckets=OVERHEAD_BUCKETS,
)
REQUEST_BYTES = Counter(
    "gateway_request_body_bytes_total", "Request body bytes received from clients.", ["route"]
)
RESPONSE_BYTES = Counter(
    "gateway_response_body_bytes_total", "Response body bytes sent to clients.", ["route"]
)

UPSTREAM_REQUESTS = Counter(
    "gateway_upstream_requests_total",
    "Requests sent to providers.",
    ["provider", "deployment"],
)
UPSTREAM_DURATION = Histogram(
    "gateway_upstream_request_duration_seconds",
    "Time from sending to a provider until its answer headers, by the operation the call served.",
    ["provider", "model", "operation"],
    buckets=DURATION_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors_total",
    "Failed provider requests by kind: connect, timeout, reset, 4xx, 5xx, payload.",
    ["provider", "kind"],
)
UPSTREAM_IN_FLIGHT = Gauge(
    "gateway_upstream_requests_in_flight",
    "Provider requests open now.",
    ["provider"],
    multiprocess_mode="livesum",
)

VIDEOS_CREATED = Counter(
    "gateway_videos_created_total", "Videos accepted by a provider.", ["model", "provider"]
)
VIDEOS_FINISHED = Counter(
    "gateway_videos_finished_total",
    "Videos seen reaching a terminal status, counted once per video.",
    ["model", "provider", "status"],
)

# A gauge rather than an Info, which prometheus_client's multiprocess mode does not carry.
BUILD = Gauge(
    "gateway_build_info",
    "Version of the running gateway.",
    ["version", "python"],
    multiprocess_mode="livemax",
)
BUILD.labels(__version__, platform.python_version()).set(1)

UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "4xx", "5xx", "payload")
# What a provider call served: the ``operation`` of gateway_upstream_request_duration_seconds. A
# list's refresh of each video is a ``retrieve``; the calls a native adapter makes for one operation
# (an image upload before its create, a status read before its download) count as that operation.
UPSTREAM_OPERATIONS = (
    "create",
    "remix",
    "edit",
    "extend",
    "retrieve",
    "content",
    "delete",
    "create_character",
    "retrieve_character",
)
# Exported at zero from the start: the two every video model serves.
PRIMED_OPERATIONS = ("create", "retrieve")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """Clients may send any token as a method; only the standard ones become label values."""
    return method if method in METHODS else "other"


class _Sum:
    """A counter's or gauge's change in this process since the last flush."""

    __slots__ = ("_child", "pending")

    def __init__(self, child: Counter | Gauge) -> None:
        self._child = child
        self.pending: float = 0

    def inc(self, amount: float = 1) -> None:
        self.pending += amount

    def dec(self, amount: float = 1) -> None:
        self.pending -= amount

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0
            self._child.inc(amount)


class _Observations:
    """A histogram's observations in this process since the last flush, counted per bucket.

    prometheus_client has no call for many observations at once, so the flush adds to the child's
    bucket and sum values itself, through its private ``_upper_bounds``, ``_buckets`` and ``_sum``;
    ``test_tallies_flush_to_what_prometheus_client_would_count`` fails if those ever change.
    """

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        self._bounds = tuple(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def flush(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        total, self._sum = self._sum, 0.0
        for i, count in enumerate(counts):
            if count:
                counts[i] = 0
                self._child._buckets[i].inc(count)
        self._child._sum.inc(total)


class RouteSeries:
    """The series of one route and method, looked up once and updated in this process's tallies."""

    __slots__ = (
        "_codes",
        "_method",
        "_route",
        "duration",
        "in_flight",
        "overhead",
        "request_bytes",
        "response_bytes",
    )

    def __init__(self, route: str, method: str) -> None:
        self._route, self._method = route, method
        self._codes: dict[int, _Sum] = {}
        self.in_flight = _Sum(HTTP_IN_FLIGHT.labels(route))
        self.duration = _Observations(HTTP_DURATION.labels(route, method))
        self.overhead = _Observations(OVERHEAD.labels(route))
        self.request_bytes = _Sum(REQUEST_BYTES.labels(route))
        self.response_bytes = _Sum(RESPONSE_BYTES.labels(route))

    def started(self) -> None:
        """A request began: it is in flight until :meth:`record`."""
        self.in_flight.pending += 1

    def record(self, status: int, seconds: float, overhead: float, bytes_in: int, bytes_out: int) -> None:
        """A request that :meth:`started` ended: its status, times and body sizes."""
        self.in_flight.pending -= 1
        tally = self._codes.get(status)
        if tally is None:
            tally = self._codes[status] = _Sum(HTTP_REQUESTS.labels(self._route, self._method, str(status)))
        tally.pending += 1
        self.duration.observe(seconds)
        self.overhead.observe(overhead)
        self.request_bytes.pending += bytes_in
        self.response_bytes.pending += bytes_out

    def flush(self) -> None:
        for tally in (self.in_flight, self.duration, self.overhead, self.request_bytes, self.response_bytes):
            tally.flush()
        for code in self._codes.values():
            code.flush()


class UpstreamSeries:
    """The per-call series of one deployment's upstream requests, tallied as :class:`RouteSeries`."""

    __slots__ = ("duration", "in_flight", "requests")

    def __init__(self, provider: str, deployment: str, model: str, operation: str) -> None:
        self.requests = _Sum(UPSTREAM_REQUESTS.labels(provider, deployment))
        self.in_flight = _Sum(UPSTREAM_IN_FLIGHT.labels(provider))
        self.duration = _Observations(UPSTREAM_DURATION.labels(provider, model, operation))

    def sent(self) -> None:
        """A request left for the provider, and is in flight until ``in_flight.dec()``."""
        self.requests.pending += 1
        self.in_flight.pending += 1

    def flush(self) -> None:
        self.requests.flush()
        self.in_flight.flush()
        self.duration.flush()


_ROUTE_SERIES: dict[tuple[str, str], RouteSeries] = {}
_UPSTREAM_SERIES: dict[tuple[str, str, str, str], UpstreamSeries] = {}


def route_series(route: str, method: str) -> RouteSeries:
    """Series for a route template (or ``unmatched``) and method: a bounded set, so cached for good."""
    key = (route, method_label(method))
    series = _ROUTE_SERIES.get(key)
    if series is None:
        series = _ROUTE_SERIES[key] = RouteSeries(*key)
    return series


def upstream_series(provider: str, deployment: str, model: str, operation: str) -> UpstreamSeries:
    """Series for one deployment's calls serving one operation (a client's ``create``, ``retrieve``,
    ``content``...: :data:`UPSTREAM_OPERATIONS`), so that a poll's time is not averaged with an upload's."""
    key = (provider, deployment, model, operation)
    series = _UPSTREAM_SERIES.get(key)
    if series is None:
        series = _UPSTREAM_SERIES[key] = UpstreamSeries(*key)
    return series


def flush() -> None:
    """Move every hot-path tally into prometheus_client (on the event loop's thread, as they are kept)."""
    for route in _ROUTE_SERIES.values():
        route.flush()
    for upstream in _UPSTREAM_SERIES.values():
        upstream.flush()


async def flush_periodically(seconds: float = FLUSH_SECONDS) -> None:
    """For a worker among several: the others' scrapes read what this one flushed."""
    try:
        while True:
            await asyncio.sleep(seconds)
            flush()
    finally:
        flush()


def prime(providers: dict[str, list[tuple[str, str]]]) -> None:
    """Pre-export zero series for every configured provider, so rates start at zero, not absent.

    ``providers`` maps a provider name to its (deployment, public model) pairs.
    """
    for provider, deployments in providers.items():
        for kind in UPSTREAM_ERROR_KINDS:
            UPSTREAM_ERRORS.labels(provider, kind)
        UPSTREAM_IN_FLIGHT.labels(provider)
        for deployment, model in deployments:
            UPSTREAM_REQUESTS.labels(provider, deployment)
            for operation in PRIMED_OPERATIONS:
                UPSTREAM_DURATION.labels(provider, model, operation)
            VIDEOS_CREATED.labels(model, provider)
            for status in ("completed", "failed"):
                VIDEOS_FINISHED.labels(model, provider, status)


def multiprocess_dir() -> Path | None:
    """Where the workers' metric files are, when this process is one of several workers."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(path) if path else None


# The CPU counter's family as prometheus_client names it: its sample is process_cpu_seconds_total.
_CPU = "process_cpu_seconds"


class GatewayProcesses(Collector):
    """``process_*`` of the whole gateway when it runs as several workers: the supervisor and every
    live worker (those with live gauge files), summed; limits and start time taken as max and min.

    ``process_cpu_seconds_total`` also counts the workers that have died: their time is in the
    supervisor's ``cutime`` and ``cstime`` once it has reaped them. Summed over live processes only,
    the counter fell whenever a worker was replaced, which ``rate()`` reads as a reset and turns into
    a spike of every survivor's lifetime CPU."""

    _PICK: ClassVar[dict[str, Callable[[list[float]], float]]] = {
        "process_max_fds": max,
        "process_start_time_seconds": min,
    }

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def _pids(self) -> set[int]:
        pids = {os.getppid(), os.getpid()}
        for path in self._directory.glob("gauge_live*_*.db"):
            pid = path.stem.rpartition("_")[2]
            if pid.isdigit():
                pids.add(int(pid))
        return pids

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, list[float]] = {}
        for pid in sorted(self._pids()):
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                families.setdefault(family.name, family)
                values.setdefault(family.name, []).extend(sample.value for sample in family.samples)
        if _CPU in values:
            values[_CPU].append(_reaped_children_cpu(os.getppid()))
        for name, family in families.items():
            pick = self._PICK.get(name, sum)
            out = Metric(family.name, family.documentation, family.type)
            value = pick(values[name])
            if name == _CPU:
                value = _whole_ticks(value)
            out.add_sample(family.samples[0].name, {}, value)
            yield out


def _whole_ticks(seconds: float) -> float:
    """CPU seconds as a whole number of clock ticks. The sum of the same ticks in another order, or
    split over other processes (a worker's own, then the supervisor's reaped), differs in its last
    bits: one scrape a hair below the one before reads to ``rate()`` as a counter reset, a spike of
    the whole gateway's lifetime CPU."""
    ticks = os.sysconf("SC_CLK_TCK")
    return round(seconds * ticks) / ticks


def _reaped_children_cpu(pid: int) -> float:
    """CPU seconds of ``pid``'s children that it has waited for (``cutime`` + ``cstime``)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def metrics_registry() -> CollectorRegistry:
    """The default registry for one process; with several workers, all of theirs, merged."""
    directory = multiprocess_dir()
    if directory is None:
        return REGISTRY
    registry = CollectorRegistry()
    registry.register(_FLUSH)
    multiprocess.MultiProcessCollector(registry, path=str(directory))
    registry.register(GatewayProcesses(directory))
    # Not the GC collector: its counters would be those of whichever worker answers the scrape.
    PlatformCollector(registry=registry)
    return registry


def metrics_handler() -> web.Handler:
    """``/metrics``; when a key is configured, scrapers must send it as a bearer token.

    The key is the one of the config generation the request pinned, so a reload rotates it at once
    (the old key stops working).
    """
    handler = make_aiohttp_handler(metrics_registry())

    async def guarded(request: web.Request) -> web.StreamResponse:
        current = request[CONTEXT].table.config.metrics_key
        presented = bearer_token(request.headers.get("Authorization"))
        if current is not None and not same_key(presented, current):
            raise ApiError(401, "The metrics endpoint needs the metrics key.", code="invalid_metrics_key")
        return await handler(request)

    return guarded
