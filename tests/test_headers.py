"""Which client headers reach an OpenAI-dialect upstream: an allow-list, so no credential of any
scheme and nothing about the client's connection to us crosses (fake: tests/fakes/openai_upstream.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway.providers import ADAPTERS
from gateway.providers.base import AdapterEnv
from tests.conftest import ALPHA_KEY, BETA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway, gateway_yaml, load
from tests.fakes.openai_upstream import FakeOpenAIUpstream

# Credentials of other schemes and clouds, and headers about the client's connection.
KEPT_BACK = {
    "x-goog-api-key": "AIza-client-secret",
    "X-Auth-Token": "client-token",
    "X-Amz-Security-Token": "client-aws-token",
    "Ocp-Apim-Subscription-Key": "client-azure-key",
    "Cookie": "session=client",
    "Cookie2": "session=client2",
    "Authorization2": "Bearer client-again",
    "api-key": "client-api-key",
    "x-api-key": "client-x-api-key",
    "Proxy-Authorization": "Basic Y2xpZW50",
    "OpenAI-Organization": "org-client",
    "Forwarded": "for=203.0.113.9",
    "X-Forwarded-For": "203.0.113.9",
    "X-Forwarded-Host": "internal.example",
    "X-Real-IP": "203.0.113.9",
    "Origin": "https://app.example",
}
PASSED_ON = {"OpenAI-Beta": "videos=v1", "Idempotency-Key": "create-42", "User-Agent": "OpenAI/Python 9"}


async def test_only_allowed_client_headers_reach_the_upstream(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    fake, _ = upstream
    headers = {"Authorization": f"Bearer {ALPHA_KEY}", **KEPT_BACK, **PASSED_ON}
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("model", "sora-remote")
    form.add_field("prompt", "whose headers")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{dialect_gateway.url}/v1/videos", data=form, headers=headers) as r:
            assert r.status == 200, await r.text()
            video_id = (await r.json())["id"]
        async with session.post(
            f"{dialect_gateway.url}/v1/videos/{video_id}/remix", json={"prompt": "again"}, headers=headers
        ) as r:
            assert r.status == 200, await r.text()

    posts = fake.requests("POST", "/v1/videos")
    assert len(posts) == 2
    for got in posts:
        assert got.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        for name, value in KEPT_BACK.items():
            assert name not in got.headers, name
            assert value not in " ".join(got.headers.values()), name
        for name, value in PASSED_ON.items():
            if name == "Idempotency-Key":  # in the tenant's own space (test_tenants)
                assert got.headers[name].endswith(f"-{value}") and got.headers[name] != value
            else:
                assert got.headers.get(name) == value, name
    assert posts[0].headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert posts[1].headers["Content-Type"] == "application/json"


async def test_a_result_host_gets_none_of_the_providers_headers(
    start_gateway: StartGateway, tmp_path: Path, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """The content redirect of the fake (``[redirect]`` → ``/signed/...``) stands for a signed URL."""
    fake, url = upstream
    text = gateway_yaml(tmp_path, upstream_url=url)
    auth_line = next(line for line in text.splitlines() if "${UPSTREAM_KEY}" in line)
    indent = auth_line[: len(auth_line) - len(auth_line.lstrip())]
    text = text.replace(auth_line, f"{auth_line}\n{indent}headers: {{X-Team-Secret: team-secret-4821}}")
    gw = await start_gateway(text)
    client = gw.sdk()
    done = await client.videos.create_and_poll(prompt="[redirect] signed", model="sora-remote")
    content = await client.videos.with_raw_response.download_content(
        done.id, extra_headers={"Range": "bytes=0-9"}
    )
    assert content.status_code == 206 and len(content.content) == 10

    (create,) = fake.requests("POST", "/v1/videos")
    assert create.headers["X-Team-Secret"] == "team-secret-4821", "the provider itself gets its headers"
    (signed,) = fake.requests("GET", "/signed/")
    assert signed.headers["Range"] == "bytes=0-9"
    for name in ("Authorization", "X-Team-Secret", "X-Request-ID"):
        assert name not in signed.headers, name


async def test_a_download_redirected_to_a_host_the_provider_never_named_is_not_followed(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """A redirect is followed only to the provider's own host or its declared result hosts: any
    other host (an open redirect, a compromised answer) would get the client's Range and learn which
    videos it fetches. Here it is "localhost" where the provider is 127.0.0.1."""
    fake, _ = upstream
    client = dialect_gateway.sdk()
    done = await client.videos.create_and_poll(prompt="[redirect elsewhere]", model="sora-remote")
    with pytest.raises(openai.InternalServerError) as refused:
        await client.videos.download_content(done.id)
    assert refused.value.status_code == 502 and "unknown host" in refused.value.message
    assert fake.requests("GET", "/signed/") == []


async def test_no_cookie_a_provider_sets_goes_back_to_it(
    start_gateway: StartGateway, tmp_path: Path, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """A proxy keeps no cookies (nginx passes them to its client and forgets them): a cookie a
    provider set in its answer to one tenant's call was sent back with every later call, whoever's,
    and the gateway's cookie jar grew with each. (Host by name: a jar refuses cookies for an IP.)"""
    fake, url = upstream
    gw = await start_gateway(gateway_yaml(tmp_path, upstream_url=url.replace("127.0.0.1", "localhost")))
    first = await gw.sdk().videos.create(prompt="[cookie] alpha's", model="sora-remote")
    await gw.sdk(BETA_KEY).videos.create(prompt="beta's", model="sora-remote")
    await gw.sdk().videos.retrieve(first.id)
    calls = fake.requests("POST", "/v1/videos") + fake.requests("GET", "/v1/videos/")
    assert len(calls) == 3
    assert [c for c in calls if "Cookie" in c.headers] == []


async def test_a_download_is_marked_for_its_client_alone(
    dialect_gateway: RunningGateway, local_gateway: RunningGateway
) -> None:
    """A provider's CDN marks its file public for a day: relayed as it was, a shared cache in front
    of the gateway could keep one tenant's video and hand it to whoever asks the same URL with
    another key. Every download is Cache-Control: private, and the provider's own file name (which
    may carry its job's ID) stays behind."""
    for gw, model in ((dialect_gateway, "sora-remote"), (local_gateway, "sora-2")):
        client = gw.sdk()
        done = await client.videos.create_and_poll(prompt="mine", model=model, size="320x240", seconds="1")
        content = await client.videos.with_raw_response.download_content(done.id)
        assert content.status_code == 200 and content.headers["Cache-Control"] == "private", model
        assert "up_render" not in content.headers.get("Content-Disposition", ""), model


def test_result_redirects_never_downgrade_to_plain_http(tmp_path: Path) -> None:
    config = load(gateway_yaml(tmp_path, upstream_url="https://videos.example"))
    adapter = ADAPTERS["openai"](config.providers["dialect"], AdapterEnv(data_dir=tmp_path, hosted=None))
    assert adapter.result_host_allowed("https://videos.example/signed/1")
    assert not adapter.result_host_allowed("http://videos.example/signed/1")
    assert not adapter.result_host_allowed("https://elsewhere.example/signed/1")
    plain = load(gateway_yaml(tmp_path, upstream_url="http://127.0.0.1:9"))
    local = ADAPTERS["openai"](plain.providers["dialect"], AdapterEnv(data_dir=tmp_path, hosted=None))
    assert local.result_host_allowed("http://127.0.0.1:9/signed/1"), "a plain-HTTP provider keeps HTTP"


async def test_a_provider_message_quoting_its_credentials_reaches_the_client_redacted(
    start_gateway: StartGateway, tmp_path: Path, aiohttp_server: Any
) -> None:
    """Providers echo what they were sent in their errors ("Incorrect API key provided: sk-...");
    this fake quotes the whole Authorization header in an OpenAI error envelope (reference §3.3)."""

    async def refuse(request: web.Request) -> web.Response:
        echoed = f"Key {request.headers['Authorization']!r} refused; raw {UPSTREAM_KEY}"
        body = {"error": {"message": echoed, "type": "invalid_request_error", "param": None, "code": None}}
        return web.json_response(body, status=401)

    echo = web.Application()
    echo.router.add_route("*", "/{tail:.*}", refuse)
    server = await aiohttp_server(echo)
    gw = await start_gateway(gateway_yaml(tmp_path, upstream_url=str(server.make_url("")).rstrip("/")))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{gw.url}/v1/videos",
            json={"model": "sora-remote", "prompt": "echo"},
            headers={"Authorization": f"Bearer {ALPHA_KEY}"},
        ) as r,
    ):
        text = await r.text()
    assert r.status == 401 and "refused" in text
    assert UPSTREAM_KEY not in text and "[REDACTED]" in text
