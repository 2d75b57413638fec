"""Hardening: faults end in bounded time with the right error and leak nothing; hostile input never
makes a 500; the key check is constant-time; schemathesis holds the gateway to its own OpenAPI document."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import gc
import gzip
import hashlib
import hmac
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import unused_port
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.app import build_app
from gateway.auth import REMEMBERED, KeyRing
from gateway.bodies import MAX_JSON_DEPTH, SINGLE_FIELDS, Spool
from gateway.config import ClientKey
from gateway.context import RequestContext
from gateway.providers.base import Call
from gateway.state import GATEWAY
from tests.conftest import (
    ALPHA_KEY,
    ENV,
    RunningGateway,
    ServeGateway,
    StartGateway,
    call,
    gateway_yaml,
    load,
)
from tests.fakes.faulty_upstream import FaultyUpstream
from tests.test_cli import free_port
from tests.test_resilience import AUTH, config
from tests.test_upstream_failures import HEAD_PARTS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
async def gw(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> RunningGateway:
    return await start_gateway(
        config(
            tmp_path,
            faulty[1],
            """
        m:
          - {provider: up, model: primary}
        twice:
          - {provider: up, model: primary, name: first}
          - {provider: up, model: primary, name: second}
    """,
            extra="resilience: {read_attempts: 2, backoff_seconds: 0.01}",
        )
    )


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle() -> tuple[int, int]:
    """Let closing transports finish, then count open descriptors and running tasks."""
    for _ in range(5):
        await asyncio.sleep(0.05)
    gc.collect()
    return open_fds(), len(asyncio.all_tasks())


async def big_upload(model: str = "m") -> AsyncIterator[bytes]:
    yield b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n' + model.encode() + b"\r\n"
    yield b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nbig\r\n'
    yield b'--b\r\nContent-Disposition: form-data; name="input_reference"; filename="x.png"\r\n\r\n'
    for _ in range(64):
        yield b"\0" * 65536
    yield b"\r\n--b--\r\n"


async def fault_cycle(gw: RunningGateway, fake: FaultyUpstream, video_id: str) -> None:
    """One round of every fault; each must end in bounded time with the right error."""

    async def case(fault: str, method: str, path: str, **kwargs: Any) -> tuple[int, Any, float]:
        started = time.monotonic()
        fake.behaviour["primary"] = fault
        status, _, body = await call(gw, method, path, **kwargs)
        fake.behaviour["primary"] = "ok"
        return status, body, time.monotonic() - started

    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    fake.reset_next_upload = True
    status, body, seconds = await case("ok", "POST", "/v1/videos", data=big_upload(), headers=multipart)
    assert status == 502 and body["error"]["type"] == "upstream_error" and seconds < 5

    status, body, seconds = await case("hang", "POST", "/v1/videos", json={"prompt": "x", "model": "m"})
    assert status == 504 and seconds < 5

    status, body, seconds = await case("nonjson", "POST", "/v1/videos", json={"prompt": "x", "model": "m"})
    assert status == 502 and "not JSON" in body["error"]["message"]

    # Two deployments: the upload is spooled (past 1 MiB into a temp file) to be replayed on failover;
    # both refuse, and the spool must be gone afterwards (the descriptor count says so).
    twice = {"Content-Type": "multipart/form-data; boundary=b"}
    status, body, seconds = await case(
        "status:503", "POST", "/v1/videos", data=big_upload("twice"), headers=twice
    )
    assert status == 503 and seconds < 5
    assert len(fake.hits_for("primary")) >= 2 and len(fake.hits[-1].body) == len(fake.hits[-2].body)

    storm = await asyncio.gather(
        *(case("status:503", "POST", "/v1/videos", json={"prompt": "x", "model": "m"}) for _ in range(30))
    )
    assert {s for s, _, _ in storm} == {503} and max(t for _, _, t in storm) < 5

    status, body, seconds = await case("reset", "GET", f"/v1/videos/{video_id}")
    assert status in (200, 502) and seconds < 5

    # Polls of a video still in progress go to the provider on every call (gateway/http1.py).
    _, _, polled = await call(gw, "POST", "/v1/videos", json={"prompt": "polled", "model": "m"})
    poll = f"/v1/videos/{polled['id']}"
    for fault, expected in (("hang", 504), ("reset", 502), ("nonjson", 502), ("status:500", 502)):
        status, body, seconds = await case(fault, "GET", poll)
        assert status == expected and body["error"]["type"] == "upstream_error" and seconds < 5, fault
    fake.behaviour["primary"] = "status:503"
    started = time.monotonic()
    polls = await asyncio.gather(*(call(gw, "GET", poll) for _ in range(30)))
    assert {s for s, _, _ in polls} == {503} and time.monotonic() - started < 5
    status, body, _ = await case("ok", "GET", poll)
    assert status == 200 and body["status"] == "completed"

    async with aiohttp.ClientSession() as session:
        for fault in ("truncate", "truncate-chunked"):  # the client must see the cut, not an end
            fake.behaviour["primary"] = fault
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.get(f"{gw.url}/v1/videos/{video_id}/content", headers=AUTH) as response:
                    assert response.status == 200
                    await response.read()
        fake.behaviour["primary"] = "drip:0.05"
        async with session.get(f"{gw.url}/v1/videos/{video_id}/content", headers=AUTH) as response:
            assert response.status == 200 and len(await response.read()) == 16396
    fake.behaviour["primary"] = "ok"


async def test_faults_end_in_time_with_the_right_error_and_leak_nothing(
    gw: RunningGateway, faulty: tuple[FaultyUpstream, str]
) -> None:
    """Pools may hold connections after the first round; later rounds must not add to them."""
    fake, _ = faulty
    _, _, video = await call(gw, "POST", "/v1/videos", json={"prompt": "warm up", "model": "m"})
    await call(gw, "GET", f"/v1/videos/{video['id']}")
    await fault_cycle(gw, fake, video["id"])
    fds_before, tasks_before = await settle()
    for _ in range(2):
        await fault_cycle(gw, fake, video["id"])
    fds_after, tasks_after = await settle()
    assert fds_after <= fds_before + 4, f"descriptors leaked: {fds_before} -> {fds_after}"
    assert tasks_after <= tasks_before, f"tasks leaked: {tasks_before} -> {tasks_after}"
    assert (await call(gw, "GET", "/healthz"))[0] == 200


async def test_a_finished_request_leaves_nothing_for_the_cyclic_garbage_collector(
    dialect_gateway: RunningGateway,
) -> None:
    """A request's objects go when it ends. A reference cycle through a request (its context, an
    upstream call, an exception's frames) leaves them to the cyclic collector instead, whose passes
    cost a poll about a tenth of its CPU and, over a large heap, pause the gateway for milliseconds."""
    video = await dialect_gateway.sdk().videos.create(prompt="warm up", model="sora-remote")
    paths = [
        ("GET", f"/v1/videos/{video.id}", None),
        ("GET", f"/v1/openai/videos/{video.id}", None),
        ("GET", "/v1/videos?limit=5", None),
        ("GET", "/v1/videos/video_unknown", None),
        ("GET", "/v1/nowhere", None),
        ("PATCH", "/v1/videos", None),
        ("POST", "/v1/videos", {"prompt": "another", "model": "sora-remote"}),
        ("POST", "/v1/videos", {"prompt": 5}),
        ("DELETE", f"/v1/videos/{video.id}", None),
    ]
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            for method, path, body in paths:
                async with session.request(method, dialect_gateway.url + path, json=body) as response:
                    assert response.status < 500, await response.text()
                    await response.read()
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, (web.BaseRequest, RequestContext, Call))]
        assert left == [], "requests waited for the cyclic collector"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def test_key_check_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured key is compared, with hmac.compare_digest on fixed-length digests, every time."""
    keys = tuple(ClientKey(f"k{i}", bytes([i]) * 32) for i in range(5))
    ring = KeyRing(keys)
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented in ("nearly-right-key", "x", "k" * 500):
        calls.clear()
        with pytest.raises(Exception, match="Incorrect API key"):
            ring.authenticate(f"Bearer {presented}")
        assert calls == [(32, 32)] * len(keys)


def test_a_key_that_authenticated_is_remembered_and_a_wrong_one_never_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The next request with a key that worked is a lookup; a wrong key is hashed and compared with
    every digest each time, and the memory of spellings of right keys stays bounded."""
    ring = KeyRing((ClientKey("a", hashlib.sha256(b"sk-right").digest()), ClientKey("b", bytes(32))))
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert ring.authenticate("Bearer sk-right").name == "a" and len(compared) == 2
    assert ring.authenticate("Bearer sk-right").name == "a" and len(compared) == 2, "remembered"
    for wrong in ("Bearer sk-righ", "Bearer sk-right2", "Bearer sk-right2"):
        compared.clear()
        with pytest.raises(Exception, match="Incorrect API key"):
            ring.authenticate(wrong)
        assert len(compared) == 2, "a wrong key is never remembered"
    for spaces in range(1, REMEMBERED + 50):
        assert ring.authenticate("Bearer" + " " * spaces + "sk-right").name == "a"
    assert len(ring._known) <= REMEMBERED


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A gateway process on the embedded default config, for fuzzers that use blocking clients."""
    port = free_port()
    data = tmp_path_factory.mktemp("fuzz")
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-format", "json"],
        cwd=data,
        env={
            **os.environ,
            **ENV,
            "VIDEO_GATEWAY_DATA_DIR": str(data / "data"),
            "VIDEO_GATEWAY_API_KEY": ALPHA_KEY,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/healthz")
            break
        except OSError:
            time.sleep(0.1)
    yield port
    process.terminate()
    process.wait(timeout=20)


def send(
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    content_type: str | None = None,
    headers: Mapping[str, str | bytes] | None = None,
) -> tuple[int, bytes]:
    """One request; a header value given as bytes goes on the wire as they are (UTF-8, say)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    sent: dict[str, str | bytes] = {"Authorization": f"Bearer {ALPHA_KEY}", **(headers or {})}
    if content_type is not None:
        sent["Content-Type"] = content_type
    connection.request(method, path, body=body, headers=sent)
    response = connection.getresponse()
    return response.status, response.read()


def assert_envelope_or_video(status: int, raw: bytes) -> None:
    assert status < 500, raw
    body = json.loads(raw)
    if status == 200:
        assert body["object"] == "video"
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"}


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(
    body=st.dictionaries(
        st.sampled_from(["prompt", "model", "size", "seconds", "input_reference", "stream", "x"]),
        json_values,
        max_size=6,
    )
)
def test_fuzz_json_creates(served: int, body: dict[str, Any]) -> None:
    if isinstance(body.get("prompt"), str) and "[fail]" in body["prompt"]:
        body["prompt"] = "ok"
    assert_envelope_or_video(
        *send(served, "POST", "/v1/videos", json.dumps(body).encode(), "application/json")
    )


@FUZZ
@given(
    raw=st.binary(max_size=300),
    boundary=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20),
)
@example(raw=b"x", boundary="g%r;L*")  # aiohttp's content_type raised IndexError on its parameters
def test_fuzz_multipart_creates(served: int, raw: bytes, boundary: str) -> None:
    body = f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'.encode() + raw
    status, answer = send(served, "POST", "/v1/videos", body, f"multipart/form-data; boundary={boundary}")
    assert_envelope_or_video(status, answer)


@FUZZ
@given(video_id=st.text(min_size=1, max_size=80))
@example(video_id="\n{")  # matched neither the video route ({} excluded) nor a catch-all "." stopped at \n
def test_fuzz_video_ids(served: int, video_id: str) -> None:
    path = "/v1/videos/" + quote(video_id, safe="")
    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/content")):
        status, raw = send(served, method, path + suffix)
        assert status in (404, 405) or (status == 200 and video_id in ("edits", "extensions")), raw
        if status == 404 and "/" not in video_id:
            # /v1/videos/characters/content is the characters route, asked for character "content"
            expected = ("character_not_found",) if (video_id, suffix) == ("characters", "/content") else ()
            assert json.loads(raw)["error"]["code"] in ("video_not_found", "not_found", *expected)


def error_of(status: int, raw: bytes) -> dict[str, Any]:
    assert_envelope_or_video(status, raw)
    assert status >= 400, raw
    error: dict[str, Any] = json.loads(raw)["error"]
    return error


FEW = settings(FUZZ, max_examples=60)
JSON_ROUTES = ("/v1/videos", "/v1/videos/edits", "/v1/videos/extensions", "/v1/videos/characters")
finite_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_REFUSED = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", '"\\ud800"', '"a\\udfff"'])


@st.composite
def hostile_json(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A JSON body with one odd value at some depth, and whether the gateway must refuse it."""
    nesting = draw(st.integers(0, 3 * MAX_JSON_DEPTH))
    kind = draw(st.sampled_from(["refused", "digits", "plain"]))
    if kind == "refused":
        value, refused = draw(_REFUSED), True
    elif kind == "digits":  # past 308 digits an integer is beyond a double: 4300 broke int() itself
        digits = draw(st.integers(1, 6000))
        value, refused = "-" * draw(st.booleans()) + "9" * digits, digits > 308
    else:
        value, refused = json.dumps(draw(finite_json)), False
    field = draw(st.sampled_from(["seconds", "size", "x", "video", "input_reference"]))
    document = f'{{"prompt": "fuzz [fail]", "{field}": {"[" * nesting}{value}{"]" * nesting}}}'
    too_deep = 1 + nesting + (0 if refused else depth(json.loads(value))) > MAX_JSON_DEPTH
    return document.encode(), refused or too_deep


def depth(value: Any) -> int:
    """How many levels of arrays and objects ``value`` has."""
    if isinstance(value, dict | list):
        return 1 + max(map(depth, value.values() if isinstance(value, dict) else value), default=0)
    return 0


@FEW
@given(route=st.sampled_from(JSON_ROUTES), document=hostile_json())
def test_fuzz_hostile_json_documents(served: int, route: str, document: tuple[bytes, bool]) -> None:
    raw, refused = document
    status, answer = send(served, "POST", route, raw, "application/json")
    assert_envelope_or_video(status, answer)
    if refused:
        assert error_of(status, answer)["code"] == "invalid_json", raw[:200]


@pytest.fixture(scope="module")
def listed(served: int) -> int:
    """The fuzz gateway with at least two videos, so that a page of one has more after it."""
    for _ in range(2):
        assert (
            send(served, "POST", "/v1/videos", b'{"prompt": "listed [fail]"}', "application/json")[0] == 200
        )
    return served


@FEW
@given(limit=st.one_of(st.text(max_size=5), st.integers(-3, 130).map(str), st.sampled_from(["9" * 5000])))
def test_fuzz_list_limits(listed: int, limit: str) -> None:
    status, raw = send(listed, "GET", "/v1/videos?limit=" + quote(limit, safe=""))
    if limit.isascii() and limit.isdigit() and len(limit) <= 3 and 0 <= int(limit) <= 100:
        page = json.loads(raw)
        assert status == 200 and min(1, int(limit)) <= len(page["data"]) <= int(limit)
        if page["data"]:
            assert page["last_id"] == page["data"][-1]["id"], "has_more needs last_id to follow it"
        else:
            assert page["has_more"] and page["last_id"] is None, "a page of none: there are videos"
    else:
        assert error_of(status, raw)["param"] == "limit", limit


@FEW
@given(boundary=st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=20))
def test_fuzz_multipart_boundaries(served: int, boundary: str) -> None:
    wire = boundary.encode()
    body = b"--" + wire + b'\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nfuzz [fail]\r\n'
    body += b"--" + wire + b"--\r\n"
    header = b"multipart/form-data; boundary=" + wire
    status, answer = send(served, "POST", "/v1/videos", body, headers={"Content-Type": header})
    assert_envelope_or_video(status, answer)
    if not boundary.isascii():
        assert error_of(status, answer)["code"] == "invalid_multipart"


@FEW
@given(
    # not deflate: aiohttp takes a bad zlib header as raw deflate, and leaves the handler waiting for
    # the client's idle timeout when such a stream ends unfinished (its parser raises at the end of
    # the message without telling the body's reader)
    encoding=st.sampled_from(["gzip", "x-gzip"]),
    raw=st.binary(min_size=1, max_size=200),
    content_type=st.sampled_from(["application/json", "multipart/form-data; boundary=b"]),
)
def test_fuzz_undecodable_bodies(served: int, encoding: str, raw: bytes, content_type: str) -> None:
    status, answer = send(served, "POST", "/v1/videos", raw, content_type, {"Content-Encoding": encoding})
    assert status < 500, answer
    if answer.startswith(b"{"):  # aiohttp itself answers a few in plain text before the gateway sees them
        assert_envelope_or_video(status, answer)


def multipart(fields: list[tuple[str, str]]) -> bytes:
    out = b"".join(
        f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields
    )
    return out + b"--b--\r\n"


_FIELD_VALUES = {
    "model": "sora-2",
    "prompt": "fuzz [fail]",
    "size": "320x240",
    "seconds": "4",
    "video[id]": "video_" + "0" * 32,
    "tag": "t",
}


@FEW
@given(
    route=st.sampled_from(JSON_ROUTES[:3]),
    names=st.lists(st.sampled_from(sorted(_FIELD_VALUES)), min_size=1, max_size=7),
)
def test_fuzz_repeated_multipart_fields(served: int, route: str, names: list[str]) -> None:
    raw = multipart([(name, _FIELD_VALUES[name]) for name in names])
    status, answer = send(served, "POST", route, raw, "multipart/form-data; boundary=b")
    assert_envelope_or_video(status, answer)
    repeated = [name for i, name in enumerate(names) if name in names[:i] and name in SINGLE_FIELDS]
    if repeated:
        error = error_of(status, answer)
        assert (error["param"], error["code"]) == (repeated[0], "duplicate_parameter"), names


# finite: "Infinity" is no JSON, and refused as such (test_fuzz_hostile_json_documents)
_VIDEO_REFS = st.one_of(finite_json, st.builds(lambda video_id: {"id": video_id}, finite_json))


@FEW
@given(
    route=st.sampled_from(JSON_ROUTES[1:3]),
    video=_VIDEO_REFS,
    fields=st.lists(st.sampled_from(["prompt", "seconds", "model", "video[id]", "x"]), unique=True),
)
def test_fuzz_edits_and_extensions_without_a_video_of_their_own(
    served: int, route: str, video: Any, fields: list[str]
) -> None:
    """No uploaded file and no ID of the caller's: never a new video, and a non-text ID is a 400."""
    status, answer = send(
        served,
        "POST",
        route,
        json.dumps({"prompt": "fuzz [fail]", "seconds": "4", "video": video}).encode(),
        "application/json",
    )
    error = error_of(status, answer)
    if isinstance(video, dict) and "id" in video and not isinstance(video["id"], str):
        assert (status, error["param"], error["code"]) == (400, "video", "invalid_type"), video
    values = {**_FIELD_VALUES, "video[id]": "video_" + "f" * 32, "x": "y"}
    form = multipart([(name, values[name]) for name in fields])
    error = error_of(*send(served, "POST", route, form, "multipart/form-data; boundary=b"))
    assert error["param"] in ("video", "seconds", "prompt"), (fields, error)


@pytest.mark.parametrize(
    "extra",
    [
        "",
        "server: {public_base_url: 'http://gw.example'}\n        metrics: {path: /internal/metrics}",
        "metrics: {enabled: false}",
    ],
)
async def test_the_openapi_document_describes_every_route(
    start_gateway: StartGateway, tmp_path: Path, extra: str
) -> None:
    """What the fuzzers are held to is every route this gateway serves (hosted files and metrics
    where the config has them), and no other."""
    gw = await start_gateway(gateway_yaml(tmp_path, extra=extra))
    status, _, document = await call(gw, "GET", "/openapi.json")
    assert status == 200
    described = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    served = {
        (route.method, route.resource.canonical)
        for route in gw.app.router.routes()
        if route.method != "HEAD" and route.handler.route != "unmatched"  # HEAD comes with GET
    }
    assert described == served
    if "public_base_url" in extra:
        assert {("GET", "/files/{name}"), ("GET", "/internal/metrics")} <= served


async def test_the_openapi_document_lists_the_answers_every_route_gives(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """Statuses the gateway answers that its document did not list: a 417 on every route (any
    expectation but 100-continue), a part (206) and a refused range (416) of a file, and the
    metrics key's refusal, in the envelope now."""
    extra = "server: {public_base_url: 'http://gw.example'}\n        metrics: {key: scrape-secret-1}"
    gw = await start_gateway(gateway_yaml(tmp_path, extra=extra))
    status, _, document = await call(gw, "GET", "/openapi.json")
    assert status == 200
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert "417" in operation["responses"], (method, path)
    for path in ("/v1/videos/{video_id}/content", "/files/{name}"):
        assert {"200", "206", "304", "412", "416"} <= set(document["paths"][path]["get"]["responses"]), path
    refused = document["paths"]["/metrics"]["get"]["responses"]["401"]["content"]
    assert set(refused) == {"application/json"}
    status, _, body = await call(gw, "GET", "/healthz", headers={"Expect": "bogus"})
    assert status == 417 and body["error"]["code"] == "expectation_failed"


async def test_the_openapi_document_takes_the_bodies_the_gateway_takes(local_gateway: RunningGateway) -> None:
    """A remix as JSON or a form (openai-videos-api §8.10), an extension's ``seconds`` as text or a
    JSON number (§8.2), as the handlers take them: the fuzzers then try them too."""
    status, _, document = await call(local_gateway, "GET", "/openapi.json")
    assert status == 200
    remix = document["paths"]["/v1/videos/{video_id}/remix"]["post"]["requestBody"]["content"]
    assert set(remix) == {"application/json", "multipart/form-data"}
    extension = document["paths"]["/v1/videos/extensions"]["post"]["requestBody"]["content"]
    assert extension["application/json"]["schema"]["properties"]["seconds"]["type"] == ["string", "integer"]
    assert extension["multipart/form-data"]["schema"]["properties"]["seconds"]["type"] == "string"
    # the forms the README shows and the API takes (§2.1, §2.5): a reference by URL or file ID, a
    # source video by its ID
    form = extension["multipart/form-data"]["schema"]
    assert "video[id]" in form["properties"] and "video" not in form["required"]
    schemas = document["components"]["schemas"]
    assert {"input_reference[image_url]", "input_reference[file_id]"} <= set(
        schemas["CreateVideoForm"]["properties"]
    )
    by_object, by_url = schemas["CreateVideo"]["properties"]["input_reference"]["anyOf"]
    assert by_object["properties"].keys() == {"image_url", "file_id"} and by_url == {"type": "string"}
    # a provider's own refusal passes on with its status (a 409 for a job's state)
    assert "4XX" in document["paths"]["/v1/videos/{video_id}"]["delete"]["responses"]


async def test_the_openapi_document_names_operations_as_openai_does(local_gateway: RunningGateway) -> None:
    """Code generators make method names of operation IDs: OpenAI's own under /v1 (openai-videos-api
    §1), unique ones without a slash under the /v1/openai alias."""
    status, _, document = await call(local_gateway, "GET", "/openapi.json")
    assert status == 200
    ids = {
        (method, path): operation["operationId"]
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    assert len(set(ids.values())) == len(ids) and not [i for i in ids.values() if "/" in i]
    assert {ids[("post", "/v1/videos")], ids[("get", "/v1/videos/{video_id}")]} == {"createVideo", "GetVideo"}
    assert ids[("get", "/v1/videos/{video_id}/content")] == "RetrieveVideoContent"
    assert ids[("post", "/v1/openai/videos/extensions")] == "CreateVideoExtendOpenai"


@pytest.mark.skipif(
    shutil.which("schemathesis", path=str(Path(sys.executable).parent)) is None and not os.environ.get("CI"),
    reason="schemathesis not installed",
)
def test_schemathesis_finds_no_server_errors_or_schema_violations(served: int) -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "schemathesis"),
            "run",
            f"http://127.0.0.1:{served}/openapi.json",
            "-H",
            f"Authorization: Bearer {ALPHA_KEY}",
            "--max-examples",
            "8",
            "--seed",
            "1",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance,response_headers_conformance",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:]


def test_json_beyond_64_bit_integers_is_still_written() -> None:
    """orjson refuses such integers (a provider may send one); the standard library takes over."""
    from gateway import jsonio

    value = {"expires_at": 2**70, "id": "video_x", "ok": [1.5, None, True]}
    assert json.loads(jsonio.dumps(value)) == value
    assert jsonio.loads(jsonio.dumps({"id": "video_x"})) == {"id": "video_x"}
    with pytest.raises(jsonio.JSONDecodeError):
        jsonio.loads(b"\xff not json")


async def exchange(gw: RunningGateway, *parts: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """Bytes sent as they are, each part a moment after the last: the answer's status, headers and
    body, and whether the gateway then closed the connection (rather than answer again)."""
    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    try:
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.1)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
        closed = await asyncio.wait_for(reader.read(1), 10) == b""
        return int(status_line.split()[1]), headers, body, closed
    finally:
        writer.close()


SECRET_IN_A_BAD_LINE = b"Authorization Bearer sk-secret-in-a-bad-line"
# What a client sends (its bytes hold "zz" wherever the parser might quote them) -> the parser's reason
MALFORMED = {
    "header line without a colon": (
        b"GET /v1/videos HTTP/1.1\r\nHost: x\r\n" + SECRET_IN_A_BAD_LINE + b"\r\n\r\n",
        "Invalid header token",
    ),
    "method with a separator": (
        b"GET(X /v1/videos HTTP/1.1\r\nHost: x\r\n\r\n",
        "Expected space after method",
    ),
    "letters in Content-Length": (
        b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Length: 12zz\r\n\r\n",
        "Invalid character in Content-Length",
    ),
    "letters in a chunk size": (
        b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "Invalid character in chunk size",
    ),
    "Content-Length and Transfer-Encoding": (
        b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nzz",
        "Transfer-Encoding can't be present with Content-Length",
    ),
    "no Host": (b"GET /v1/videos/zz HTTP/1.1\r\n\r\n", "Missing 'Host' header in request"),
    "bare line feeds": (
        b"GET /v1/videos/zz HTTP/1.1\nHost: x\n\n",
        "Bad status line: Expected CRLF after version",
    ),
    "TLS on the plain port": (
        bytes.fromhex("16030100a5010000a10303") + b"zz" * 40,
        "Received HTTPS traffic on an HTTP port",
    ),
    "header over 16 KiB": (
        b"GET /v1/videos HTTP/1.1\r\nHost: x\r\nX-Big: " + b"zz" * 9000 + b"\r\n\r\n",
        "Got more than 16384 bytes when reading",
    ),
    "request line over 8 KiB": (
        b"GET /v1/videos/" + b"zz" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "Got more than 8190 bytes when reading",
    ),
}


@pytest.mark.parametrize(("raw", "reason"), MALFORMED.values(), ids=MALFORMED.keys())
async def test_what_the_http_parser_refuses_gets_the_envelope(
    gw: RunningGateway, raw: bytes, reason: str
) -> None:
    """aiohttp answers these itself, before any route: in text/plain quoting the client's bytes,
    unless the gateway's connections answer them (gateway.connections)."""
    status, headers, body, closed = await exchange(gw, raw)
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert headers["x-request-id"].startswith("req_") and closed
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_http_request"
    assert error["param"] is None and error["message"] == f"The request is not valid HTTP: {reason}."
    assert b"zz" not in body and b"sk-secret" not in body and b"GET(X" not in body, body


OTHER_VERSIONS = {
    "HTTP/2.0": f"GET /v1/videos HTTP/2.0\r\nHost: x\r\nAuthorization: Bearer {ALPHA_KEY}\r\n\r\n",
    "HTTP/0.9": f"GET /v1/videos HTTP/0.9\r\nHost: x\r\nAuthorization: Bearer {ALPHA_KEY}\r\n\r\n",
    "HTTP/2": "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # the preface of HTTP/2 without an upgrade
}


@pytest.mark.parametrize(("version", "raw"), OTHER_VERSIONS.items(), ids=OTHER_VERSIONS.keys())
async def test_http_versions_other_than_1_get_505_in_a_status_line_clients_read(
    gw: RunningGateway, version: str, raw: str
) -> None:
    """aiohttp's parser lets the first two through, and would answer "HTTP/2.0 200 OK", which an HTTP/1
    client cannot read (Python's http.client raises UnknownProtocol); HTTP/2's preface it refused as
    "Pause on PRI/Upgrade". nginx and Go answer 505, as this does."""
    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    writer.write(raw.encode())
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.split()[:2] in ([b"HTTP/1.0", b"505"], [b"HTTP/1.1", b"505"]), status_line
    status, _, body, closed = await exchange(gw, raw.encode())
    error = json.loads(body)["error"]
    assert status == 505 and closed and error["code"] == "http_version_not_supported"
    assert error["message"] == f"{version} is not supported: send HTTP/1.1 (or 1.0)."


async def test_a_request_target_that_is_no_path_gets_the_envelope(gw: RunningGateway) -> None:
    """``OPTIONS *`` is valid HTTP that no path pattern matches: aiohttp answered it in text/plain."""
    status, headers, body, _ = await exchange(
        gw, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 404 and headers["x-request-id"].startswith("req_")
    assert json.loads(body)["error"]["code"] == "not_found"


async def test_connect_is_refused_in_the_envelope(gw: RunningGateway) -> None:
    """A client configured with the gateway as its proxy sends CONNECT host:port, a target no route
    can match: aiohttp answered it in text/plain."""
    status, headers, body, closed = await exchange(
        gw, b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == 405 and closed and headers["x-request-id"].startswith("req_")
    assert json.loads(body)["error"] == {
        "message": "CONNECT is not supported: the gateway is no forward proxy.",
        "type": "invalid_request_error",
        "param": None,
        "code": "method_not_allowed",
    }


async def test_an_error_that_escapes_a_handler_gets_the_envelope(gateway_server: ServeGateway) -> None:
    """Every gateway route catches its own errors; one that escaped (a bug) still answers the envelope."""

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app = web.Application()
    app.router.add_get("/broken", broken)
    server = await gateway_server(app)
    async with aiohttp.ClientSession() as session, session.get(server.make_url("/broken")) as response:
        assert response.status == 500 and response.headers["x-request-id"].startswith("req_")
        assert (await response.json())["error"] == {
            "message": "The gateway failed to handle this request.",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }


request_tokens = st.text(st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=12)
_BODY_HEADERS = ("content-length", "transfer-encoding", "expect")  # a declared body never sent waits


@FEW
@given(
    method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]) | request_tokens,
    path=st.sampled_from(["/v1/videos", "/v1/videos/video_1", "/v1/openai/videos"]).flatmap(
        lambda base: st.builds(lambda tail: base + tail, request_tokens)
    ),
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.x", ""]),
    headers=st.lists(
        st.tuples(
            request_tokens.filter(lambda name: name.strip().lower() not in _BODY_HEADERS), request_tokens
        ),
        max_size=4,
    ),
)
@example(method="GET", path="/v1/videos", version="HTTP/1.1", headers=[("Authorization", "\x00")])
def test_fuzz_raw_requests(
    served: int, method: str, path: str, version: str, headers: list[tuple[str, str]]
) -> None:
    """Requests as bytes on the wire, well-formed or not: every answer is a JSON success or the envelope,
    in time, never a 500."""
    lines = [
        f"{method} {path} {version}".rstrip(),
        "Host: x",
        *(f"{name}: {value}" for name, value in headers),
    ]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass")
    with socket.create_connection(("127.0.0.1", served), timeout=10) as sock:
        sock.sendall(raw)
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        body = response.read()
    # no version at all is an HTTP/0.9 request line, to the parser
    assert response.status < 500 or (response.status == 505 and version in ("HTTP/2.0", ""))
    document = json.loads(body)
    if response.status >= 400:
        assert set(document["error"]) == {"message", "type", "param", "code"}, document


CHUNKED_HEAD = (
    "POST /v1/videos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
    "Transfer-Encoding: chunked\r\nContent-Type: {content_type}\r\n\r\n"
)
FORM_START = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n--b\r\n'


@pytest.mark.parametrize(
    ("content_type", "first_chunk"),
    [("application/json", b'{"prompt": "x", '), ("multipart/form-data; boundary=b", FORM_START)],
    ids=["json", "multipart streamed to the upstream"],
)
async def test_a_chunked_body_that_breaks_off_is_refused_at_once(
    gw: RunningGateway, faulty: tuple[FaultyUpstream, str], content_type: str, first_chunk: bytes
) -> None:
    """A bad chunk size after the first chunk: aiohttp's C parser would leave the handler waiting
    for more body until the idle timeout (a minute). The client gets the 400 at once, and only it."""
    fake, _ = faulty
    head = CHUNKED_HEAD.format(key=ALPHA_KEY, content_type=content_type).encode()
    chunk = b"%x\r\n%s\r\n" % (len(first_chunk), first_chunk)
    started = time.monotonic()
    status, _, body, closed = await exchange(gw, head, chunk, b"zz\r\nnot a chunk\r\n")
    assert time.monotonic() - started < 5
    assert status == 400 and closed
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_body" and "chunk size" in error["message"], error
    assert b"zz" not in body
    assert fake.hits_for("primary") == [], "the provider got a create from a body that broke off"


def idle_config(tmp_path: Path, url: str, client_idle_timeout: int) -> str:
    """The faulty fake as model ``m``, with its 1 s read timeout, and this client idle timeout."""
    models = "m:\n  - {provider: up, model: primary}"
    return config(tmp_path, url, models, extra=f"limits: {{client_idle_timeout: {client_idle_timeout}}}")


async def test_a_client_that_stops_taking_a_download_is_let_go(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """A client that takes no more of an answer (a phone gone to sleep mid-download, a NAT that
    dropped the flow) must not hold its request, and the provider's connection under it, for ever.
    After ``limits.client_idle_timeout`` without taking a byte, the gateway lets it go."""
    fake, url = faulty
    gw = await start_gateway(idle_config(tmp_path, url, client_idle_timeout=1))
    _, _, video = await call(gw, "POST", "/v1/videos", json={"prompt": "x", "model": "m"})
    assert (await call(gw, "GET", f"/v1/videos/{video['id']}"))[2]["status"] == "completed"
    fake.behaviour["primary"] = "large"  # 256 MiB, far more than the sockets' buffers hold
    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    writer.write(
        f"GET /v1/videos/{video['id']}/content HTTP/1.1\r\nHost: gw\r\n"
        f"Authorization: Bearer {ALPHA_KEY}\r\n\r\n".encode()
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.transport.pause_reading()  # and the socket's receive window closes
    gateway = gw.app[GATEWAY]
    started = time.monotonic()
    while (fake.streaming or gateway.in_flight) and time.monotonic() - started < 20:
        await asyncio.sleep(0.1)
    assert fake.streaming == 0, "the provider's connection is still held for a client that left"
    assert gateway.in_flight == 0, "the download's request is still being served"
    writer.transport.resume_reading()
    received = 0
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
            received += len(chunk)
    assert received < 256 * 1024 * 1024, "the connection should have been cut, not finished"
    writer.close()


async def test_a_client_that_stops_taking_a_file_sent_by_sendfile_is_let_go(
    gateway_server: ServeGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """Files the gateway serves itself (local renders, kept Vertex videos, images hosted for Luma)
    go out by sendfile(), one call with no pause between writes to time: the kernel's option
    ends it all the same."""
    port = unused_port()
    extra = f"server: {{public_base_url: 'http://127.0.0.1:{port}'}}"
    app = build_app(load(idle_config(tmp_path, faulty[1], client_idle_timeout=1) + extra))
    await gateway_server(app, port=port)
    gateway = app[GATEWAY]
    assert gateway.hosted is not None
    url = yarl.URL(await gateway.hosted.put(bytes(64 * 1024 * 1024), "image/png"))  # past any buffer
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {url.raw_path_qs} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.transport.pause_reading()
    started = time.monotonic()
    while gateway.in_flight and time.monotonic() - started < 20:
        await asyncio.sleep(0.1)
    assert gateway.in_flight == 0, "the file is still being sent to a client that left"
    writer.close()


async def test_a_provider_that_stops_taking_an_upload_is_given_up_on(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """A provider that stops reading an upload (and never answers) gets the provider's
    ``timeouts.read`` (1 s here), as one that stops answering does: a 504, with the client told not
    to retry on its own, since the provider may hold part of the job."""
    fake, url = faulty
    gw = await start_gateway(idle_config(tmp_path, url, client_idle_timeout=60))

    async def upload() -> AsyncIterator[bytes]:
        yield HEAD_PARTS
        for _ in range(1024):  # 64 MiB, far more than the sockets' buffers hold
            yield bytes(65536)
        yield b"\r\n--b--\r\n"

    fake.stall_next_upload = True
    started = time.monotonic()
    try:
        status, headers, body = await call(
            gw,
            "POST",
            "/v1/videos",
            data=upload(),
            headers={"Content-Type": "multipart/form-data; boundary=b"},
            timeout=aiohttp.ClientTimeout(total=20),
        )
    finally:
        fake.stall_released.set()
    assert time.monotonic() - started < 15
    assert status == 504 and headers["x-should-retry"] == "false", body
    assert body["error"]["message"] == "Upstream error: the provider stopped taking the request."


async def test_idle_timeouts_longer_than_the_socket_option_holds_still_serve(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """The kernel's option takes milliseconds in a C int (24.8 days at most); a config that asks
    for longer (any finite number passes the schema) gets the longest, not a failed connection."""
    _, url = faulty
    ten_billion = 10_000_000_000  # seconds
    text = idle_config(tmp_path, url, ten_billion).replace("read: 1,", f"read: {ten_billion},")
    gw = await start_gateway(text)
    status, _, video = await call(gw, "POST", "/v1/videos", json={"prompt": "x", "model": "m"})
    assert status == 200, video
    status, _, content = await call(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and content.startswith(b"\0\0\0\x18ftyp")


@pytest.mark.parametrize(
    ("model", "first_part"),
    [
        ("twice", b""),  # two deployments: the whole upload is held on disk, for a failover
        ("m", b'--b\r\nContent-Disposition: form-data; name="input_reference"; filename="a.png"\r\n\r\n'),
    ],
    ids=["held for failover", "image ahead of the model field"],
)
async def test_a_full_disk_under_an_upload_is_a_503_to_retry(
    gw: RunningGateway,
    faulty: tuple[FaultyUpstream, str],
    session_log: Path,
    monkeypatch: pytest.MonkeyPatch,
    model: str,
    first_part: bytes,
) -> None:
    """Part of an upload waits in a temporary file (past 1 MiB) when it must be replayed or when
    the model field comes after the image. A full disk there is the gateway's trouble and passes as
    other uploads end: 503 with Retry-After and an error log line that says why, not a 500 with a
    traceback, and the provider gets nothing."""

    def disk_full(f: Any, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Spool, "_append", staticmethod(disk_full))

    async def body() -> AsyncIterator[bytes]:
        if first_part:
            yield first_part + bytes(2 * 1024 * 1024) + b"\r\n"
        async for piece in big_upload(model):
            yield piece

    logged = len(session_log.read_text().splitlines())
    status, headers, answer = await call(
        gw, "POST", "/v1/videos", data=body(), headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert status == 503 and headers["Retry-After"] == "5", answer
    assert answer["error"]["code"] == "storage_unavailable"
    assert "No space left on device" in answer["error"]["message"]
    assert faulty[0].hits_for("primary") == []
    events = [json.loads(line) for line in session_log.read_text().splitlines()[logged:]]
    failures = [e for e in events if e["event"] == "storage_failed"]
    assert failures and failures[0]["reason"] == "No space left on device"
    assert failures[0]["request_id"] == {k.lower(): v for k, v in headers.items()}["x-request-id"]
    assert not [e for e in events if e["event"] == "unhandled_error"]


async def test_a_json_body_of_millions_of_objects_is_refused_before_it_is_parsed(
    local_gateway: RunningGateway,
) -> None:
    """A body of 11 million empty objects gzips to 32 KB and held the event loop for 12 s (parsed,
    then walked for its depth) and 770 MiB. More than 10 000 objects and arrays are refused unread."""
    wide = b'{"prompt": "x", "extra": [' + b"{}," * 20_000 + b"{}]}"
    status, _, body = await call(
        local_gateway, "POST", "/v1/videos", data=wide, headers={"Content-Type": "application/json"}
    )
    assert status == 400 and body["error"]["code"] == "invalid_json", body
    assert "10000 objects and arrays" in body["error"]["message"]
    fine = b'{"prompt": "a {brace} or [two]", "size": "320x240", "extra": [' + b"{}," * 100 + b"{}]}"
    status, _, body = await call(
        local_gateway, "POST", "/v1/videos", data=fine, headers={"Content-Type": "application/json"}
    )
    assert status == 200, body


async def test_a_form_of_thousands_of_parts_is_refused(local_gateway: RunningGateway) -> None:
    """Each part of a form costs a parse and each file part a spool (1 MiB in memory, then a temp file
    and a descriptor): 1 500 parts gzipped to 1.6 MB held 1.6 GB; no client sends more than a handful."""
    form = aiohttp.FormData()
    form.add_field("prompt", "x")
    for i in range(150):
        form.add_field(f"extra_{i}", b"\x00" * 10, filename=f"f{i}.bin")
    status, _, body = await call(local_gateway, "POST", "/v1/videos", data=form)
    assert status == 400 and body["error"]["code"] == "invalid_multipart", body
    assert "more than 100 parts" in body["error"]["message"]


async def test_a_local_reference_image_sent_as_a_data_url_is_bounded_like_an_upload(
    local_gateway: RunningGateway,
) -> None:
    """An uploaded image over 20 MiB is refused, but one in a JSON data URL was written into the job:
    gzipped, 31 KB a request kept 22 MB on disk."""
    data_url = "data:image/png;base64," + base64.b64encode(bytes(21 * 1024 * 1024)).decode()
    status, _, body = await call(
        local_gateway,
        "POST",
        "/v1/videos",
        json={"prompt": "x", "input_reference": {"image_url": data_url}},
    )
    assert status == 413 and body["error"]["param"] == "input_reference", body


async def test_an_answer_given_before_a_compressed_body_was_read_closes_the_connection(
    gw: RunningGateway,
) -> None:
    """A 401 for a create whose gzipped body is still coming: aiohttp kept reading and inflating what
    was left of it for up to 10 s before the next request, 6.7 s of CPU for a 2 MB gzip bomb. The
    answer closes the connection instead."""
    bomb = gzip.compress(b" " * 50_000_000)
    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    try:
        writer.write(
            b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-wrong-key-0000\r\n"
            b"Content-Type: application/json\r\nContent-Encoding: gzip\r\n"
            + f"Content-Length: {len(bomb)}\r\n\r\n".encode()
            + bomb[: len(bomb) // 2]
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 401") and b"Connection: close" in head, head
        started = time.monotonic()
        while await asyncio.wait_for(reader.read(65536), 5):
            pass  # the answer's body, then the end
        assert time.monotonic() - started < 2
    finally:
        writer.close()


async def test_request_headers_over_64_kib_are_refused_with_431(gw: RunningGateway) -> None:
    """aiohttp bounds each header line (16 KiB) and their count (128), not their sum: a client that
    never finished its headers held 2 MiB a connection (4 GB for a thousand such clients)."""

    def padding(lines: int) -> bytes:
        return b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 700) for i in range(lines))

    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + padding(100))  # 70 KB, and no end to them
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b" 431 " in head.split(b"\r\n")[0], answer
    assert json.loads(body)["error"]["code"] == "request_header_fields_too_large", body
    status, _, _ = await call(gw, "GET", "/healthz", headers={f"X-Pad-{i}": "a" * 700 for i in range(40)})
    assert status == 200, "28 KB of headers, sent whole, pass"


async def test_a_body_in_an_encoding_the_gateway_does_not_decode_is_refused_with_415(
    local_gateway: RunningGateway,
) -> None:
    """aiohttp decodes gzip and deflate; a body in another coding (``compress``, gzip twice) reached
    the gateway undecoded and was read as plain JSON or a form, and br or zstd got a 400 naming the
    Python packages aiohttp lacked."""
    for encoding in ("compress", "gzip, gzip", "br", "zstd", "x-gzip"):
        status, _, body = await call(
            local_gateway,
            "POST",
            "/v1/videos",
            data=b'{"prompt": "x"}',
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        )
        assert status == 415 and body["error"]["code"] == "unsupported_media_type", (encoding, body)
        assert "install" not in body["error"]["message"], body
    status, _, body = await call(
        local_gateway,
        "POST",
        "/v1/videos",
        data=gzip.compress(b'{"prompt": "x", "size": "320x240"}'),
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    assert status == 200, body


def _unlinked_open_files() -> set[str]:
    """This process's descriptors of files already removed: a spool's temp file still held."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if (target := os.readlink(f"/proc/self/fd/{fd}")).endswith("(deleted)"):
                found.add(f"{fd}:{target}")
    return found


@pytest.mark.parametrize("ending", ["client leaves", "over the limit"])
async def test_an_upload_that_fails_mid_file_leaves_no_temp_file_open(
    start_gateway: StartGateway, tmp_path: Path, ending: str
) -> None:
    """A provider that needs the whole form (the local one here; native adapters alike) has its
    file parts spooled, past 1 MiB into a temp file. One that fails while a file part is being
    written (the client hangs up, the body passes max_upload_bytes) gives that file back at once,
    not at the next full garbage collection, which may be hours of such uploads away. The body is
    chunked: a declared length over the limit is refused before any of it is read."""
    gw = await start_gateway(gateway_yaml(tmp_path, extra="limits: {max_upload_bytes: 8388608}"))
    head = (
        b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nsora-2\r\n'
        b'--B\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n'
        b'--B\r\nContent-Disposition: form-data; name="video"; filename="v.mp4"\r\n'
        b"Content-Type: video/mp4\r\n\r\n"
    )
    megabyte = b"100000\r\n" + bytes(1 << 20) + b"\r\n"  # one chunk of 1 MiB
    gc.collect()
    gc.disable()  # as between two of production's full collections
    try:
        before = _unlinked_open_files()
        reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
        writer.write(
            f"POST /v1/videos HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"
            "Content-Type: multipart/form-data; boundary=B\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + f"{len(head):x}\r\n".encode()
            + head
            + b"\r\n"
        )
        for _ in range(4 if ending == "client leaves" else 12):
            writer.write(megabyte)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        if ending == "client leaves":
            await asyncio.sleep(0.3)
            assert _unlinked_open_files() - before, "the file part is being spooled to a temp file"
            writer.transport.abort()
        else:
            assert (await reader.readline()).startswith(b"HTTP/1.1 413")
            writer.close()
        for _ in range(20):
            await asyncio.sleep(0.05)
            if not _unlinked_open_files() - before:
                break
        assert _unlinked_open_files() - before == set()
    finally:
        gc.enable()
