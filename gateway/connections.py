"""The gateway's HTTP connections: aiohttp's, mending what aiohttp answers below the routes.

aiohttp parses each connection's requests and answers by itself, in text/plain, what never reaches a
route. :class:`GatewayRunner` serves the app (``video-gateway serve`` and the tests alike) on
connections that answer those in the OpenAI error envelope too, with a request ID, a log line and a
count, and that refuse what aiohttp's parser lets through but cannot serve.

aiohttp has no public hook for any of this (its issue 3287), so these subclasses lean on its
internals: ``AppRunner._make_server``, the connection's queue of parsed messages and ``_ErrInfo``.
The refusal tests in ``tests/test_hardening.py`` fail if those change.

:func:`write_whole` sends a whole answer (every JSON answer: a poll's, an error's) in one write,
past aiohttp's preparing of a Response (about 5 us of a poll). It uses aiohttp's own serialiser of
a head (``http_writer._serialize_headers``, which refuses a line break in a header) and reads a
Response's cookies (``_cookies``, None when none were set). ``tests/test_routes.py`` compares its
heads with aiohttp's.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMethod, ContentEncodingError, HttpProcessingError
from aiohttp.http_writer import _serialize_headers
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest

from gateway import metrics
from gateway.bodies import UNREAD_ENCODING
from gateway.config import Limits
from gateway.context import new_request_id
from gateway.errors import ApiError, internal_error
from gateway.logs import log
from gateway.sockets import give_up_when_stalled
from gateway.state import GATEWAY

_DEFAULT_LIMITS = Limits()


class GatewayRunner(web.AppRunner):
    """aiohttp's AppRunner, with connections that answer in the OpenAI envelope what aiohttp
    answers by itself (a request its parser refused, an error that escaped the envelope), and that
    give up on a client that takes no more of its answer (:func:`give_up_when_stalled`)."""

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's start-up runs here
        gw = self.app.get(GATEWAY)  # a bare app (tests of these connections) keeps the default
        return _Server(
            plain.request_handler,
            lambda: gw.table.config.limits if gw is not None else _DEFAULT_LIMITS,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )


class _Server(web.Server):
    """aiohttp's Server, making a :class:`_Connection` of each client connection."""

    def __init__(self, handler: Any, limits: Callable[[], Limits], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits  # read per connection, so a reload changes them

    def __call__(self) -> RequestHandler:
        # aiohttp's own keep-alive default is an hour: idle connections would pile up that long
        kwargs = {**self._kwargs, "keepalive_timeout": self.limits().keepalive_timeout}
        return _Connection(self, loop=self._loop, **kwargs)


class _Connection(RequestHandler):
    """One client connection, mending what aiohttp's own does below the routes.

    - No route or middleware sees a request that aiohttp's parser refused (aiohttp issue 3287): bad
      syntax, a line over the size limit, TLS on the plain port. aiohttp answers it in text/plain that
      quotes the client's bytes; :meth:`handle_error` answers the envelope instead.
    - A request line of HTTP/2.0 or HTTP/0.9 passes the parser: it is refused with 505, and
      ``CONNECT`` (the gateway is no proxy) with 405.
    - A chunked body that breaks off fails the request reading it at once (see
      :meth:`_fail_body_in_progress`).
    - Every request's headers are timed (:attr:`headers_since`, for the server's watchdog) and
      bounded: more than :data:`MAX_HEAD_BYTES` of them is refused with 431 (aiohttp bounds each
      line, and the count, but 128 lines of 16 KiB held 2 MiB a connection).
    """

    # When the headers of the request being received began to arrive; None between requests.
    headers_since: float | None = None
    _head_bytes = 0
    _last_body: StreamReader | None = None  # of the last request parsed: bytes before its end are its

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        manager: _Server = self._manager  # type: ignore[assignment]
        give_up_when_stalled(transport.get_extra_info("socket"), manager.limits().client_idle_timeout)

    def data_received(self, data: bytes) -> None:
        messages = self._messages
        queued = len(messages)
        body = self._last_body
        in_head = body is None or body.is_eof()  # no body under way: these bytes are a request's head
        RequestHandler.data_received(self, data)  # not super(): this runs for every read of a socket
        if len(messages) == queued:  # more of a body, a request line or headers
            if in_head and not self._close:
                self._head_grew(len(data))
            return
        self.headers_since, self._head_bytes, self._last_body = None, 0, messages[-1][1]
        last = messages[-1][0]
        if (
            len(messages) == queued + 1
            and type(last) is not _ErrInfo
            and last.version is HttpVersion11
            and not last.upgrade
        ):
            return  # the usual case: one more HTTP/1.1 request
        for i in range(queued, len(messages)):
            message = messages[i][0]
            if isinstance(message, _ErrInfo):
                if message.message.startswith(_HTTP2_PREFACE):
                    messages[i] = _refused(505, "HTTP/2 is not supported")
                elif isinstance(message.exc, ContentEncodingError) and "install" in message.message:
                    # br or zstd, which aiohttp decodes only with packages the gateway does not have
                    messages[i] = _refused(415, UNREAD_ENCODING)
                else:
                    self._fail_body_in_progress(message)
            elif message.version not in (HttpVersion11, HttpVersion10):
                # aiohttp's parser lets HTTP/2.0 and HTTP/0.9 request lines through, and its answer
                # would name that version in a status line no client of it can read.
                version = f"HTTP/{message.version.major}.{message.version.minor}"
                messages[i] = _refused(505, f"{version} is not supported")
            elif message.method == "CONNECT":  # a client that takes the gateway for its proxy
                # Its target is no path, so no route can take it, and aiohttp would answer text/plain.
                messages[i] = _refused(405, "CONNECT is not supported: the gateway is no forward proxy")

    def _head_grew(self, size: int) -> None:
        if self.headers_since is None:
            self.headers_since = time.monotonic()
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            limit = MAX_HEAD_BYTES >> 10
            self._messages.append(_refused(431, f"The request's headers are larger than {limit} KiB"))
            self._request_count += 1
            self._close = True  # aiohttp reads no more of it, answers the refusal, then closes
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    def _fail_body_in_progress(self, refused: _ErrInfo) -> None:
        """aiohttp's C parser raises on a broken chunked body (a bad chunk size, say) without failing
        the body of the request being read, which then waits for more until the idle timeout. Fail it
        here, as aiohttp's Python parser does: its handler answers 400, then the connection closes."""
        request = self._current_request
        if request is None or request.content.is_eof() or not isinstance(refused.exc, HttpProcessingError):
            return  # no body being read, or it was whole: the refusal is the next request's
        request.content.set_exception(RequestPayloadError(_parser_reason(refused.exc)))
        request.content.feed_eof()  # no more will come: aiohttp must not linger reading it
        self.close()  # after this request's answer; the refusal queued behind it gets none

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("an answer was started: the connection can only be closed")
        request_id = new_request_id()
        if isinstance(exc, HttpProcessingError):
            response = _refusal(status, exc, request_id, request.remote)
        else:  # the envelope catches every error of a handler: this is the gateway's own bug
            log.error("unhandled_error", request_id=request_id, path=request.path, exc_info=exc)
            response = internal_error(status).response()
        response.headers["x-request-id"] = request_id
        response.force_close()
        return response


# The most a request's line and headers may take together, as nginx's large_client_header_buffers.
MAX_HEAD_BYTES = 64 * 1024

# How llhttp refuses "PRI * HTTP/2.0", the preface of a client speaking HTTP/2 without asking first.
_HTTP2_PREFACE = "Pause on PRI/Upgrade"


def _refused(status: int, reason: str) -> tuple[_ErrInfo, StreamReader]:
    """A parsed request the gateway refuses, queued as aiohttp queues those its parser refused."""
    return _ErrInfo(status, HttpProcessingError(code=status, message=reason), reason), EMPTY_PAYLOAD


# How a refusal is answered, by status: the error code, and the message around the parser's reason.
_REFUSALS = {
    405: ("method_not_allowed", "{}."),
    415: ("unsupported_media_type", "{}."),
    431: ("request_header_fields_too_large", "{}."),
    505: ("http_version_not_supported", "{}: send HTTP/1.1 (or 1.0)."),
}


def _refusal(status: int, exc: HttpProcessingError, request_id: str, remote: str | None) -> web.Response:
    """The answer to a request the parser refused (400) or the connection did (405, 415, 431, 505), logged
    and counted as the route ``malformed``."""
    reason = _parser_reason(exc)
    # Scanners and TLS clients on the plain port are routine on an open port: not a warning.
    say = log.info if isinstance(exc, BadHttpMethod) else log.warning
    say("bad_http_request", request_id=request_id, reason=reason, remote=remote)
    code, message = _REFUSALS.get(status, ("invalid_http_request", "The request is not valid HTTP: {}."))
    response = ApiError(status, message.format(reason), code=code).response()
    series = metrics.route_series("malformed", "other")
    series.started()
    series.record(status, 0.0, 0.0, 0, len(response.body or b""))
    return response


# Where the parser's message starts quoting the client's bytes: b'...', b"..." or bytearray(b'...').
_QUOTED_BYTES = re.compile(r"""[\s:]*(?:bytearray\()?(?<!\w)b['"]""")


def _parser_reason(exc: HttpProcessingError) -> str:
    """The parser's reason, on one line and without the client's bytes that it goes on to quote
    ("Bad status line:\n  Expected CRLF after version:\n\n  b'...'" gives
    "Bad status line: Expected CRLF after version")."""
    reason = " ".join(_QUOTED_BYTES.split(exc.message, maxsplit=1)[0].split()).strip(" :.")
    return reason or type(exc).__name__


class _Written(web.StreamResponse):
    """What aiohttp finishes in place of an answer :func:`write_whole` sent: nothing, and then keeps
    the connection open or closes it as the answer said. Two of these serve every request."""

    def __init__(self, keep_alive: bool) -> None:
        super().__init__()
        self._kept = keep_alive

    @property
    def keep_alive(self) -> bool:
        return self._kept

    async def prepare(self, request: BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


_WRITTEN = {True: _Written(True), False: _Written(False)}
# Bodies up to this size go in one write; a larger one goes through aiohttp, which waits for a slow
# client to take it (its writer drains past 64 KiB).
_MAX_WHOLE = 64 * 1024


def write_whole(request: web.BaseRequest, response: web.Response) -> web.StreamResponse | None:
    """Send ``response`` (stamped, not prepared) with its head in one write, as aiohttp would send it:
    ``Content-Length``, ``Date``, ``Server``, and ``Connection: close`` when the connection ends
    after it. What aiohttp is to finish in its place; None for an answer it must send itself (a
    HEAD's, HTTP/1.0's, a bodiless status, a large or streamed body, cookies, compression)."""
    body = response.body
    status = response.status
    if (
        type(body) is not bytes
        or len(body) > _MAX_WHOLE
        or request.version is not HttpVersion11
        or request.method == "HEAD"
        or status < 200
        or status in (204, 304)
        or response.chunked
        or response.compression
        or response._cookies
    ):
        return None
    headers = response.headers
    if "Content-Length" in headers or "Transfer-Encoding" in headers:
        return None
    keep_alive = response.keep_alive
    if keep_alive is None:
        keep_alive = request.keep_alive
    headers["Content-Length"] = str(len(body))
    if "Date" not in headers:
        headers["Date"] = rfc822_formatted_time()
    headers.setdefault("Server", SERVER_SOFTWARE)
    if not keep_alive and "Connection" not in headers:
        headers["Connection"] = "close"
    head = _serialize_headers(f"HTTP/1.1 {status} {response.reason}", headers)
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("the client closed the connection")
    transport.write(head + body)
    return _WRITTEN[keep_alive]
