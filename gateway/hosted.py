"""Short-lived signed URLs for uploaded images, for providers that only take image URLs (Luma).

An image is written under ``<data_dir>/hosted`` and served at
``<public_base_url>/files/<name>?expires=<unix>&sig=<hmac>``. The signature covers the name and the
expiry, so a URL cannot be extended or pointed at another file; expired files are swept lazily (by
a put, once a minute at most), and a file goes at once when the video it was uploaded for is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import secrets
import time
from pathlib import Path

from aiohttp import web

from gateway.errors import ApiError, storage_failed
from gateway.providers.base import FileAnswer

_NAME = re.compile(r"[0-9a-f]{32}\.(png|jpg|webp|bin)")
# ASCII digits and hex only: str.isdigit() takes "²", which int() refuses, and compare_digest refuses
# text that is not ASCII; either was a 500 for a link anyone can send.
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
SWEEP_SECONDS = 60.0  # expired files are swept by a put at most this often


class HostedFiles:
    def __init__(self, root: Path, public_base_url: str, key: bytes, ttl_seconds: float = 3600) -> None:
        self.root = root
        self.public_base_url = public_base_url.rstrip("/")
        self._key = key
        self.ttl_seconds = ttl_seconds
        self._swept_at = -SWEEP_SECONDS

    def _sign(self, name: str, expires: int) -> str:
        return hmac.new(self._key, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()

    async def put(self, data: bytes, mime: str) -> str:
        """Store ``data`` and return a signed URL that works for ``ttl_seconds``."""
        name = f"{secrets.token_hex(16)}.{_EXTENSIONS.get(mime, 'bin')}"
        expires = int(time.time() + self.ttl_seconds)
        try:
            await asyncio.to_thread(self._write, name, data)
        except OSError as exc:
            with contextlib.suppress(OSError):  # a half-written image must not fill the disk further
                await asyncio.to_thread((self.root / name).unlink, missing_ok=True)
            raise storage_failed("this image", exc) from None
        return f"{self.public_base_url}/files/{name}?expires={expires}&sig={self._sign(name, expires)}"

    async def remove(self, url: str) -> None:
        """Delete the file behind a URL :meth:`put` gave (its video is gone); unknown URLs are ignored."""
        name = url.partition("?")[0].rpartition("/")[2]
        if _NAME.fullmatch(name):
            await asyncio.to_thread((self.root / name).unlink, missing_ok=True)

    def _write(self, name: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if time.monotonic() - self._swept_at >= SWEEP_SECONDS:  # a look at every file: 200 ms with 50 000
            self._swept_at = time.monotonic()
            cutoff = time.time() - 2 * self.ttl_seconds
            for old in self.root.iterdir():
                # another put's sweep, or a delete, may remove a listed file first
                with contextlib.suppress(FileNotFoundError):
                    if old.stat().st_mtime < cutoff:
                        old.unlink(missing_ok=True)
        (self.root / name).write_bytes(data)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        expires = request.query.get("expires", "")
        sig = request.query.get("sig", "")
        valid = (
            _NAME.fullmatch(name)
            and _EXPIRES.fullmatch(expires)
            and _SIGNATURE.fullmatch(sig)
            and hmac.compare_digest(sig, self._sign(name, int(expires)))
        )
        if not valid or int(expires) < time.time() or not (self.root / name).is_file():
            raise ApiError(404, "No such file, or its link has expired.", code="not_found")
        return FileAnswer(self.root / name)
