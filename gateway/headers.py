"""Which headers cross the gateway, in each direction: allow-lists, so that nothing new leaks by default."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from multidict import CIMultiDict

# The only client headers an upstream gets: what describes the body and the kind of answer wanted,
# and the OpenAI API's own request options. Everything else stays here: credentials of any scheme
# (Authorization, api-key, x-goog-api-key, cookies, cloud tokens), hop-by-hop and framing headers,
# Content-Encoding (the gateway forwards the decoded body), and what describes the client's
# connection to us (Forwarded, X-Forwarded-*, X-Real-IP, Origin).
_TO_UPSTREAM = frozenset({"content-type", "accept", "user-agent", "openai-beta", "idempotency-key"})

# What a download passes on from the provider's answer. Not its Cache-Control, which a CDN may set
# to public: a download is one tenant's (CONTENT_CACHE_CONTROL), nor its Content-Disposition, whose
# file name may carry the provider's job ID.
CONTENT_RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Range",
    "Accept-Ranges",
    "ETag",
    "Last-Modified",
    "Content-Encoding",
)
CONTENT_CACHE_CONTROL = "private"  # the client's own cache may keep it; no shared one

# Passed on with a content download; Range and If-Range go through base.range_headers().
CONDITIONAL_REQUEST_HEADERS = ("If-None-Match", "If-Modified-Since")


def forwardable_request_headers(headers: Mapping[str, str], tenant: str) -> CIMultiDict[str]:
    """The client's headers an upstream may have. A provider keeps an ``Idempotency-Key`` per
    account, and every tenant reaches it on the gateway's: the key goes on prefixed with a tag of
    the ``tenant``'s own, so that one tenant's key can never have the provider replay another's job."""
    forwarded = CIMultiDict((k, v) for k, v in headers.items() if k.lower() in _TO_UPSTREAM)
    key = forwarded.get("Idempotency-Key")
    if key is not None:
        forwarded["Idempotency-Key"] = f"{_tenant_tag(tenant)}-{key}"
    return forwarded


def _tenant_tag(tenant: str) -> str:
    """A tag of a tenant's key name: a hash, so of one length whatever the name, and not the name as
    written (though a guessable name can be guessed from it: it keeps tenants apart, not secret)."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:16]


def media_type(content_type: str | None) -> str:
    """The ``type/subtype`` of a Content-Type value, lower-cased; its parameters are not parsed.

    aiohttp's ``content_type`` parses them with the email package, which raises on some malformed
    ones (``boundary=g%r;L*``): a client's or a provider's odd header must not become a 500.
    """
    return (content_type or "").partition(";")[0].strip().lower()
