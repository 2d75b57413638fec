"""Which headers cross the gateway, in each direction (RFC 9110 §7.6.1 plus the gateway's own rules)."""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)

# Never forwarded upstream: the client's own credentials and account, framing we set ourselves, and
# headers that describe the client's connection to us rather than the request.
_NOT_UPSTREAM = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",
    "expect",
    "cookie",
    "openai-organization",
    "openai-project",
    "x-api-key",
    "api-key",
    "x-request-id",
    "accept-encoding",
}

CONTENT_RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Range",
    "Accept-Ranges",
    "ETag",
    "Last-Modified",
    "Content-Encoding",
    "Content-Disposition",
    "Cache-Control",
)

CONTENT_REQUEST_HEADERS = ("Range", "If-Range", "If-None-Match", "If-Modified-Since")


def connection_tokens(headers: Mapping[str, str]) -> set[str]:
    """Header names the sender listed in ``Connection``: hop-by-hop for this message only."""
    getall = getattr(headers, "getall", None)
    values = getall("Connection", ()) if getall else [headers.get("Connection", "")]
    return {token.strip().lower() for value in values for token in value.split(",") if token.strip()}


def forwardable_request_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    drop = _NOT_UPSTREAM | connection_tokens(headers)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)
