"""The lean HTTP/1.1 client (gateway/http1.py) against servers on loopback that write exact bytes.

Each test runs on asyncio's own loop and on uvloop (the loop the gateway serves on): see conftest.
The servers speak HTTP/1.1 as RFC 9112 frames it: Content-Length, chunked, close-delimited bodies,
interim 1xx answers, keep-alive and its races.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.http1 import ExchangeError, FixedHeaders, Http1Client, Limits

LIMITS = Limits(connect=1.0, read=1.0, total=5.0, max_answer=1 << 20)
JSON = b'{"id": "video_1", "status": "in_progress"}'

Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A loopback server that hands each connection to ``handler`` and counts connections."""

    def __init__(self, handler: Handler, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.open = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                head += await reader.readexactly(int(line.split(b":")[1]))
        self.requests.append(head)
        return head


def answer(body: bytes = JSON, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n".encode()
        + extra
        + b"\r\n"
        + body
    )


def keep_alive(response: bytes) -> Handler:
    async def handler(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(response)
            await writer.drain()

    return handler


def once(response: bytes) -> Handler:
    """Answer one request, then close the connection (as the server does once a handler returns)."""

    async def handler(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(response)
        await writer.drain()

    return handler


async def silent(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read the request, then say nothing until the client gives up."""
    await server.read_request(reader)
    await reader.read()


def dripping(size: int) -> Handler:
    """Answer at once with a body of ``size`` bytes, one every 20 ms."""

    async def handler(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        for _ in range(size):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.02)

    return handler


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def start(handler: Handler, tls: ssl.SSLContext | None = None) -> RawServer:
        server = await RawServer(handler, tls).__aenter__()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.__aexit__()


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    http = Http1Client(max_connections=4)
    yield http
    http.close()


async def test_keeps_the_connection_alive_and_sends_what_it_was_given(serve, client) -> None:
    server = await serve(keep_alive(answer(extra=b"Retry-After: 3\r\n")))
    headers = {"Authorization": "Bearer up", "X-Request-ID": "req_1"}
    for _ in range(3):
        got = await client.request("GET", server.url + "/v1/videos/x?variant=a", headers, None, LIMITS)
        assert (got.status, got.body, got.headers["retry-after"]) == (200, JSON, "3")
    assert server.connections == 1
    first = server.requests[0].decode()
    assert first.startswith("GET /v1/videos/x?variant=a HTTP/1.1\r\n")
    port = server.url.rsplit(":", 1)[1]
    assert f"\r\nHost: 127.0.0.1:{port}\r\n" in first
    assert "\r\nAuthorization: Bearer up\r\n" in first and "Content-Length" not in first


async def test_post_carries_its_body_with_a_length(serve, client) -> None:
    server = await serve(keep_alive(answer()))
    await client.request(
        "POST", server.url + "/v1/videos", {"Content-Type": "application/json"}, b"{}", LIMITS
    )
    assert server.requests[0].endswith(b"Content-Length: 2\r\n\r\n{}")


async def test_chunked_close_delimited_and_interim_answers(serve, client) -> None:
    async def chunked(server, reader, writer):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        await writer.drain()
        await reader.read()

    server = await serve(chunked)
    got = await client.request("GET", server.url + "/", {}, None, LIMITS)
    assert (got.status, got.body) == (200, b"hello world")

    async def until_close(server, reader, writer):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")
        await writer.drain()

    closing = await serve(until_close)
    got = await client.request("GET", closing.url + "/", {}, None, LIMITS)
    assert got.body == b"part one, part two"


async def test_a_stale_kept_alive_connection_is_retried_for_a_get_only(serve, client) -> None:
    async def one_answer_per_connection(server, reader, writer):
        await server.read_request(reader)
        writer.write(answer())  # says keep-alive, then closes: as a server whose idle timer just fired
        await writer.drain()
        await asyncio.sleep(0.05)

    server = await serve(one_answer_per_connection)
    await client.request("GET", server.url + "/a", {}, None, LIMITS)
    await asyncio.sleep(0.2)
    got = await client.request("GET", server.url + "/b", {}, None, LIMITS)
    assert got.status == 200 and server.connections == 2

    async def closes_on_second_request(server, reader, writer):
        await server.read_request(reader)
        writer.write(answer())
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the second request arrives, then the connection dies

    post_server = await serve(closes_on_second_request)
    await client.request("POST", post_server.url + "/", {}, b"{}", LIMITS)
    with pytest.raises(ExchangeError) as failure:
        await client.request("POST", post_server.url + "/", {}, b"{}", LIMITS)
    assert failure.value.kind == "reset" and post_server.connections == 1


@pytest.mark.parametrize(
    ("wire", "kind"),
    [
        (b"", "reset"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this much", "payload"),
        (b"SMTP ready\r\n\r\n", "payload"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n" + b"x" * 1_100_000, "payload"),
    ],
    ids=["reset", "cut-off", "not-http", "too-large"],
)
async def test_broken_answers_fail_with_their_kind(serve, client, wire: bytes, kind: str) -> None:
    async def broken(server, reader, writer):
        await server.read_request(reader)
        writer.write(wire)
        await writer.drain()

    server = await serve(broken)
    with pytest.raises(ExchangeError) as failure:
        await client.request("GET", server.url + "/", {}, None, LIMITS)
    assert failure.value.kind == kind
    await asyncio.sleep(0.05)
    assert server.open == 0, "a failed connection is closed, never pooled"


async def test_silence_and_a_slow_drip_end_in_bounded_time(serve, client) -> None:
    silent_server = await serve(silent)
    started = time.monotonic()
    with pytest.raises(ExchangeError) as failure:
        await client.request("GET", silent_server.url + "/", {}, None, Limits(1, 0.3, 5, 1 << 20))
    assert failure.value.kind == "timeout" and not failure.value.answered
    assert 0.25 < time.monotonic() - started < 1.5

    drip_server = await serve(dripping(1000))
    started = time.monotonic()
    with pytest.raises(ExchangeError) as failure:
        await client.request("GET", drip_server.url + "/", {}, None, Limits(1, 0.3, 0.5, 1 << 20))
    assert failure.value.kind == "timeout" and failure.value.answered
    assert 0.45 < time.monotonic() - started < 1.5
    await asyncio.sleep(0.1)
    assert silent_server.open == 0 and drip_server.open == 0


async def test_an_answer_due_by_a_time_must_begin_by_then_and_may_take_longer_to_end(serve, client) -> None:
    """``answer_by`` (a read's deadline) bounds the wait for an answer, not its reading: a large
    answer that began in time ends within the read and total limits, as without it."""
    silent_server, slow_server = await serve(silent), await serve(dripping(30))
    limits = Limits(1, 5, 10, 1 << 20)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    with pytest.raises(ExchangeError) as failure:
        await client.request("GET", silent_server.url + "/", {}, None, limits, answer_by=loop.time() + 0.3)
    assert failure.value.kind == "timeout" and not failure.value.answered
    assert 0.25 < time.monotonic() - started < 1.5

    answer = await client.request("GET", slow_server.url + "/", {}, None, limits, answer_by=loop.time() + 0.3)
    assert answer.status == 200 and answer.body == b"x" * 30


async def test_connect_failures_say_nothing_was_sent(unused_tcp_port: int, client) -> None:
    with pytest.raises(ExchangeError) as failure:
        await client.request("GET", f"http://127.0.0.1:{unused_tcp_port}/", {}, None, LIMITS)
    assert failure.value.kind == "connect" and failure.value.connecting


async def test_a_request_whose_time_the_queue_took_is_never_sent(serve, monkeypatch) -> None:
    """A request that waited for the pool's only connection until little of its whole call's time
    (1 s) was left, then met a slow connect (0.4 s), was sent after its time, to fail at once as a
    timeout the provider might have acted on (a create, perhaps made). Its connect now gets only the
    time left, and it ends unsent, as the gateway's own wait."""
    release = asyncio.Event()

    async def slow_then_close(server, reader, writer):
        await server.read_request(reader)
        await release.wait()
        writer.write(answer(extra=b"Connection: close\r\n"))  # the next request must open another
        await writer.drain()
        writer.close()

    server = await serve(slow_then_close)
    loop = asyncio.get_running_loop()
    connect = loop.create_connection
    opened = []

    async def slow_second_connect(*args: object, **kwargs: object) -> object:
        opened.append(args)
        if len(opened) == 2:
            await asyncio.sleep(0.4)  # a SYN retransmitted, a far TLS handshake
        return await connect(*args, **kwargs)

    monkeypatch.setattr(loop, "create_connection", slow_second_connect)
    http = Http1Client(max_connections=1)
    try:
        first = asyncio.create_task(http.request("GET", server.url + "/hold", {}, None, LIMITS))
        await asyncio.sleep(0.05)
        loop.call_later(0.85, release.set)
        with pytest.raises(ExchangeError) as failure:
            await http.request("POST", server.url + "/v1/videos", {}, b"{}", Limits(1.0, 5, 1.0, 1 << 20))
        # the connect had what the queue left of the second (the provider had it that long)
        assert failure.value.connecting and failure.value.given is not None and failure.value.given < 0.3
        assert (await first).status == 200
        await asyncio.sleep(0.5)
        assert [r.split(b" ")[1] for r in server.requests] == [b"/hold"], "the late request never went out"
    finally:
        http.close()


async def test_a_request_whose_time_is_gone_is_not_sent_on_an_idle_connection(serve) -> None:
    """A kept-alive connection free at once did not stop a request already past the time it must
    begin by (a retry that woke late, a call's second request) from going out, only to fail at once."""

    async def answers(server, reader, writer):
        while True:
            await server.read_request(reader)
            writer.write(answer())
            await writer.drain()

    server = await serve(answers)
    http = Http1Client(max_connections=1)
    try:
        assert (await http.request("GET", server.url + "/warm", {}, None, LIMITS)).status == 200
        late = asyncio.get_running_loop().time() - 0.1
        with pytest.raises(ExchangeError) as failure:
            await http.request("GET", server.url + "/late", {}, None, LIMITS, answer_by=late)
        assert failure.value.given == 0.0
        await asyncio.sleep(0.1)
        assert [r.split(b" ")[1] for r in server.requests] == [b"/warm"]
    finally:
        http.close()


async def test_a_full_pool_queues_within_the_connect_timeout(serve) -> None:
    release = asyncio.Event()

    async def slow(server, reader, writer):
        while True:
            await server.read_request(reader)
            await release.wait()
            writer.write(answer())
            await writer.drain()

    server = await serve(slow)
    http = Http1Client(max_connections=1)
    try:
        first = asyncio.create_task(http.request("GET", server.url + "/1", {}, None, LIMITS))
        await asyncio.sleep(0.05)
        with pytest.raises(ExchangeError) as failure:
            await http.request("GET", server.url + "/2", {}, None, Limits(0.2, 1, 5, 1 << 20))
        assert failure.value.kind == "busy" and failure.value.connecting
        waiting = asyncio.create_task(http.request("GET", server.url + "/3", {}, None, LIMITS))
        await asyncio.sleep(0.05)
        release.set()
        assert (await first).status == 200 and (await waiting).status == 200
        assert server.connections == 1, "the waiter got the released connection"
    finally:
        http.close()


async def test_a_cancelled_exchange_closes_its_connection(serve, client) -> None:
    async def never(server, reader, writer):
        await server.read_request(reader)
        await reader.read()

    server = await serve(never)
    task = asyncio.create_task(client.request("GET", server.url + "/", {}, None, LIMITS))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    assert server.open == 0


async def test_close_releases_idle_connections(serve) -> None:
    server = await serve(keep_alive(answer()))
    http = Http1Client(max_connections=4)
    await http.request("GET", server.url + "/", {}, None, LIMITS)
    assert server.open == 1
    http.close()
    await asyncio.sleep(0.1)
    assert server.open == 0


async def test_header_injection_is_refused(serve, client) -> None:
    server = await serve(keep_alive(answer()))
    with pytest.raises(ValueError):
        await client.request("GET", server.url + "/", {"X-Evil": "a\r\nHost: elsewhere"}, None, LIMITS)
    assert server.requests == []


@pytest.mark.parametrize("target", ["/jobs/abc\n", "/jobs/abc\r\nX-Evil: 1", "/jobs/a b", "/jobs/\x00"])
async def test_a_request_target_that_would_break_the_request_line_is_refused(
    serve, client, target: str
) -> None:
    """A provider's job name goes into the path of every poll; one with a line break would end the
    request line there and start headers of its own on a request carrying the gateway's key."""
    server = await serve(keep_alive(answer()))
    with pytest.raises(ExchangeError) as raised:
        await client.request("GET", server.url + target, {}, None, LIMITS)
    assert raised.value.kind == "payload" and server.requests == []


async def test_bytes_after_an_answer_in_the_same_read_are_not_kept_for_the_next(serve, client) -> None:
    """A server that writes more than the answer it owed (the start of another, glued on) left the
    pooled connection's parser part-way through that one: the next request on it, maybe another
    tenant's, read the leftovers as its answer's start. Such a connection is not used again."""
    glued = (
        answer(b'{"id": "first"}') + b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n" + b'{"id": "not yours'
    )
    calls = 0

    async def handler(server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        while True:
            await server.read_request(reader)
            calls += 1
            writer.write(glued if calls == 1 else answer(b'{"id": "second"}'))
            await writer.drain()

    server = await serve(handler)
    first = await client.request("GET", server.url + "/a", {}, None, LIMITS)
    second = await client.request("GET", server.url + "/b", {}, None, LIMITS)
    assert (first.body, second.body) == (b'{"id": "first"}', b'{"id": "second"}')
    assert server.connections == 2


async def test_a_switching_protocols_answer_is_a_clean_failure(serve, client) -> None:
    """A 101 from a provider: httptools raises its own upgrade signal, which is no parser error and
    escaped into the event loop ("Fatal error: protocol.data_received() call failed")."""
    upgrade = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    server = await serve(keep_alive(upgrade))
    with pytest.raises(ExchangeError) as raised:
        await client.request("GET", server.url + "/", {}, None, LIMITS)
    assert raised.value.kind == "payload"


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    loopback = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(loopback, False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_https_verifies_the_provider(serve, tmp_path: Path) -> None:
    server_tls, client_tls = _self_signed(tmp_path)
    server = await serve(keep_alive(answer()), tls=server_tls)
    trusted = Http1Client(max_connections=2, tls=client_tls)
    untrusted = Http1Client(max_connections=2)
    try:
        got = await trusted.request("GET", server.url + "/", {}, None, LIMITS)
        assert got.body == JSON
        with pytest.raises(ExchangeError) as failure:
            await untrusted.request("GET", server.url + "/", {}, None, LIMITS)
        assert failure.value.kind == "connect" and str(failure.value) == "could not connect to the provider"
        assert isinstance(failure.value.__cause__, ssl.SSLCertVerificationError)  # for the log only
    finally:
        trusted.close()
        untrusted.close()


async def test_request_targets_keep_their_query_and_drop_fragments(serve, client) -> None:
    server = await serve(keep_alive(answer()))
    await client.request("GET", server.url + "?a=1", {}, None, LIMITS)
    await client.request("GET", server.url + "/v1/x?b=2#frag", {}, None, LIMITS)
    assert [r.split(b"\r\n")[0] for r in server.requests] == [
        b"GET /?a=1 HTTP/1.1",
        b"GET /v1/x?b=2 HTTP/1.1",
    ]
    with pytest.raises(ExchangeError):
        await client.request("GET", "ftp://127.0.0.1/x", {}, None, LIMITS)
    with pytest.raises(ExchangeError):
        await client.request("GET", "http://user:pw@127.0.0.1/x", {}, None, LIMITS)


async def test_pools_of_many_result_hosts_do_not_pile_up(serve, client, unused_tcp_port_factory) -> None:
    server = await serve(keep_alive(answer()))
    for _ in range(100):
        with pytest.raises(ExchangeError):  # nothing listens there; each is a new origin
            await client.request("GET", f"http://127.0.0.1:{unused_tcp_port_factory()}/", {}, None, LIMITS)
    await client.request("GET", server.url + "/", {}, None, LIMITS)
    assert len(client._pools) <= 64


# Found by an audit of this client against RFC 9110/9112: each test failed before its fix.


async def test_an_answer_head_past_64_kib_is_refused(serve, client) -> None:
    """llhttp sets no limit on an answer's head and only the body was counted: a 4 MiB header value,
    or a provider sending headers for the whole request timeout, was gathered in memory."""
    huge = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (4 << 20) + b"\r\nContent-Length: 2\r\n\r\n{}"
    server = await serve(keep_alive(huge))
    with pytest.raises(ExchangeError) as failure:
        await client.request("GET", server.url + "/", {}, None, Limits(1.0, 1.0, 5.0, 64 << 10))
    assert failure.value.kind == "payload" and "too large" in str(failure.value)
    big_but_fine = answer(extra=b"X-Big: " + b"a" * 60_000 + b"\r\n")
    server = await serve(keep_alive(big_but_fine))
    assert (await client.request("GET", server.url + "/", {}, None, LIMITS)).body == JSON


async def test_a_providers_own_host_header_replaces_the_urls(serve, client) -> None:
    """A provider configured with a Host of its own (a gateway in front of it by address) got two
    Host lines on every poll, which RFC 9112 (3.2) has a server answer with 400."""
    server = await serve(keep_alive(answer()))
    await client.request("GET", server.url + "/v1/videos/x", {"host": "api.example.com"}, None, LIMITS)
    await client.request("GET", server.url + "/v1/videos/x", {"X-Team": "a"}, None, LIMITS)
    fixed = FixedHeaders.of({"Authorization": "Bearer up", "Host": "api.example.com"})
    await client.request("GET", server.url + "/v1/videos/x", {"X-Request-ID": "r"}, None, LIMITS, fixed)
    given, default, fixed_given = (request.lower() for request in server.requests)
    for named in (given, fixed_given):
        assert named.count(b"\r\nhost:") == 1 and b"\r\nhost: api.example.com\r\n" in named
    assert default.count(b"\r\nhost:") == 1 and b"\r\nhost: 127.0.0.1:" in default


async def test_an_answer_to_head_ends_with_its_headers(serve, client) -> None:
    """The parser is not told the method: for HEAD it waited for the Content-Length bytes an answer
    to HEAD never has (RFC 9112, 6.3) until the read timeout."""
    server = await serve(keep_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"))
    started = time.monotonic()
    got = await client.request("HEAD", server.url + "/result.mp4", {}, None, LIMITS)
    assert (got.status, got.body, got.headers["Content-Length"]) == (200, b"", "1000")
    assert time.monotonic() - started < 0.5
    assert (await client.request("HEAD", server.url + "/result.mp4", {}, None, LIMITS)).status == 200


async def test_a_close_delimited_answer_cut_by_a_reset_is_not_complete(serve, client) -> None:
    """An answer that ends with its connection is whole only when the connection closed cleanly
    (RFC 9112, 8): one cut by a reset came back as a 200 with half a body."""

    half = once(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"id": "video_1", "sta')

    async def reset_mid_body(
        server: RawServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await half(server, reader, writer)
        await asyncio.sleep(0.05)
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.transport.abort()  # a reset, not a close

    server = await serve(reset_mid_body)
    with pytest.raises(ExchangeError) as failure:
        await client.request("GET", server.url + "/", {}, None, LIMITS)
    assert failure.value.kind == "payload" and "cut off" in str(failure.value)


async def test_trailer_fields_are_not_headers_and_values_lose_trailing_whitespace(serve, client) -> None:
    """Trailers reached on_header with the headers, so a trailing Content-Type replaced the answer's
    and a Retry-After appeared (RFC 9110, 6.5.1); and a value kept the whitespace ending its line
    (RFC 9112, 5.1), which the gateway passed on to its client."""
    chunked = (
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        b"X-Wait: 7 \t \r\n\r\n2;ext=1\r\n{}\r\n0\r\nContent-Type: text/html\r\nRetry-After: 999\r\n\r\n"
    )
    server = await serve(keep_alive(chunked))
    got = await client.request("GET", server.url + "/", {}, None, LIMITS)
    assert got.body == b"{}" and got.headers["Content-Type"] == "application/json"
    assert "Retry-After" not in got.headers and got.headers["X-Wait"] == "7"


async def test_an_answer_whose_last_coding_is_not_chunked_ends_with_its_connection(serve, client) -> None:
    """RFC 9112 (6.3, rule 4): such an answer is read until the connection closes; any
    Transfer-Encoding was taken for framing, and the close for an answer cut off."""

    server = await serve(once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity-ish\r\n\r\nraw bytes"))
    assert (await client.request("GET", server.url + "/", {}, None, LIMITS)).body == b"raw bytes"


async def test_a_connection_is_not_kept_past_the_idle_time_the_provider_gives(serve, client) -> None:
    """A provider that closes idle connections after 2 s (Keep-Alive: timeout=2, as Node.js servers
    say) had its connections kept 15 s: a create sent as it closed one was reported as perhaps made.
    A second before the provider's limit, the connection is given up instead."""
    server = await serve(keep_alive(answer(extra=b"Keep-Alive: timeout=2\r\n")))
    await client.request("GET", server.url + "/", {}, None, LIMITS)
    await client.request("GET", server.url + "/", {}, None, LIMITS)
    assert server.connections == 1
    await asyncio.sleep(1.1)
    await client.request("POST", server.url + "/", {}, b"{}", LIMITS)
    assert server.connections == 2
    plain = await serve(keep_alive(answer()))
    await client.request("GET", plain.url + "/", {}, None, LIMITS)
    await asyncio.sleep(1.1)
    await client.request("POST", plain.url + "/", {}, b"{}", LIMITS)
    assert plain.connections == 1
