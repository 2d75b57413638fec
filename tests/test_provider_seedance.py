"""The Seedance (Volcengine Ark) adapter against a fake of Ark's API (tests/fakes/seedance.py)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ProviderConfig
from gateway.errors import ApiError
from gateway.providers import ADAPTERS
from gateway.providers.base import AdapterEnv
from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway
from tests.fakes.seedance import FakeArk
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

PRO = "doubao-seedance-1-0-pro-250528"
MODELS = f"""
    seedance-pro:
      provider: native
      model: {PRO}
    seedance-lite-t2v:
      provider: native
      model: doubao-seedance-1-0-lite-t2v-250428
    seedance-lite-i2v:
      provider: native
      model: doubao-seedance-1-0-lite-i2v-250428
    seedance-15:
      provider: native
      model: doubao-seedance-1-5-pro-251215
    seedance-endpoint:
      provider: native
      model: ep-20260101000000-abcde
    seedance-gone:
      provider: native
      model: doubao-seedance-9-9-pro-990101
"""


@pytest.fixture
async def ark(aiohttp_server: Any, media: dict[str, Path]) -> tuple[FakeArk, str]:
    fake = FakeArk(api_key=UPSTREAM_KEY, video=media["video"])
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("")).rstrip("/")


async def start(
    start_gateway: StartGateway,
    tmp_path: Path,
    url: str,
    *,
    options: str = "{}",
    key: str = "${UPSTREAM_KEY}",
) -> RunningGateway:
    provider = f"""
        kind: seedance
        base_url: {url}/api/v3
        api_key: {key}
        poll_after_ms: 100
        options: {options}
    """
    return await start_provider_gateway(start_gateway, tmp_path, provider, MODELS)


@pytest.fixture
async def gw(start_gateway: StartGateway, tmp_path: Path, ark: tuple[FakeArk, str]) -> RunningGateway:
    return await start(start_gateway, tmp_path, ark[1])


async def refusal(gw: RunningGateway, fields: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, headers, body = await request(gw, "POST", "/v1/videos", json=fields)
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return status, headers, body["error"]


def last_task(fake: FakeArk) -> dict[str, Any]:
    return list(fake.tasks.values())[-1]


async def test_text_to_video_request_and_status_sequence(
    gw: RunningGateway, ark: tuple[FakeArk, str]
) -> None:
    fake, _ = ark
    video = await create(
        gw, model="seedance-pro", prompt="a red fox", size="720x1280", seconds="7", seed=42, camera_fixed=True
    )
    assert video["model"] == "seedance-pro" and video["size"] == "720x1280" and video["seconds"] == "7"
    assert fake.creates == [
        {
            "model": PRO,
            "content": [{"type": "text", "text": "a red fox"}],
            "resolution": "720p",
            "ratio": "9:16",
            "duration": 7,
            "seed": 42,
            "camera_fixed": True,
            "return_last_frame": True,
        }
    ]
    headers = fake.headers[-1]
    assert (
        headers["Authorization"] == f"Bearer {UPSTREAM_KEY}" and headers["Content-Type"] == "application/json"
    )
    assert ALPHA_KEY not in str(fake.headers)

    seen = await poll_until_done(gw, video["id"])
    assert [v["status"] for v in seen] == ["queued", "in_progress", "completed"]
    assert seen[0]["progress"] == 0 and 1 <= seen[1]["progress"] <= 95 and seen[2]["progress"] == 100
    assert seen[-1]["error"] is None and seen[-1]["completed_at"] is not None
    assert seen[-1]["expires_at"] == last_task(fake)["updated_at"] + 86400


async def test_suffix_parameter_style_puts_settings_in_the_prompt(
    start_gateway: StartGateway, tmp_path: Path, ark: tuple[FakeArk, str]
) -> None:
    fake, url = ark
    gw = await start(start_gateway, tmp_path, url, options="{parameter_style: suffix}")
    video = await create(
        gw,
        model="seedance-pro",
        prompt="a cat yawns",
        size="1280x720",
        seconds="5",
        seed=11,
        camera_fixed=False,
        service_tier="flex",
    )
    assert fake.creates == [
        {
            "model": PRO,
            "content": [
                {
                    "type": "text",
                    "text": "a cat yawns --ratio 16:9 --resolution 720p --dur 5 --seed 11 "
                    "--camerafixed false",
                }
            ],
            "service_tier": "flex",
            "return_last_frame": True,
        }
    ]
    assert last_task(fake)["settings"] == {
        "ratio": "16:9",
        "resolution": "720p",
        "duration": 5,
        "seed": 11,
        "camera_fixed": False,
    }
    assert (await poll_until_done(gw, video["id"]))[-1]["status"] == "completed"


async def test_image_to_video_sends_a_first_frame(gw: RunningGateway, ark: tuple[FakeArk, str]) -> None:
    fake, _ = ark
    image = png(64, 48)
    form = {"prompt": "animate", "model": "seedance-pro", "seconds": "6"}
    status, _, video = await request(gw, "POST", "/v1/videos", data={**form, "input_reference": image})
    assert status == 200, video
    sent = fake.creates[-1]
    assert sent["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()},
        "role": "first_frame",
    }
    assert (sent["ratio"], sent["resolution"], sent["duration"]) == ("adaptive", "720p", 6)
    final = (await poll_until_done(gw, video["id"]))[-1]
    assert final["status"] == "completed" and final["size"] == "1120x832"  # Ark chose 4:3 from the image

    await create(
        gw,
        model="seedance-pro",
        prompt="a link",
        size="960x960",
        input_reference={"image_url": "https://example.com/cat.png"},
    )
    assert fake.creates[-1]["content"][1]["image_url"] == {"url": "https://example.com/cat.png"}
    assert fake.creates[-1]["ratio"] == "1:1"

    await assert_refused(
        gw, {"prompt": "no image", "model": "seedance-lite-i2v"}, status=400, param="input_reference"
    )
    status, _, body = await request(
        gw, "POST", "/v1/videos", data={"prompt": "x", "model": "seedance-lite-t2v", "input_reference": image}
    )
    assert status == 400 and body["error"]["param"] == "input_reference"


async def test_an_image_is_sent_as_what_it_is_and_a_broken_one_is_the_clients_to_fix(
    gw: RunningGateway, ark: tuple[FakeArk, str]
) -> None:
    """Ark takes ``data:image/<format>`` in lower case and standard names only: a PNG labelled
    ``image/x-png`` goes as ``image/png``. An image Ark cannot read is named as input_reference."""
    fake, _ = ark
    image = png()
    form = {"model": "seedance-pro", "prompt": "alias", "input_reference": (image, "image/x-png")}
    status, _, body = await request(gw, "POST", "/v1/videos", data=form)
    assert status == 200, body
    sent = fake.creates[-1]["content"][1]["image_url"]["url"]
    assert sent == "data:image/png;base64," + base64.b64encode(image).decode()

    broken = {"model": "seedance-pro", "prompt": "broken", "input_reference": b"\x89PNG but cut short"}
    status, _, body = await request(gw, "POST", "/v1/videos", data=broken)
    error = body["error"]
    assert (status, error["code"], error["param"]) == (400, "invalid_value", "input_reference"), body


async def test_unsupported_size_and_seconds_list_the_allowed_values(gw: RunningGateway) -> None:
    await assert_refused(
        gw,
        {"prompt": "x", "model": "seedance-pro", "seconds": "1"},
        status=400,
        param="seconds",
        mentions=("2, 3, 4", "11, 12"),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "seedance-15", "seconds": "3"},
        status=400,
        param="seconds",
        mentions=("4, 5",),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "seedance-pro", "size": "1792x1024"},
        status=400,
        param="size",
        mentions=("1248x704", "1280x720", "1920x1088"),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "seedance-15", "size": "1248x704"},
        status=400,
        param="size",
        mentions=("1470x630",),
    )


async def test_each_size_maps_to_the_documented_tier(gw: RunningGateway, ark: tuple[FakeArk, str]) -> None:
    fake, _ = ark
    cases = [
        ("seedance-pro", "1920x1080", ("1080p", "16:9")),
        ("seedance-pro", "864x480", ("480p", "16:9")),
        ("seedance-pro", "1504x640", ("720p", "21:9")),
        ("seedance-15", "864x480", ("480p", "16:9")),
        ("seedance-15", "834x1112", ("720p", "3:4")),
        ("seedance-endpoint", "1470x630", ("720p", "21:9")),
    ]
    for model, size, expected in cases:
        await create(gw, model=model, prompt="tiers", size=size, seconds="12")
        assert (fake.creates[-1]["resolution"], fake.creates[-1]["ratio"]) == expected, (model, size)
    await create(gw, model="seedance-endpoint", prompt="endpoint", seconds="15", generate_audio=True)
    assert (
        fake.creates[-1]["model"] == "ep-20260101000000-abcde" and fake.creates[-1]["generate_audio"] is True
    )


async def test_failed_filtered_expired_and_cancelled_tasks(gw: RunningGateway) -> None:
    outcomes = {}
    for word in ("fail", "nsfw", "expire", "cancel"):
        video = await create(gw, model="seedance-pro", prompt=f"[{word}] please")
        final = (await poll_until_done(gw, video["id"]))[-1]
        assert final["status"] == "failed"
        outcomes[word] = final["error"]
    assert outcomes["fail"] == {
        "code": "InternalServiceError",
        "message": "The service encountered an error.",
    }
    assert outcomes["nsfw"]["code"] == "content_filter"
    assert "OutputVideoSensitiveContentDetected" in outcomes["nsfw"]["message"]
    assert outcomes["expire"]["code"] == "expired" and outcomes["cancel"]["code"] == "cancelled"


async def test_ark_refusals_become_openai_errors(gw: RunningGateway) -> None:
    status, headers, error = await refusal(gw, {"prompt": "[429]", "model": "seedance-pro"})
    assert status == 429 and headers["Retry-After"] == "10" and error["code"] == "rate_limited"
    assert "RateLimitExceeded.EndpointRPMExceeded" in error["message"]

    status, _, error = await refusal(gw, {"prompt": "[overdue]", "model": "seedance-pro"})
    assert (status, error["code"], error["type"]) == (402, "insufficient_quota", "insufficient_quota")

    status, _, error = await refusal(gw, {"prompt": "[sensitive]", "model": "seedance-pro"})
    assert (status, error["code"]) == (400, "content_filter")

    status, _, error = await refusal(gw, {"prompt": "x", "model": "seedance-pro", "seed": 2**33})
    assert (status, error["code"], error["param"]) == (400, "invalid_value", "seed")

    status, _, error = await refusal(gw, {"prompt": "x", "model": "seedance-gone"})
    assert (status, error["code"], error["type"]) == (502, "upstream_model_not_found", "upstream_error")
    assert "routing config" in error["message"] and "doubao-seedance-9-9-pro-990101" in error["message"]

    status, _, error = await refusal(gw, {"prompt": "a dog --ratio 21:9", "model": "seedance-pro"})
    assert (status, error["param"]) == (400, "prompt")


async def test_a_rejected_upstream_key_is_a_401(
    start_gateway: StartGateway, tmp_path: Path, ark: tuple[FakeArk, str]
) -> None:
    gw = await start(start_gateway, tmp_path, ark[1], key="wrong-key-0123456789")
    status, _, error = await refusal(gw, {"prompt": "x", "model": "seedance-pro"})
    assert (status, error["code"]) == (401, "upstream_auth_failed") and "AuthenticationError" in error[
        "message"
    ]


async def test_content_and_last_frame_thumbnail_stream_through_the_gateway(
    gw: RunningGateway, ark: tuple[FakeArk, str], media: dict[str, Path]
) -> None:
    fake, _ = ark
    video = await create(gw, model="seedance-pro", prompt="stream me")
    await poll_until_done(gw, video["id"])
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and body == media["video"].read_bytes() and headers["Content-Type"] == "video/mp4"
    assert "tos" not in str(headers)

    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content?variant=thumbnail")
    assert status == 200 and body == fake.last_frame and headers["Content-Type"] == "image/jpeg"

    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content?variant=spritesheet")
    assert status == 404 and body["error"]["code"] == "variant_not_available"
    assert "spritesheet" in body["error"]["message"]

    fake.tasks.clear()  # Ark purged the task (7 days): nothing left to download
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 410 and body["error"]["code"] == "video_expired"


async def test_a_last_frame_that_is_not_an_image_is_refused(gw: RunningGateway) -> None:
    video = await create(gw, model="seedance-pro", prompt="[html] frame")
    await poll_until_done(gw, video["id"])
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content?variant=thumbnail")
    assert status == 502 and "text/html" in body["error"]["message"]


async def test_without_last_frames_there_is_no_thumbnail(
    start_gateway: StartGateway, tmp_path: Path, ark: tuple[FakeArk, str]
) -> None:
    fake, url = ark
    gw = await start(start_gateway, tmp_path, url, options="{last_frame_thumbnail: false}")
    video = await create(gw, model="seedance-pro", prompt="plain")
    assert "return_last_frame" not in fake.creates[-1]
    await poll_until_done(gw, video["id"])
    await assert_variant_missing(gw, video["id"])


async def test_delete_cancels_queued_tasks_and_forgets_running_ones(
    gw: RunningGateway, ark: tuple[FakeArk, str]
) -> None:
    fake, _ = ark
    queued = await create(gw, model="seedance-pro", prompt="cancel me")
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{queued['id']}")
    assert status == 200 and body["deleted"] is True and last_task(fake)["status"] == "cancelled"

    running = await create(gw, model="seedance-pro", prompt="too late")
    for _ in range(2):
        await request(gw, "GET", f"/v1/videos/{running['id']}")
    assert last_task(fake)["status"] == "running"
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{running['id']}")
    assert status == 200 and body["deleted"] is True  # Ark refused; the gateway forgets it anyway
    assert (await request(gw, "GET", f"/v1/videos/{running['id']}"))[0] == 404

    done = await create(gw, model="seedance-pro", prompt="finished")
    await poll_until_done(gw, done["id"])
    upstream_id = last_task(fake)["id"]
    status, _, _ = await request(gw, "DELETE", f"/v1/videos/{done['id']}")
    assert status == 200 and upstream_id not in fake.tasks and fake.deleted[-1] == upstream_id


async def test_official_sdk_end_to_end(gw: RunningGateway, media: dict[str, Path]) -> None:
    assert await assert_sdk_roundtrip(gw, "seedance-pro", prompt="sdk", size="1280x720", seconds="4") == (
        media["video"].read_bytes()
    )


async def test_a_task_id_is_used_whole(gw: RunningGateway, ark: tuple[FakeArk, str]) -> None:
    await assert_task_id_kept_whole(gw, ark[0], "seedance-pro")


def test_the_result_hosts_of_volcengine_and_byteplus_are_followed(tmp_path: Path) -> None:
    """The fake serves results from its own host, so this is the test of the built-in list: Ark's
    result buckets on Volcengine (Beijing) and BytePlus (Johor), on both of BytePlus's domains."""
    config = ProviderConfig(name="ark", kind="seedance", api_key="k")
    adapter = ADAPTERS["seedance"](config, AdapterEnv(data_dir=tmp_path, hosted=None))
    for host in (
        "ark-content-generation-cn-beijing.tos-cn-beijing.volces.com",
        "ark-content-generation-ap-southeast-1.tos-ap-southeast-1.volces.com",
        "ark-content-generation-v2-ap-southeast-1.tos-ap-southeast-1.bytepluses.com",
    ):
        assert adapter.result_host_allowed(f"https://{host}/doubao-seedance/v.mp4?X-Tos-Expires=86400"), host
    assert not adapter.result_host_allowed("https://tos-ap-southeast-1.bytepluses.com.example.com/v.mp4")


def test_a_model_unknown_at_request_time_is_named_as_written(tmp_path: Path) -> None:
    """The config refuses such a model; a task stored under an older config can still name one.
    The 400 names it as written (Ark's model IDs are case-sensitive), not lower-cased."""
    adapter = ADAPTERS["seedance"](
        ProviderConfig(name="ark", kind="seedance", api_key="k"), AdapterEnv(data_dir=tmp_path, hosted=None)
    )
    with pytest.raises(ApiError) as caught:
        adapter.spec("Some-Chat-Model")
    assert caught.value.message.startswith("The seedance provider does not know the model 'Some-Chat-Model'")
    assert "Ark endpoint ID" in caught.value.message and caught.value.code == "unsupported_model"


async def test_a_moments_404_ends_nothing(
    gw: RunningGateway, ark: tuple[FakeArk, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await assert_a_moments_404_ends_nothing(
        gw, ark[0].tasks, monkeypatch, model="seedance-pro", prompt="a red fox"
    )
