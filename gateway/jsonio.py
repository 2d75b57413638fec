"""JSON on the hot path: orjson, several times faster than the standard library at both ends.

Every answer the gateway writes and every provider answer it reads passes through here. orjson
refuses integers beyond 64 bits when writing; those (rare, provider-supplied) go through the
standard library instead, so nothing that ``json`` can write is refused.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

JSONDecodeError = json.JSONDecodeError  # orjson's error is a subclass: catch this one


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value).encode()


def loads(raw: bytes | str) -> Any:
    """Parse JSON; raises :data:`JSONDecodeError` (also for bytes that are not UTF-8)."""
    return orjson.loads(raw)
