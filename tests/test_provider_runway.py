"""The Runway adapter against a fake of Runway's API (tests/fakes/runway.py)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway
from tests.fakes.runway import FakeRunway
from tests.provider_contract import (
    ODD_TASK_ID,
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

MODELS = """
    gen-video:
      provider: native
      model: gen4.5
    turbo:
      provider: native
      model: gen4_turbo
    veo-on-runway:
      provider: native
      model: veo3.1
"""


@pytest.fixture
async def runway(aiohttp_server: Any, media: dict[str, Path]) -> tuple[FakeRunway, str]:
    fake = FakeRunway(api_key=UPSTREAM_KEY, video=media["video"])
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def gw(start_gateway: StartGateway, tmp_path: Path, runway: tuple[FakeRunway, str]) -> RunningGateway:
    provider = f"""
        kind: runway
        base_url: {runway[1]}
        api_key: ${{UPSTREAM_KEY}}
        poll_after_ms: 100
    """
    return await start_provider_gateway(start_gateway, tmp_path, provider, MODELS)


async def test_text_to_video_request_and_status_sequence(
    gw: RunningGateway, runway: tuple[FakeRunway, str]
) -> None:
    fake, _ = runway
    video = await create(gw, model="gen-video", prompt="a red fox", size="720x1280", seconds="7")
    assert video["model"] == "gen-video" and video["size"] == "720x1280" and video["seconds"] == "7"
    ((endpoint, body),) = fake.creates
    assert endpoint == "text_to_video"
    assert body == {"model": "gen4.5", "promptText": "a red fox", "ratio": "720:1280", "duration": 7}
    headers = fake.headers[-1]
    assert (
        headers["Authorization"] == f"Bearer {UPSTREAM_KEY}" and headers["X-Runway-Version"] == "2024-11-06"
    )
    assert ALPHA_KEY not in str(fake.headers)

    seen = await poll_until_done(gw, video["id"])
    assert [v["status"] for v in seen] == ["queued", "in_progress", "completed"]
    assert [v["progress"] for v in seen] == [0, 40, 100]
    assert seen[-1]["completed_at"] is not None and seen[-1]["error"] is None


@pytest.mark.parametrize("progress", [1e308, -0.5, 3, True, "0.4"])
async def test_a_progress_that_is_no_fraction_is_ignored(
    gw: RunningGateway, runway: tuple[FakeRunway, str], progress: object
) -> None:
    """Runway reports a fraction; anything else is ignored (1e308 times 100 is infinity, which no
    integer holds: that poll used to fail with a 500)."""
    fake, _ = runway
    fake.running_progress = progress
    video = await create(gw, model="gen-video", prompt="a red fox", size="720x1280", seconds="7")
    seen = await poll_until_done(gw, video["id"])
    assert [v["status"] for v in seen] == ["queued", "in_progress", "completed"]
    assert [v["progress"] for v in seen] == [0, 0, 100]


async def test_a_task_nearly_done_is_not_shown_done(
    gw: RunningGateway, runway: tuple[FakeRunway, str]
) -> None:
    """Runway's 0.997 rounds to 100: a client taking 100 for finished would download too soon."""
    fake, _ = runway
    fake.running_progress = 0.997
    video = await create(gw, model="gen-video", prompt="a red fox", size="720x1280", seconds="7")
    seen = await poll_until_done(gw, video["id"])
    progress = [(v["status"], v["progress"]) for v in seen]
    assert progress == [("queued", 0), ("in_progress", 99), ("completed", 100)]


async def test_image_to_video_sends_a_data_uri(gw: RunningGateway, runway: tuple[FakeRunway, str]) -> None:
    fake, _ = runway
    image = png()
    form = {"prompt": "animate", "model": "turbo", "size": "960x960", "seconds": "10"}
    status, _, body = await request(gw, "POST", "/v1/videos", data={**form, "input_reference": image})
    assert status == 200, body
    ((endpoint, sent),) = fake.creates
    assert endpoint == "image_to_video" and sent["ratio"] == "960:960" and sent["duration"] == 10
    assert sent["promptImage"] == "data:image/png;base64," + base64.b64encode(image).decode()

    await assert_refused(gw, {"prompt": "no image", "model": "turbo"}, status=400, param="input_reference")


async def test_an_image_url_that_is_no_url_is_refused(gw: RunningGateway) -> None:
    """``urlsplit`` raises on some strings (an unclosed IPv6 bracket): that is the client's 400."""
    fields = {"prompt": "animate", "model": "turbo", "input_reference": {"image_url": "http://[::1"}}
    await assert_refused(gw, fields, status=400, param="input_reference")


@pytest.mark.parametrize("seed", ["[" * 100_000, "[" * 1000 + "]" * 1000, "NaN"])
async def test_a_form_field_is_read_as_strict_json_or_as_text(
    gw: RunningGateway, runway: tuple[FakeRunway, str], seed: str
) -> None:
    """Form values are parsed as JSON when they look like it: nesting 100 000 deep (a
    RecursionError for Python's json), 1 000 deep (valid JSON that Python could not write back)
    and NaN (no JSON) stay text, which Runway then refuses or takes; either way the client hears a
    clear answer, never a 500."""
    form = {"prompt": "animate", "model": "gen-video", "seed": seed}
    status, _, body = await request(gw, "POST", "/v1/videos", data=form)
    assert status in (200, 400), body
    if status == 200:
        assert runway[0].creates[-1][1]["seed"] == seed  # as text: NaN is no JSON number


@pytest.mark.parametrize("location", ["http://[::1", "http://127.0.0.1:99999/out.mp4"])
async def test_a_result_redirect_to_no_url_is_a_502(
    gw: RunningGateway, runway: tuple[FakeRunway, str], location: str
) -> None:
    video = await create(gw, model="gen-video", prompt="a red fox")
    await poll_until_done(gw, video["id"])
    runway[0].redirect_to = location
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 502 and body["error"]["type"] == "upstream_error", body


async def test_unsupported_size_and_seconds_list_the_allowed_values(gw: RunningGateway) -> None:
    await assert_refused(
        gw,
        {"prompt": "x", "model": "veo-on-runway", "seconds": "5"},
        status=400,
        param="seconds",
        mentions=("4, 6, 8",),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "gen-video", "size": "1792x1024"},
        status=400,
        param="size",
        mentions=("1280x720", "720x1280"),
    )


async def test_gen45_takes_its_image_ratios_with_an_image_and_two_without(
    gw: RunningGateway, runway: tuple[FakeRunway, str]
) -> None:
    """Reference §c: gen4.5 takes six ratios for image-to-video, only 1280:720 and 720:1280 for
    text-to-video."""
    fake, _ = runway
    for size in ("1104x832", "960x960", "832x1104", "1584x672"):
        form = {"prompt": "animate", "model": "gen-video", "size": size, "input_reference": png()}
        status, _, body = await request(gw, "POST", "/v1/videos", data=form)
        assert status == 200 and body["size"] == size, body
        assert fake.creates[-1][0] == "image_to_video"
        assert fake.creates[-1][1]["ratio"] == size.replace("x", ":")
    sent = len(fake.creates)
    await assert_refused(
        gw,
        {"prompt": "x", "model": "gen-video", "size": "960x960"},
        status=400,
        param="size",
        mentions=("needs an input_reference image", "1280x720, 720x1280"),
    )
    assert len(fake.creates) == sent


async def test_runways_input_limits_are_told_before_it_is_asked(
    gw: RunningGateway, runway: tuple[FakeRunway, str]
) -> None:
    """Runway takes a data URI under 5 MB (a 3.75 MiB image is over it once base64-encoded), image
    URLs over HTTPS only, and prompts up to 1000 UTF-16 code units (an emoji is two)."""
    fake, _ = runway
    big = png() + bytes(int(3.8 * 1024 * 1024))  # a PNG with trailing bytes: still sniffed as one
    status, _, body = await request(
        gw, "POST", "/v1/videos", data={"prompt": "x", "model": "turbo", "input_reference": big}
    )
    assert status == 413 and body["error"]["param"] == "input_reference", body
    assert "3.7 MiB" in body["error"]["message"], body
    ok = png() + bytes(3 * 1024 * 1024)
    status, _, body = await request(
        gw, "POST", "/v1/videos", data={"prompt": "x", "model": "turbo", "input_reference": ok}
    )
    assert status == 200, body
    sent = len(fake.creates)
    plain = {"prompt": "x", "model": "turbo", "input_reference": {"image_url": "http://img.example/a.png"}}
    await assert_refused(gw, plain, status=400, param="input_reference", mentions=("HTTPS",))
    await assert_refused(
        gw,
        {"prompt": "\U0001f98a" * 501, "model": "gen-video"},
        status=400,
        param="prompt",
        mentions=("1000",),
    )
    assert len(fake.creates) == sent
    status, _, body = await request(
        gw, "POST", "/v1/videos", json={"prompt": "\U0001f98a" * 500, "model": "gen-video"}
    )
    assert status == 200, body


async def test_runway_refusing_the_gateways_key_is_not_the_clients_bad_key(
    start_gateway: StartGateway, tmp_path: Path, runway: tuple[FakeRunway, str]
) -> None:
    provider = f"""
        kind: runway
        base_url: {runway[1]}
        api_key: not-the-key
    """
    gw = await start_provider_gateway(start_gateway, tmp_path, provider, MODELS)
    await assert_refused(
        gw,
        {"prompt": "x", "model": "gen-video"},
        status=401,
        mentions=("Runway rejected the gateway's API key.", "Invalid API key."),
    )
    _, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "x", "model": "gen-video"})
    assert body["error"]["code"] == "upstream_auth_failed"


async def test_clients_are_told_runways_own_pace_unless_the_config_says(
    start_gateway: StartGateway, tmp_path: Path, runway: tuple[FakeRunway, str], gw: RunningGateway
) -> None:
    """Runway asks its clients not to expect news more often than every five seconds; the SDK's
    create_and_poll waits what openai-poll-after-ms says, which was a second for every provider."""
    provider = f"""
        kind: runway
        base_url: {runway[1]}
        api_key: ${{UPSTREAM_KEY}}
    """
    paced = await start_provider_gateway(start_gateway, tmp_path / "paced", provider, MODELS)
    for running, pace in ((paced, "5000"), (gw, "100")):  # gw's config says 100
        video = await create(running, model="gen-video", prompt="paced")
        status, headers, body = await request(running, "GET", f"/v1/videos/{video['id']}")
        assert status == 200 and body["status"] in ("queued", "in_progress"), body
        assert headers["openai-poll-after-ms"] == pace


async def test_failed_and_cancelled_tasks(gw: RunningGateway) -> None:
    failed = await create(gw, model="gen-video", prompt="[fail] forbidden")
    final = (await poll_until_done(gw, failed["id"]))[-1]
    assert final["status"] == "failed"
    assert final["error"] == {  # filtered, as every provider's filtered job is; Runway's code kept
        "code": "content_filter",
        "message": "Content moderation rejected the input. (SAFETY.INPUT.TEXT)",
    }

    cancelled = await create(gw, model="gen-video", prompt="[cancel] please")
    final = (await poll_until_done(gw, cancelled["id"]))[-1]
    assert final["status"] == "failed" and final["error"]["code"] == "cancelled"


async def test_rate_limit_becomes_429_with_retry_after(gw: RunningGateway) -> None:
    headers = await assert_refused(
        gw, {"prompt": "[429]", "model": "gen-video"}, status=429, mentions=("daily generation limit",)
    )
    assert headers["Retry-After"] == "1", "Runway sends none: the gateway's own, for the SDK's backoff"


async def test_content_streams_through_the_gateway(gw: RunningGateway, media: dict[str, Path]) -> None:
    video = await create(gw, model="gen-video", prompt="stream me")
    await poll_until_done(gw, video["id"])
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and body == media["video"].read_bytes() and headers["Content-Type"] == "video/mp4"
    await assert_variant_missing(gw, video["id"])


async def test_delete_cancels_at_runway(gw: RunningGateway, runway: tuple[FakeRunway, str]) -> None:
    video = await create(gw, model="gen-video", prompt="short-lived")
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{video['id']}")
    assert status == 200 and body["deleted"] is True and runway[0].tasks == {}


async def test_official_sdk_end_to_end(gw: RunningGateway, media: dict[str, Path]) -> None:
    assert await assert_sdk_roundtrip(gw, "gen-video", prompt="sdk", size="1280x720", seconds="5") == (
        media["video"].read_bytes()
    )


async def test_a_task_id_is_used_whole(gw: RunningGateway, runway: tuple[FakeRunway, str]) -> None:
    video_id = await assert_task_id_kept_whole(gw, runway[0], "gen-video")
    status, _, deleted = await request(gw, "DELETE", f"/v1/videos/{video_id}")
    assert status == 200 and deleted["deleted"] is True, deleted
    assert ODD_TASK_ID not in runway[0].tasks  # the cancel reached the task's own path


async def test_a_moments_404_ends_nothing(
    gw: RunningGateway, runway: tuple[FakeRunway, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await assert_a_moments_404_ends_nothing(
        gw, runway[0].tasks, monkeypatch, model="gen-video", prompt="a red fox"
    )


async def test_an_object_the_sdk_flattens_into_a_form_arrives_whole(
    gw: RunningGateway, runway: tuple[FakeRunway, str]
) -> None:
    """``contentModeration`` is an object: the SDK's form writes it as
    ``contentModeration[publicFigureThreshold]``, which Runway gets back as the object."""
    fake, _ = runway
    await gw.sdk().videos.create(
        prompt="a crowd",
        model="gen-video",  # type: ignore[arg-type]
        seconds="5",  # type: ignore[arg-type]
        extra_body={"contentModeration": {"publicFigureThreshold": "low"}, "seed": 7},
    )
    ((_, sent),) = fake.creates
    assert sent["contentModeration"] == {"publicFigureThreshold": "low"} and sent["seed"] == 7
