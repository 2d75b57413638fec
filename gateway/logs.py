"""Structured logs: JSON lines in production, readable console lines in development.

Every event passes a redaction processor: values under credential-like keys are masked and any
configured secret or credential-shaped string (:func:`scrub`) that ended up in a message is
replaced. Control characters from client input are escaped so one event is always one line. What
aiohttp, asyncio and other libraries log through the standard library's logging, at warning and
above, goes the same way.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

import structlog

_SECRET_KEYS = re.compile(r"(authorization|api[-_]?key|secret|token|password|cookie|credential)", re.I)
# Credentials by their shape, wherever they show up: a token after an auth scheme (Bearer; Basic
# and fal's Key when long enough to be one), Google API keys and OAuth tokens, JWTs (Kling's), and
# the secret parameters of signed URLs and keyed queries (S3/TOS/GCS/OSS signatures, Runway's _jwt).
_CREDENTIAL = re.compile(
    r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=:-]+|\b((?:basic|key)\s+)[A-Za-z0-9._~+/=:-]{12,}"
    r"|\bAIza[0-9A-Za-z_-]{30,}|\bya29\.[0-9A-Za-z_-]+|\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
    r"|([?&](?:key|api[-_]?key|token|access_token|signature|sig|ossaccesskeyid|_jwt"
    r"|x-(?:amz|goog|tos)-(?:signature|credential|security-token))=)[^&#\s\"'<>]+"
)


def _masked(match: re.Match[str]) -> str:
    return f"{match.group(1) or match.group(2) or match.group(3) or ''}[REDACTED]"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Longest first: a secret that begins with a shorter one is masked whole, not left with its tail.
_secrets: list[str] = []


def register_secrets(values: Iterable[str | None]) -> None:
    """Values that must never appear in a log line (upstream and client keys from the config), in
    each spelling a provider may quote them in: as they are, escaped in a JSON string (``/`` as
    ``\\/`` too, as PHP and others write it) and percent-encoded in a URL."""
    known = {*_secrets, *(s for v in values if v and len(v) >= 6 for s in _spellings(v))}
    _secrets[:] = sorted(known, key=len, reverse=True)


def _spellings(secret: str) -> set[str]:
    """``secret`` as written, JSON-escaped (with and without ``/`` escaped) and percent-encoded."""
    escaped = json.dumps(secret, ensure_ascii=False)[1:-1]
    return {secret, escaped, escaped.replace("/", "\\/"), quote(secret, safe=""), quote_plus(secret, safe="")}


def scrub(text: str) -> str:
    """``text`` with every configured secret and credential-shaped string in it (:data:`_CREDENTIAL`)
    replaced by ``[REDACTED]``: for log lines, and for a provider's words passed on to clients (a
    provider may echo its key, or a signed URL, in one)."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "[REDACTED]")
    return _CREDENTIAL.sub(_masked, text)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", scrub(value))
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


# The request being served, set by the envelope: every line logged while serving it names it, those
# of code that knows no request too (a full disk under an upload, an ejection its failure caused).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


def _request_id(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    if "request_id" not in event_dict and (request_id := REQUEST_ID.get()) is not None:
        event_dict["request_id"] = request_id
    return event_dict


def _inline_exception(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """A traceback as a value of its line (escaped by :func:`redact`), where the console renderer
    would write it below, so that one event stays one line in the console format too."""
    if "exception" in event_dict:
        event_dict["traceback"] = event_dict.pop("exception")
    return event_dict


_LEVELS = logging.getLevelNamesMapping()
_level = logging.INFO


def enabled(level: str) -> bool:
    """Would an event at ``level`` be written? Lets hot paths skip building one that would not."""
    return _LEVELS[level.upper()] >= _level


class _StdlibHandler(logging.StreamHandler[TextIO]):
    """Where records of the standard library's loggers are written, formatted as the gateway's own."""


def _warnings_and_above(record: logging.LogRecord) -> bool:
    """Libraries' records below warning are chatter; the gateway's level may raise the bar."""
    return record.levelno >= max(_level, logging.WARNING)


def configure(fmt: str = "console", level: str = "info", stream: TextIO | None = None) -> None:
    global _level
    _level = _LEVELS[level.upper()]
    json_lines = fmt == "json"
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    )
    out = stream or sys.stderr
    # Both kinds of record get a level, a time and their request first, and are redacted and
    # rendered last.
    head = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _request_id,
    ]
    tail = [
        structlog.processors.format_exc_info,
        *([] if json_lines else [_inline_exception]),
        redact,
        renderer,
    ]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *head, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(_level),
        logger_factory=structlog.WriteLoggerFactory(out),  # one write per line: workers share stderr
        cache_logger_on_first_use=False,
    )
    handler = _StdlibHandler(out)
    handler.addFilter(_warnings_and_above)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                *head,
                structlog.stdlib.add_logger_name,
            ],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)


def set_level(level: str) -> None:
    """Change the level only, keeping format and stream (a config reload's ``logging.level``)."""
    global _level
    _level = _LEVELS[level.upper()]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(_level))


log = structlog.get_logger("gateway")
