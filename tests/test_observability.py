"""Metrics as Prometheus scrapes them, and logs as on-call engineers grep them."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from prometheus_client import REGISTRY, Histogram
from prometheus_client.parser import text_string_to_metric_families

from gateway import logs, metrics
from gateway.logs import configure, log, register_secrets, scrub
from tests.conftest import ALPHA_KEY, BETA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway, gateway_yaml


async def scrape(gw: RunningGateway, headers: dict[str, str] | None = None) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gw.url + "/metrics", headers=headers) as response,
    ):
        assert response.status == 200
        return await response.text()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(snapshot: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return snapshot.get((name, frozenset(labels.items())), 0.0)


async def traffic(gw: RunningGateway) -> str:
    """Some of everything: creates, polls, downloads, a list, refusals. Returns a finished video ID."""
    client = gw.sdk()
    done = await client.videos.create_and_poll(prompt="metered", size="320x240", seconds="1")
    await client.videos.retrieve(done.id)
    await client.videos.retrieve(done.id)
    await client.videos.download_content(done.id)
    [v async for v in await client.videos.list()]
    async with aiohttp.ClientSession() as session:
        await (await session.get(gw.url + "/v1/videos")).read()
        await (
            await session.post(
                gw.url + "/v1/videos",
                json={"prompt": "[500]", "model": "sora-remote"},
                headers={"Authorization": f"Bearer {ALPHA_KEY}"},
            )
        ).read()
    return done.id


async def test_metrics_count_what_happened(dialect_gateway: RunningGateway) -> None:
    before = samples(await scrape(dialect_gateway))
    video_id = await traffic(dialect_gateway)
    text = await scrape(dialect_gateway)
    after = samples(text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("gateway_http_requests_total", route="/v1/videos", method="POST", code="200") == 1
    assert delta("gateway_http_requests_total", route="/v1/videos", method="GET", code="401") == 1
    assert (
        delta("gateway_http_requests_total", route="/v1/videos/{video_id}/content", method="GET", code="200")
        == 1
    )
    assert delta("gateway_videos_created_total", model="sora-2", provider="local") == 1
    assert delta("gateway_videos_finished_total", model="sora-2", provider="local", status="completed") == 1
    assert delta("gateway_upstream_errors_total", provider="dialect", kind="5xx") == 1
    assert (
        delta("gateway_upstream_requests_total", provider="dialect", deployment="dialect/upstream-sora") == 1
    )
    assert delta("gateway_response_body_bytes_total", route="/v1/videos/{video_id}/content") > 1000
    assert delta("gateway_request_body_bytes_total", route="/v1/videos") > 0
    assert (
        delta("gateway_http_request_duration_seconds_count", route="/v1/videos/{video_id}", method="GET") >= 3
    )
    assert (
        value(
            after,
            "gateway_http_request_duration_seconds_bucket",
            route="/v1/videos",
            method="POST",
            le="600.0",
        )
        >= 1
    )
    assert value(after, "gateway_overhead_seconds_bucket", route="/v1/videos", le="0.001") >= 0
    assert (
        value(
            after,
            "gateway_build_info",
            version=__import__("gateway").__version__,
            python=__import__("platform").python_version(),
        )
        == 1
    )
    for secret in (ALPHA_KEY, BETA_KEY, UPSTREAM_KEY, video_id):
        assert secret not in text

    client = dialect_gateway.sdk()
    await client.videos.retrieve(video_id)
    again = samples(await scrape(dialect_gateway))
    assert value(
        again, "gateway_videos_finished_total", model="sora-2", provider="local", status="completed"
    ) == value(after, "gateway_videos_finished_total", model="sora-2", provider="local", status="completed")


def test_tallies_flush_to_what_prometheus_client_would_count() -> None:
    """The hot-path series tally in plain Python; any collection first flushes them, and what it then
    reports equals prometheus_client's own updates of the same observations, bucket bounds included."""
    route = "/tally-check"
    reference = Histogram("tally_check_seconds", "reference", buckets=metrics.OVERHEAD_BUCKETS, registry=None)
    series = metrics.route_series(route, "GET")
    observed = [0.0, 0.0001, 0.00010001, 0.001, 0.3, 1.0, 7.5, 1e9]
    for seconds in observed:
        series.started()
        series.record(200, 2 * seconds, seconds, 10, 20)
        reference.observe(seconds)
    series.started()  # a request still in flight when the collection comes

    def collected(name: str) -> dict[str, float]:
        return {
            s.labels.get("le", s.name): s.value
            for family in REGISTRY.collect()
            for s in family.samples
            if s.name == name and s.labels.get("route") == route
        }

    expected = {s.labels["le"]: s.value for s in next(iter(reference.collect())).samples if "le" in s.labels}
    assert collected("gateway_overhead_seconds_bucket") == expected
    assert collected("gateway_overhead_seconds_sum") == {"gateway_overhead_seconds_sum": sum(observed)}
    assert collected("gateway_http_requests_total") == {"gateway_http_requests_total": len(observed)}
    assert collected("gateway_request_body_bytes_total") == {"gateway_request_body_bytes_total": 80}
    assert collected("gateway_response_body_bytes_total") == {"gateway_response_body_bytes_total": 160}
    assert collected("gateway_http_requests_in_flight") == {"gateway_http_requests_in_flight": 1}
    assert collected("gateway_overhead_seconds_bucket") == expected  # a second flush adds nothing
    series.record(200, 0.0, 0.0, 0, 0)
    assert collected("gateway_http_requests_in_flight") == {"gateway_http_requests_in_flight": 0}
    assert collected("gateway_http_requests_total") == {"gateway_http_requests_total": len(observed) + 1}


async def test_a_scrape_has_the_same_series_with_one_worker_or_several(
    dialect_gateway: RunningGateway,
) -> None:
    """prometheus_client adds a ``_created`` series to each counter and histogram of one process,
    and none in the multiprocess mode that several workers use: 112 series that came and went with
    a setting, and that the README's table does not list. They are off in both."""
    await dialect_gateway.sdk().videos.list()
    text = await scrape(dialect_gateway)
    assert "gateway_http_requests_total{" in text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert "gateway_videos_created_total" in names and [n for n in names if n.endswith("_created")] == []


async def test_configured_series_exist_before_traffic(dialect_gateway: RunningGateway) -> None:
    snapshot = samples(await scrape(dialect_gateway))
    for kind in ("connect", "timeout", "reset", "4xx", "5xx", "payload"):
        assert (
            "gateway_upstream_errors_total",
            frozenset({"provider": "dialect", "kind": kind}.items()),
        ) in snapshot
    assert (
        "gateway_videos_finished_total",
        frozenset({"model": "sora-remote", "provider": "dialect", "status": "failed"}.items()),
    ) in snapshot


async def test_upstream_latency_is_timed_per_operation(dialect_gateway: RunningGateway) -> None:
    """A poll's few milliseconds and an upload's seconds are not one distribution: each provider call
    is timed under the operation it served, so a dashboard can show poll latency on its own."""
    before = samples(await scrape(dialect_gateway))
    client = dialect_gateway.sdk()
    video = await client.videos.create(prompt="timed", model="sora-remote")
    while video.status not in ("completed", "failed"):
        video = await client.videos.retrieve(video.id)
    assert video.status == "completed"
    await client.videos.download_content(video.id)
    await client.videos.delete(video.id)
    after = samples(await scrape(dialect_gateway))

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    def timed(operation: str) -> float:
        return grew(
            "gateway_upstream_request_duration_seconds_count",
            provider="dialect",
            model="sora-remote",
            operation=operation,
        )

    assert timed("create") == 1
    assert timed("retrieve") >= 2  # queued -> in_progress -> completed
    assert timed("content") == 1  # the download itself (its video was known to be completed)
    assert timed("delete") == 1
    assert timed("remix") == 0
    assert grew(
        "gateway_upstream_requests_total", provider="dialect", deployment="dialect/upstream-sora"
    ) == timed("create") + timed("retrieve") + timed("content") + timed("delete")


async def test_upstream_latency_series_exist_before_traffic(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """With the label set it is observed with: the provider, the public model and the operation, for
    the two operations every video model serves."""
    text = (
        gateway_yaml(tmp_path)
        .replace("providers:\n", "providers:\n  primed: {kind: openai, base_url: 'http://127.0.0.1:9/v1'}\n")
        .replace("models:\n", "models:\n  primed-model: {provider: primed, model: upstream-name}\n")
    )
    gw = await start_gateway(text)
    snapshot = samples(await scrape(gw))
    for operation in ("create", "retrieve"):
        labels = {"provider": "primed", "model": "primed-model", "operation": operation}
        assert value(snapshot, "gateway_upstream_request_duration_seconds_count", **labels) == 0
        assert ("gateway_upstream_request_duration_seconds_count", frozenset(labels.items())) in snapshot
        assert (
            "gateway_upstream_request_duration_seconds_bucket",
            frozenset({**labels, "le": "+Inf"}.items()),
        ) in snapshot


async def test_metrics_key_and_path_are_configurable(start_gateway: StartGateway, tmp_path: Path) -> None:
    gw = await start_gateway(gateway_yaml(tmp_path, extra="metrics: {key: scrape-secret-1}"))
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as response:
        refusal = await response.json(content_type=None)  # the envelope, as every error is
        assert response.status == 401 and refusal["error"]["code"] == "invalid_metrics_key", refusal
    assert "gateway_http_requests_total" in await scrape(gw, {"Authorization": "Bearer scrape-secret-1"})
    for wrong in ("scrape-secret-1", "Basic scrape-secret-1", "Bearer scrape-secret-2"):
        async with (
            aiohttp.ClientSession() as session,
            session.get(gw.url + "/metrics", headers={"Authorization": wrong}) as response,
        ):
            assert response.status == 401, wrong

    off = await start_gateway(gateway_yaml(tmp_path / "off", extra="metrics: {enabled: false}"))
    async with aiohttp.ClientSession() as session, session.get(off.url + "/metrics") as response:
        assert response.status == 404


async def test_promtool_accepts_a_real_scrape(dialect_gateway: RunningGateway, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    await traffic(dialect_gateway)
    text = await scrape(dialect_gateway)
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


async def test_a_head_request_counts_no_body_bytes(local_gateway: RunningGateway) -> None:
    """``curl -I`` on a download sends headers only: the bytes counter must not add the file's size."""
    done = await local_gateway.sdk().videos.create_and_poll(prompt="head", size="320x240", seconds="1")
    before = samples(await scrape(local_gateway))
    async with (
        aiohttp.ClientSession() as session,
        session.head(
            f"{local_gateway.url}/v1/videos/{done.id}/content",
            headers={"Authorization": f"Bearer {ALPHA_KEY}"},
        ) as response,
    ):
        assert response.status == 200 and int(response.headers["Content-Length"]) > 1000
    after = samples(await scrape(local_gateway))
    route = {"route": "/v1/videos/{video_id}/content"}
    assert value(after, "gateway_response_body_bytes_total", **route) == value(
        before, "gateway_response_body_bytes_total", **route
    )
    heads = {**route, "method": "HEAD", "code": "200"}
    assert (
        value(after, "gateway_http_requests_total", **heads)
        == value(before, "gateway_http_requests_total", **heads) + 1
    ), "counted, once (the registry is the process's: earlier tests' HEADs are in it too)"


async def test_access_log_line_has_what_on_call_needs(
    dialect_gateway: RunningGateway, session_log: Path
) -> None:
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            dialect_gateway.url + "/v1/videos",
            json={"prompt": "log me", "model": "sora-remote"},
            headers={"Authorization": f"Bearer {BETA_KEY}", "X-Request-ID": "grep-me-42"},
        )
        assert response.status == 200
    lines = [json.loads(line) for line in session_log.read_text().splitlines() if "grep-me-42" in line]
    (entry,) = [line for line in lines if line["event"] == "request"]
    assert entry["route"] == "/v1/videos" and entry["method"] == "POST" and entry["status"] == 200
    assert entry["model"] == "sora-remote" and entry["provider"] == "dialect"
    assert entry["deployment"] == "dialect/upstream-sora" and entry["upstream_status"] == 200
    assert entry["key_name"] == "beta" and entry["bytes_in"] > 0 and entry["bytes_out"] > 0
    assert entry["duration_ms"] >= entry["upstream_ms"] >= 0 and entry["overhead_ms"] >= 0
    assert BETA_KEY not in json.dumps(entry)


@pytest.fixture
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """A stream for a test's own ``configure``; the session's logging comes back afterwards."""
    saved, handlers = structlog.get_config(), logging.getLogger().handlers[:]
    monkeypatch.setattr(logs, "_level", logs._level)
    yield io.StringIO()
    structlog.configure(**saved)
    logging.getLogger().handlers[:] = handlers


def test_an_event_with_a_traceback_is_one_line_in_the_console_format_too(fresh_log: io.StringIO) -> None:
    configure("console", "info", fresh_log)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("unhandled_error", path="/v1/videos")
    (line,) = fresh_log.getvalue().splitlines()
    assert "unhandled_error" in line and "ValueError: boom" in line


def test_a_line_logged_while_serving_a_request_names_it(fresh_log: io.StringIO) -> None:
    """Code that knows no request (a full disk under an upload, an ejection) logs the request it
    happened for; a line that names its own request keeps it."""
    configure("json", "info", fresh_log)

    def serve() -> None:
        logs.REQUEST_ID.set("req_abc")
        log.error("storage_failed", reason="No space left on device")
        log.info("request", request_id="req_own")

    contextvars.copy_context().run(serve)
    log.info("gateway_started")
    lines = [json.loads(line) for line in fresh_log.getvalue().splitlines()]
    assert [line.get("request_id") for line in lines] == ["req_abc", "req_own", None]


def test_redaction_and_one_line_per_event(fresh_log: io.StringIO) -> None:
    configure("json", "info", fresh_log)
    register_secrets(["sk-provider-very-secret"])
    log.info(
        "upstream said\r\nforged: line",
        detail="used sk-provider-very-secret here",
        authorization="Bearer abcdef123456",
        api_key="xyz",
        note="header Bearer tok_123456789 seen",
    )
    lines = fresh_log.getvalue().splitlines()
    assert len(lines) == 1
    entry: dict[str, Any] = json.loads(lines[0])
    assert "sk-provider-very-secret" not in lines[0] and "abcdef123456" not in lines[0]
    assert "tok_123456789" not in lines[0] and entry["api_key"] == "[REDACTED]"
    assert "\r" not in entry["event"] and "\n" not in entry["event"]


@pytest.mark.parametrize(
    ("text", "kept", "gone"),
    [
        ("Authorization: Key 0a1b2c3d-4e5f-6789:abcdef0123456789", "Key [REDACTED]", "abcdef0123456789"),
        ("Basic dXNlcjpwYXNzd29yZDEyMw==", "Basic [REDACTED]", "dXNlcjpw"),
        ("API key AIzaSyA1234567890abcdefghijklmnopqrstuv not valid", "not valid", "AIzaSyA123"),
        ("token ya29.a0AfH6SMBx-secret was revoked", "was revoked", "a0AfH6SMBx"),
        ("kling jwt eyJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJhayJ9.c2lnbmF0dXJl refused", "refused", "c2lnbmF0dXJl"),
        (
            "https://b.oss-cn-beijing.aliyuncs.com/v.mp4?Expires=1&OSSAccessKeyId=LTAI5t&Signature=a%2Bb",
            "Expires=1",
            "LTAI5t",
        ),
        (
            "https://s3.example/v.mp4?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=5f0c",
            "X-Amz-Signature=[REDACTED]",
            "AKIA",
        ),
        ("https://dnznrvs05pmza.cloudfront.net/v.mp4?_jwt=eyJz.eyJ0.c2ln", "v.mp4?_jwt=[REDACTED]", "c2ln"),
        ("https://files.example/f?key=AIzaXYZ123&alt=media", "alt=media", "AIzaXYZ123"),
    ],
)
def test_credentials_are_masked_by_their_shape(text: str, kept: str, gone: str) -> None:
    """What providers put in messages and URLs besides the configured keys: minted tokens (Kling's
    JWTs, Vertex's OAuth tokens), fal's Key scheme, and the secret parameters of signed URLs."""
    masked = scrub(text)
    assert kept in masked and gone not in masked, masked
    assert scrub("the key expired; see req_5c6f0a1b for /v1/videos/{video_id}") == (
        "the key expired; see req_5c6f0a1b for /v1/videos/{video_id}"
    )


def test_a_secret_that_begins_with_another_is_masked_whole() -> None:
    """Secrets were replaced in no particular order: a key that begins with a shorter one (a
    deployment's key and a longer one derived from it) could be left with its tail showing."""
    short, long = "sk-team-7f3a9c", "sk-team-7f3a9c-vertex-2b8d41e6"
    register_secrets([short])
    register_secrets([long])
    assert scrub(f"sent {long} and {short}") == "sent [REDACTED] and [REDACTED]"


def test_a_secret_is_masked_as_json_and_urls_spell_it() -> None:
    """A provider quoting its key in raw JSON (an event stream's data line, ``/`` written ``\\/``)
    or in a URL (percent-encoded) showed it: only the key as written in the config was masked."""
    secret = "AKc9/Tq+7v=Zw2"
    register_secrets([secret])
    for quoted in (
        '{"detail": "key AKc9\\/Tq+7v=Zw2 refused"}',
        "https://x.example/?k=AKc9%2FTq%2B7v%3DZw2&a=1",
    ):
        masked = scrub(quoted)
        assert "[REDACTED]" in masked and "Tq" not in masked, masked


def test_library_records_take_the_same_way(fresh_log: io.StringIO) -> None:
    """aiohttp's and asyncio's records (standard logging) come out as the gateway's own lines,
    redacted and on one line each; below warning they are chatter and stay out."""
    configure("json", "debug", fresh_log)
    register_secrets(["sk-provider-very-secret"])
    try:
        raise RuntimeError("upstream key sk-provider-very-secret\nin a traceback")
    except RuntimeError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    logging.getLogger("aiohttp.client").info("chatter")
    lines = fresh_log.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["event"] == "Task exception was never retrieved" and entry["level"] == "error"
    assert entry["logger"] == "asyncio" and "RuntimeError" in entry["exception"]
    assert "sk-provider-very-secret" not in lines[0] and "timestamp" in entry


async def test_malformed_http_is_one_warning_and_a_count_without_the_clients_bytes(
    dialect_gateway: RunningGateway, session_log: Path
) -> None:
    """aiohttp itself would log a request its parser refuses as an error, with a traceback quoting the
    bad header line. The gateway logs one warning with the parser's reason and the answer's request ID,
    and counts it under the route ``malformed``."""
    before = samples(await scrape(dialect_gateway))
    seen = len(session_log.read_text().splitlines())
    reader, writer = await asyncio.open_connection(dialect_gateway.server.host, dialect_gateway.server.port)
    writer.write(b"GET /v1/videos HTTP/1.1\r\nHost: x\r\nAuthorization " + ALPHA_KEY.encode() + b"\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    await writer.wait_closed()
    status_line, *lines = head.decode().split("\r\n")
    assert status_line.split()[1] == "400"
    (request_id,) = [
        line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("x-request-id:")
    ]
    new = session_log.read_text().splitlines()[seen:]
    text = "\n".join(new)
    (entry,) = [e for e in map(json.loads, new) if e["event"] == "bad_http_request"]
    assert entry["level"] == "warning" and entry["request_id"] == request_id
    assert entry["reason"] == "Invalid header token" and entry["remote"] == "127.0.0.1"
    assert ALPHA_KEY not in text and "Traceback" not in text

    reader, writer = await asyncio.open_connection(dialect_gateway.server.host, dialect_gateway.server.port)
    writer.write(bytes.fromhex("16030100a5010000a10303") + b"\x00" * 32)  # a TLS ClientHello's start
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).split()[1] == b"400"
    writer.close()
    await writer.wait_closed()
    logged = [json.loads(line) for line in session_log.read_text().splitlines()[seen:]]
    tls = [e for e in logged if e["event"] == "bad_http_request"][1:]
    assert [(e["level"], e["reason"]) for e in tls] == [("info", "Received HTTPS traffic on an HTTP port")]

    after = samples(await scrape(dialect_gateway))
    counted = {"route": "malformed", "method": "other", "code": "400"}
    assert (
        value(after, "gateway_http_requests_total", **counted)
        == value(before, "gateway_http_requests_total", **counted) + 2
    )
    assert value(after, "gateway_http_requests_in_flight", route="malformed") == 0


async def test_other_methods_do_not_mint_series(dialect_gateway: RunningGateway) -> None:
    """Methods the API does not use (WebDAV's, say) are counted as ``other``: a client cannot grow the
    label set, whatever method token its HTTP parser lets through. They are counted under the route of
    their path, which is no unknown path."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ALPHA_KEY}"}) as session:
        for method in ("PROPFIND", "PURGE", "MKCOL"):
            async with session.request(method, dialect_gateway.url + "/v1/videos") as response:
                assert (
                    response.status == 405
                    and (await response.json())["error"]["code"] == "method_not_allowed"
                )
    text = await scrape(dialect_gateway)
    assert "PROPFIND" not in text and "PURGE" not in text
    after = samples(text)
    assert value(after, "gateway_http_requests_total", route="/v1/videos", method="other", code="405") == 3
    assert value(after, "gateway_http_requests_total", route="unmatched", method="other", code="405") == 0


async def test_a_preflight_and_a_wrong_method_count_under_their_route(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A browser's preflight comes before its calls, per URL: labelled ``unmatched`` with the paths
    no route has, every video a page polled added to what reads as scanners on the dashboard."""
    app = "https://studio.example.com"
    gw = await start_gateway(gateway_yaml(tmp_path, extra=f"cors: {{allow_origins: ['{app}']}}"))
    before = samples(await scrape(gw))
    asked = {"Origin": app, "Access-Control-Request-Method": "GET"}
    async with aiohttp.ClientSession() as session:
        async with session.options(gw.url + "/v1/videos/video_123", headers=asked) as response:
            assert response.status == 204
        async with session.put(gw.url + "/v1/videos", headers={"Authorization": f"Bearer {ALPHA_KEY}"}) as r:
            assert r.status == 405
        async with session.get(gw.url + "/nothing-here") as response:
            assert response.status == 404
    after = samples(await scrape(gw))

    def counted(route: str, method: str, code: str) -> float:
        labels = {"route": route, "method": method, "code": code}
        return value(after, "gateway_http_requests_total", **labels) - value(
            before, "gateway_http_requests_total", **labels
        )

    assert counted("/v1/videos/{video_id}", "OPTIONS", "204") == 1
    assert counted("/v1/videos", "PUT", "405") == 1
    assert counted("unmatched", "GET", "404") == 1
    assert counted("unmatched", "OPTIONS", "204") == counted("unmatched", "PUT", "405") == 0


async def test_an_overhead_of_seconds_has_a_bucket(local_gateway: RunningGateway) -> None:
    """An upload read slowly is the gateway's time (it cannot send it on before): with 1 s the top
    bucket, every quantile above it read as exactly 1 s on the dashboard."""

    async def slow() -> AsyncIterator[bytes]:
        yield b'{"prompt": "slow", '
        await asyncio.sleep(1.2)
        yield b'"size": "320x240"}'

    before = samples(await scrape(local_gateway))
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {ALPHA_KEY}", "Content-Type": "application/json"}
        async with session.post(local_gateway.url + "/v1/videos", data=slow(), headers=headers) as response:
            assert response.status == 200
            assert float(response.headers["x-gateway-overhead-ms"]) > 1000
    after = samples(await scrape(local_gateway))

    def added(le: str) -> float:
        labels = {"route": "/v1/videos", "le": le}
        return value(after, "gateway_overhead_seconds_bucket", **labels) - value(
            before, "gateway_overhead_seconds_bucket", **labels
        )

    assert (added("1.0"), added("2.5")) == (0, 1)
