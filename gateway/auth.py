"""Client keys: who is calling, and which models they may use.

Keys are configured as SHA-256 digests. A presented key is hashed and compared with every configured
digest in constant time (no early exit), so timing reveals nothing about any key. An
``Authorization`` value that authenticated is remembered, so that the next request with it (most
often on the same keep-alive connection) is one dictionary lookup rather than a hash: a lookup
compares strings only when their randomised hashes are equal, so a wrong key never meets a
remembered one, and learns nothing from the time it takes.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from gateway.config import ClientKey
from gateway.context import CONTEXT
from gateway.errors import ApiError


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case), else None."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def same_key(presented: str | None, key: str) -> bool:
    """A constant-time comparison of a presented token with a configured key."""
    raw = (presented or "").encode("utf-8", "surrogateescape")
    return hmac.compare_digest(raw, key.encode("utf-8", "surrogateescape"))


# Authorization values remembered at most: a client may write one key in many ways ("Bearer  k").
REMEMBERED = 1024


class KeyRing:
    def __init__(self, keys: tuple[ClientKey, ...]) -> None:
        self._keys = keys
        self._known: dict[str, ClientKey] = {}

    def authenticate(self, authorization: str | None) -> ClientKey:
        """The key named by an ``Authorization: Bearer`` header, or a 401."""
        authorization = authorization or ""
        known = self._known.get(authorization)
        if known is None:
            known = self._check(bearer_token(authorization))  # a missing or wrong key raises
            if len(self._known) >= REMEMBERED:
                self._known.clear()
            self._known[authorization] = known
        return known

    def _check(self, token: str | None) -> ClientKey:
        if token is None:
            raise ApiError(
                401,
                "Missing API key: send it as 'Authorization: Bearer <key>'.",
                type="invalid_request_error",
                code="missing_api_key",
            )
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: ClientKey | None = None
        for key in self._keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        if found is None:
            raise ApiError(
                401, "Incorrect API key provided.", type="invalid_request_error", code="invalid_api_key"
            )
        return found


def check_model_access(key: ClientKey, model: str) -> None:
    if key.models is not None and model not in key.models:
        raise ApiError(
            403,
            f"This API key may not use the model '{model}'.",
            type="permission_error",
            param="model",
            code="model_not_allowed",
        )


def client_key(request: web.Request) -> ClientKey:
    """The key the envelope authenticated (every API route has one)."""
    key = request[CONTEXT].client_key
    assert key is not None, "API routes are authenticated before their handler runs"
    return key
