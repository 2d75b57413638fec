"""The fal.ai adapter against a fake of fal's queue API (tests/fakes/fal.py)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ProviderConfig
from gateway.providers.base import AdapterEnv
from gateway.providers.fal import FalAdapter, app_path
from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway
from tests.fakes.fal import ENDPOINTS, FakeFal
from tests.provider_contract import (
    assert_a_moments_404_ends_nothing,
    assert_an_unsendable_job_name_is_refused,
    assert_refused,
    assert_sdk_roundtrip,
    assert_variant_missing,
    create,
    png,
    poll_until_done,
    request,
    start_provider_gateway,
)

KLING = "fal-ai/kling-video/v2.5-turbo/pro/text-to-video"

MODELS = f"""
    kling:
      provider: native
      model: {KLING}
    kling-image:
      provider: native
      model: fal-ai/kling-video/v2.5-turbo/pro/image-to-video
    veo:
      provider: native
      model: fal-ai/veo3.1
    veo-image:
      provider: native
      model: fal-ai/veo3.1/image-to-video
    wan:
      provider: native
      model: fal-ai/wan/v2.2-a14b/text-to-video
    wan-25:
      provider: native
      model: fal-ai/wan-25-preview/text-to-video
"""


@pytest.fixture
async def fal(aiohttp_server: Any, media: dict[str, Path]) -> tuple[FakeFal, str]:
    fake = FakeFal(api_key=UPSTREAM_KEY, video=media["video"])
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    return fake, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def gw(start_gateway: StartGateway, tmp_path: Path, fal: tuple[FakeFal, str]) -> RunningGateway:
    provider = f"""
        kind: fal
        base_url: {fal[1]}
        api_key: ${{UPSTREAM_KEY}}
        poll_after_ms: 100
        options: {{priority: low, result_lifetime_seconds: 3600}}
    """
    return await start_provider_gateway(start_gateway, tmp_path, provider, MODELS)


def _status_paths(fake: FakeFal) -> list[str]:
    return [path for method, _, path in fake.calls if method == "GET" and "/status" in path]


async def test_text_to_video_request_and_status_sequence(
    gw: RunningGateway, fal: tuple[FakeFal, str]
) -> None:
    fake, _ = fal
    video = await create(
        gw, model="kling", prompt="a red fox", size="720x1280", seconds="10", negative_prompt="blur", fps=30
    )
    assert video["model"] == "kling" and video["size"] == "720x1280" and video["seconds"] == "10"
    ((endpoint, body),) = fake.submits
    assert endpoint == KLING
    assert body == {
        "prompt": "a red fox",
        "aspect_ratio": "9:16",
        "duration": "10",
        "negative_prompt": "blur",
    }
    headers = fake.headers[-1]
    assert headers["Authorization"] == f"Key {UPSTREAM_KEY}"
    assert headers["X-Fal-Queue-Priority"] == "low"
    assert json.loads(headers["X-Fal-Object-Lifecycle-Preference"]) == {"expiration_duration_seconds": 3600}
    assert ALPHA_KEY not in str(fake.headers)

    seen = await poll_until_done(gw, video["id"])
    assert [v["status"] for v in seen] == ["queued", "in_progress", "completed"]
    assert seen[0]["progress"] == 0 and 0 < seen[1]["progress"] < 100 and seen[-1]["progress"] == 100
    assert seen[-1]["error"] is None and seen[-1]["expires_at"] > seen[-1]["completed_at"]

    # Status and result live under the app path: the endpoint's sub-path is dropped.
    request_id = next(iter(fake.requests))
    assert _status_paths(fake) == [f"/fal-ai/kling-video/requests/{request_id}/status?logs=1"] * 3
    assert ("GET", fake.calls[-1][1], f"/fal-ai/kling-video/requests/{request_id}") in fake.calls


def test_app_path_drops_the_endpoint_sub_path() -> None:
    assert app_path(KLING) == "fal-ai/kling-video"
    assert app_path("fal-ai/veo3.1") == "fal-ai/veo3.1"
    assert app_path("workflows/acme/storyboard/render") == "workflows/acme/storyboard"
    assert app_path("1714827-joke") == "1714827/joke"


async def test_follow_up_urls_on_another_host_are_not_followed(
    gw: RunningGateway, fal: tuple[FakeFal, str], media: dict[str, Path]
) -> None:
    fake, base = fal
    video = await create(gw, model="veo", prompt="[elsewhere] a lighthouse")
    seen = await poll_until_done(gw, video["id"])
    assert seen[-1]["status"] == "completed"
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and body == media["video"].read_bytes()
    hosts = {host for _, host, _ in fake.calls}
    assert hosts == {base.removeprefix("http://")}, hosts
    assert len(_status_paths(fake)) == 3


async def test_a_follow_up_url_with_a_control_character_is_not_followed(
    gw: RunningGateway, fal: tuple[FakeFal, str]
) -> None:
    """urlsplit drops tabs and line breaks, so such a status_url passed for one under the base URL;
    every poll then put the tab in its request line. The gateway builds its own URL instead."""
    fake, _ = fal
    video = await create(gw, model="veo", prompt="[tab url] a lighthouse")
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}")
    assert status == 200 and body["status"] in ("queued", "in_progress"), body
    assert all("\t" not in path for _, _, path in fake.calls)


async def test_veo_sizes_seconds_and_extras(gw: RunningGateway, fal: tuple[FakeFal, str]) -> None:
    fake, _ = fal
    await create(
        gw, model="veo", prompt="waves", size="1920x1080", seconds="6", generate_audio=False, seed=7, fps=24
    )
    ((endpoint, body),) = fake.submits
    assert endpoint == "fal-ai/veo3.1"
    assert body == {
        "prompt": "waves",
        "aspect_ratio": "16:9",
        "resolution": "1080p",
        "duration": "6s",
        "generate_audio": False,
        "seed": 7,
    }


async def test_wan_writes_frames_and_resolution(gw: RunningGateway, fal: tuple[FakeFal, str]) -> None:
    fake, _ = fal
    await create(gw, model="wan", prompt="a kite", size="832x480", seconds="3")
    await create(gw, model="wan-25", prompt="a kite", size="960x960", seconds="10")
    assert [body for _, body in fake.submits] == [
        {
            "prompt": "a kite",
            "aspect_ratio": "16:9",
            "resolution": "480p",
            "num_frames": 49,
            "frames_per_second": 16,
        },
        {"prompt": "a kite", "aspect_ratio": "1:1", "resolution": "720p", "duration": "10"},
    ]


async def test_image_to_video_sends_a_data_uri_or_the_url(
    gw: RunningGateway, fal: tuple[FakeFal, str]
) -> None:
    fake, _ = fal
    image = png()
    form = {"prompt": "animate", "model": "veo-image", "size": "720x1280", "seconds": "4"}
    status, _, body = await request(gw, "POST", "/v1/videos", data={**form, "input_reference": image})
    assert status == 200, body
    await create(
        gw,
        model="kling-image",
        prompt="wave hello",
        input_reference={"image_url": "https://example.com/cat.png"},
    )
    (veo_endpoint, veo), (kling_endpoint, kling) = fake.submits
    assert veo_endpoint == "fal-ai/veo3.1/image-to-video"
    assert veo == {
        "prompt": "animate",
        "aspect_ratio": "9:16",
        "resolution": "720p",
        "duration": "4s",
        "image_url": "data:image/png;base64," + base64.b64encode(image).decode(),
    }
    assert kling_endpoint == "fal-ai/kling-video/v2.5-turbo/pro/image-to-video"
    assert kling == {"prompt": "wave hello", "duration": "5", "image_url": "https://example.com/cat.png"}

    await assert_refused(
        gw, {"prompt": "no image", "model": "veo-image"}, status=400, param="input_reference"
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "kling", "input_reference": {"image_url": "https://example.com/a.png"}},
        status=400,
        param="input_reference",
    )
    assert len(fake.submits) == 2


async def test_unsupported_size_seconds_and_endpoint(gw: RunningGateway, fal: tuple[FakeFal, str]) -> None:
    await assert_refused(
        gw,
        {"prompt": "x", "model": "veo", "seconds": "5"},
        status=400,
        param="seconds",
        mentions=("4, 6, 8",),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "kling", "size": "1792x1024"},
        status=400,
        param="size",
        mentions=("1080x1080", "1280x720", "720x1280"),
    )
    assert fal[0].submits == []


async def test_an_endpoint_fal_retired_is_the_operators_to_fix_and_fails_over(
    start_gateway: StartGateway, tmp_path: Path, fal: tuple[FakeFal, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fal answers 404 for an endpoint it no longer serves (or one the config mistypes): not the
    client's 'not found' but a deployment that cannot work, so the create goes to the model's next
    deployment, and with none left the client hears 502 naming the endpoint and the routing config."""
    monkeypatch.delitem(ENDPOINTS, KLING)
    provider = f"""
        kind: fal
        base_url: {fal[1]}
        api_key: ${{UPSTREAM_KEY}}
    """
    models = f"""
        kling:
          - {{provider: native, model: {KLING}}}
          - {{provider: native, model: fal-ai/veo3.1, priority: 1}}
        kling-only:
          provider: native
          model: {KLING}
          name: kling-alone
    """
    gw = await start_provider_gateway(start_gateway, tmp_path, provider, models)
    status, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "a fox", "model": "kling"})
    assert status == 200, body
    assert [endpoint for endpoint, _ in fal[0].submits] == ["fal-ai/veo3.1"]
    status, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "a fox", "model": "kling-only"})
    assert status == 502 and body["error"]["code"] == "upstream_model_not_found", body
    assert KLING in body["error"]["message"] and "routing config" in body["error"]["message"]


def test_validation_error_names_the_openai_field() -> None:
    adapter = FalAdapter(ProviderConfig(name="fal", kind="fal"), AdapterEnv(data_dir=Path(".")))
    detail = [
        {"loc": ["body", "duration"], "msg": "Input should be '5' or '10'", "type": "literal_error"},
        {"loc": ["body", "cfg_scale"], "msg": "Input should be a number", "type": "float_parsing"},
    ]
    err = adapter.provider_error(422, {}, json.dumps({"detail": detail}).encode())
    assert err.status == 400 and err.param == "seconds" and err.code == "invalid_value"
    assert err.message == "fal: duration: Input should be '5' or '10'; cfg_scale: Input should be a number"
    flagged = [{"loc": ["body", "image_url"], "msg": "flagged", "type": "content_policy_violation"}]
    err = adapter.provider_error(422, {}, json.dumps({"detail": flagged}).encode())
    assert err.param == "input_reference" and err.code == "content_filter"
    err = adapter.provider_error(
        504, {"X-Fal-Error-Type": "request_timeout"}, b'{"detail": "Request timed out"}'
    )
    assert err.status == 502 and "Request timed out (request_timeout)" in err.message
    err = adapter.provider_error(401, {}, b'{"detail": "Invalid authentication credentials"}')
    assert err.status == 401 and err.code == "upstream_auth_failed"


async def test_failed_content_filtered_and_cancelled_runs(gw: RunningGateway) -> None:
    failed = await create(gw, model="kling", prompt="[fail] a storm")
    final = (await poll_until_done(gw, failed["id"]))[-1]
    assert final["status"] == "failed"
    assert final["error"] == {
        "code": "runner_disconnected",
        "message": "Runner disconnected while generating.",
    }

    flagged = await create(gw, model="kling", prompt="[nsfw] something")
    final = (await poll_until_done(gw, flagged["id"]))[-1]
    assert final["status"] == "failed" and final["error"]["code"] == "content_filter"
    assert "flagged by a content checker" in final["error"]["message"]

    cancelled = await create(gw, model="kling", prompt="[cancel] never mind")
    final = (await poll_until_done(gw, cancelled["id"]))[-1]
    assert final["status"] == "failed" and final["error"]["code"] == "cancelled"


async def test_rate_limit_becomes_429_with_retry_after(gw: RunningGateway) -> None:
    headers = await assert_refused(
        gw, {"prompt": "[429]", "model": "kling"}, status=429, mentions=("Too many concurrent requests",)
    )
    assert headers["Retry-After"] == "12"


async def test_content_streams_through_the_gateway(gw: RunningGateway, media: dict[str, Path]) -> None:
    video = await create(gw, model="kling", prompt="stream me")
    await poll_until_done(gw, video["id"])
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and body == media["video"].read_bytes() and headers["Content-Type"] == "video/mp4"
    await assert_variant_missing(gw, video["id"])


async def test_delete_cancels_at_fal(gw: RunningGateway, fal: tuple[FakeFal, str]) -> None:
    fake, _ = fal
    video = await create(gw, model="kling", prompt="short-lived")
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{video['id']}")
    assert status == 200 and body["deleted"] is True
    request_id = next(iter(fake.requests))
    assert fake.requests[request_id]["cancelled"] is True
    assert ("PUT", fake.calls[-1][1], f"/fal-ai/kling-video/requests/{request_id}/cancel") in fake.calls


async def test_official_sdk_end_to_end(gw: RunningGateway, media: dict[str, Path]) -> None:
    assert await assert_sdk_roundtrip(gw, "veo", prompt="sdk", size="1280x720", seconds="8") == (
        media["video"].read_bytes()
    )


async def test_a_moments_404_ends_nothing(
    gw: RunningGateway, fal: tuple[FakeFal, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await assert_a_moments_404_ends_nothing(
        gw, fal[0].requests, monkeypatch, model="kling", prompt="a red fox"
    )


async def test_an_unsendable_job_name_is_refused(gw: RunningGateway) -> None:
    await assert_an_unsendable_job_name_is_refused(gw, "kling")


async def test_a_moments_404_from_the_result_ends_nothing(
    gw: RunningGateway, fal: tuple[FakeFal, str]
) -> None:
    """A run fal reports COMPLETED is read from its result URL; a 404 there (a replica behind) ended
    the video as failed (expired) at once, a video fal had made and billed. The client gets that
    poll's 404, and the next poll finds the result."""
    fake, _ = fal
    fake.result_misses = 1
    video = await create(gw, model="kling", prompt="a red fox")
    seen: list[Any] = []
    for _ in range(10):
        status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}")
        seen.append(body["status"] if status == 200 else status)
        if seen[-1] in ("completed", "failed"):
            break
    assert 404 in seen and seen[-1] == "completed", seen
