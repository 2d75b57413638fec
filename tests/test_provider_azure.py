"""The Azure OpenAI (v1 API) adapter against a fake Azure resource (tests/fakes/azure.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway
from tests.fakes.azure import FakeAzure
from tests.provider_contract import (
    AUTH,
    assert_a_moments_404_ends_nothing,
    assert_refused,
    assert_sdk_roundtrip,
    create,
    png,
    poll_until_done,
    request,
    start_provider_gateway,
)

MODELS = """
    sora-azure:
      provider: native
      model: my-sora-2
    not-deployed:
      provider: native
      model: missing-deployment
"""


def provider_yaml(azure_url: str, *, key: str = "${UPSTREAM_KEY}", options: str = "") -> str:
    return f"""
        kind: azure
        base_url: {azure_url}/openai/v1
        api_key: {key}
        poll_after_ms: 100
        {options}
    """


@pytest.fixture
async def azure(aiohttp_server: Any, media: dict[str, Path]) -> tuple[FakeAzure, str]:
    fake = FakeAzure(api_key=UPSTREAM_KEY, media=media)
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def gw(start_gateway: StartGateway, tmp_path: Path, azure: tuple[FakeAzure, str]) -> RunningGateway:
    return await start_provider_gateway(start_gateway, tmp_path, provider_yaml(azure[1]), MODELS)


def assert_azure_auth(fake: FakeAzure) -> None:
    assert fake.received
    for got in fake.received:
        assert got.headers["api-key"] == UPSTREAM_KEY and "Authorization" not in got.headers
    assert ALPHA_KEY not in str([dict(got.headers) for got in fake.received])


async def test_create_sends_the_deployment_name_with_api_key(
    gw: RunningGateway, azure: tuple[FakeAzure, str]
) -> None:
    fake, _ = azure
    video = await create(gw, model="sora-azure", prompt="a red fox", size="1280x720", seconds="8")
    assert video["model"] == "sora-azure" and video["size"] == "1280x720" and video["seconds"] == "8"
    assert fake.bodies == [{"model": "my-sora-2", "prompt": "a red fox", "size": "1280x720", "seconds": "8"}]
    (sent,) = fake.received
    assert sent.path == "/openai/v1/videos" and sent.query == {}
    assert_azure_auth(fake)

    seen = await poll_until_done(gw, video["id"])
    assert [v["status"] for v in seen] == ["in_progress", "in_progress", "completed"]
    assert [v["progress"] for v in seen] == [33, 66, 100]
    assert seen[-1]["expires_at"] is not None


async def test_image_upload_arrives_as_multipart(gw: RunningGateway, azure: tuple[FakeAzure, str]) -> None:
    fake, _ = azure
    image = png(1280, 720)
    form = aiohttp.FormData({"prompt": "animate", "model": "sora-azure", "size": "1280x720"})
    form.add_field("input_reference", image, filename="first.png", content_type="image/png")
    status, _, body = await request(gw, "POST", "/v1/videos", data=form)
    assert status == 200, body
    (sent,) = fake.bodies
    assert sent["model"] == "my-sora-2" and sent["size"] == "1280x720"
    assert sent["input_reference"] == ("image/png", image)
    assert_azure_auth(fake)


async def test_api_version_is_added_to_every_request(
    start_gateway: StartGateway, tmp_path: Path, azure: tuple[FakeAzure, str], media: dict[str, Path]
) -> None:
    fake, url = azure
    options = "options: {api_version: 2025-04-01-preview}"
    gw = await start_provider_gateway(start_gateway, tmp_path, provider_yaml(url, options=options), MODELS)
    video = await create(gw, model="sora-azure", prompt="versioned")
    await poll_until_done(gw, video["id"])
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content?variant=thumbnail")
    assert status == 200 and body == media["thumbnail"].read_bytes()
    status, _, remix = await request(gw, "POST", f"/v1/videos/{video['id']}/remix", json={"prompt": "again"})
    assert status == 200 and remix["remixed_from_video_id"] == video["id"]
    status, _, _ = await request(gw, "DELETE", f"/v1/videos/{video['id']}")
    assert status == 200

    first = f"/openai/v1/videos/{fake.created[0]}"
    assert {(got.method, got.path) for got in fake.received} >= {
        ("POST", "/openai/v1/videos"),
        ("GET", first),
        ("GET", f"{first}/content"),
        ("POST", f"{first}/remix"),
        ("DELETE", first),
    }
    for got in fake.received:
        assert got.query.get("api-version") == "2025-04-01-preview", got
    (content,) = [got for got in fake.received if got.path.endswith("/content")]
    assert content.query == {"variant": "thumbnail", "api-version": "2025-04-01-preview"}
    assert_azure_auth(fake)


async def test_azure_validates_size_and_seconds_itself(gw: RunningGateway) -> None:
    await assert_refused(
        gw,
        {"prompt": "x", "model": "sora-azure", "size": "1792x1024"},
        status=400,
        param="size",
        mentions=("'1280x720'", "'720x1280'"),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "sora-azure", "seconds": "5"},
        status=400,
        param="seconds",
        mentions=("'12'",),
    )


async def test_failed_video_keeps_azures_error(gw: RunningGateway) -> None:
    video = await create(gw, model="sora-azure", prompt="[fail] forbidden")
    final = (await poll_until_done(gw, video["id"]))[-1]
    assert final["status"] == "failed"
    assert final["error"] == {
        "code": "moderation_blocked",
        "message": "Your request was blocked by our moderation system.",
    }


async def test_rate_limit_and_refusals(
    gw: RunningGateway, start_gateway: StartGateway, tmp_path: Path, azure: tuple[FakeAzure, str]
) -> None:
    status, headers, body = await request(
        gw, "POST", "/v1/videos", json={"prompt": "[429]", "model": "sora-azure"}
    )
    assert status == 429 and headers["Retry-After"] == "7" and body["error"]["code"] == "rate_limited"
    assert "exceeded call rate limit" in body["error"]["message"]

    status, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "x", "model": "not-deployed"})
    # the routing config names a deployment the resource lacks: the operator's to fix, Azure's words kept
    assert status == 502 and body["error"]["code"] == "upstream_model_not_found", body
    message = body["error"]["message"]
    assert "'missing-deployment'" in message and "deployment for this resource does not exist" in message

    wrong = await start_provider_gateway(
        start_gateway, tmp_path / "wrong", provider_yaml(azure[1], key="not-the-key"), MODELS
    )
    status, _, body = await request(wrong, "POST", "/v1/videos", json={"prompt": "x", "model": "sora-azure"})
    assert status == 401 and body["error"]["code"] == "upstream_auth_failed"
    assert "Access denied due to invalid subscription key" in body["error"]["message"]


async def test_content_and_delete(
    gw: RunningGateway, azure: tuple[FakeAzure, str], media: dict[str, Path]
) -> None:
    fake, _ = azure
    video = await create(gw, model="sora-azure", prompt="stream me")
    await poll_until_done(gw, video["id"])
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and body == media["video"].read_bytes() and headers["Content-Type"] == "video/mp4"
    fake.api_key, key = "rotated-at-azure", fake.api_key
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 401 and body["error"]["code"] == "upstream_auth_failed", body
    assert body["error"]["message"].startswith("Azure rejected the gateway's API key.")
    fake.api_key = key
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{video['id']}")
    assert status == 200 and body["deleted"] is True and fake.videos == {}
    assert_azure_auth(fake)


async def test_official_sdk_end_to_end(
    gw: RunningGateway, azure: tuple[FakeAzure, str], media: dict[str, Path]
) -> None:
    fake, _ = azure
    video_bytes = await assert_sdk_roundtrip(gw, "sora-azure", prompt="sdk", size="720x1280", seconds="4")
    assert video_bytes == media["video"].read_bytes()
    assert fake.bodies[0]["model"] == "my-sora-2"
    assert_azure_auth(fake)
    assert AUTH["Authorization"] not in str([dict(got.headers) for got in fake.received])


async def test_a_moments_404_ends_nothing(
    gw: RunningGateway, azure: tuple[FakeAzure, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await assert_a_moments_404_ends_nothing(
        gw, azure[0].videos, monkeypatch, model="sora-azure", prompt="a red fox"
    )
