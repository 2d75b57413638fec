"""The OpenAI Video object: every answer about a video is built here, whatever the upstream said."""

from __future__ import annotations

import secrets
import time
from typing import Any

from gateway.errors import ApiError, bad_request
from gateway.logs import log, scrub
from gateway.store import ACTIVE_STATUSES, Task

VIDEO_KEYS = (
    "id",
    "object",
    "model",
    "status",
    "progress",
    "created_at",
    "completed_at",
    "expires_at",
    "prompt",
    "size",
    "seconds",
    "remixed_from_video_id",
    "error",
)

STATUSES = ("queued", "in_progress", "completed", "failed")

# Every provider's status word, lower-cased, → (OpenAI status, error code when it means failure).
STATUS_SYNONYMS: dict[str, tuple[str, str | None]] = {
    "queued": ("queued", None),
    "pending": ("queued", None),
    "submitted": ("queued", None),
    "waiting": ("queued", None),
    "starting": ("queued", None),
    "throttled": ("queued", None),
    "in_queue": ("queued", None),
    "preparing": ("queued", None),
    "preprocessing": ("queued", None),
    "queueing": ("queued", None),
    "suspended": ("queued", None),
    "in_progress": ("in_progress", None),
    "processing": ("in_progress", None),
    "running": ("in_progress", None),
    "generating": ("in_progress", None),
    "dreaming": ("in_progress", None),
    "completed": ("completed", None),
    "succeeded": ("completed", None),
    "success": ("completed", None),
    "succeed": ("completed", None),
    "done": ("completed", None),
    "failed": ("failed", "generation_failed"),
    "failure": ("failed", "generation_failed"),
    "fail": ("failed", "generation_failed"),
    "error": ("failed", "generation_failed"),
    "cancelled": ("failed", "cancelled"),
    "canceled": ("failed", "cancelled"),
    "aborted": ("failed", "aborted"),
    "expired": ("failed", "expired"),
    "unknown": ("failed", "unknown_status"),
}

DEFAULT_SIZE = "720x1280"
MAX_PROMPT_CHARS = 32000  # the API's own bound (maxLength)
DEFAULT_SECONDS = "4"
VARIANTS = ("video", "thumbnail", "spritesheet")  # what /content?variant= serves
_FINISHED = ("completed", "failed")


def prompt_too_long() -> ApiError:
    return bad_request(f"'prompt' is longer than {MAX_PROMPT_CHARS} characters.", param="prompt")


def validate_prompt(value: Any) -> str:
    """A create's prompt, required: where the gateway itself reads it (local and native providers)."""
    if not isinstance(value, str) or not value.strip():
        raise bad_request(
            "'prompt' is required and must be a non-empty string.",
            param="prompt",
            code="missing_required_parameter",
        )
    if len(value) > MAX_PROMPT_CHARS:
        raise prompt_too_long()
    return value


def new_video_id() -> str:
    """An unguessable ID: 128 random bits, hex, in OpenAI's ``video_`` form."""
    return "video_" + secrets.token_hex(16)


def new_character_id() -> str:
    return "char_" + secrets.token_hex(16)


def map_status(raw: Any) -> tuple[str, str | None] | None:
    """The OpenAI status of a provider's word (and the error code it implies), None for a word
    the gateway does not know."""
    known = STATUS_SYNONYMS.get(raw) if type(raw) is str else None  # most providers write it so
    return known or STATUS_SYNONYMS.get(str(raw).strip().lower())


def _int_or_none(value: Any) -> int | None:
    if type(value) is int:  # the usual case (a bool's type is bool)
        return value
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(float(value))
    except (TypeError, ValueError, OverflowError):  # "inf" is a float, but no int
        return None


def _seconds(value: Any) -> str | None:
    """A duration as the Video object writes it (a string of digits), from text or a whole number."""
    if type(value) is str:
        return value or None
    if type(value) is int or (type(value) is float and value.is_integer()):
        return str(int(value))
    return None


def build_video(task: Task, upstream: dict[str, Any], *, remixed_from: str | None = None) -> dict[str, Any]:
    """The client's view of a video: all 13 keys, public ID and model, one of the four statuses.

    ``upstream`` is what the provider reported, already in OpenAI field names; anything missing
    falls back to what the gateway showed last (``task.video``), so values never go backwards.
    """
    last = task.video
    get, last_get = upstream.get, last.get
    word = get("status", last_get("status", "queued"))
    mapped = map_status(word)
    if mapped is None:
        # Never end a job on a guess: a failed video is no longer polled, so one the provider then
        # finishes (and bills) would be lost. A new stage of a provider's reads as in progress.
        log.warning("unknown_upstream_status", video_id=task.id, status=str(word)[:100])
        mapped = ("in_progress", None)
    status, failure_code = mapped
    progress = _int_or_none(get("progress"))
    if progress is None:
        progress = last_get("progress", 0)
    progress = max(0, min(100, progress))
    if status == "completed":
        progress = 100
    elif last_get("status") in ACTIVE_STATUSES and status in ACTIVE_STATUSES:
        progress = max(progress, last_get("progress", 0))

    error = None
    if status == "failed":
        reported = get("error")
        if not isinstance(reported, dict):
            reported = {}
        error = {  # the provider's words, which may quote the key it was sent or a signed URL
            "code": scrub(str(reported.get("code") or failure_code or "generation_failed")),
            "message": scrub(str(reported.get("message") or f"The video generation ended as '{word}'.")),
        }

    completed_at = None
    if status in _FINISHED:
        completed_at = _int_or_none(get("completed_at")) or last_get("completed_at")
        if completed_at is None:
            completed_at = int(time.time())
        # created_at is the gateway's clock, completed_at the provider's: never finished before made
        completed_at = max(completed_at, task.created_at)
    prompt = get("prompt")
    # text or nothing, whatever the provider sent, and no longer than a client may send: every
    # cached copy of the video holds it
    if type(prompt) is not str or not prompt or len(prompt) > MAX_PROMPT_CHARS:
        prompt = last_get("prompt")
    size = get("size")
    if type(size) is not str or not size:
        size = last_get("size") or DEFAULT_SIZE
    return {
        "id": task.id,
        "object": "video",
        "model": task.model,
        "status": status,
        "progress": progress,
        "created_at": task.created_at,
        "completed_at": completed_at,
        "expires_at": _int_or_none(get("expires_at")) or last_get("expires_at"),
        "prompt": prompt,
        "size": size,
        "seconds": _seconds(get("seconds")) or last_get("seconds") or DEFAULT_SECONDS,
        "remixed_from_video_id": remixed_from
        if remixed_from is not None
        else last_get("remixed_from_video_id"),
        "error": error,
    }


def is_terminal(status: str) -> bool:
    return status in _FINISHED
