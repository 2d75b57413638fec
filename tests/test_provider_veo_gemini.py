"""The Veo adapter for the Gemini API against a fake of it (tests/fakes/veo_gemini.py)."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway
from tests.fakes.veo_gemini import FakeVeoGemini
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

MODELS = """
    veo:
      provider: native
      model: veo-3.1-generate-preview
    veo-fast:
      provider: native
      model: veo-3.0-fast-generate-001
    veo-2:
      provider: native
      model: veo-2.0-generate-001
"""


@pytest.fixture
async def gemini(aiohttp_server: Any, media: dict[str, Path]) -> tuple[FakeVeoGemini, str]:
    fake = FakeVeoGemini(api_key=UPSTREAM_KEY, video=media["video"])
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("")).rstrip("/")


def provider(url: str, key: str = "${UPSTREAM_KEY}") -> str:
    return f"""
        kind: veo
        base_url: {url}
        api_key: {key}
        poll_after_ms: 100
    """


@pytest.fixture
async def gw(
    start_gateway: StartGateway, tmp_path: Path, gemini: tuple[FakeVeoGemini, str]
) -> RunningGateway:
    return await start_provider_gateway(start_gateway, tmp_path, provider(gemini[1]), MODELS)


async def test_text_to_video_request_and_status_sequence(
    gw: RunningGateway, gemini: tuple[FakeVeoGemini, str]
) -> None:
    fake, _ = gemini
    fields = {"negativePrompt": "rain", "personGeneration": "allow_all"}
    video = await create(gw, model="veo", prompt="a red fox", size="1080x1920", seconds="8", **fields)
    assert video["status"] == "queued" and video["size"] == "1080x1920" and video["seconds"] == "8"
    ((model, body),) = fake.creates
    assert model == "veo-3.1-generate-preview"
    assert body == {
        "instances": [{"prompt": "a red fox"}],
        "parameters": {
            "aspectRatio": "9:16",
            "resolution": "1080p",
            "durationSeconds": 8,
            "negativePrompt": "rain",
            "personGeneration": "allow_all",
        },
    }
    headers = fake.headers[-1]
    assert headers["x-goog-api-key"] == UPSTREAM_KEY and "Authorization" not in headers
    assert ALPHA_KEY not in str(fake.headers)

    seen = await poll_until_done(gw, video["id"])
    assert [v["status"] for v in seen] == ["in_progress", "in_progress", "completed"]
    assert all(1 <= v["progress"] <= 95 for v in seen[:-1]) and seen[-1]["progress"] == 100
    assert seen[-1]["error"] is None
    assert abs(seen[-1]["expires_at"] - (time.time() + 2 * 24 * 3600)) < 60


async def test_image_is_sent_inline_and_urls_are_refused(
    gw: RunningGateway, gemini: tuple[FakeVeoGemini, str]
) -> None:
    fake, _ = gemini
    image = png()
    form = {"prompt": "animate", "model": "veo-2", "size": "720x1280", "seconds": "5"}
    status, _, body = await request(gw, "POST", "/v1/videos", data={**form, "input_reference": image})
    assert status == 200, body
    ((_, sent),) = fake.creates
    assert sent["instances"][0]["image"] == {
        "bytesBase64Encoded": base64.b64encode(image).decode(),
        "mimeType": "image/png",
    }
    assert sent["parameters"] == {"aspectRatio": "9:16", "durationSeconds": 5}

    await assert_refused(
        gw,
        {"prompt": "x", "model": "veo", "input_reference": {"image_url": "https://example.com/cat.png"}},
        status=400,
        param="input_reference",
        mentions=("image URLs",),
    )
    assert len(fake.creates) == 1


async def test_an_empty_size_or_a_zero_duration_is_refused_not_taken_for_the_default(
    gw: RunningGateway, gemini: tuple[FakeVeoGemini, str]
) -> None:
    """A value the client sent is checked as sent: ``seconds: 0`` made an 8-second video and
    ``size: ""`` a 1280x720 one, where the local provider answers 400 (nothing is snapped silently)."""
    await assert_refused(gw, {"prompt": "x", "model": "veo", "seconds": 0}, status=400, param="seconds")
    await assert_refused(gw, {"prompt": "x", "model": "veo", "seconds": ""}, status=400, param="seconds")
    await assert_refused(gw, {"prompt": "x", "model": "veo", "size": ""}, status=400, param="size")
    assert gemini[0].creates == []


async def test_unsupported_size_and_seconds_list_the_allowed_values(gw: RunningGateway) -> None:
    await assert_refused(
        gw,
        {"prompt": "x", "model": "veo", "size": "1792x1024"},
        status=400,
        param="size",
        mentions=("1280x720, 720x1280, 1080x1920, 1920x1080",),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "veo", "seconds": "12"},
        status=400,
        param="seconds",
        mentions=("4, 6, 8",),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "veo-2", "seconds": "4"},
        status=400,
        param="seconds",
        mentions=("5, 6, 8",),
    )
    await assert_refused(gw, {"prompt": "x", "model": "veo-2", "size": "1920x1080"}, status=400, param="size")
    for seconds in ("5", "7"):  # between Veo 3's lengths: no fast model takes them either
        await assert_refused(
            gw,
            {"prompt": "x", "model": "veo-fast", "seconds": seconds},
            status=400,
            param="seconds",
            mentions=("4, 6, 8",),
        )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "veo-fast", "size": "1920x1080", "seconds": "4"},
        status=400,
        param="seconds",
        mentions=("at 1080p: 8",),
    )


async def test_failed_and_content_filtered_operations(gw: RunningGateway) -> None:
    failed = await create(gw, model="veo", prompt="[fail] please")
    final = (await poll_until_done(gw, failed["id"]))[-1]
    assert final["status"] == "failed"
    assert final["error"] == {
        "code": "internal",
        "message": "Video generation failed due to an internal error.",
    }

    filtered = await create(gw, model="veo", prompt="[filter] forbidden")
    final = (await poll_until_done(gw, filtered["id"]))[-1]
    assert final["status"] == "failed"
    assert final["error"] == {
        "code": "content_filter",
        "message": "The video was filtered because it may violate our policies.",
    }


async def test_rate_limit_becomes_429_with_retry_after(gw: RunningGateway) -> None:
    headers = await assert_refused(
        gw, {"prompt": "[429]", "model": "veo"}, status=429, mentions=("RESOURCE_EXHAUSTED",)
    )
    assert headers["Retry-After"] == "28"


async def test_bad_upstream_key_is_reported_as_the_gateways(
    start_gateway: StartGateway, tmp_path: Path, gemini: tuple[FakeVeoGemini, str]
) -> None:
    gw = await start_provider_gateway(start_gateway, tmp_path, provider(gemini[1], "wrong-key"), MODELS)
    got, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "x", "model": "veo"})
    assert got == 401 and body["error"]["code"] == "upstream_auth_failed"
    assert "API key not valid" in body["error"]["message"]


async def test_content_streams_with_the_key_only_to_the_api(
    gw: RunningGateway, gemini: tuple[FakeVeoGemini, str], media: dict[str, Path]
) -> None:
    fake, _ = gemini
    video = await create(gw, model="veo", prompt="stream me")
    await poll_until_done(gw, video["id"])
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and body == media["video"].read_bytes() and headers["Content-Type"] == "video/mp4"
    (api_path, api_headers), (media_path, media_headers) = fake.downloads
    assert api_path.endswith(":download") and api_headers["x-goog-api-key"] == UPSTREAM_KEY
    assert media_path.startswith("/media/") and "x-goog-api-key" not in media_headers

    await assert_variant_missing(gw, video["id"])
    fake.files.clear()
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 410 and body["error"]["code"] == "video_expired"


async def test_delete_forgets_the_video(gw: RunningGateway, gemini: tuple[FakeVeoGemini, str]) -> None:
    video = await create(gw, model="veo", prompt="short-lived")
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{video['id']}")
    assert status == 200 and body["deleted"] is True
    status, _, _ = await request(gw, "GET", f"/v1/videos/{video['id']}")
    assert status == 404


async def test_a_model_google_no_longer_serves_is_the_operators_to_fix(
    gw: RunningGateway, gemini: tuple[FakeVeoGemini, str]
) -> None:
    """Google answers 404 NOT_FOUND to a create for a model it retired: a 502 naming the model and
    the routing config (and a failover where the model has another deployment), not the client's
    404, which the SDK reads as its own mistake."""
    gemini[0].retired.add("veo-3.1-generate-preview")
    status, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "x", "model": "veo"})
    assert status == 502 and body["error"]["code"] == "upstream_model_not_found", body
    assert (
        "veo-3.1-generate-preview" in body["error"]["message"]
        and "routing config" in body["error"]["message"]
    )


async def test_a_create_naming_no_size_or_seconds_gets_openais_defaults(
    gw: RunningGateway, gemini: tuple[FakeVeoGemini, str]
) -> None:
    """OpenAI makes 720x1280, 4 s when a create names neither (openai-videos-api §2.1); Veo makes
    both, so an application moved from OpenAI gets the same video here, not a landscape 8 s one."""
    fake, _ = gemini
    video = await create(gw, model="veo", prompt="defaults")
    assert (video["size"], video["seconds"]) == ("720x1280", "4")
    assert fake.creates[-1][1]["parameters"] == {
        "aspectRatio": "9:16",
        "resolution": "720p",
        "durationSeconds": 4,
    }
    video = await create(gw, model="veo", prompt="only the length", seconds="8")
    assert (video["size"], video["seconds"]) == ("720x1280", "8")
    video = await create(gw, model="veo", prompt="only the size", size="1920x1080")
    assert (video["size"], video["seconds"]) == ("1920x1080", "8"), "1080p is made at 8 s only"


async def test_official_sdk_end_to_end(gw: RunningGateway, media: dict[str, Path]) -> None:
    assert await assert_sdk_roundtrip(gw, "veo", prompt="sdk", size="1280x720", seconds="4") == (
        media["video"].read_bytes()
    )


async def test_a_moments_404_ends_nothing(
    gw: RunningGateway, gemini: tuple[FakeVeoGemini, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await assert_a_moments_404_ends_nothing(
        gw, gemini[0].operations, monkeypatch, model="veo", prompt="a red fox"
    )


async def test_an_unsendable_job_name_is_refused(gw: RunningGateway) -> None:
    await assert_an_unsendable_job_name_is_refused(gw, "veo")


@pytest.mark.parametrize(
    "uri",
    [
        "https://files.example.net/v1beta/files/abc:download?alt=media",  # another origin
        "https://[2001:db8::1/files/abc:download",  # no URL at all: an unclosed IPv6 host
    ],
)
async def test_a_file_the_api_names_elsewhere_is_never_fetched_with_the_key(
    gw: RunningGateway, gemini: tuple[FakeVeoGemini, str], uri: str
) -> None:
    """The download sends the API key only to the Gemini API's own origin: a finished operation
    naming its file anywhere else, or naming something that is no URL, is the provider's broken
    answer (502), and nothing is fetched."""
    fake, _ = gemini
    fake.file_uri = uri
    video = await create(gw, model="veo", prompt="a fox")
    assert (await poll_until_done(gw, video["id"]))[-1]["status"] == "completed"
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 502 and body["error"]["type"] == "upstream_error", body
    assert fake.downloads == []
