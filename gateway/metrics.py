"""Prometheus metrics of the HTTP surface, the upstream calls and the videos' lives.

Labels come only from bounded sets: route templates, methods, status codes, and model, provider and
deployment names from the config; never a key, tenant or video ID. Metrics owned by a feature that
lives elsewhere (failover, ejection, rate limits, reloads) are defined in that feature's module.
"""

from __future__ import annotations

import hmac
import platform

from aiohttp import web
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.aiohttp import make_aiohttp_handler

from gateway import __version__

# Uploads and downloads of large videos can take minutes: buckets reach 10 minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

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
HTTP_IN_FLIGHT = Gauge("gateway_http_requests_in_flight", "Requests being handled now.", ["route"])
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
    "Time from sending to a provider until its answer headers.",
    ["provider", "model"],
    buckets=DURATION_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "gateway_upstream_errors_total",
    "Failed provider requests by kind: connect, timeout, reset, 4xx, 5xx, payload.",
    ["provider", "kind"],
)
UPSTREAM_IN_FLIGHT = Gauge("gateway_upstream_requests_in_flight", "Provider requests open now.", ["provider"])

VIDEOS_CREATED = Counter(
    "gateway_videos_created_total", "Videos accepted by a provider.", ["model", "provider"]
)
VIDEOS_FINISHED = Counter(
    "gateway_videos_finished_total",
    "Videos seen reaching a terminal status, counted once per video.",
    ["model", "provider", "status"],
)

BUILD = Info("gateway_build", "Version of the running gateway.")
BUILD.info({"version": __version__, "python": platform.python_version()})

UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "4xx", "5xx", "payload")


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
            VIDEOS_CREATED.labels(model, provider)
            for status in ("completed", "failed"):
                VIDEOS_FINISHED.labels(model, provider, status)


def metrics_handler(key: str | None) -> web.Handler:
    """``/metrics``; when a key is configured, scrapers must send it as a bearer token."""
    handler = make_aiohttp_handler(REGISTRY)
    if key is None:
        return handler

    async def guarded(request: web.Request) -> web.StreamResponse:
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), key.encode()):
            return web.Response(status=401, text="metrics key required\n")
        return await handler(request)

    return guarded
