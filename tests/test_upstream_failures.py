"""How upstream failures and edge answers reach the client: a client's own upload failure wins over
the connection error it causes upstream, failures name no upstream address, Range requests follow
RFC 9110, every answer carries a request ID, requests abandoned at shutdown are not the client's, and
a create or delete the provider has taken is finished even when its client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import secrets
import socket
import struct
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway import metrics
from gateway.app import build_app
from gateway.connections import GatewayRunner
from gateway.context import start_answer
from gateway.state import GATEWAY
from tests.conftest import ALPHA_KEY, RunningGateway, StartGateway, load
from tests.fakes.faulty_upstream import FaultyUpstream
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.test_resilience import AUTH, config

MODELS = """
    m:
      - {provider: up, model: primary}
    unreachable:
      - {provider: down, model: nowhere}
"""
LIMITS = "limits: {client_idle_timeout: 0.3, max_upload_bytes: 1048576}"


async def exchange(gw: RunningGateway, head: bytes, body: list[bytes], pause: float = 0) -> tuple[int, bytes]:
    """Send a request head and body pieces over a raw socket, then read the answer: status, body.

    The writer keeps going (or pauses) while the answer is read, as a real client's upload would.
    """
    host, port = gw.server.host, gw.server.port
    assert port is not None
    reader, writer = await asyncio.open_connection(host, port)

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(head)
            for piece in body:
                writer.write(piece)
                await writer.drain()
            await asyncio.sleep(pause)

    sending = asyncio.create_task(send())
    try:
        return await asyncio.wait_for(read_answer(reader), 10)
    finally:
        sending.cancel()
        writer.close()


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One answer with a Content-Length: its status and body (the connection may stay open)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    lengths = [line.partition(":")[2] for line in head if line.lower().startswith("content-length:")]
    return int(head[0].split()[1]), await reader.readexactly(int(lengths[0]))


def request_head(length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /v1/videos HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\n{framing}\r\n\r\n"
    ).encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


HEAD_PARTS = (
    b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
    b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nupload\r\n'
    b'--b\r\nContent-Disposition: form-data; name="input_reference"; filename="r.png"\r\n\r\n'
)


@pytest.fixture
async def gw(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> RunningGateway:
    return await start_gateway(config(tmp_path, faulty[1], MODELS, extra=LIMITS))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_upload_that_stalls_on_its_way_upstream_is_408(
    gw: RunningGateway, faulty: tuple[FaultyUpstream, str], framing: str
) -> None:
    fake = faulty[0]
    start = HEAD_PARTS + b"\0" * 1000
    if framing == "chunked":
        head, body = request_head(None), [chunk(start)]
    else:
        head, body = request_head(len(start) + 5000), [start]
    started = time.monotonic()
    status, raw = await exchange(gw, head, body, pause=5)
    assert status == 408 and time.monotonic() - started < 3
    assert json.loads(raw)["error"]["code"] == "request_timeout"
    await asyncio.sleep(0.2)
    assert fake.hits_for("primary") == [], "the upstream created no job from a cut-off body"


async def test_a_chunked_upload_over_the_limit_on_its_way_upstream_is_413(
    gw: RunningGateway, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake = faulty[0]
    body = [
        chunk(HEAD_PARTS),
        *(chunk(b"\0" * 65536) for _ in range(32)),
        chunk(b"\r\n--b--\r\n"),
        b"0\r\n\r\n",
    ]
    status, raw = await exchange(gw, request_head(None), body)
    assert status == 413 and json.loads(raw)["error"]["code"] == "request_too_large"
    await asyncio.sleep(0.2)
    assert fake.hits_for("primary") == [], "the upstream created no job from a cut-off body"


def log_lines(session_log: Path, request_id: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in session_log.read_text().splitlines() if request_id in line]
    return [line for line in lines if line.get("request_id") == request_id]


async def post(gw: RunningGateway, path: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.url + path, headers=headers, **kwargs) as r,
    ):
        return r.status, dict(r.headers), await r.json()


async def test_connect_failures_name_no_upstream_address(
    start_gateway: StartGateway, tmp_path: Path, aiohttp_server: Any, session_log: Path
) -> None:
    upstream = await aiohttp_server(FaultyUpstream().app())
    gw = await start_gateway(
        config(
            tmp_path, str(upstream.make_url("")).rstrip("/"), MODELS, extra="resilience: {read_attempts: 1}"
        )
    )
    # a create, over aiohttp's client
    status, _, body = await post(
        gw, "/v1/videos", json={"prompt": "x", "model": "unreachable"}, headers={"X-Request-ID": "refused-1"}
    )
    message = body["error"]["message"]
    assert status == 502 and message == "Upstream error: could not connect to the provider."
    # a poll, over the lean client (gateway/http1.py), once the provider is gone
    status, _, video = await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"})
    assert status == 200
    await upstream.close()
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gw.url}/v1/videos/{video['id']}", headers={**AUTH, "X-Request-ID": "refused-2"}) as r,
    ):
        status, body = r.status, await r.json()
    assert status == 502 and body["error"]["message"] == message
    for request_id in ("refused-1", "refused-2"):
        failed = [line for line in log_lines(session_log, request_id) if line["event"] == "upstream_failed"]
        assert failed and failed[0]["kind"] == "connect" and failed[0]["errno"] == errno.ECONNREFUSED
        assert failed[0]["error"] in ("ClientConnectorError", "ExchangeError")


async def completed(gw: RunningGateway, model: str) -> str:
    client = gw.sdk()
    size = "320x240" if model == "sora-2" else "1280x720"
    done = await client.videos.create_and_poll(prompt="ranged", model=model, size=size, poll_interval_ms=100)
    return done.id


async def content(
    gw: RunningGateway, video_id: str, range_: str, if_range: str | None = None
) -> tuple[int, Any, bytes]:
    headers = {**AUTH, "Range": range_} | ({"If-Range": if_range} if if_range is not None else {})
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{gw.url}/v1/videos/{video_id}/content", headers=headers) as r,
    ):
        return r.status, r.headers, await r.read()


@pytest.mark.parametrize("model", ["sora-2", "sora-remote"])
async def test_ranges_the_gateway_ignores_get_the_whole_video(
    dialect_gateway: RunningGateway, model: str
) -> None:
    video_id = await completed(dialect_gateway, model)
    status, _, full = await content(dialect_gateway, video_id, "bytes=0-")
    assert status == 206
    for ignored in ("bytes=abc", "items=0-5", "bytes=0-1,5-6", "bytes=100-50"):
        status, headers, body = await content(dialect_gateway, video_id, ignored)
        assert status == 200 and body == full, ignored
        assert headers["Content-Type"] == "video/mp4" and "Content-Range" not in headers, ignored
    status, headers, body = await content(dialect_gateway, video_id, "bytes=0-" + "9" * 5000)
    assert status == 206 and body == full
    assert headers["Content-Range"] == f"bytes 0-{len(full) - 1}/{len(full)}"


async def test_a_range_the_gateway_rewrites_beside_a_latin_1_header_is_served(
    dialect_gateway: RunningGateway,
) -> None:
    """A Range the gateway rewrites (``bytes=00-1``) or drops (two ranges) beside a header that is
    not UTF-8 (a Latin-1 User-Agent) was a 500 with a traceback: the rewritten request encodes
    every header again as UTF-8."""
    video_id = await completed(dialect_gateway, "sora-2")
    _, _, full = await content(dialect_gateway, video_id, "bytes=0-")
    for range_, status, body in (("bytes=00-1", 206, full[:2]), ("bytes=0-1,5-6", 200, full)):
        reader, writer = await asyncio.open_connection(
            dialect_gateway.server.host, dialect_gateway.server.port
        )
        try:
            writer.write(
                f"GET /v1/videos/{video_id}/content HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                f"Authorization: {AUTH['Authorization']}\r\nRange: {range_}\r\n".encode()
                + b"User-Agent: caf\xe9\r\n\r\n"
            )
            answer = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, got = answer.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status}".encode()) and got == body, (range_, head)


async def test_a_range_with_a_stale_if_range_gets_the_whole_file(dialect_gateway: RunningGateway) -> None:
    """RFC 9110 §13.1.5: a client resuming a download sends If-Range with what it has; unless that
    names this very file, it gets the whole file, never a piece of another one spliced on. An entity
    tag in If-Range was not read at all (aiohttp reads dates only) on files the gateway serves."""
    video_id = await completed(dialect_gateway, "sora-2")
    status, headers, full = await content(dialect_gateway, video_id, "bytes=0-")
    etag, modified = headers["ETag"], headers["Last-Modified"]
    for matching in (etag, modified, "Fri, 31 Dec 2099 23:59:59 GMT"):
        status, headers, body = await content(dialect_gateway, video_id, "bytes=10-19", matching)
        assert status == 206 and body == full[10:20], matching
    for stale in ('"not-this-file"', "W/" + etag, "Mon, 01 Jan 2001 00:00:00 GMT", "not a validator"):
        status, headers, body = await content(dialect_gateway, video_id, "bytes=10-19", stale)
        assert status == 200 and body == full and "Content-Range" not in headers, stale


@pytest.mark.parametrize("model", ["sora-2", "sora-remote"])
async def test_an_unsatisfiable_range_is_416_in_the_error_envelope(
    dialect_gateway: RunningGateway, model: str
) -> None:
    video_id = await completed(dialect_gateway, model)
    _, _, full = await content(dialect_gateway, video_id, "bytes=0-")
    status, headers, body = await content(dialect_gateway, video_id, "bytes=999999999-")
    assert status == 416 and headers["Content-Type"].startswith("application/json")
    assert headers["Content-Range"] == f"bytes */{len(full)}" and headers["x-request-id"]
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    if model == "sora-2":  # a zero-length suffix; a relayed download passes on what the provider says
        status, headers, body = await content(dialect_gateway, video_id, "bytes=-0")
        assert status == 416 and json.loads(body)["error"]["code"] == "range_not_satisfiable"


async def test_a_file_gone_before_it_is_sent_is_a_404_in_the_error_envelope(
    dialect_gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file deleted between its lookup and its sending (a DELETE racing the download) was aiohttp's
    404: an empty body under the file's Content-Type (video/mp4), which no client reads as an error."""
    video_id = await completed(dialect_gateway, "sora-2")
    engine = dialect_gateway.app[GATEWAY].table.adapter("local").engine
    asset = engine.asset

    async def deleted_meanwhile(job_id: str, variant: str) -> tuple[Path, str]:
        path, content_type = await asset(job_id, variant)
        path.unlink()
        return path, content_type

    monkeypatch.setattr(engine, "asset", deleted_meanwhile)
    status, headers, body = await content(dialect_gateway, video_id, "bytes=0-")
    assert status == 404 and headers["Content-Type"].startswith("application/json"), (headers, body)
    assert json.loads(body)["error"]["code"] == "video_not_found" and headers["x-request-id"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Expect": "100-continue", "Authorization": "Bearer sk-wrong"}, 401),
        (
            {"Expect": "100-continue", "Authorization": f"Bearer {ALPHA_KEY}", "Content-Length": str(10**12)},
            413,
        ),
        (  # a JSON body over the JSON limit (32 MiB), though not over an upload's: not invited either
            {"Expect": "100-continue", "Authorization": f"Bearer {ALPHA_KEY}", "Content-Length": "41943040"},
            413,
        ),
        ({"Expect": "something-else", "Authorization": f"Bearer {ALPHA_KEY}"}, 417),
    ],
)
async def test_expect_continue_refusals_carry_a_request_id(
    local_gateway: RunningGateway, headers: dict[str, str], status: int, session_log: Path
) -> None:
    """Answered before the envelope runs, these refusals also had no access line and no count."""
    host, port = local_gateway.server.host, local_gateway.server.port
    assert port is not None
    lines = [f"{name}: {value}" for name, value in headers.items()]
    head = "\r\n".join(["POST /v1/videos HTTP/1.1", "Host: gw", "Content-Type: application/json", *lines])
    client_id = f"expect-{status}-{secrets.token_hex(4)}"
    for request_id, expected in ((client_id, client_id), ("bad id <>", None)):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(f"{head}\r\nX-Request-ID: {request_id}\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        lines = raw.decode().split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {status}")
        ids = [line.partition(":")[2].strip() for line in lines if line.lower().startswith("x-request-id:")]
        assert len(ids) == 1 and (ids[0] == expected if expected else ids[0].startswith("req_"))
    access = await wait_for_event(session_log, client_id, "request")
    assert (access["status"], access["route"], access["method"]) == (status, "/v1/videos", "POST"), access


@pytest.mark.parametrize("target", ["GET /healthz", "GET /v1/models", "GET /nowhere", "POST /admin/reload"])
async def test_an_expectation_other_than_100_continue_is_refused_in_the_envelope_everywhere(
    local_gateway: RunningGateway, target: str, session_log: Path
) -> None:
    """Only the API's creates had an Expect handler of the gateway's; elsewhere aiohttp's own
    answered 417 in text/plain, without a request ID, an access line or a count."""
    host, port = local_gateway.server.host, local_gateway.server.port
    request_id = f"expect-elsewhere-{secrets.token_hex(4)}"
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"{target} HTTP/1.1\r\nHost: gw\r\nExpect: bogus\r\nX-Request-ID: {request_id}\r\n\r\n".encode()
    )
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode().lower()
    writer.close()
    assert head.startswith("http/1.1 417") and "content-type: application/json" in head, head
    assert f"x-request-id: {request_id}" in head, head
    access = await wait_for_event(session_log, request_id, "request")
    assert access["status"] == 417, access
    reader, writer = await asyncio.open_connection(host, port)  # Expect is HTTP/1.1's: 1.0 ignores it
    writer.write(f"{target} HTTP/1.0\r\nHost: gw\r\nExpect: bogus\r\n\r\n".encode())
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode().lower()
    writer.close()
    assert not head.startswith("http/1.1 417") and not head.startswith("http/1.0 417"), head


async def test_requests_abandoned_at_shutdown_are_not_logged_as_the_clients(
    tmp_path: Path, faulty: tuple[FaultyUpstream, str], unused_tcp_port: int, session_log: Path
) -> None:
    fake, url = faulty
    fake.behaviour["primary"] = "hang"
    text = config(tmp_path, url, MODELS).replace("read: 1, request: 2", "read: 30, request: 60")
    runner = GatewayRunner(build_app(load(text)), handler_cancellation=True, shutdown_timeout=0.2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()

    async def hanging() -> None:
        headers = {**AUTH, "X-Request-ID": "abandoned-1"}
        with contextlib.suppress(aiohttp.ClientError):
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"http://127.0.0.1:{unused_tcp_port}/v1/videos",
                    json={"prompt": "x", "model": "m"},
                    headers=headers,
                ) as r,
            ):
                await r.read()

    client = asyncio.create_task(hanging())
    while not fake.hits_for("primary"):
        await asyncio.sleep(0.02)
    await runner.cleanup()
    await client
    access = [line for line in log_lines(session_log, "abandoned-1") if line["event"] == "request"]
    assert [line["status"] for line in access] == [503]


def upstream_errors(provider: str) -> float:
    samples = metrics.metrics_registry().get_sample_value
    return sum(
        samples("gateway_upstream_errors_total", {"provider": provider, "kind": kind}) or 0.0
        for kind in ("connect", "timeout", "reset", "payload", "4xx", "5xx")
    )


async def test_a_client_that_hangs_up_mid_upload_is_not_the_providers_failure(
    gw: RunningGateway, faulty: tuple[FaultyUpstream, str], session_log: Path
) -> None:
    """Clients give up on uploads; that must not count against the provider, nor bring it closer to
    ejection, and the access log says the client went away (499)."""
    before = upstream_errors("up")
    start = HEAD_PARTS + b"\0" * 20000
    _, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    writer.write(
        request_head(len(start) + 500_000).replace(b"Host: gw", b"Host: gw\r\nX-Request-ID: hangs-up-1")
    )
    writer.write(start)
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()
    for _ in range(50):
        await asyncio.sleep(0.05)
        if any(line.get("event") == "request" for line in log_lines(session_log, "hangs-up-1")):
            break
    (access,) = [line for line in log_lines(session_log, "hangs-up-1") if line.get("event") == "request"]
    assert access["status"] == 499
    assert upstream_errors("up") == before
    assert faulty[0].hits_for("primary") == []


async def test_a_client_that_drops_a_download_is_not_the_providers_failure(
    gw: RunningGateway, faulty: tuple[FaultyUpstream, str], session_log: Path
) -> None:
    """Players seek and users cancel: a download whose client hangs up mid-stream is the client's
    doing (499, with the bytes it was sent), not a provider reset, which counted as an upstream
    error, a 502 on the dashboard and a failure towards the deployment's ejection."""
    fake = faulty[0]
    status, _, video = await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"})
    assert status == 200
    fake.behaviour["primary"] = "large"
    before = upstream_errors("up")
    for attempt in range(3):
        request_id = f"drops-download-{attempt}"
        reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
        writer.write(
            f"GET /v1/videos/{video['id']}/content HTTP/1.1\r\nHost: gw\r\n"
            f"Authorization: Bearer {ALPHA_KEY}\r\nX-Request-ID: {request_id}\r\n\r\n".encode()
        )
        received = 0
        while received < 1_000_000:
            received += len(await reader.read(65536))
        writer.transport.abort()  # unread bytes in its buffer: the kernel answers with a reset
        access = await wait_for_event(session_log, request_id, "request")
        assert access["status"] == 499 and access["upstream_error"] is None, access
        assert access["bytes_out"] >= received - 65536 * 4, (access["bytes_out"], received)
    assert upstream_errors("up") == before
    (board,) = [row for row in gw.app[GATEWAY].health.snapshot(["up/primary"])]
    assert board["consecutive_failures"] == 0, board


async def wait_for_event(session_log: Path, request_id: str, event: str) -> dict[str, Any]:
    for _ in range(100):
        found = [line for line in log_lines(session_log, request_id) if line.get("event") == event]
        if found:
            return found[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {event} line for {request_id}")


async def test_a_create_whose_client_leaves_while_the_provider_answers_is_kept(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], session_log: Path
) -> None:
    """A client that times out, or dies, once its create has reached the provider leaves a job the
    provider goes on with (and bills for). The gateway still records it: the client finds it in its
    list and can poll it, and the log says how the create ended."""
    fake, _ = upstream
    client = dialect_gateway.sdk()
    with pytest.raises(openai.APITimeoutError):
        await client.videos.create(
            model="sora-remote",  # type: ignore[arg-type]
            prompt="a provider slow to answer [slow]",
            extra_headers={"X-Request-ID": "left-create-1"},
            timeout=0.3,
        )
    access = await wait_for_event(session_log, "left-create-1", "request")
    assert access["status"] == 499
    ended = await wait_for_event(session_log, "left-create-1", "finished_without_client")
    assert ended["status"] == 200 and ended["level"] == "info"

    (job_id,) = fake.jobs
    listed = (await client.videos.list()).data
    assert [v.prompt for v in listed] == ["a provider slow to answer [slow]"]
    polled = await client.videos.retrieve(listed[0].id)
    assert polled.status == "completed"  # the fake moves a step per poll: the list's, then this one
    assert fake.requests("GET", f"/v1/videos/{job_id}"), "the poll reached the provider's job"


async def test_a_streamed_create_whose_client_leaves_before_the_stream_starts_is_kept(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], session_log: Path
) -> None:
    """The same for a create answered as an event stream (an aggregator's ``stream``): with no client
    to relay it to, the stream is still read until its video is recorded."""
    fake, _ = upstream
    body = {"prompt": "streamed slowly [slow]", "model": "sora-remote", "stream": True}
    headers = {**AUTH, "X-Request-ID": "left-stream-1"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
        with pytest.raises(TimeoutError):
            await session.post(dialect_gateway.url + "/v1/videos", json=body, headers=headers)
    ended = await wait_for_event(session_log, "left-stream-1", "finished_without_client")
    assert ended["status"] == 200
    assert len(fake.jobs) == 1
    listed = (await dialect_gateway.sdk().videos.list()).data
    assert [v.prompt for v in listed] == ["streamed slowly [slow]"]


@pytest.mark.parametrize(
    "how",
    [
        "cut stream",  # the connection drops after the first event
        "endless event",  # then an event that never ends (a provider that never writes the blank line)
    ],
)
async def test_a_streamed_create_the_provider_breaks_off_is_cut_off_for_the_client_too(
    dialect_gateway: RunningGateway, session_log: Path, how: str
) -> None:
    """Ended normally, the relayed stream would pass for whole, and the client wait for events that
    never come (it hung until its own timeout); an event that never ends grew in the gateway's
    memory for as long as the provider kept writing (now cut past base.MAX_EVENT_BYTES). The client
    sees the break; the video is recorded."""
    body = {"prompt": f"streamed [{how}]", "model": "sora-remote", "stream": True}
    headers = {**AUTH, "X-Request-ID": "broken-stream-" + how.replace(" ", "-")}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(dialect_gateway.url + "/v1/videos", json=body, headers=headers) as response,
    ):
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    listed = (await dialect_gateway.sdk().videos.list()).data
    assert [v.prompt for v in listed] == [body["prompt"]]
    access = await wait_for_event(session_log, headers["X-Request-ID"], "request")
    assert access["upstream_error"] == "payload"
    assert not [line for line in log_lines(session_log, headers["X-Request-ID"]) if line["level"] == "error"]


async def test_a_streamed_event_in_cr_line_ends_is_relayed_before_a_cut(
    dialect_gateway: RunningGateway,
) -> None:
    """An event whose lines end in CR ends in a CR too, which was held back as the possible start
    of a CRLF until the provider wrote again: a stream cut after it lost the event, and the video
    it started was never recorded."""
    body = {"prompt": "streamed [cr events] [cut stream]", "model": "sora-remote", "stream": True}
    async with (
        aiohttp.ClientSession(headers=AUTH, timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(dialect_gateway.url + "/v1/videos", json=body) as response,
    ):
        assert response.status == 200
        first = await response.content.readuntil(b"\n\n")
        assert b'"id": "video_' in first or b'"id":"video_' in first, first
    assert [v.prompt for v in (await dialect_gateway.sdk().videos.list()).data] == [body["prompt"]]


async def test_a_create_whose_client_left_counts_the_providers_wait_as_upstream(
    dialect_gateway: RunningGateway, session_log: Path
) -> None:
    """A client that leaves while the provider is still answering its create: the access line (and
    gateway_overhead_seconds) took the whole wait for the gateway's own overhead, the provider's
    call still open in the work that goes on without the client."""
    with pytest.raises(openai.APITimeoutError):
        await dialect_gateway.sdk().videos.create(
            model="sora-remote",
            prompt="slow [slow]",
            extra_headers={"X-Request-ID": "left-create-overhead"},
            timeout=0.3,
        )
    access = await wait_for_event(session_log, "left-create-overhead", "request")
    assert access["status"] == 499, access
    assert access["upstream_ms"] >= 0.2 * 1000 and access["overhead_ms"] < 100, access


async def test_a_delete_whose_client_leaves_while_the_provider_deletes_is_done(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], session_log: Path
) -> None:
    """The provider deleted the video: it must not stay in the client's list as if it still existed."""
    fake, _ = upstream
    client = dialect_gateway.sdk()
    video = await client.videos.create(model="sora-remote", prompt="to delete [slow]")  # type: ignore[arg-type]
    with pytest.raises(openai.APITimeoutError):
        await client.videos.delete(video.id, extra_headers={"X-Request-ID": "left-delete-1"}, timeout=0.3)
    ended = await wait_for_event(session_log, "left-delete-1", "finished_without_client")
    assert ended["status"] == 200
    assert fake.jobs == {}
    assert (await client.videos.list()).data == []
    with pytest.raises(openai.NotFoundError):
        await client.videos.retrieve(video.id)


async def test_a_create_whose_client_leaves_before_it_is_sent_starts_nothing(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], session_log: Path
) -> None:
    """Only a create already sent is finished without its client: one that leaves while its body is
    still coming starts no job (the body is cut short upstream, and the provider is not blamed)."""
    fake, _ = upstream
    head = (
        f"POST /v1/videos HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"
        "X-Request-ID: left-upload-1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        "Content-Length: 10000000\r\n\r\n"
    ).encode()
    _, writer = await asyncio.open_connection(dialect_gateway.server.host, dialect_gateway.server.port)
    writer.write(head + HEAD_PARTS.replace(b"\r\nm\r\n", b"\r\nsora-remote\r\n") + b"\0" * 200_000)
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.transport.abort()
    access = await wait_for_event(session_log, "left-upload-1", "request")
    assert access["status"] == 499
    await asyncio.sleep(0.3)
    assert fake.jobs == {}
    assert not [line for line in log_lines(session_log, "left-upload-1") if line["level"] != "info"]
    assert not dialect_gateway.app[GATEWAY].left_by_client


@pytest.mark.parametrize("ending", ["reset", "reset at once", "close"])
async def test_a_download_without_length_that_the_provider_resets_is_cut_off_for_the_client(
    start_gateway: StartGateway, tmp_path: Path, ending: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body without Content-Length or chunking ends when its connection closes (RFC 9112 §6.3):
    closed cleanly, it is whole; reset, it was cut short. aiohttp ends such a body at either, so a
    provider's reset mid-video reached the client as a complete (chunked) video, truncated. Reset at
    once, right behind the body, the connection may be gone before the gateway starts relaying."""
    video = json.dumps(
        {"id": "job_1", "object": "video", "model": "primary", "status": "completed", "progress": 100}
    ).encode()
    part = b"\x00\x00\x00\x18ftypmp42" + bytes(4096 if ending == "reset at once" else 65536)
    if ending == "reset at once":  # a gateway busy elsewhere: the reset comes before relaying starts
        from gateway.providers import base

        async def late_start(request: web.Request, response: web.StreamResponse) -> None:
            await asyncio.sleep(0.2)
            await start_answer(request, response)

        monkeypatch.setattr(base, "start_answer", late_start)

    async def provider(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An OpenAI-dialect server as raw bytes: a create and a retrieve that answer a completed
        job (reference §3.1), then content sent until close, and reset half-way."""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line[15:])
                        for line in head.lower().split(b"\r\n")
                        if line.startswith(b"content-length:")
                    ),
                    0,
                )
                await reader.readexactly(length)
                if b"/content" not in head.split(b"\r\n")[0]:
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(video), video)
                    )
                    await writer.drain()
                    continue
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nConnection: close\r\n\r\n" + part
                )
                await writer.drain()
                if ending != "reset at once":
                    await asyncio.sleep(0.1)
                if ending.startswith("reset"):
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    writer.transport.abort()  # RST, not FIN
                else:
                    writer.close()
                return

    server = await asyncio.start_server(provider, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        gw = await start_gateway(config(tmp_path, url, MODELS))
        status, _, made = await post(gw, "/v1/videos", json={"model": "m", "prompt": "cut short"})
        assert status == 200 and made["status"] == "completed", made
        cut_before = upstream_errors("up")
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{gw.url}/v1/videos/{made['id']}/content", headers=AUTH) as response,
        ):
            assert response.status == 200
            if ending.startswith("reset"):
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            else:
                assert await response.read() == part
        assert upstream_errors("up") - cut_before == ending.startswith("reset")
    finally:
        server.close()
        await server.wait_closed()
