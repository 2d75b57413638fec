"""Cross-origin access for browser applications (the OpenAI SDKs run in a browser), for the origins
the config's ``cors.allow_origins`` names; none by default.

A browser asks first (a preflight ``OPTIONS``, which carries no credential) whether a page of an
origin may send the request, and later reads an answer only if it names that origin. The preflight
is answered here, before authentication; every answer to an allowed origin names it, with the
gateway's own headers exposed to the page's script. Requests of other origins, and requests that
name none (every client outside a browser), are served as they would be without this.
"""

from __future__ import annotations

from aiohttp import web

METHODS = "GET, POST, DELETE"
# What an application's script may read of an answer beyond the basic headers: the request's ID
# (for a support ticket), the poll pace the SDK honours, retry advice, rate limits, ranges.
EXPOSED = ", ".join(
    [
        *("x-request-id", "x-gateway-overhead-ms", "openai-poll-after-ms", "retry-after", "x-should-retry"),
        *("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
        *("content-range", "accept-ranges", "content-disposition", "etag", "last-modified"),
    ]
)
MAX_AGE_SECONDS = 600  # how long a browser may keep a preflight's answer (Chrome caps it at 7200)


def allowed_origin(origins: tuple[str, ...], origin: str | None) -> str:
    """What ``Access-Control-Allow-Origin`` says to a request from ``origin``: ``*`` when any origin
    may call, ``origin`` when it may, else "" (nothing, though the answer varies by ``Origin``)."""
    if "*" in origins:
        return "*"
    return origin if origin is not None and origin in origins else ""


def is_preflight(request: web.Request) -> bool:
    """A browser asking whether it may send a request, rather than an OPTIONS request of its own."""
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def preflight(request: web.Request) -> web.Response:
    """The answer to a preflight from an allowed origin: any of the API's methods, with the headers
    it asked for (the SDKs send ``Authorization`` and their ``x-stainless-*`` headers, which a
    ``*`` would not cover). The origin is named as on every answer (:func:`stamp`)."""
    response = web.Response(status=204)
    response.headers["Access-Control-Allow-Methods"] = METHODS
    asked = request.headers.get("Access-Control-Request-Headers")
    if asked:
        response.headers["Access-Control-Allow-Headers"] = asked
    response.headers["Access-Control-Max-Age"] = str(MAX_AGE_SECONDS)
    return response


def stamp(response: web.StreamResponse, allowed: str) -> None:
    """Name the allowed origin, if any, on an answer about to start (see :func:`allowed_origin`)."""
    if allowed != "*":  # the answer differs by the request's Origin: caches must keep them apart
        response.headers.add("Vary", "Origin")
    if allowed:
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers["Access-Control-Expose-Headers"] = EXPOSED
