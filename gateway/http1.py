"""A lean HTTP/1.1 client for the small, buffered JSON exchanges with providers.

Polls, creates with JSON bodies and deletes are the gateway's hot path: a poll is one small request
and one small answer. aiohttp's client spends more than the whole server side on building and
tracking such a request; this client writes one request head, parses the answer with httptools
(llhttp, the parser of Node.js) and keeps connections alive per origin. Streams (uploads, downloads,
event streams) stay on aiohttp, which is built for them.

Failures are :class:`ExchangeError` with the kinds the gateway reports for aiohttp's: ``connect``
(nothing reached the provider), ``timeout``, ``reset`` (the connection closed before an answer) and
``payload`` (a cut-off, oversized or malformed answer). Their messages reach the client, so they
name no address; an operating system's error is kept as the ``__cause__``, for the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

IDLE_SECONDS = 15.0  # as aiohttp's keep-alive: well under the usual server-side idle limits
# An answer's status line and headers (interim answers' too), as the gateway's own server allows a
# request's: llhttp sets no limit, and would gather whatever a broken provider kept sending.
MAX_HEAD_BYTES = 64 * 1024
# A provider that closes idle connections sooner says so in Keep-Alive (Node.js servers: timeout=5).
_KEEP_ALIVE_TIMEOUT = re.compile(rb"(?i)\btimeout\s*=\s*([0-9]{1,6})")
MAX_ORIGINS = 64
_IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "PUT"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]  # case-insensitive (a CIMultiDict here, aiohttp's proxy elsewhere)
    body: bytes


class _ReceivedHeaders(Mapping[str, str]):
    """An answer's headers as they arrived, decoded and made case-insensitive when first read: the
    answer to a poll that went well is never asked for them."""

    __slots__ = ("_lines", "_made")

    def __init__(self, lines: dict[bytes, bytes]) -> None:
        self._lines = lines
        self._made: CIMultiDict[str] | None = None

    def _headers(self) -> CIMultiDict[str]:
        if self._made is None:
            self._made = CIMultiDict(
                # llhttp leaves the whitespace that may end a line, which is no part of the value
                (n.decode("latin-1"), v.decode("latin-1").rstrip(" \t"))
                for n, v in self._lines.items()
            )
        return self._made

    def __getitem__(self, name: str) -> str:
        return self._headers()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers())

    def __len__(self) -> int:
        return len(self._lines)


@dataclass(frozen=True, slots=True)
class FixedHeaders:
    """Headers that many requests send alike (an adapter's poll headers), checked and written out
    once rather than on every request."""

    lines: str
    names_host: bool  # a provider's own Host, which replaces the URL's

    @classmethod
    def of(cls, headers: Mapping[str, str]) -> FixedHeaders:
        lines = _lines(headers)
        return cls(lines, _names_host(lines))


class ExchangeError(Exception):
    def __init__(
        self,
        kind: str,
        message: str,
        *,
        answered: bool = False,
        connecting: bool = False,
        given: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.answered = answered  # the answer's headers had arrived
        self.connecting = connecting  # still opening a connection, or waiting for one
        # Cut short by the caller's time (answer_by, or a deadline the gateway's queue ate into)
        # rather than the provider's own timeouts: how long the provider had the request by then.
        self.given = given


@dataclass(frozen=True, slots=True)
class Limits:
    """connect: to open a connection or get a pooled one; read: the longest silence while an answer
    is awaited; total: the whole exchange (None: no limit); max_answer: bytes of body."""

    connect: float
    read: float
    total: float | None
    max_answer: int


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one exchange at a time (never pipelined)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # httptools hands each header to on_header: a dict's own __setitem__ takes it without a
        # Python call (a provider's answer has a dozen headers). A header sent twice in one spelling
        # keeps its last value (in two spellings, the first); none of those the gateway reads is a list.
        self._header_lines: dict[bytes, bytes] = {}
        self.on_header = self._header_lines.__setitem__
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_until = loop.time()  # when it stops being fit for another exchange, once idle
        self.idle_seconds = IDLE_SECONDS
        self._waiter: asyncio.Future[Answer] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._read = 0.0
        self._deadline: float | None = None
        self._answer_by: float | None = None
        self._last_read = 0.0
        self._sent_at = 0.0
        self._max_answer = 0
        self._start_answer()

    def _start_answer(self) -> None:
        self._status = 0
        self._header_lines.clear()
        self._body: list[bytes] = []
        self._size = 0
        self._headers_done = False
        self._headers: Mapping[str, str] = {}
        self._keep_alive = False
        self._head_only = False  # an answer to HEAD: no body, whatever its headers say
        self._wire = 0  # bytes of this answer so far
        self.received = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:
            self.close()  # bytes nobody asked for: the connection can no longer be trusted
            return
        self._last_read = self.loop.time()
        self.received = True
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # a 101 is none of ours either
            self._fail(ExchangeError("payload", "the provider's answer is not valid HTTP", answered=True))
            return
        # The head, then the body's framing and trailers, besides the body on_body counts.
        self._wire += len(data)
        if self._wire > MAX_HEAD_BYTES + (2 * self._max_answer if self._headers_done else 0):
            self._fail(ExchangeError("payload", "the provider's answer is too large", answered=True))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._stop_timer()
        if self._waiter is None:
            return
        if self._headers_done and exc is None and self._close_delimited():
            self.on_message_complete()
        elif self._headers_done:
            self._fail(ExchangeError("payload", "the provider's answer was cut off", answered=True))
        else:
            self._fail(ExchangeError("reset", "the provider closed the connection"))

    # httptools callbacks (and on_header, set in __init__)

    def on_message_begin(self) -> None:
        if self._waiter is None:  # another answer glued onto the one just read: nobody asked for it
            self.close()

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (100, 103): the real one follows
            self._header_lines.clear()
            return
        self._status = status
        self._headers_done = True
        # Taken now: trailer fields, which httptools hands to on_header too, are no headers.
        self._headers = _ReceivedHeaders(dict(self._header_lines))
        self._keep_alive = self._parser.should_keep_alive()
        if self._head_only:  # the parser, not told the method, would wait for the body it announces
            self._keep_alive = False
            self.on_message_complete()

    def _close_delimited(self) -> bool:
        """An answer with neither length nor chunks (as its last coding) ends when the connection
        closes cleanly."""
        fields = {name.lower(): value for name, value in self._header_lines.items()}
        codings = fields.get(b"transfer-encoding")
        if codings is not None:
            return codings.rpartition(b",")[2].strip().lower() != b"chunked"
        return b"content-length" not in fields

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_answer:
            self._fail(ExchangeError("payload", "the provider's answer is too large", answered=True))
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        waiter = self._waiter
        if not self._headers_done or waiter is None or waiter.done():
            return
        self._waiter = None  # whatever arrives after this answer is unexpected (see data_received)
        if not self._keep_alive:
            self.close()
        else:
            said = self._header_lines.get(b"Keep-Alive") or self._header_lines.get(b"keep-alive")
            if said is not None:
                self.idle_seconds = _idle_seconds(said)
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        waiter.set_result(Answer(self._status, self._headers, body))

    # exchange

    async def exchange(
        self,
        head: bytes,
        body: bytes | None,
        limits: Limits,
        deadline: float | None,
        answer_by: float | None = None,
    ) -> Answer:
        assert self.transport is not None
        self._start_answer()
        self._head_only = head.startswith(b"HEAD ")
        self._max_answer = limits.max_answer
        self._read, self._deadline, self._answer_by = limits.read, deadline, answer_by
        self._last_read = self._sent_at = self.loop.time()
        self._waiter = waiter = self.loop.create_future()
        self._arm()
        try:
            self.transport.write(head + body if body else head)
            return await waiter
        finally:
            self._waiter = None

    def _arm(self) -> None:
        """Make sure the timer fires no later than this exchange's due time.

        The timer outlives the exchange: on a busy kept-alive connection one armed for an earlier
        exchange is due sooner, fires, finds the current exchange not yet due and re-arms. That
        costs one timer per read timeout rather than one per exchange.
        """
        due = self._due()
        if self._timer is not None:
            if self._timer.when() <= due:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(due, self._on_timer)

    def _due(self) -> float:
        """When the exchange under way times out: a read timeout after the last bytes, the total
        deadline, and until the answer's headers are in, the time it must begin by."""
        due = self._last_read + self._read
        if self._deadline is not None and self._deadline < due:
            due = self._deadline
        if self._answer_by is not None and not self._headers_done and self._answer_by < due:
            due = self._answer_by
        return due

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiter is None:
            return  # idle between exchanges: the next one arms again
        due = self._due()
        now = self.loop.time()
        if now >= due:
            by_caller = due == self._answer_by and not self._headers_done
            error = ExchangeError(
                "timeout",
                "the provider did not answer in time",
                answered=self._headers_done,
                given=due - self._sent_at if by_caller else None,
            )
            self._fail(error)
        else:
            self._arm()

    def _fail(self, error: ExchangeError) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    @property
    def keep_alive(self) -> bool:
        return not self.closed and self._keep_alive


class _Pool:
    """Keep-alive connections to one origin, at most ``size`` in use at once."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, size: int) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.closed = False
        self._size = size
        self._in_use = 0
        self._idle: deque[_Connection] = deque()
        self._queue: deque[asyncio.Future[None]] = deque()

    async def acquire(self, connect: float, start_by: float | None) -> tuple[_Connection, bool]:
        """A connection and whether it was reused; connect failures raise :class:`ExchangeError`.

        Waiting for a slot and connecting get ``connect`` seconds each, neither past ``start_by``
        (when the request must be under way): a connection the wait left no time to open is never
        used for a request that is already late."""
        loop = asyncio.get_running_loop()
        if self._in_use < self._size and not self._queue:
            self._in_use += 1
        else:
            await self._wait_for_slot(loop, *_budget(loop, connect, start_by))
        timeout, squeezed = _budget(loop, connect, start_by)
        try:
            conn = self._fresh_idle(loop.time())
            if conn is not None:
                return conn, True
            if timeout <= 0:
                raise TimeoutError
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop),
                    self.host,
                    self.port,
                    ssl=self.tls,
                    server_hostname=self.host if self.tls else None,
                )
            return conn, False
        except BaseException as exc:
            self._free_slot()
            if isinstance(exc, TimeoutError):
                raise ExchangeError(
                    "timeout",
                    "timed out connecting to the provider",
                    connecting=True,
                    given=timeout if squeezed else None,  # the provider had the connect that long
                ) from None
            if isinstance(exc, OSError):  # its text (an address, a host name) is for the log only
                raise ExchangeError("connect", "could not connect to the provider", connecting=True) from exc
            raise

    def take_idle(self, now: float) -> _Connection | None:
        """A kept-alive connection with its slot when both are free at once: the common case, taken
        without awaiting :meth:`acquire`."""
        if self._in_use >= self._size or self._queue or not self._idle:
            return None
        conn = self._fresh_idle(now)
        if conn is not None:
            self._in_use += 1
        return conn

    def _fresh_idle(self, now: float) -> _Connection | None:
        """The most recently used idle connection still fit for use; stale ones are closed."""
        while self._idle and now >= self._idle[0].idle_until:
            self._idle.popleft().close()  # the longest idle, left behind by the LIFO below
        while self._idle:
            conn = self._idle.pop()
            if conn.keep_alive and now < conn.idle_until:
                return conn
            conn.close()
        return None

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop, timeout: float, squeezed: bool) -> None:
        """Queue for a slot; on return this caller holds one (handed over by :meth:`_free_slot`)."""
        slot: asyncio.Future[None] = loop.create_future()
        self._queue.append(slot)
        try:
            async with asyncio.timeout(timeout):
                await slot
        except BaseException as exc:
            if slot.done() and not slot.cancelled():
                self._free_slot()  # handed a slot just as this caller gave up: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(slot)
            if isinstance(exc, TimeoutError):  # every connection busy: the gateway's queue, not the provider
                raise ExchangeError(
                    "busy",
                    "timed out waiting for a free connection to the provider",
                    connecting=True,
                    given=0.0 if squeezed else None,
                ) from None
            raise

    def release(self, conn: _Connection, *, reuse: bool) -> None:
        if reuse and conn.keep_alive and not self.closed:
            conn.idle_until = conn.loop.time() + conn.idle_seconds
            self._idle.append(conn)
        else:
            conn.close()
        self._free_slot()

    def _free_slot(self) -> None:
        while self._queue:
            slot = self._queue.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes to the first waiter, still counted as in use
                return
        self._in_use -= 1

    @property
    def unused(self) -> bool:
        return self._in_use == 0 and not self._queue

    def close(self) -> None:
        """Close the idle connections now; those in use close when their exchange ends."""
        self.closed = True
        while self._idle:
            self._idle.pop().close()


class Http1Client:
    """Pools per origin; :meth:`request` sends one buffered request and returns the whole answer."""

    def __init__(self, max_connections: int, tls: ssl.SSLContext | None = None) -> None:
        self._max_connections = max_connections
        self._tls = tls
        self._pools: dict[str, tuple[_Pool, str]] = {}  # origin -> (pool, Host header)

    def _pool(self, origin: str) -> tuple[_Pool, str]:
        found = self._pools.get(origin)
        if found is not None:
            return found
        parts = urlsplit(origin)
        hostname = parts.hostname
        if parts.scheme not in ("http", "https") or not hostname or parts.username is not None:
            raise ExchangeError("connect", "the provider's URL cannot be requested", connecting=True)
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        host = f"[{hostname}]" if ":" in hostname else hostname
        if port != default_port:
            host = f"{host}:{port}"
        tls = None
        if parts.scheme == "https":
            tls = self._tls = self._tls or ssl.create_default_context()
        if len(self._pools) >= MAX_ORIGINS:
            self._forget_unused()
        found = self._pools[origin] = (_Pool(hostname, port, tls, self._max_connections), host)
        return found

    def _forget_unused(self) -> None:
        """Result URLs can name many hosts over time: drop the pools nobody is using."""
        for origin, (pool, _) in list(self._pools.items()):
            if pool.unused:
                pool.close()
                del self._pools[origin]

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        limits: Limits,
        fixed: FixedHeaders | None = None,
        answer_by: float | None = None,
    ) -> Answer:
        """One exchange; ``fixed`` headers are sent ahead of ``headers``. ``answer_by``, a time of
        the event loop, is when the answer must have begun (its headers in), whatever the limits."""
        host_at = url.find("://") + 3
        split = url.find("/", host_at)
        if split < 0:
            split = len(url)
        query_at = url.find("?", host_at, split)  # a query straight after the host
        if query_at >= 0:
            split = query_at
        target = url[split:].partition("#")[0]
        if not target.startswith("/"):
            target = "/" + target
        if not target.isprintable() or " " in target:  # a provider's job name that would end the line
            raise ExchangeError("payload", "the provider's job name cannot be sent in a request line")
        pool, host = self._pool(url[:split])
        head = _head(method, target, host, headers, body, fixed)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.total if limits.total is not None else None
        start_by = deadline
        if answer_by is not None and (start_by is None or answer_by < start_by):
            start_by = answer_by
        while True:
            now = loop.time()
            conn = pool.take_idle(now)
            reused = conn is not None
            if conn is None:
                conn, reused = await pool.acquire(limits.connect, start_by)
                now = loop.time()
            if start_by is not None and now >= start_by:  # its time is gone: never sent late
                pool.release(conn, reuse=True)
                raise ExchangeError(
                    "busy",
                    "timed out waiting for a free connection to the provider",
                    connecting=True,
                    given=0.0,
                )
            try:
                answer = await conn.exchange(head, body, limits, deadline, answer_by)
            except ExchangeError as exc:
                pool.release(conn, reuse=False)
                # A kept-alive connection the server had already closed: nothing was processed, so
                # an idempotent request may go again, on a fresh connection.
                if reused and exc.kind == "reset" and not conn.received and method in _IDEMPOTENT:
                    continue
                raise
            except BaseException:
                pool.release(conn, reuse=False)
                raise
            pool.release(conn, reuse=True)
            return answer

    def close(self) -> None:
        for pool, _ in self._pools.values():
            pool.close()
        self._pools.clear()


def _idle_seconds(keep_alive: bytes) -> float:
    """How long a connection may wait for its next exchange, given the provider's Keep-Alive: a
    second less than the provider's own limit, so that no request crosses the provider's close (a
    create that did would be reported as perhaps made)."""
    said = _KEEP_ALIVE_TIMEOUT.search(keep_alive)
    return IDLE_SECONDS if said is None else min(IDLE_SECONDS, int(said[1]) - 1.0)


def _budget(loop: asyncio.AbstractEventLoop, seconds: float, start_by: float | None) -> tuple[float, bool]:
    """``seconds`` from now, but not past ``start_by``; and whether ``start_by`` cut them short."""
    if start_by is not None and start_by - loop.time() < seconds:
        return max(0.0, start_by - loop.time()), True
    return seconds, False


def _head(
    method: str,
    target: str,
    host: str,
    headers: Mapping[str, str],
    body: bytes | None,
    fixed: FixedHeaders | None,
) -> bytes:
    lines = _lines(headers)
    fields = lines if fixed is None else fixed.lines + lines
    length = f"Content-Length: {len(body or b'')}\r\n" if body is not None or method in _BODY_METHODS else ""
    if not ((fixed is not None and fixed.names_host) or _names_host(lines)):  # a provider's own Host wins
        fields = f"Host: {host}\r\n{fields}"
    return f"{method} {target} HTTP/1.1\r\n{fields}{length}\r\n".encode()


def _names_host(lines: str) -> bool:
    return lines[:5].lower() == "host:" or "\nhost:" in lines.lower()


def _lines(headers: Mapping[str, str]) -> str:
    """Header lines; a name or value that would break the request's framing is a ValueError."""
    lines = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    line_ends = len(headers)
    # One scan of the whole block: a CR or LF inside a name or value adds to the line ends' count.
    if lines.count("\r") != line_ends or lines.count("\n") != line_ends or ":" in "".join(headers):
        bad = next(n for n, v in headers.items() if "\r" in n + v or "\n" in n + v or ":" in n)
        raise ValueError(f"header {bad!r} cannot be sent")
    return lines
