"""JSON on the hot path: orjson, several times faster than the standard library at both ends.

The videos and lists the gateway answers with, every provider answer and every client body it reads
pass through here; the rarer answers (error envelopes, streamed events, the admin's) use the standard
library. orjson refuses integers beyond 64 bits when writing; those (rare, provider-supplied) go through
the standard library instead, so nothing that ``json`` can write is refused.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

JSONDecodeError = json.JSONDecodeError  # orjson's error is a subclass: catch this one
MAX_DEPTH = 64  # nesting the gateway takes from clients and providers


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value).encode()


def loads(raw: bytes | bytearray | str) -> Any:
    """Parse JSON strictly; raises :data:`JSONDecodeError` for anything RFC 8259 does not allow.

    Unlike ``json.loads`` this refuses ``NaN`` and ``Infinity``, numbers beyond a double's range (an
    integer of 5000 digits among them), lone surrogates, bytes that are not UTF-8 and nesting deeper
    than 1024 levels. Integers beyond 64 bits but within a double's range come back as floats.
    """
    return orjson.loads(raw)


def loads_shallow(raw: bytes) -> Any:
    """:func:`loads`, also refusing nesting deeper than :data:`MAX_DEPTH` levels: the gateway could
    neither write such a value back nor make text of it (``str`` of 1 000 nested lists raises
    RecursionError). For what providers send and form values; brackets are counted first, so a
    usual document is never walked."""
    value = loads(raw)
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and nesting_exceeds(value, MAX_DEPTH):
        raise JSONDecodeError(f"nested deeper than {MAX_DEPTH} levels", "", 0)
    return value


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether objects and arrays in ``value`` nest more than ``limit`` levels deep.

    Walked level by level, without recursion: a parsed document may be deeper than the encoders can
    write back (orjson stops at 255 levels, ``json`` at the interpreter's recursion limit).
    """
    level = [value] if isinstance(value, dict | list) else []
    for _ in range(limit):
        children: list[Any] = []
        for container in level:
            items = container.values() if isinstance(container, dict) else container
            children.extend(item for item in items if isinstance(item, dict | list))
        if not children:
            return False
        level = children
    return True
