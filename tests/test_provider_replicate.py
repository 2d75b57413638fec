"""The Replicate adapter against a fake of Replicate's API (tests/fakes/replicate.py)."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway
from tests.fakes.replicate import SCHEMAS, VERSION_ID, FakeReplicate
from tests.provider_contract import (
    assert_a_moments_404_ends_nothing,
    assert_refused,
    assert_sdk_roundtrip,
    assert_variant_missing,
    create,
    png,
    poll_until_done,
    request,
    start_provider_gateway,
)

MODELS = f"""
    hailuo:
      provider: native
      model: minimax/hailuo-02
    hailuo-pinned:
      provider: native
      model: minimax/hailuo-02:{VERSION_ID}
    hailuo-version:
      provider: native
      model: {VERSION_ID}
    hailuo-deployed:
      provider: native
      model: deployments/acme/hailuo-prod
    veo:
      provider: native
      model: google/veo-3
    kling:
      provider: native
      model: kwaivgi/kling-v2.1
    wan:
      provider: native
      model: wan-video/wan-2.2-t2v-fast
"""


def noise_png(side: int = 64) -> bytes:
    """A PNG that does not compress: above the configured data-URI limit."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
async def replicate(aiohttp_server: Any, media: dict[str, Path]) -> tuple[FakeReplicate, str]:
    fake = FakeReplicate(api_key=UPSTREAM_KEY, video=media["video"])
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def gw(
    start_gateway: StartGateway, tmp_path: Path, replicate: tuple[FakeReplicate, str]
) -> RunningGateway:
    provider = f"""
        kind: replicate
        base_url: {replicate[1]}
        api_key: ${{UPSTREAM_KEY}}
        poll_after_ms: 100
        headers: {{Prefer: wait=60}}
        options:
          data_uri_max_bytes: 4096
          input_schemas:
            {VERSION_ID}: minimax/hailuo-02
            deployments/acme/hailuo-prod: minimax/hailuo-02
    """
    return await start_provider_gateway(start_gateway, tmp_path, provider, MODELS)


async def test_official_model_request_and_status_sequence(
    gw: RunningGateway, replicate: tuple[FakeReplicate, str]
) -> None:
    fake, _ = replicate
    video = await create(gw, model="hailuo", prompt="a red fox", size="1366x768", seconds="10")
    assert video["status"] == "queued" and video["size"] == "1366x768" and video["seconds"] == "10"
    ((path, body),) = fake.creates
    assert path == "/v1/models/minimax/hailuo-02/predictions"
    assert body == {"input": {"prompt": "a red fox", "resolution": "768p", "duration": 10}}
    headers = fake.headers[-1]
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "Prefer" not in headers, "a configured Prefer: wait must never reach Replicate"
    assert ALPHA_KEY not in str(fake.headers)

    seen = await poll_until_done(gw, video["id"])
    assert [v["status"] for v in seen] == ["queued", "in_progress", "completed"]
    assert [v["progress"] for v in seen] == [0, 45, 100]
    final = seen[-1]
    assert final["error"] is None and final["expires_at"] == final["completed_at"] + 3600


async def test_version_and_deployment_routes(
    gw: RunningGateway, replicate: tuple[FakeReplicate, str]
) -> None:
    fake, _ = replicate
    pinned = await create(gw, model="hailuo-pinned", prompt="pinned", size="1920x1080", seconds="6")
    await create(gw, model="hailuo-version", prompt="bare version")
    await create(gw, model="hailuo-deployed", prompt="deployed", size="912x512")
    assert fake.creates == [
        (
            "/v1/predictions",
            {"version": VERSION_ID, "input": {"prompt": "pinned", "resolution": "1080p", "duration": 6}},
        ),
        (
            "/v1/predictions",
            {"version": VERSION_ID, "input": {"prompt": "bare version", "resolution": "768p", "duration": 6}},
        ),
        (
            "/v1/deployments/acme/hailuo-prod/predictions",
            {"input": {"prompt": "deployed", "resolution": "512p", "duration": 6}},
        ),
    ]
    # a version prediction's output is a list of URLs
    await poll_until_done(gw, pinned["id"])
    status, _, body = await request(gw, "GET", f"/v1/videos/{pinned['id']}/content")
    assert status == 200 and body[4:8] == b"ftyp"


async def test_model_specific_inputs(gw: RunningGateway, replicate: tuple[FakeReplicate, str]) -> None:
    fake, _ = replicate
    await create(gw, model="wan", prompt="waves", size="720x1280", seconds="6", seed=7)
    await create(gw, model="veo", prompt="city", size="1080x1920", negative_prompt="rain")
    assert [body["input"] for _, body in fake.creates] == [
        {
            "prompt": "waves",
            "seed": 7,
            "aspect_ratio": "9:16",
            "resolution": "720p",
            "num_frames": 97,
            "frames_per_second": 16,
        },
        {"prompt": "city", "negative_prompt": "rain", "aspect_ratio": "9:16", "resolution": "1080p"},
    ]
    # an extra parameter the model refuses: Replicate's 422 becomes a 400 with its detail
    await assert_refused(
        gw,
        {"model": "hailuo", "prompt": "x", "prompt_optimizer": "yes"},
        status=400,
        mentions=("input.prompt_optimizer", "Expected: boolean"),
    )


async def test_image_inputs(gw: RunningGateway, replicate: tuple[FakeReplicate, str]) -> None:
    fake, _ = replicate
    small = png(16, 16)
    form = {"prompt": "animate", "model": "hailuo", "size": "768x1366", "seconds": "6"}
    status, _, body = await request(gw, "POST", "/v1/videos", data={**form, "input_reference": small})
    assert status == 200, body
    sent = fake.creates[-1][1]["input"]
    assert sent["first_frame_image"] == "data:image/png;base64," + base64.b64encode(small).decode()
    assert sent["resolution"] == "768p"

    await create(
        gw, model="kling", prompt="wave", input_reference="https://example.com/cat.png", size="1920x1080"
    )
    assert fake.creates[-1][1]["input"] == {
        "prompt": "wave",
        "mode": "pro",
        "duration": 5,
        "start_image": "https://example.com/cat.png",
    }

    large = noise_png()
    assert len(large) > 4096
    status, _, body = await request(gw, "POST", "/v1/videos", data={**form, "input_reference": large})
    assert status == 200, body
    (upload,) = fake.uploads
    assert upload["data"] == large and upload["content_type"] == "image/png"
    assert fake.creates[-1][1]["input"]["first_frame_image"].startswith(replicate[1] + "/v1/files/")

    await assert_refused(gw, {"prompt": "no image", "model": "kling"}, status=400, param="input_reference")
    await assert_refused(
        gw,
        {"prompt": "x", "model": "wan", "input_reference": "https://example.com/a.png"},
        status=400,
        param="input_reference",
    )


async def test_unsupported_size_and_seconds_list_the_allowed_values(gw: RunningGateway) -> None:
    await assert_refused(
        gw,
        {"prompt": "x", "model": "hailuo", "seconds": "8"},
        status=400,
        param="seconds",
        mentions=("6, 10",),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "hailuo", "size": "1280x720"},
        status=400,
        param="size",
        mentions=("1366x768", "1920x1080", "912x512"),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "hailuo", "size": "1920x1080", "seconds": "10"},
        status=400,
        param="seconds",
        mentions=("6-second",),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "hailuo", "size": "768x1366"},
        status=400,
        param="size",
        mentions=("input_reference",),
    )
    await assert_refused(
        gw, {"prompt": "x", "model": "veo", "seconds": "4"}, status=400, param="seconds", mentions=("8",)
    )


async def test_failed_filtered_cancelled_and_aborted_have_distinct_codes(gw: RunningGateway) -> None:
    errors = {}
    for marker in ("fail", "nsfw", "cancel", "abort"):
        video = await create(gw, model="hailuo", prompt=f"[{marker}] please")
        final = (await poll_until_done(gw, video["id"]))[-1]
        assert final["status"] == "failed" and final["progress"] < 100
        errors[marker] = final["error"]
    assert errors["fail"] == {
        "code": "generation_failed",
        "message": "CUDA out of memory. Tried to allocate 2.00 GiB",
    }
    assert errors["nsfw"]["code"] == "content_filter" and "(E005)" in errors["nsfw"]["message"]
    assert errors["cancel"]["code"] == "cancelled"
    assert errors["abort"]["code"] == "aborted" and "deadline" in errors["abort"]["message"]


async def test_progress_is_synthesised_without_a_progress_bar(gw: RunningGateway) -> None:
    video = await create(gw, model="hailuo", prompt="[nolog] quiet model")
    seen = await poll_until_done(gw, video["id"])
    assert [v["status"] for v in seen] == ["queued", "in_progress", "completed"]
    assert 1 <= seen[1]["progress"] < 45, "synthesised from started_at, well below the logged 45 %"


async def test_throttling_becomes_429_with_retry_after(gw: RunningGateway) -> None:
    headers = await assert_refused(
        gw, {"prompt": "[429]", "model": "hailuo"}, status=429, mentions=("Request was throttled",)
    )
    assert headers["Retry-After"] == "30"
    headers = await assert_refused(gw, {"prompt": "[429h]", "model": "hailuo"}, status=429)
    assert headers["Retry-After"] == "7"


async def test_content_streams_and_expired_outputs_are_410(
    gw: RunningGateway, replicate: tuple[FakeReplicate, str], media: dict[str, Path]
) -> None:
    fake, _ = replicate
    video = await create(gw, model="hailuo", prompt="stream me")
    await poll_until_done(gw, video["id"])
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and body == media["video"].read_bytes() and headers["Content-Type"] == "video/mp4"
    assert fake.headers[-1]["Authorization"] == f"Bearer {UPSTREAM_KEY}"

    await assert_variant_missing(gw, video["id"])
    task = next(iter(fake.predictions))
    fake.expire(task, url_gone=True)
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 410 and body["error"]["code"] == "video_expired"
    fake.expire(task)
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 410 and body["error"]["code"] == "video_expired"


async def test_delete_cancels_only_unfinished_predictions(
    gw: RunningGateway, replicate: tuple[FakeReplicate, str]
) -> None:
    fake, _ = replicate
    running = await create(gw, model="hailuo", prompt="[slow] long one")
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{running['id']}")
    assert status == 200 and body["deleted"] is True
    ((prediction_id, prediction),) = fake.predictions.items()
    assert fake.cancels == [prediction_id] and prediction["status"] == "canceled"

    done = await create(gw, model="hailuo", prompt="finished")
    await poll_until_done(gw, done["id"])
    status, _, _ = await request(gw, "DELETE", f"/v1/videos/{done['id']}")
    assert status == 200 and fake.cancels == [prediction_id]


async def test_a_rejected_token(
    start_gateway: StartGateway, tmp_path: Path, replicate: tuple[FakeReplicate, str]
) -> None:
    provider = f"""
        kind: replicate
        base_url: {replicate[1]}
        api_key: r8_wrong
        options:
          input_schemas:
            {VERSION_ID}: minimax/hailuo-02
            deployments/acme/hailuo-prod: minimax/hailuo-02
    """
    other = await start_provider_gateway(start_gateway, tmp_path / "other", provider, MODELS)
    got, _, body = await request(other, "POST", "/v1/videos", json={"prompt": "x", "model": "hailuo"})
    assert got == 401 and body["error"]["code"] == "upstream_auth_failed"
    assert "valid authentication token" in body["error"]["message"]


async def test_official_sdk_end_to_end(gw: RunningGateway, media: dict[str, Path]) -> None:
    assert await assert_sdk_roundtrip(gw, "hailuo", prompt="sdk", size="1366x768", seconds="6") == (
        media["video"].read_bytes()
    )


async def test_a_model_replicate_no_longer_has_is_the_operators_to_fix(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicate's 404 to a create: the model the routing config names is gone (or mistyped)."""
    monkeypatch.delitem(SCHEMAS, "minimax/hailuo-02")
    status, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "x", "model": "hailuo"})
    assert status == 502 and body["error"]["code"] == "upstream_model_not_found", body
    assert "minimax/hailuo-02" in body["error"]["message"] and "routing config" in body["error"]["message"]


async def test_a_version_replicate_does_not_have_is_the_operators_to_fix(
    start_gateway: StartGateway, tmp_path: Path, replicate: tuple[FakeReplicate, str]
) -> None:
    """Replicate answers a version it does not have (retired, or mistyped in the routing config)
    with 422 "Invalid version", not a 404: the operator's to fix, not the client's invalid value."""
    models = f"""
        pinned:
          provider: native
          model: minimax/hailuo-02:{"0" * 64}
    """
    provider = f"""
        kind: replicate
        base_url: {replicate[1]}
        api_key: ${{UPSTREAM_KEY}}
    """
    gw = await start_provider_gateway(start_gateway, tmp_path, provider, models)
    status, _, body = await request(
        gw, "POST", "/v1/videos", json={"model": "pinned", "prompt": "x", "size": "1366x768"}
    )
    assert status == 502 and body["error"]["code"] == "upstream_model_not_found", body
    assert "routing config" in body["error"]["message"]


async def test_a_moments_404_ends_nothing(
    gw: RunningGateway, replicate: tuple[FakeReplicate, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await assert_a_moments_404_ends_nothing(
        gw, replicate[0].predictions, monkeypatch, model="hailuo", prompt="a red fox"
    )
