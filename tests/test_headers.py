"""Which client headers reach an OpenAI-dialect upstream: an allow-list, so no credential of any
scheme and nothing about the client's connection to us crosses (fake: tests/fakes/openai_upstream.py)."""

from __future__ import annotations

import aiohttp

from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway
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
            assert got.headers.get(name) == value, name
    assert posts[0].headers["Content-Type"].startswith("multipart/form-data; boundary=")
    assert posts[1].headers["Content-Type"] == "application/json"
