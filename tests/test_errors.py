"""Every failure leaves as the OpenAI error envelope with a fitting status; none hangs or 500s."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from multidict import CIMultiDict

from tests.conftest import ALPHA_KEY, RunningGateway, StartGateway, gateway_yaml
from tests.fakes.openai_upstream import FakeOpenAIUpstream

AUTH = {"Authorization": f"Bearer {ALPHA_KEY}"}


async def request(
    gw: RunningGateway, method: str, path: str, **kwargs: Any
) -> tuple[int, CIMultiDict[str], Any]:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.url + path, headers=headers, **kwargs) as response,
    ):
        raw = await response.read()
        return response.status, CIMultiDict(response.headers), json.loads(raw) if raw else None


def assert_envelope(
    body: Any, headers: CIMultiDict[str], *, code: str | None = None, param: str | None = None
) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert headers["Content-Type"].startswith("application/json")
    assert headers.get("x-request-id")
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body


def multipart(fields: dict[str, str], boundary: str = "XyZ") -> bytes:
    out = b""
    for name, value in fields.items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
    return out + f"--{boundary}--\r\n".encode()


async def test_bad_bodies(local_gateway: RunningGateway) -> None:
    gw = local_gateway
    status, headers, body = await request(
        gw, "POST", "/v1/videos", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert_envelope(body, headers, code="invalid_json")

    status, headers, body = await request(
        gw, "POST", "/v1/videos", data=b"[1, 2]", headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert_envelope(body, headers, code="invalid_json")

    broken = b'--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\nno blank line'
    status, headers, body = await request(
        gw, "POST", "/v1/videos", data=broken, headers={"Content-Type": "multipart/form-data; boundary=XyZ"}
    )
    assert status == 400
    assert_envelope(body, headers, code="invalid_multipart")

    status, headers, body = await request(
        gw,
        "POST",
        "/v1/videos",
        data=multipart({"prompt": "x"}),
        headers={"Content-Type": "multipart/form-data"},
    )
    assert status == 400
    assert_envelope(body, headers, code="invalid_multipart")

    status, headers, body = await request(
        gw,
        "POST",
        "/v1/videos",
        data=b"prompt=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 415
    assert_envelope(body, headers, code="unsupported_media_type")

    status, headers, body = await request(gw, "POST", "/v1/videos", json={"prompt": "x", "model": "sora-9"})
    assert status == 404
    assert_envelope(body, headers, code="model_not_found", param="model")

    status, headers, body = await request(gw, "POST", "/v1/videos", json={"prompt": "x", "size": "999x3"})
    assert status == 400
    assert_envelope(body, headers, param="size")

    status, headers, body = await request(
        gw, "POST", "/v1/videos", json={"prompt": "x", "seconds": "forever"}
    )
    assert status == 400
    assert_envelope(body, headers, param="seconds")

    status, headers, body = await request(gw, "POST", "/v1/videos", json={"size": "320x240"})
    assert status == 400
    assert_envelope(body, headers, param="prompt")


async def test_bad_queries_routes_and_methods(local_gateway: RunningGateway) -> None:
    gw = local_gateway
    for query, param in (
        ("limit=500", "limit"),
        ("limit=-1", "limit"),
        ("order=sideways", "order"),
        ("after=video_" + "0" * 32, "after"),
    ):
        status, headers, body = await request(gw, "GET", f"/v1/videos?{query}")
        assert status == 400, query
        assert_envelope(body, headers, param=param)

    for path in ("/v1/nothing-here", "/v1/videos/", "/nothing", "/v1/openai/videos/a/b/c"):
        status, headers, body = await request(gw, "GET", path)
        assert status == 404, path
        assert_envelope(body, headers, code="not_found")
    status, headers, body = await request(gw, "GET", "/v1/nothing-here", headers={"Authorization": ""})
    assert status == 401, "an unknown API route still asks for a key first"
    status, headers, body = await request(gw, "PUT", "/v1/videos")
    assert status == 405
    assert_envelope(body, headers, code="method_not_allowed")
    assert headers["Allow"] == "GET,HEAD,POST"
    status, headers, body = await request(gw, "POST", "/v1/openai/videos/video_x/content")
    assert status == 405 and headers["Allow"] == "GET,HEAD"
    status, headers, _ = await request(gw, "HEAD", "/v1/nothing-here")
    assert status == 404 and headers["x-request-id"]

    video = await gw.sdk().videos.create(prompt="not yet", size="320x240")
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video.id}/content?variant=poster")
    assert status == 400
    assert_envelope(body, headers, param="variant")
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video.id}/content")
    assert status == 409
    assert_envelope(body, headers, code="video_not_ready")


async def test_body_limits(start_gateway: StartGateway, tmp_path: Path) -> None:
    gw = await start_gateway(
        gateway_yaml(tmp_path, extra="limits: {max_upload_bytes: 4096, max_json_bytes: 2048}")
    )
    big = multipart({"prompt": "x", "model": "sora-2", "pad": "y" * 10_000})
    status, headers, body = await request(
        gw, "POST", "/v1/videos", data=big, headers={"Content-Type": "multipart/form-data; boundary=XyZ"}
    )
    assert status == 413
    assert_envelope(body, headers, code="request_too_large")

    async def chunked() -> AsyncIterator[bytes]:
        yield b'--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'
        for _ in range(10):
            yield b"z" * 1000

    status, headers, body = await request(
        gw,
        "POST",
        "/v1/videos",
        data=chunked(),
        headers={"Content-Type": "multipart/form-data; boundary=XyZ"},
    )
    assert status == 413
    assert_envelope(body, headers, code="request_too_large")

    status, headers, body = await request(gw, "POST", "/v1/videos", json={"prompt": "p" * 3000})
    assert status == 413
    assert_envelope(body, headers, code="request_too_large")


async def test_upstream_refusals_are_passed_on(dialect_gateway: RunningGateway) -> None:
    gw = dialect_gateway
    status, headers, body = await request(
        gw, "POST", "/v1/videos", json={"prompt": "[400]", "model": "sora-remote"}
    )
    assert status == 400
    assert_envelope(body, headers, param="size", code="invalid_value")
    assert body["error"]["message"] == "Invalid size for this model."

    status, headers, body = await request(
        gw, "POST", "/v1/videos", json={"prompt": "[429]", "model": "sora-remote"}
    )
    assert status == 429 and headers["Retry-After"] == "7"
    assert_envelope(body, headers)
    assert "Rate limit" in body["error"]["message"]

    with pytest.raises(openai.RateLimitError) as caught:
        await gw.sdk().videos.create(prompt="[429]", model="sora-remote")
    assert caught.value.request_id

    status, headers, body = await request(
        gw, "POST", "/v1/videos", json={"prompt": "[500]", "model": "sora-remote"}
    )
    assert status == 502
    assert_envelope(body, headers, code="upstream_error")

    status, headers, body = await request(
        gw, "POST", "/v1/videos", json={"prompt": "[nonjson]", "model": "sora-remote"}
    )
    assert status == 502
    assert_envelope(body, headers)
    assert "not JSON" in body["error"]["message"]


async def test_an_upstream_refusing_the_gateways_key_is_not_the_clients_bad_key(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """The client's key never goes upstream, so an upstream 401 is about the gateway's own key (one
    rotated at the provider, say): every route says so, and none answers invalid_api_key, which would
    send the application's developer after a key that is fine."""
    gw, (fake, _) = dialect_gateway, upstream
    video = await gw.sdk().videos.create(prompt="x", model="sora-remote")
    fake.api_key = "rotated-at-the-provider"
    for method, path, payload in (
        ("POST", "/v1/videos", {"prompt": "x", "model": "sora-remote"}),
        ("GET", f"/v1/videos/{video.id}", None),
        ("GET", f"/v1/videos/{video.id}/content", None),
        ("POST", f"/v1/videos/{video.id}/remix", {"prompt": "y"}),
        ("DELETE", f"/v1/videos/{video.id}", None),
    ):
        status, headers, body = await request(gw, method, path, json=payload)
        assert status == 401, (path, body)
        assert_envelope(body, headers, code="upstream_auth_failed")
        assert body["error"]["message"].startswith("The provider rejected the gateway's API key."), body


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_upstream_unreachable_is_502(start_gateway: StartGateway, tmp_path: Path) -> None:
    gw = await start_gateway(gateway_yaml(tmp_path, upstream_url=f"http://127.0.0.1:{closed_port()}"))
    status, headers, body = await request(
        gw, "POST", "/v1/videos", json={"prompt": "x", "model": "sora-remote"}
    )
    assert status == 502
    assert_envelope(body, headers)
    assert "connect" in body["error"]["message"]


async def test_upstream_timeout_is_504_without_retry(
    start_gateway: StartGateway, tmp_path: Path, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    text = gateway_yaml(tmp_path, upstream_url=upstream[1]).replace(
        "timeouts: {connect: 2, read: 2, request: 3}", "timeouts: {connect: 1, read: 0.5, request: 1}"
    )
    gw = await start_gateway(text)
    started = time.monotonic()
    status, headers, body = await request(
        gw, "POST", "/v1/videos", json={"prompt": "[hang]", "model": "sora-remote"}
    )
    assert status == 504 and time.monotonic() - started < 5
    assert_envelope(body, headers)
    assert headers.get("x-should-retry") == "false"


async def test_no_traceback_and_request_ids(local_gateway: RunningGateway) -> None:
    status, headers, _ = await request(
        local_gateway, "GET", "/v1/videos", headers={"X-Request-ID": "trace-123"}
    )
    assert status == 200 and headers["x-request-id"] == "trace-123"
    status, headers, _ = await request(
        local_gateway, "GET", "/v1/videos", headers={"X-Request-ID": "bad id <>"}
    )
    assert headers["x-request-id"].startswith("req_")
    status, headers, _ = await request(local_gateway, "GET", "/healthz")
    assert status == 200 and headers["x-request-id"]


async def test_stalled_upload_is_cut_off(start_gateway: StartGateway, tmp_path: Path) -> None:
    gw = await start_gateway(gateway_yaml(tmp_path, extra="limits: {client_idle_timeout: 0.3}"))

    async def stall() -> AsyncIterator[bytes]:
        yield b'--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nslow'
        await asyncio.sleep(3)
        yield b"\r\n--XyZ--\r\n"

    started = time.monotonic()
    status, headers, body = await request(
        gw, "POST", "/v1/videos", data=stall(), headers={"Content-Type": "multipart/form-data; boundary=XyZ"}
    )
    assert status == 408 and time.monotonic() - started < 2.5
    assert_envelope(body, headers, code="request_timeout")


JSON = {"Content-Type": "application/json"}


async def json_routes(gw: RunningGateway) -> list[str]:
    """Every route that takes a JSON body; remix needs a video of the caller's."""
    source = await gw.sdk().videos.create(prompt="remix source", size="320x240")
    return [
        "/v1/videos",
        f"/v1/videos/{source.id}/remix",
        "/v1/videos/edits",
        "/v1/videos/extensions",
        "/v1/videos/characters",
    ]


HOSTILE_JSON = {
    "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    "nested past the gateway's depth": b'{"prompt": "a", "x": ' + b"[" * 900 + b"]" * 900 + b"}",
    "5000-digit integer": b'{"prompt": "a", "n": ' + b"1" * 5000 + b"}",
    "NaN": b'{"prompt": "a", "seconds": NaN}',
    "Infinity": b'{"prompt": "a", "seconds": Infinity}',
    "-Infinity": b'{"prompt": "a", "x": {"y": [-Infinity]}}',
    "overflowing float": b'{"prompt": "a", "seconds": 1e999}',
    "lone surrogate": b'{"prompt": "a", "video": {"id": "\\ud800"}}',
}


@pytest.mark.parametrize("raw", HOSTILE_JSON.values(), ids=HOSTILE_JSON.keys())
async def test_hostile_json_is_400_invalid_json_on_every_json_route(
    local_gateway: RunningGateway, raw: bytes
) -> None:
    for path in await json_routes(local_gateway):
        status, headers, body = await request(local_gateway, "POST", path, data=raw, headers=JSON)
        assert status == 400, (path, body)
        assert_envelope(body, headers, code="invalid_json")


async def test_non_finite_numbers_never_reach_the_upstream(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    raw = b'{"model": "sora-remote", "prompt": "x", "seconds": NaN}'
    status, headers, body = await request(dialect_gateway, "POST", "/v1/videos", data=raw, headers=JSON)
    assert status == 400
    assert_envelope(body, headers, code="invalid_json")
    assert upstream[0].requests("POST", "/v1/videos") == []


async def test_list_limit_takes_only_short_ascii_digits(local_gateway: RunningGateway) -> None:
    gw = local_gateway
    for _ in range(2):
        await gw.sdk().videos.create(prompt="listed", size="320x240")
    for limit in ("%C2%B2", "%EF%BC%95", "9" * 5000, "-0", "", "1.0", "+5", " 5", "0x10"):
        status, headers, body = await request(gw, "GET", f"/v1/videos?limit={limit}")
        assert status == 400, limit
        assert_envelope(body, headers, param="limit")
    status, _, page = await request(gw, "GET", "/v1/videos?limit=1")
    assert status == 200 and len(page["data"]) == 1
    assert page["has_more"] is True and page["last_id"] == page["data"][0]["id"]
    status, _, page = await request(gw, "GET", "/v1/videos?limit=007")
    assert status == 200 and len(page["data"]) == 2 and page["has_more"] is False


async def test_list_limit_zero_is_an_empty_page_that_says_whether_there_are_videos(
    local_gateway: RunningGateway,
) -> None:
    """The API's limit goes from 0 (its OpenAPI minimum); the gateway refused 0 with a 400. A page of
    none tells whether the key has videos; the SDK's iteration stops at it (no data, no cursor)."""
    gw = local_gateway
    client = gw.sdk()
    empty = await client.videos.list(limit=0)
    assert empty.data == [] and empty.has_more is False
    await client.videos.create(prompt="listed", size="320x240")
    status, _, page = await request(gw, "GET", "/v1/videos?limit=0")
    assert status == 200, page
    assert page == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": True}
    assert [v.id async for v in await client.videos.list(limit=0)] == []


async def raw_exchange(gw: RunningGateway, head: bytes, body: bytes) -> tuple[int, Any]:
    """One request written byte for byte (headers no client library would send) and its answer."""
    assert gw.server.host is not None and gw.server.port is not None
    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    try:
        writer.write(
            b"POST /v1/videos HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
            + f"Authorization: Bearer {ALPHA_KEY}\r\nContent-Length: {len(body)}\r\n".encode()
            + head
            + b"\r\n"
            + body
        )
        answer = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), json.loads(rest.partition(b"\r\n\r\n")[2])


async def test_non_ascii_multipart_boundary_is_400(local_gateway: RunningGateway) -> None:
    for boundary in ("☃".encode(), b"\xe9", "caf\u00e9".encode()):
        body = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n'
        body += b"--" + boundary + b"--\r\n"
        head = b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
        status, answer = await raw_exchange(local_gateway, head, body)
        assert status == 400, boundary
        assert answer["error"]["code"] == "invalid_multipart"


async def test_undecodable_content_encoding_is_400(local_gateway: RunningGateway, session_log: Path) -> None:
    """A 400 that closes the connection: the rest of such a body cannot be read either, and reading on
    (as aiohttp does after an answer) logged its error again, as an unhandled one with a traceback."""
    logged = session_log.stat().st_size
    for encoding in ("gzip", "deflate"):
        for data, content_type in (
            (b'{"prompt": "not compressed at all"}', "application/json"),
            (multipart({"prompt": "not compressed either"}), "multipart/form-data; boundary=XyZ"),
        ):
            status, headers, body = await request(
                local_gateway,
                "POST",
                "/v1/videos",
                data=data,
                headers={"Content-Type": content_type, "Content-Encoding": encoding},
            )
            assert status == 400, (encoding, content_type)
            assert_envelope(body, headers, code="invalid_body")
            assert encoding in body["error"]["message"]
            assert headers["Connection"] == "close"
    await asyncio.sleep(0.2)
    with session_log.open(encoding="utf-8") as log:
        log.seek(logged)
        errors = [line for line in log if '"level": "error"' in line]
    assert errors == []


async def test_unsupported_media_type_says_what_was_sent(local_gateway: RunningGateway) -> None:
    status, headers, body = await request(
        local_gateway, "POST", "/v1/videos", data=b"prompt", headers={"Content-Type": "garbage"}
    )
    assert status == 415
    assert_envelope(body, headers, code="unsupported_media_type")
    assert "'garbage'" in body["error"]["message"] and "octet-stream" not in body["error"]["message"]
    status, answer = await raw_exchange(local_gateway, b"", b"prompt")
    assert status == 415 and "no Content-Type" in answer["error"]["message"]


async def test_prompt_of_the_wrong_type_is_invalid_type(local_gateway: RunningGateway) -> None:
    routes = [path for path in await json_routes(local_gateway) if not path.endswith("/characters")]
    for path in routes:
        for prompt in (123, ["a"], {"text": "a"}, True):
            status, headers, body = await request(local_gateway, "POST", path, json={"prompt": prompt})
            assert status == 400, (path, prompt)
            assert_envelope(body, headers, code="invalid_type", param="prompt")


@pytest.mark.parametrize(
    ("field", "value"),
    [("seconds", True), ("seconds", 8.5), ("seconds", ["8"]), ("size", 1280), ("size", {"w": 1280})],
)
async def test_seconds_and_size_of_the_wrong_type_are_invalid_type(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], field: str, value: Any
) -> None:
    """``"seconds": true`` went on to an OpenAI-dialect upstream as it was, and the video showed
    ``"True"`` until the provider said otherwise; a number for size, a list for seconds likewise."""
    fake, _ = upstream
    body = {"prompt": "typed", "model": "sora-remote", field: value}
    status, headers, answer = await request(dialect_gateway, "POST", "/v1/videos", json=body)
    assert status == 400, answer
    assert_envelope(answer, headers, code="invalid_type", param=field)
    assert fake.requests("POST", "/v1/videos") == []
