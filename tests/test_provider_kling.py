"""The Kling adapter against a fake of Kling's API (tests/fakes/kling.py)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, ProviderConfig
from gateway.providers.base import AdapterEnv
from gateway.providers.kling import KlingAdapter
from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway, load
from tests.fakes.kling import FakeKling
from tests.provider_contract import (
    assert_a_moments_404_ends_nothing,
    assert_refused,
    assert_sdk_roundtrip,
    assert_task_id_kept_whole,
    assert_variant_missing,
    create,
    png,
    poll_until_done,
    request,
    start_provider_gateway,
)

ACCESS_KEY = "ak-kling-test-0001"

MODELS = """
    kling:
      provider: native
      model: kling-v1-6
    kling-master:
      provider: native
      model: kling-v2-1-master
    kling-26:
      provider: native
      model: kling-v2-6
"""


def provider_yaml(base_url: str, secret: str = "${UPSTREAM_KEY}") -> str:
    return f"""
        kind: kling
        base_url: {base_url}
        api_key: {secret}
        poll_after_ms: 100
        options: {{access_key: {ACCESS_KEY}}}
    """


@pytest.fixture
async def kling(aiohttp_server: Any, media: dict[str, Path]) -> FakeKling:
    fake = FakeKling(access_key=ACCESS_KEY, secret_key=UPSTREAM_KEY, video=media["video"])
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def gw(start_gateway: StartGateway, tmp_path: Path, kling: FakeKling) -> RunningGateway:
    return await start_provider_gateway(start_gateway, tmp_path, provider_yaml(kling.base_url), MODELS)


async def test_text_to_video_request_and_status_sequence(gw: RunningGateway, kling: FakeKling) -> None:
    video = await create(
        gw,
        model="kling",
        prompt="a red fox",
        size="720x1280",
        seconds="10",
        mode="pro",
        negative_prompt="blur",
        cfg_scale=0.7,
    )
    assert video["model"] == "kling" and video["size"] == "720x1280" and video["seconds"] == "10"
    assert video["status"] == "queued"
    assert kling.creates == [
        (
            "text2video",
            {
                "model_name": "kling-v1-6",
                "prompt": "a red fox",
                "duration": "10",
                "aspect_ratio": "9:16",
                "mode": "pro",
                "negative_prompt": "blur",
                "cfg_scale": 0.7,
            },
        )
    ]
    headers = kling.headers[-1]
    assert headers["Authorization"].startswith("Bearer ey") and headers["Content-Type"] == "application/json"
    assert ALPHA_KEY not in str(kling.headers) and UPSTREAM_KEY not in str(kling.headers)

    seen = await poll_until_done(gw, video["id"])
    assert [v["status"] for v in seen] == ["queued", "in_progress", "completed"]
    assert seen[0]["progress"] == 0 and 1 <= seen[1]["progress"] <= 95 and seen[2]["progress"] == 100
    final = seen[-1]
    assert final["error"] is None and final["completed_at"] is not None
    assert abs(final["expires_at"] - (time.time() + 30 * 86400)) < 60


async def test_the_fake_verified_the_jwt(
    gw: RunningGateway, kling: FakeKling, start_gateway: StartGateway, tmp_path: Path
) -> None:
    video = await create(gw, model="kling", prompt="signed")
    await poll_until_done(gw, video["id"])
    assert len(kling.claims) == 4  # the create and three polls, each accepted by the fake's verifier
    now = time.time()
    for claims in kling.claims:
        assert set(claims) == {"iss", "exp", "nbf"} and claims["iss"] == ACCESS_KEY
        assert claims["exp"] - claims["nbf"] == 1805
        assert claims["nbf"] <= now < claims["exp"] and 1790 < claims["exp"] - now <= 1800
    assert len(set(kling.tokens)) == 1, "one token serves until it is 25 minutes old"
    header = json.loads(base64.urlsafe_b64decode(kling.tokens[0].split(".")[0] + "=="))
    assert header == {"alg": "HS256", "typ": "JWT"}

    wrong = await start_provider_gateway(
        start_gateway, tmp_path / "wrong", provider_yaml(kling.base_url, secret="not-the-secret"), MODELS
    )
    status, _, body = await request(wrong, "POST", "/v1/videos", json={"model": "kling", "prompt": "x"})
    assert status == 401 and body["error"]["code"] == "upstream_auth_failed"
    assert "Authorization is invalid" in body["error"]["message"] and "1002" in body["error"]["message"]


def test_config_needs_the_access_key_and_the_secret() -> None:
    text = """
        keys: [{name: alpha, key: "${ALPHA_KEY}"}]
        providers:
          k: {kind: kling, api_key: "${UPSTREAM_KEY}", options: {access_key: ak}}
        models:
          kling: {provider: k, model: kling-v1}
    """
    assert load(text).providers["k"].api_key == UPSTREAM_KEY
    with pytest.raises(ConfigError, match="'access_key' is required"):
        load(text.replace("access_key: ak", "region: sg"))
    with pytest.raises(ConfigError, match="'api_key' is required"):
        load(text.replace('api_key: "${UPSTREAM_KEY}", ', ""))


def test_the_token_is_signed_again_before_it_expires(tmp_path: Path) -> None:
    config = ProviderConfig(name="k", kind="kling", api_key="secret", options={"access_key": ACCESS_KEY})
    adapter = KlingAdapter(config, AdapterEnv(data_dir=tmp_path))
    start = 1_800_000_000.0
    first = adapter.token(now=start)
    assert adapter.token(now=start + 24 * 60) == first
    renewed = adapter.token(now=start + 25 * 60)
    assert renewed != first
    claims = json.loads(base64.urlsafe_b64decode(renewed.split(".")[1] + "=="))
    assert claims == {"iss": ACCESS_KEY, "exp": int(start) + 25 * 60 + 1800, "nbf": int(start) + 25 * 60 - 5}
    assert adapter.token(now=start) != renewed, "a clock that went backwards gets a fresh token"


async def test_image_to_video_sends_raw_base64_and_polls_image2video(
    gw: RunningGateway, kling: FakeKling
) -> None:
    image = png()
    form = {"prompt": "animate", "model": "kling-master", "size": "720x720", "seconds": "5"}
    status, _, body = await request(gw, "POST", "/v1/videos", data={**form, "input_reference": image})
    assert status == 200, body
    ((endpoint, sent),) = kling.creates
    assert endpoint == "image2video"
    assert sent == {
        "model_name": "kling-v2-1-master",
        "prompt": "animate",
        "duration": "5",
        "image": base64.b64encode(image).decode(),
    }
    seen = await poll_until_done(gw, body["id"])  # the fake answers this task only under image2video
    assert seen[-1]["status"] == "completed"

    url = "https://example.com/cat.png"
    await create(gw, model="kling-master", prompt="from a url", input_reference={"image_url": url})
    assert kling.creates[-1][1]["image"] == url

    data_url = "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff\xe0jpeg").decode()
    await create(gw, model="kling-master", prompt="from data", input_reference={"image_url": data_url})
    assert kling.creates[-1][1]["image"] == base64.b64encode(b"\xff\xd8\xff\xe0jpeg").decode()

    await assert_refused(
        gw,
        {"prompt": "x", "model": "kling-master", "size": "1792x1024", "input_reference": {"image_url": url}},
        status=400,
        param="size",
    )
    webp = "data:image/webp;base64," + base64.b64encode(b"RIFF....WEBPVP8 ").decode()
    await assert_refused(
        gw,
        {"prompt": "x", "model": "kling-master", "input_reference": {"image_url": webp}},
        status=400,
        param="input_reference",
        mentions=("JPEG or PNG",),
    )


async def test_unsupported_size_seconds_and_extras(gw: RunningGateway, kling: FakeKling) -> None:
    await assert_refused(
        gw,
        {"prompt": "x", "model": "kling", "seconds": "8"},
        status=400,
        param="seconds",
        mentions=("5, 10",),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "kling", "size": "1792x1024"},
        status=400,
        param="size",
        mentions=("720x720, 1280x720, 720x1280",),
    )
    await assert_refused(gw, {"prompt": "x", "model": "kling", "mode": "ultra"}, status=400, param="mode")
    await assert_refused(gw, {"prompt": "x", "model": "kling", "cfg_scale": 3}, status=400, param="cfg_scale")
    await assert_refused(gw, {"prompt": "x" * 2501, "model": "kling"}, status=400, param="prompt")
    assert kling.creates == []

    await create(gw, model="kling-master", prompt="v2", cfg_scale=0.5, sound="on")
    await create(gw, model="kling-26", prompt="v2.6", sound="on", size="1280x720")
    assert [body for _, body in kling.creates] == [
        {"model_name": "kling-v2-1-master", "prompt": "v2", "duration": "5", "aspect_ratio": "9:16"},
        {
            "model_name": "kling-v2-6",
            "prompt": "v2.6",
            "duration": "5",
            "aspect_ratio": "16:9",
            "sound": "on",
        },
    ]


async def test_failed_and_content_filtered_tasks(gw: RunningGateway) -> None:
    risky = await create(gw, model="kling", prompt="[risk] forbidden")
    final = (await poll_until_done(gw, risky["id"]))[-1]
    assert final["status"] == "failed"
    assert final["error"] == {"code": "content_filter", "message": "Failure to pass the risk control system"}

    broken = await create(gw, model="kling", prompt="[fail] unlucky")
    final = (await poll_until_done(gw, broken["id"]))[-1]
    assert final["status"] == "failed"
    assert final["error"] == {
        "code": "generation_failed",
        "message": "Internal error, please try again later",
    }


async def test_refusals_are_judged_by_kling_code(gw: RunningGateway) -> None:
    headers = await assert_refused(
        gw, {"prompt": "[429]", "model": "kling"}, status=429, mentions=("too fast", "1302")
    )
    assert headers["Retry-After"] == "5"

    got, headers, body = await request(gw, "POST", "/v1/videos", json={"prompt": "[quota]", "model": "kling"})
    assert got == 402 and "Retry-After" not in headers
    assert body["error"]["type"] == "insufficient_quota" and body["error"]["code"] == "insufficient_quota"
    assert "Resource pack exhausted" in body["error"]["message"]

    got, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "[policy]", "model": "kling"})
    assert got == 400 and body["error"]["code"] == "content_filter"

    headers = await assert_refused(
        gw, {"prompt": "[200-error]", "model": "kling"}, status=429, mentions=("Parallel tasks",)
    )
    assert headers["Retry-After"] == "5"

    got, headers, body = await request(gw, "POST", "/v1/videos", json={"prompt": "[5001]", "model": "kling"})
    assert got == 503 and body["error"]["code"] == "upstream_unavailable" and "maintenance" in str(body)


async def test_content_streams_through_the_gateway(
    gw: RunningGateway, kling: FakeKling, media: dict[str, Path]
) -> None:
    video = await create(gw, model="kling", prompt="stream me")
    await poll_until_done(gw, video["id"])
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and body == media["video"].read_bytes() and headers["Content-Type"] == "video/mp4"
    await assert_variant_missing(gw, video["id"])
    kling.tasks.clear()  # Kling purged the task after its 30 days
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 410 and body["error"]["code"] == "video_expired"

    gone = await create(gw, model="kling", prompt="[gone] old")
    await poll_until_done(gw, gone["id"])
    status, _, body = await request(gw, "GET", f"/v1/videos/{gone['id']}/content")
    assert status == 410 and body["error"]["code"] == "video_expired"


async def test_delete_only_forgets_the_video(gw: RunningGateway, kling: FakeKling) -> None:
    video = await create(gw, model="kling", prompt="short-lived")
    calls = len(kling.headers)
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{video['id']}")
    assert status == 200 and body["deleted"] is True
    assert len(kling.headers) == calls, "Kling has no delete or cancel endpoint"
    status, _, _ = await request(gw, "GET", f"/v1/videos/{video['id']}")
    assert status == 404


async def test_official_sdk_end_to_end(gw: RunningGateway, media: dict[str, Path]) -> None:
    assert await assert_sdk_roundtrip(gw, "kling", prompt="sdk", size="1280x720", seconds="5") == (
        media["video"].read_bytes()
    )


async def test_a_task_id_is_used_whole(gw: RunningGateway, kling: FakeKling) -> None:
    await assert_task_id_kept_whole(gw, kling, "kling")


async def test_a_moments_404_ends_nothing(
    gw: RunningGateway, kling: FakeKling, monkeypatch: pytest.MonkeyPatch
) -> None:
    await assert_a_moments_404_ends_nothing(gw, kling.tasks, monkeypatch, model="kling", prompt="a red fox")


async def test_a_text_extra_that_looks_like_a_number_stays_text(gw: RunningGateway, kling: FakeKling) -> None:
    """In the SDK's form every value is text: a negative prompt of "1990" is that text, not the
    number Kling would refuse."""
    await gw.sdk().videos.create(
        prompt="a fox",
        model="kling",  # type: ignore[arg-type]
        seconds="5",  # type: ignore[arg-type]
        extra_body={"negative_prompt": "1990", "mode": "pro"},
    )
    ((_, body),) = kling.creates
    assert (body["negative_prompt"], body["mode"]) == ("1990", "pro")
