"""The adapter contract: what every provider module implements, and the HTTP plumbing they share.

An adapter turns the gateway's operations (create, retrieve, content, delete, remix, edit, extend,
characters) into its provider's API and answers in OpenAI field names. The gateway owns IDs,
tenancy and the task store; an adapter only ever sees upstream IDs and its own ``Task.state``.
Operations a provider lacks keep the default here: a clear 400 naming the feature.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import SplitResult, quote, urlsplit

import aiohttp
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict
from yarl import URL

from gateway import jsonio, metrics
from gateway.bodies import RequestBody
from gateway.config import Deployment, ProviderConfig
from gateway.context import CONTEXT, UpstreamClock, cut_answer, start_answer
from gateway.errors import ApiError, UpstreamError, unsupported, upstream_busy
from gateway.headers import (
    CONDITIONAL_REQUEST_HEADERS,
    CONTENT_CACHE_CONTROL,
    CONTENT_RESPONSE_HEADERS,
    forwardable_request_headers,
)
from gateway.http1 import Answer, ExchangeError, FixedHeaders, Http1Client, Limits
from gateway.limits import BULKHEAD_REJECTED
from gateway.logs import log
from gateway.sockets import stall_limited_socket
from gateway.store import Task

if TYPE_CHECKING:
    from gateway.hosted import HostedFiles

MAX_JSON_ANSWER = 64 * 1024 * 1024  # Vertex answers carry whole videos inline
PARSE_OFF_LOOP = 1024 * 1024  # answers this large (inline videos) are parsed in a worker thread
CHUNK = 256 * 1024


@dataclass
class Call:
    """One client request as an adapter sees it, for one deployment."""

    request: web.Request
    request_id: str
    deployment: Deployment
    operation: str  # what the client asked for, as metrics.UPSTREAM_OPERATIONS names it
    clock: UpstreamClock = field(default_factory=UpstreamClock)  # the request's, shared by its calls
    upstream_status: int | None = None
    upstream_error: str | None = None
    on_outcome: Callable[[str | None], None] | None = None
    # The event loop's time by which the provider must begin answering a JSON call, besides its
    # own timeouts: a read's tries share one deadline (``resilience.read_deadline_seconds``).
    answer_by: float | None = None
    # A call answer_by cuts short after the provider had it less than this long (seconds) is no
    # failure of the provider's: the gateway's own queue, or a list's deadline, took the time.
    fair_wait: float | None = None
    reported: bool = False  # whether an outcome was reported

    def outcome(self, failure: str | None) -> None:
        """Report a call's health: a failure kind, or None when the provider answered properly."""
        self.reported = True
        if self.on_outcome is not None:
            self.on_outcome(failure)


@dataclass
class UpstreamVideo:
    """A provider's answer about one job, in OpenAI field names, plus what finds the job again."""

    id: str
    fields: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdapterEnv:
    """What the gateway lends every adapter."""

    data_dir: Path
    hosted: HostedFiles | None = None


class FileAnswer(web.FileResponse):
    """A file with Range support whose ``prepare`` may be called twice.

    The gateway's envelope sends answers itself (``app._send``) so metrics see every byte; aiohttp then
    calls ``prepare`` again, which the stock FileResponse does not allow.

    Ranges follow RFC 9110 §14.2 where aiohttp's answer an empty 416: a Range header this gateway
    ignores (see :func:`byte_range`) gets the whole file, and an unsatisfiable one the error envelope.
    A file gone by the time it is sent (deleted meanwhile) is a 404 in the envelope too, where
    aiohttp's is an empty body under the file's Content-Type.
    """

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        try:
            return await super().prepare(request)
        except _FileGone:
            gone = ApiError(404, "The content is no longer here: it was deleted.", code="video_not_found")
            return await self._error(request, gone)

    def _make_response(self, *args: Any) -> Any:
        # aiohttp's opening of the file (in a thread), whose OSError it answers itself
        try:
            return super()._make_response(*args)
        except FileNotFoundError as exc:
            raise _FileGone from exc

    async def _prepare_open_file(
        self, request: web.BaseRequest, fobj: Any, st: os.stat_result, file_encoding: str | None
    ) -> AbstractStreamWriter | None:
        # aiohttp's hook between the conditional checks (304, 412) and its own Range handling
        header = request.headers.get(hdrs.RANGE)
        if header is not None and not _if_range_holds(request, st):
            request = _with_range(request, None)  # the client's copy is of another file: all of it
        elif header is not None:
            wanted = byte_range(header)
            if wanted is not None and not wanted.satisfiable(st.st_size):
                unsatisfiable = ApiError(
                    416,
                    f"The requested range is not satisfiable: the content is {st.st_size} bytes long.",
                    param="Range",
                    code="range_not_satisfiable",
                    headers={hdrs.CONTENT_RANGE: f"bytes */{st.st_size}", hdrs.ACCEPT_RANGES: "bytes"},
                )
                return await self._error(request, unsatisfiable)
            canonical = None if wanted is None else wanted.header()
            if canonical != header:
                request = _with_range(request, canonical)
        return await super()._prepare_open_file(request, fobj, st, file_encoding)

    async def _error(self, request: web.BaseRequest, error: ApiError) -> AbstractStreamWriter | None:
        """``error`` in the envelope in place of the file."""
        payload = json.dumps(error.body()).encode()
        self.set_status(error.status)
        self.content_type = "application/json"
        self.content_length = len(payload)
        self.headers.update(error.headers)
        writer = await web.StreamResponse.prepare(self, request)
        if request.method != "HEAD":
            await self.write(payload)
        return writer


class _FileGone(Exception):
    """A file that went away between its answer's making and its sending."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    """One range of a ``Range: bytes=`` header: ``first-last``, ``first-`` or the ``-last`` bytes."""

    first: int | None
    last: int | None

    def satisfiable(self, size: int) -> bool:
        return self.first < size if self.first is not None else self.last != 0

    def header(self) -> str:
        first = "" if self.first is None else str(self.first)
        last = "" if self.last is None else str(self.last)
        return f"bytes={first}-{last}"


_BYTE_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)
_HUGE = 2**63  # stands for any position written with more digits than a file size ever has


def byte_range(header: str) -> ByteRange | None:
    """The one byte range a Range header asks for; None when the header is to be ignored.

    RFC 9110 §14.2: a server MUST ignore a range unit it does not know, and MAY ignore an invalid
    ranges-specifier or several ranges; each of those gets the whole content (200).
    """
    match = _BYTE_RANGE.fullmatch(header.strip(" \t"))
    if match is None:
        return None
    first, last = (_position(digits) for digits in match.groups())
    if first is None:
        return None if last is None else ByteRange(None, last)
    return None if last is not None and first > last else ByteRange(first, last)


def range_headers(request_headers: Mapping[str, str]) -> dict[str, str]:
    """The client's ``Range`` (with its ``If-Range``) as the gateway reads it, for a provider or a
    result host. A Range the gateway ignores (:func:`byte_range`) is not passed on, so the whole
    file comes, as it would from a local provider."""
    header = request_headers.get("Range")
    wanted = byte_range(header) if header is not None else None
    if wanted is None:
        return {}
    sent = {"Range": wanted.header()}
    if "If-Range" in request_headers:
        sent["If-Range"] = request_headers["If-Range"]
    return sent


def split_url(url: str) -> SplitResult | None:
    """``url`` in its parts, or None when it is no URL at all: URLs from providers and clients are
    untrusted, and ``urlsplit`` raises on some (``http://[::1``)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def is_web_url(url: str) -> bool:
    """Whether ``url`` is an http(s) URL that parses."""
    parts = split_url(url)
    return parts is not None and parts.scheme in ("http", "https")


REDIRECTS = frozenset({301, 302, 303, 307, 308})
# The answers to a download that a client can take as they are: the file, a part of it, a proxy's
# copy of it; and a 304 to a request that was sent conditional (:func:`_relayable`). Anything else
# under 400 (a redirect without Location, a 204) carries no video.
MEDIA_STATUSES = frozenset({200, 203, 206})


def redirect_target(response: aiohttp.ClientResponse) -> str:
    """Where a redirect points, resolved against the URL that answered; a ``Location`` that is no
    URL (``http://[::1``, port 99999) is the provider's failure, a 502."""
    try:
        return str(response.url.join(URL(response.headers["Location"])))
    except ValueError:
        raise UpstreamError(
            502, "Upstream error: the provider redirected to something that is no URL.", kind="payload"
        ) from None


def _relayable(upstream: aiohttp.ClientResponse) -> bool:
    """Whether a download's answer is one the client can take: a file, or "not modified" when the
    request that went upstream asked whether it had changed (the client's ``If-None-Match`` or
    ``If-Modified-Since``, which only some adapters pass on). Unasked, a 304 tells the client nothing."""
    if upstream.status == 304:
        sent = upstream.request_info.headers
        return any(name in sent for name in CONDITIONAL_REQUEST_HEADERS)
    return upstream.status in MEDIA_STATUSES


_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_.~-]+")


def path_segment(value: str) -> str:
    """``value`` (a provider's ID) as one segment of a URL path: as it is when plain, as provider
    IDs are, and percent-encoded otherwise, so that no ID (``a/b``, ``x?y``, ``..``) can point a
    call with the provider's credential at another path."""
    if _PLAIN_SEGMENT.fullmatch(value) is None:
        return quote(value, safe="")
    return value.replace(".", "%2E") if value in (".", "..") else value


def _position(digits: str) -> int | None:
    digits = digits.lstrip("0") or ("0" if digits else "")
    if not digits:
        return None
    return _HUGE if len(digits) > 18 else int(digits)


def _if_range_holds(request: web.BaseRequest, st: os.stat_result) -> bool:
    """RFC 9110 §13.1.5: a Range counts only while its If-Range, if any, names this very file: its
    entity tag, compared strongly (aiohttp's, from the file's change time and size), or a date no
    earlier than its last change. aiohttp's own check reads dates only, and takes a tag for none."""
    validator = request.headers.get(hdrs.IF_RANGE)
    if validator is None:
        return True
    validator = validator.strip()
    if validator.startswith(('"', 'W/"')):
        return validator == f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
    date = request.if_range
    return date is not None and int(st.st_mtime) <= date.timestamp()  # HTTP dates are whole seconds


def _with_range(request: web.BaseRequest, header: str | None) -> web.BaseRequest:
    """``request`` with its Range header replaced by ``header``, or without one (None).

    ``clone`` encodes every header again as UTF-8, which a value aiohttp read from other bytes (a
    Latin-1 User-Agent) cannot be: such values are left out, as nothing after this reads them."""
    headers = CIMultiDict(
        (name, value) for name, value in request.headers.items() if name != hdrs.RANGE and _utf8(value)
    )
    if header is not None:
        headers[hdrs.RANGE] = header
    return request.clone(headers=headers)


def _utf8(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


# How a provider's stream fails once its answer has begun: cut off, reset, or stalled past the read
# timeout.
UPSTREAM_STREAM_FAILURES = (aiohttp.ClientPayloadError, aiohttp.ClientOSError, TimeoutError)


# The most of one event the gateway holds while it waits for its end (a provider's progress event
# is a few hundred bytes).
MAX_EVENT_BYTES = 4 * 1024 * 1024


class EventStream:
    """An upstream ``text/event-stream`` answer, relayed event by event."""

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        closer: contextlib.AsyncExitStack,
        on_cut_off: Callable[[], None],
    ) -> None:
        self.response = response
        self._closer = closer
        self._on_cut_off = on_cut_off
        self.cut_off = False  # the provider's stream broke off (reset, cut, stalled past its read timeout)

    def hold(self, held: contextlib.ExitStack) -> None:
        """Keep what the stream's call holds (its bulkhead slots) until the stream is closed."""
        self._closer.callback(held.close)

    async def events(self) -> AsyncIterator[bytes]:
        """Raw events, their lines ended in LF, each ending in a blank line; they end early when the
        stream breaks off, or when an event grows past :data:`MAX_EVENT_BYTES` without ending.

        Lines may end in CRLF, LF or CR (the SSE spec). A CR that ends a read ends its line at once
        (an event it completes goes on now), and an LF that begins the next read is then its pair."""
        pending, after_cr = b"", False
        try:
            async for chunk in self.response.content.iter_any():
                if after_cr and chunk.startswith(b"\n"):
                    chunk = chunk[1:]
                after_cr = chunk.endswith(b"\r")
                pending += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                *complete, pending = pending.split(b"\n\n")
                for event in complete:
                    yield event + b"\n\n"
                if len(pending) > MAX_EVENT_BYTES:
                    raise aiohttp.ClientPayloadError("an event grew past the gateway's limit")
        except UPSTREAM_STREAM_FAILURES:
            self.cut_off = True
            self._on_cut_off()
            return
        if pending.strip():
            yield pending + b"\n\n"

    async def aclose(self) -> None:
        await self._closer.aclose()


class Adapter:
    """Base class of every provider adapter; see the module docstring."""

    kind: ClassVar[str]
    provider_name: ClassVar[str] = "The provider"  # as messages name it ("Runway rejected ...")
    default_base_url: ClassVar[str | None] = None
    # How often clients are told to poll (openai-poll-after-ms) unless the config says.
    default_poll_after_ms: ClassVar[int] = 1000
    required_fields: ClassVar[tuple[str, ...]] = ()
    options_schema: ClassVar[dict[str, Any]] = {"type": "object", "additionalProperties": False}
    # The header :meth:`auth_headers` makes of ``api_key``: a configured header of that name is
    # overridden by it whenever an api_key is set.
    credential_header: ClassVar[str | None] = "Authorization"

    @classmethod
    def config_problems(cls, raw: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
        """Rules on a provider's config entry (as written) that a JSON Schema cannot say clearly:
        (path inside the entry, message) pairs. Adapters with rules of their own add to these."""
        headers = raw.get("headers")
        if not raw.get("api_key") or not isinstance(headers, dict) or cls.credential_header is None:
            return []
        return [
            (("headers", name), "is made from api_key, which overrides this value: remove one of the two")
            for name in headers
            if isinstance(name, str) and name.lower() == cls.credential_header.lower()
        ]

    @classmethod
    def startup_problems(cls, config: ProviderConfig) -> list[str]:
        """What would stop :meth:`start` (a credential file that cannot be read), checked without
        starting: for ``check-config`` and the supervisor of several workers."""
        return []

    @classmethod
    def model_problem(cls, upstream_model: str, options: Mapping[str, Any]) -> str | None:
        """What is wrong with routing a model to ``upstream_model`` here (``options`` being the
        provider's), checked when the config loads; None when nothing is, as for upstreams that
        take any model name."""
        return None

    def __init__(self, config: ProviderConfig, env: AdapterEnv) -> None:
        self.config = config
        self.env = env
        self._session: aiohttp.ClientSession | None = None
        self._http1: Http1Client | None = None
        t = config.timeouts
        self._limits = Limits(connect=t.connect, read=t.read, total=t.request, max_answer=MAX_JSON_ANSWER)
        self.in_flight = 0
        self._superseded = False
        self._closing: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        """The provider's API root: the config's ``base_url``, else the adapter's public default."""
        url = self.config.base_url or self.default_base_url
        assert url is not None, "the config schema requires base_url for this kind"
        return url.rstrip("/")

    async def start(self) -> None:
        """Open connection pools; called once before the first request."""

    async def close(self) -> None:
        """Close the connection pool; a later request opens a new one."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        http1, self._http1 = self._http1, None
        if http1 is not None:
            http1.close()

    async def close_when_idle(self, poll_seconds: float = 1.0) -> None:
        """Close connection pools once no request uses them; a later call opens new ones."""
        while self.in_flight:
            await asyncio.sleep(poll_seconds)
        await self.close()

    async def superseded(self) -> None:
        """A reload replaced this adapter: close its pools once no call is open, and again after
        every later call (a request that began under the old config, reading its body when the
        reload came, still makes its calls here, and nothing else would close what they open)."""
        self._superseded = True
        await self.close_when_idle()

    def _call_ended(self) -> None:
        self.in_flight -= 1
        if self._superseded and not self.in_flight:
            self._closing = asyncio.get_running_loop().create_task(self._close_if_idle())

    async def _close_if_idle(self) -> None:
        """Closed only if still idle when this runs: a request's next call (a download after its
        poll) may have started on the pool meanwhile. ``close`` lets the pool go before it awaits."""
        if not self.in_flight:
            await self.close()

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo | EventStream:
        raise NotImplementedError

    async def retrieve(self, call: Call, task: Task) -> UpstreamVideo:
        raise NotImplementedError

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        raise NotImplementedError

    async def delete(self, call: Call, task: Task) -> None:
        """Delete upstream where the provider can; the gateway forgets the video either way."""

    async def remix(self, call: Call, task: Task, body: RequestBody) -> UpstreamVideo:
        raise unsupported("Remix", self.kind)

    async def edit(self, call: Call, task: Task | None, body: RequestBody) -> UpstreamVideo:
        raise unsupported("Video edits", self.kind)

    async def extend(self, call: Call, task: Task | None, body: RequestBody) -> UpstreamVideo:
        raise unsupported("Video extensions", self.kind)

    async def create_character(self, call: Call, body: RequestBody) -> dict[str, Any]:
        raise unsupported("Characters", self.kind)

    async def get_character(self, call: Call, task: Task) -> dict[str, Any]:
        raise unsupported("Characters", self.kind)

    # HTTP plumbing shared by the adapters that talk to a remote API.

    @property
    def http1(self) -> Http1Client:
        if self._http1 is None:
            self._http1 = Http1Client(self.config.max_connections)
        return self._http1

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.config.max_connections,
                enable_cleanup_closed=True,
                # an upload the provider stopped reading ends as a read it stopped answering would
                socket_factory=stall_limited_socket(self.config.timeouts.read),
            )
            # no cookie jar: a cookie a provider sets answering one tenant's call must not go back
            # with the next one, whoever's (a proxy keeps none, as nginx keeps none)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                response_class=WatchedResponse,
                trace_configs=[_CALL_TRACE],
            )
        return self._session

    def timeout(self, *, streaming: bool) -> aiohttp.ClientTimeout:
        t = self.config.timeouts
        return aiohttp.ClientTimeout(
            total=None if streaming else t.request,
            connect=t.connect,
            sock_connect=t.connect,
            sock_read=t.read,
        )

    @property
    def poll_after_ms(self) -> int:
        """openai-poll-after-ms for this provider's unfinished videos: its config's, else its pace."""
        configured = self.config.poll_after_ms
        return self.default_poll_after_ms if configured is None else configured

    def auth_headers(self) -> dict[str, str]:
        """The deployment's credential; adapters with another scheme override this."""
        return {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}

    def upstream_headers(self, call: Call, *, forward_client: bool = True) -> CIMultiDict[str]:
        if forward_client:
            key = call.request[CONTEXT].client_key
            headers = forwardable_request_headers(call.request.headers, key.name if key else "")
        else:
            headers = CIMultiDict()
        headers.update(self.provider_headers())
        headers["X-Request-ID"] = call.request_id
        return headers

    def provider_headers(self) -> CIMultiDict[str]:
        """The deployment's configured headers, then its credential."""
        headers = CIMultiDict(self.config.headers)
        headers.update(self.auth_headers())
        return headers

    @contextlib.asynccontextmanager
    async def send(
        self,
        call: Call,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        data: Any = None,
        body: RequestBody | None = None,
        streaming: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One upstream request, failures mapped to :class:`UpstreamError`; never follows redirects.
        The answer must begin by ``call.answer_by`` when it is set; a request whose time is gone
        before it leaves is never sent."""
        if call.answer_by is not None and _now() >= call.answer_by:
            raise self._cut_short(call) if call.fair_wait is not None else self._busy(call)
        series = self._sending(call)
        started = time.perf_counter()
        response: aiohttp.ClientResponse | None = None
        trace = _CallTrace()
        answer_by = asyncio.timeout_at(call.answer_by)
        call.clock.start()
        try:
            requesting = self.session.request(
                method,
                self.upstream_url(url),
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=self.timeout(streaming=streaming),
                compress=None,
                trace_request_ctx=trace,
            )
            async with answer_by:
                answer = await requesting
            async with answer as response:
                self._answered(call, series, response.status, time.perf_counter() - started)
                yield response
        except ApiError:
            raise
        except (aiohttp.ClientError, TimeoutError) as exc:
            own = _client_failure(exc, body)
            if own is not None:
                raise own from None
            if answer_by.expired() and call.fair_wait is not None and trace.given(call) < call.fair_wait:
                raise self._cut_short(call) from None
            if isinstance(exc, aiohttp.ConnectionTimeoutError) and trace.queued_out(
                self.config.timeouts.connect
            ):
                series.requests.dec()  # it never left the gateway's queue: no request sent
                raise self._busy(call) from None
            status, message, kind, sent = _transport_failure(exc, answered=response is not None, data=data)
            raise self._fail(call, status, message, kind, sent=sent, cause=exc) from None
        finally:
            call.clock.stop()
            series.in_flight.dec()
            self._call_ended()

    async def exchange(
        self,
        call: Call,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        data: bytes | None = None,
        fixed: FixedHeaders | None = None,
    ) -> Answer:
        """One buffered request and its whole answer, over the lean client (:mod:`gateway.http1`).

        For the small JSON calls that make up the hot path (polls, JSON creates, deletes); streams
        go through :meth:`send`. Failures are mapped as :meth:`send` maps them. ``fixed`` headers,
        built once, go ahead of ``headers``.
        """
        series = self._sending(call)
        started = time.perf_counter()
        call.clock.start()
        try:
            answer = await self.http1.request(
                method, self.upstream_url(url), headers, data, self._limits, fixed, call.answer_by
            )
        except ExchangeError as exc:
            if exc.kind == "busy":  # it never left the gateway's queue: no request sent
                series.requests.dec()
            if exc.given is not None and call.fair_wait is not None and exc.given < call.fair_wait:
                raise self._cut_short(call) from None
            if exc.kind == "busy":
                raise self._busy(call) from None
            sent = exc.kind in ("reset", "payload") or (
                exc.kind == "timeout" and not exc.connecting and (exc.answered or data is not None)
            )
            status = 504 if exc.kind == "timeout" else 502
            raise self._fail(call, status, str(exc), exc.kind, sent=sent, cause=exc) from None
        finally:
            call.clock.stop()
            series.in_flight.dec()
            self._call_ended()
        self._answered(call, series, answer.status, time.perf_counter() - started)
        return answer

    def upstream_url(self, url: str) -> str:
        """The URL actually requested; adapters that add a query parameter to every call override it."""
        return url

    def _sending(self, call: Call) -> metrics.UpstreamSeries:
        """A call is leaving: counted, and in flight until the caller decrements the series."""
        series = metrics.upstream_series(
            self.config.name, call.deployment.name, call.deployment.model, call.operation
        )
        series.sent()
        self.in_flight += 1
        return series

    def _answered(self, call: Call, series: metrics.UpstreamSeries, status: int, waited: float) -> None:
        """The provider's answer headers arrived: time, status and health of the call."""
        call.upstream_status = status
        series.duration.observe(waited)
        if status >= 400:
            call.upstream_error = "5xx" if status >= 500 else "4xx"
            self.count_error(call.upstream_error)
        call.outcome("5xx" if status >= 500 else None)

    def _fail(
        self,
        call: Call,
        status: int,
        message: str,
        kind: str,
        *,
        sent: bool,
        cause: BaseException | None = None,
    ) -> UpstreamError:
        """The error for a failed exchange (not the client's own: see :func:`_client_failure`);
        ``message`` is for the client, ``cause`` for the log only."""
        self.count_error(kind)
        call.upstream_error = kind
        call.outcome(kind)
        log.warning(
            "upstream_failed",
            request_id=call.request_id,
            provider=self.config.name,
            deployment=call.deployment.name,
            kind=kind,
            sent=sent,
            **_failure_detail(cause),
        )
        return UpstreamError(status, f"Upstream error: {message}.", kind=kind, sent=sent)

    def _busy(self, call: Call) -> ApiError:
        """Every connection to the provider (``max_connections``) stayed in use for the connect
        timeout: the gateway's own queue was full, as a bulkhead is, which says nothing of the
        provider's health (Envoy keeps pool overflow out of outlier detection too)."""
        BULKHEAD_REJECTED.labels(call.deployment.name, "connections").inc()
        log.warning(
            "upstream_pool_full",
            request_id=call.request_id,
            provider=self.config.name,
            deployment=call.deployment.name,
            max_connections=self.config.max_connections,
        )
        return upstream_busy("connections")

    def _cut_short(self, call: Call) -> UpstreamError:
        """A call cut short by its caller's time (:attr:`Call.fair_wait`): the video keeps
        its last known state, and the provider's health and errors hear nothing of it."""
        log.info(
            "upstream_call_cut_short",
            request_id=call.request_id,
            provider=self.config.name,
            deployment=call.deployment.name,
        )
        return UpstreamError(504, "Upstream error: the provider did not answer in time.", kind="timeout")

    def count_error(self, kind: str) -> None:
        metrics.UPSTREAM_ERRORS.labels(self.config.name, kind).inc()

    def stream_cut_off(self, call: Call) -> None:
        """A provider's stream broke off once the client had the start of it: counted (the caller
        cuts the client's answer: :func:`cut_answer`)."""
        call.upstream_error = "payload"
        self.count_error("payload")

    def error_in_answer(self, call: Call, error: UpstreamError) -> UpstreamError:
        """A refusal the provider sent inside a successful HTTP answer, counted and reported to health
        as ``send`` does for an HTTP error; raise what it returns."""
        self.count_error(error.kind)
        call.upstream_error = error.kind
        if error.kind == "5xx":
            call.outcome("5xx")
        return error

    def provider_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
        """A provider's refusal as our envelope; adapters with their own error format override this.
        A client's key never goes upstream, so a 401 refuses the gateway's own: not the client's
        ``invalid_api_key``."""
        error = error_from_upstream(status, headers, raw)
        if status == 401:
            return auth_rejected(self.provider_name, error.message, upstream_status=status)
        return error

    async def read_json(self, response: aiohttp.ClientResponse) -> Any:
        """The upstream's JSON answer; raise the right error for a refusal or a non-JSON answer.

        Read within ``timeouts.request`` of its start, whatever the call: an answer that trickles
        in, each byte within the read timeout, would otherwise hold a streamed call (an upload's
        create) without end."""
        async with asyncio.timeout(self.config.timeouts.request):
            raw = await read_limited(response, MAX_JSON_ANSWER)
        return await self.json_of(Answer(response.status, response.headers, raw))

    async def json_of(self, answer: Answer) -> Any:
        """:meth:`read_json` for an answer already read."""
        raw = answer.body
        if answer.status >= 400:
            raise self.provider_error(answer.status, answer.headers, raw)
        if not raw.strip():
            return {}
        try:
            return (
                await asyncio.to_thread(jsonio.loads_shallow, raw)
                if len(raw) > PARSE_OFF_LOOP
                else jsonio.loads_shallow(raw)
            )
        except jsonio.JSONDecodeError:  # counted with the other unusable answers (app.py)
            raise UpstreamError(
                502, "Upstream error: the provider answered with something that is not JSON.", kind="payload"
            ) from None

    async def relay(
        self, call: Call, upstream: aiohttp.ClientResponse, default_content_type: str | None = None
    ) -> web.StreamResponse:
        """Stream a media answer to the client: status, content headers and bytes, nothing else.

        Once the first byte went out, an upstream failure can only cut the client's connection. A
        HEAD gets the status and headers alone (aiohttp leaves a streamed body to its writer).
        """
        if not _relayable(upstream):
            raise UpstreamError(
                502,
                f"Upstream error: the provider answered the download with status {upstream.status}, "
                "which carries no file.",
                kind="payload",
            )
        response = web.StreamResponse(status=upstream.status)
        for name in CONTENT_RESPONSE_HEADERS:
            if name in upstream.headers:
                response.headers[name] = upstream.headers[name]
        response.headers["Cache-Control"] = CONTENT_CACHE_CONTROL
        generic = upstream.headers.get("Content-Type", "application/octet-stream").startswith(
            "application/octet"
        )
        if default_content_type and generic:
            response.headers["Content-Type"] = default_content_type
        if upstream.content_length is not None and "Content-Length" in upstream.headers:
            response.content_length = upstream.content_length
        await start_answer(call.request, response)
        if call.request.method == "HEAD":
            await response.write_eof()
            return response
        reset = _reset_of(upstream)
        sent = 0
        ctx = call.request[CONTEXT]
        try:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                try:
                    await response.write(chunk)
                except ConnectionError:  # the client hung up (a player seeking, say): not the provider
                    ctx.client_gone = True
                    response.force_close()
                    return response
                sent += len(chunk)
                ctx.bytes_out = sent
        except UPSTREAM_STREAM_FAILURES:
            broke = True
        else:  # a body its connection's close ends, ended by a reset, broke off too
            broke = reset is not None and reset.done() and reset.exception() is not None
        if broke:
            cut_answer(call.request, response)
            self.stream_cut_off(call)
        else:
            await response.write_eof()
        return response

    def result_host_allowed(self, url: str) -> bool:
        """Redirects for content are followed only to the provider's own or declared result hosts,
        over HTTPS (plain HTTP only for a provider that is itself reached over plain HTTP)."""
        target, own = split_url(url), urlsplit(self.config.base_url or self.default_base_url or "")
        if target is None:
            return False
        if target.scheme != "https" and not (target.scheme == "http" and own.scheme == "http"):
            return False
        host = target.hostname or ""
        hosts = (own.hostname, *self.result_hosts())
        return host in hosts or any(h.startswith(".") and host.endswith(h) for h in hosts if h)

    def result_hosts(self) -> tuple[str, ...]:
        """Hosts besides the provider's own that may serve its results (``.suffix`` for a domain)."""
        return tuple(self.config.result_hosts)


class WatchedResponse(aiohttp.ClientResponse):
    """aiohttp's response, holding its connection's close future from before the answer arrives.

    A body that only its connection's close ends (no Content-Length, not chunked: RFC 9112 §6.3)
    was cut short if that close was a reset; aiohttp ends such a body at either. A short body may be
    read, and its connection gone, before the relay looks: aiohttp only hands out the future for a
    close still to come, so it is taken here, before anything of the answer is read.
    """

    closing: asyncio.Future[None] | None = None

    async def start(self, connection: aiohttp.connector.Connection) -> aiohttp.ClientResponse:
        protocol = connection.protocol
        closing = protocol.closed if protocol is not None else None
        if closing is not None and closing not in _WATCHED:
            _WATCHED.add(closing)  # one callback per connection, however many answers it carries
            # a failed future nobody reads is logged when it goes: reset pooled connections too
            closing.add_done_callback(lambda done: done.cancelled() or done.exception())
        self.closing = closing
        return await super().start(connection)


_WATCHED: weakref.WeakSet[asyncio.Future[None]] = weakref.WeakSet()


def _reset_of(upstream: aiohttp.ClientResponse) -> asyncio.Future[None] | None:
    """For a body that only its connection's close ends, the future that fails if that close was a
    reset (see :class:`WatchedResponse`); None for a body framed otherwise."""
    chunked = "chunked" in upstream.headers.get("Transfer-Encoding", "").lower()
    if upstream.content_length is not None or chunked:
        return None
    return getattr(upstream, "closing", None)


class _CallTrace:
    """What aiohttp's own trace (:data:`_CALL_TRACE`) tells of one call on the session, in the event
    loop's time: how long it queued for one of the pool's connections (``max_connections`` all in
    use), and when its request went out."""

    __slots__ = ("dequeued_at", "queued_at", "sent_at")

    def __init__(self) -> None:
        self.queued_at: float | None = None
        self.dequeued_at: float | None = None
        self.sent_at: float | None = None

    def queued_out(self, connect: float) -> bool:
        """Whether the gateway's queue took at least half of the ``connect`` timeout: a connect
        timeout then is the queue's, not the provider's."""
        if self.queued_at is None:
            return False
        until = self.dequeued_at if self.dequeued_at is not None else _now()
        return until - self.queued_at >= connect / 2

    def given(self, call: Call) -> float:
        """How long the provider had the request when ``call.answer_by`` came."""
        assert call.answer_by is not None
        return 0.0 if self.sent_at is None else max(0.0, call.answer_by - self.sent_at)


def _now() -> float:
    return asyncio.get_running_loop().time()


async def _queued(session: Any, context: Any, params: Any) -> None:
    trace = context.trace_request_ctx
    if isinstance(trace, _CallTrace) and trace.queued_at is None:  # aiohttp may queue a call again
        trace.queued_at = _now()


async def _dequeued(session: Any, context: Any, params: Any) -> None:
    if isinstance(context.trace_request_ctx, _CallTrace):
        context.trace_request_ctx.dequeued_at = _now()


async def _sent(session: Any, context: Any, params: Any) -> None:
    if isinstance(context.trace_request_ctx, _CallTrace):
        context.trace_request_ctx.sent_at = _now()


_CALL_TRACE = aiohttp.TraceConfig()
_CALL_TRACE.on_connection_queued_start.append(_queued)
_CALL_TRACE.on_connection_queued_end.append(_dequeued)
_CALL_TRACE.on_request_headers_sent.append(_sent)


def _client_failure(exc: BaseException, body: RequestBody | None) -> ApiError | None:
    """The client's own failure behind a failed upload, if it was one.

    When the client's body stalls or grows too large while aiohttp streams it on, the body reader
    raises an :class:`ApiError` (and records it as ``body.failure``), which aiohttp's client reports
    as a connection error of its own, with the original as its cause.
    """
    if body is not None and body.failure is not None:
        return body.failure
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, ApiError):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


def _transport_failure(exc: BaseException, *, answered: bool, data: Any) -> tuple[int, str, str, bool]:
    """Status, message, kind and whether the body may have reached the provider, for an aiohttp
    failure. The message names no host, port, URL or OS error: those go to the log line only."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return 504, "timed out connecting to the provider", "timeout", False
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.InvalidURL):
        return 502, "could not connect to the provider", "connect", False
    if isinstance(exc, TimeoutError):
        return 504, "the provider did not answer in time", "timeout", answered or data is not None
    if isinstance(exc, aiohttp.ClientPayloadError):
        return 502, "the provider's answer was cut off", "payload", True
    if getattr(_os_error(exc) or exc, "errno", None) == errno.ETIMEDOUT:  # see stall_limited_socket
        return 504, "the provider stopped taking the request", "timeout", True
    return 502, "the provider closed the connection", "reset", True


def _failure_detail(cause: BaseException | None) -> dict[str, Any]:
    """What the log line says of a failure: the exception's class and the OS error under it.

    Never the exception's text: aiohttp's names the request URL, which may carry a key in its query.
    """
    if cause is None:
        return {}
    detail: dict[str, Any] = {"error": type(cause).__name__}
    os_error = _os_error(cause)
    if os_error is not None:
        detail.update(os_error=type(os_error).__name__, errno=os_error.errno, reason=os_error.strerror)
    return detail


def _os_error(exc: BaseException) -> OSError | None:
    """The operating system's (or TLS library's) error under an aiohttp or gateway one."""
    for link in (getattr(exc, "os_error", None), exc.__cause__, exc):
        if isinstance(link, OSError) and not isinstance(link, aiohttp.ClientError):
            return link
    return None


async def read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    raw = bytearray()
    async for chunk in response.content.iter_any():
        raw += chunk
        if len(raw) > limit:
            raise UpstreamError(502, "Upstream error: the provider's answer is too large.", kind="payload")
    return bytes(raw)


def json_or_none(raw: bytes) -> Any:
    """``raw`` parsed as JSON, or None when it is not (strict) JSON."""
    try:
        return jsonio.loads_shallow(raw)
    except jsonio.JSONDecodeError:
        return None


def _text(value: Any) -> str | None:
    """A provider's error field as the envelope has it (text or null): a number becomes its digits,
    anything else but text is dropped."""
    if isinstance(value, str):
        return value or None
    return str(value) if type(value) is int else None


def refused(
    status: int,
    text: str,
    *,
    code: str | None,
    upstream_status: int,
    param: str | None = None,
    type: str = "invalid_request_error",
) -> UpstreamError:
    """Any other refusal the client can act on (``content_filter``, ``invalid_value``...)."""
    return UpstreamError(
        status, text, kind="4xx", upstream_status=upstream_status, type=type, code=code, param=param
    )


def auth_rejected(
    provider: str, text: str, *, upstream_status: int, credential: str = "API key"
) -> UpstreamError:
    """401: the provider refused the gateway's own credential (the operator's problem, not the client's)."""
    return refused(
        401,
        f"{provider} rejected the gateway's {credential}. {text}",
        code="upstream_auth_failed",
        upstream_status=upstream_status,
    )


def error_from_upstream(status: int, headers: Mapping[str, str], raw: bytes) -> UpstreamError:
    """A provider's refusal as our envelope: its message kept, the status made meaningful."""
    message, type_, param, code = None, None, None, None
    parsed = json_or_none(raw)
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed)
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail") or err.get("msg")
            type_, param, code = (_text(err.get(name)) for name in ("type", "param", "code"))
        elif isinstance(err, str):
            message = err
    if not isinstance(message, str) or not message:
        message = f"The provider answered HTTP {status}."
    out_headers = {}
    for name in ("Retry-After", "Retry-After-Ms"):
        if name in headers:
            out_headers[name] = headers[name]
    # The provider's own word on retrying (an OpenAI-dialect server's, §4.4 of the reference): a
    # create it may have acted on must not be sent again by the client's SDK. A 409 is a conflict
    # with the job's state (a source not finished yet) that the SDK would retry as a lock timeout.
    should_retry = headers.get("x-should-retry", "").strip().lower()
    if should_retry in ("true", "false"):
        out_headers["x-should-retry"] = should_retry
    elif status == 409:
        out_headers["x-should-retry"] = "false"
    if status == 416 and "Content-Range" in headers:  # the content's size, for the client's next Range
        out_headers["Content-Range"] = headers["Content-Range"]
    kind = "4xx" if status < 500 else "5xx"
    if status == 429:
        out_headers.setdefault("Retry-After", "1")
        return UpstreamError(
            429,
            message,
            kind=kind,
            upstream_status=status,
            type=type_ or "rate_limit_error",
            code=code or "rate_limited",
            param=param,
            headers=out_headers,
        )
    if status < 500:
        return UpstreamError(
            status,
            message,
            kind=kind,
            upstream_status=status,
            type=type_ or "invalid_request_error",
            code=code,
            param=param,
            headers=out_headers,
        )
    gateway_status = 503 if status == 503 else 502
    return UpstreamError(
        gateway_status,
        f"Upstream error (HTTP {status}): {message}",
        kind=kind,
        upstream_status=status,
        code="upstream_error",
        headers=out_headers,
    )
