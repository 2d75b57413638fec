"""Structured logs: JSON lines in production, readable console lines in development.

Every event passes a redaction processor: values under credential-like keys are masked and any
bearer token or configured secret that ended up in a message is replaced. Control characters from
client input are escaped so one event is always one line.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog

_SECRET_KEYS = re.compile(r"(authorization|api[-_]?key|secret|token|password|cookie|credential)", re.I)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_secrets: set[str] = set()


def register_secrets(values: Iterable[str | None]) -> None:
    """Values that must never appear in a log line (upstream and client keys from the config)."""
    _secrets.update(v for v in values if v and len(v) >= 6)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _secrets:
            if secret in value:
                value = value.replace(secret, "[REDACTED]")
        value = _BEARER.sub(r"\1 [REDACTED]", value)
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    if isinstance(value, dict):
        return {k: "[REDACTED]" if _SECRET_KEYS.search(str(k)) else _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def redact(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    return {
        k: "[REDACTED]" if _SECRET_KEYS.search(k) and k != "key_name" else _clean(v)
        for k, v in event_dict.items()
    }


_LEVELS = logging.getLevelNamesMapping()
_level = logging.INFO


def enabled(level: str) -> bool:
    """Would an event at ``level`` be written? Lets hot paths skip building one that would not."""
    return _LEVELS[level.upper()] >= _level


def configure(fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    global _level
    _level = _LEVELS[level.upper()]
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_level),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


log = structlog.get_logger("gateway")
