"""The MiniMax Hailuo adapter against a fake of MiniMax's v1 video API (tests/fakes/minimax.py)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.providers.minimax import refusal
from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway
from tests.fakes.minimax import FakeMiniMax
from tests.provider_contract import (
    assert_a_moments_404_ends_nothing,
    assert_refused,
    assert_sdk_roundtrip,
    assert_task_id_kept_whole,
    assert_variant_missing,
    create,
    create_with_a_huge_image,
    png,
    poll_until_done,
    request,
    start_provider_gateway,
)

MODELS = """
    hailuo:
      provider: native
      model: MiniMax-Hailuo-2.3
    hailuo-02:
      provider: native
      model: MiniMax-Hailuo-02
    hailuo-fast:
      provider: native
      model: MiniMax-Hailuo-2.3-Fast
    t2v-01:
      provider: native
      model: T2V-01
    i2v-01:
      provider: native
      model: I2V-01
"""


@pytest.fixture
async def minimax(aiohttp_server: Any, media: dict[str, Path]) -> FakeMiniMax:
    fake = FakeMiniMax(api_key=UPSTREAM_KEY, video=media["video"])
    server = await aiohttp_server(fake.app())
    fake.base_url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def gw(start_gateway: StartGateway, tmp_path: Path, minimax: FakeMiniMax) -> RunningGateway:
    provider = f"""
        kind: minimax
        base_url: {minimax.base_url}
        api_key: ${{UPSTREAM_KEY}}
        poll_after_ms: 100
    """
    return await start_provider_gateway(start_gateway, tmp_path, provider, MODELS)


async def test_text_to_video_request_and_status_sequence(gw: RunningGateway, minimax: FakeMiniMax) -> None:
    video = await create(
        gw, model="hailuo", prompt="a red fox", size="1366x768", seconds="10", prompt_optimizer=False
    )
    assert video["model"] == "hailuo" and video["size"] == "1366x768" and video["seconds"] == "10"
    assert minimax.creates == [
        {
            "model": "MiniMax-Hailuo-2.3",
            "prompt": "a red fox",
            "duration": 10,
            "resolution": "768P",
            "prompt_optimizer": False,
        }
    ]
    headers = minimax.headers[-1]
    assert (
        headers["Authorization"] == f"Bearer {UPSTREAM_KEY}" and headers["Content-Type"] == "application/json"
    )
    assert ALPHA_KEY not in str(minimax.headers)

    seen = await poll_until_done(gw, video["id"])
    # Preparing, Queueing, Processing, Processing, Success
    assert [v["status"] for v in seen] == ["queued", "queued", "in_progress", "in_progress", "completed"]
    progress = [v["progress"] for v in seen]
    assert progress[:2] == [0, 0] and 1 <= progress[2] <= progress[3] <= 95 and progress[4] == 100
    assert seen[-1]["size"] == "1366x768" and seen[-1]["error"] is None


async def test_an_image_too_large_to_send_inline_is_refused_unread(
    gw: RunningGateway, minimax: FakeMiniMax
) -> None:
    """An image goes to MiniMax inline (a data URL in its JSON), so the gateway must hold it whole:
    one over 20 MiB is a 413 before it is read into memory, not a gateway holding gigabytes."""
    status, body, peak = await create_with_a_huge_image(gw, "hailuo-fast", mib=256)
    assert status == 413 and body["error"]["code"] == "request_too_large", body
    assert body["error"]["param"] == "input_reference"
    assert peak < 32 * 1024 * 1024, f"{peak / 2**20:.0f} MiB held for a refused image"
    assert minimax.creates == []

    # ... and refused as soon as the image passes 20 MiB, not after the rest of a 1 GiB upload
    head = (
        f"POST /v1/videos HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"
        f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {2**30}\r\n\r\n"
        '--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nhailuo-fast\r\n'
        '--b\r\nContent-Disposition: form-data; name="input_reference"; filename="i.png"\r\n\r\n'
    ).encode()
    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    try:
        writer.write(head + bytes(24 * 1024 * 1024))
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
    finally:
        writer.transport.abort()
    assert answer.startswith(b"HTTP/1.1 413"), answer


async def test_image_to_video_sends_a_data_url_and_follows_the_image(
    gw: RunningGateway, minimax: FakeMiniMax
) -> None:
    image = png(48, 64)  # portrait
    form = {"prompt": "animate", "model": "hailuo-fast", "size": "1366x768", "seconds": "6"}
    status, _, body = await request(gw, "POST", "/v1/videos", data={**form, "input_reference": image})
    assert status == 200, body
    (sent,) = minimax.creates
    assert (
        sent["model"] == "MiniMax-Hailuo-2.3-Fast" and sent["resolution"] == "768P" and sent["duration"] == 6
    )
    assert sent["first_frame_image"] == "data:image/png;base64," + base64.b64encode(image).decode()
    final = (await poll_until_done(gw, body["id"]))[-1]
    assert final["status"] == "completed" and final["size"] == "768x1366", "the size MiniMax made"

    url_ref = {"image_url": "https://images.example.com/cat.jpg"}
    await create(gw, model="hailuo-02", prompt="walk", size="512x912", input_reference=url_ref)
    assert minimax.creates[-1]["first_frame_image"] == url_ref["image_url"], "URLs pass through unfetched"
    assert minimax.creates[-1]["resolution"] == "512P"

    await assert_refused(
        gw, {"prompt": "no image", "model": "hailuo-fast"}, status=400, param="input_reference"
    )


async def test_text_to_video_is_landscape_only(gw: RunningGateway, minimax: FakeMiniMax) -> None:
    await assert_refused(
        gw,
        {"prompt": "x", "model": "hailuo", "size": "768x1366"},
        status=400,
        param="size",
        mentions=("landscape", "1366x768, 1920x1080"),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "hailuo-02", "size": "912x512"},
        status=400,
        param="size",
        mentions=("512P", "input_reference"),
    )
    assert minimax.creates == []


async def test_unsupported_size_and_seconds_list_the_allowed_values(gw: RunningGateway) -> None:
    await assert_refused(
        gw, {"prompt": "x", "model": "t2v-01", "seconds": "10"}, status=400, param="seconds", mentions=("6",)
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "hailuo", "size": "1280x720"},
        status=400,
        param="size",
        mentions=("1366x768", "1920x1080"),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "hailuo-02", "size": "1920x1080", "seconds": "10"},
        status=400,
        param="seconds",
        mentions=("1920x1080", "1080P", "'10'", "1366x768"),
    )
    await assert_refused(gw, {"prompt": "x" * 2001, "model": "hailuo"}, status=400, param="prompt")


async def test_errors_inside_http_200_answers(gw: RunningGateway, minimax: FakeMiniMax) -> None:
    headers = await assert_refused(
        gw, {"prompt": "[1002]", "model": "hailuo"}, status=429, mentions=("rate limit", "1002")
    )
    assert headers["Retry-After"] == "10"
    status, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "[1008]", "model": "hailuo"})
    assert status == 402 and body["error"]["type"] == "insufficient_quota", body
    assert "insufficient balance" in body["error"]["message"]
    status, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "[1026]", "model": "hailuo"})
    assert status == 400 and body["error"]["code"] == "content_filter", body

    minimax.api_key = "rotated-key"
    status, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "hi", "model": "hailuo"})
    assert status == 401 and "2049" in body["error"]["message"] and UPSTREAM_KEY not in str(body), body


@pytest.mark.parametrize(
    ("code", "status", "error_code"),
    [(1004, 401, "upstream_auth_failed"), (2013, 400, "invalid_value"), (1013, 502, "upstream_error")],
)
def test_other_status_codes(code: int, status: int, error_code: str) -> None:
    error = refusal(code, "from MiniMax")
    assert (error.status, error.code) == (status, error_code) and "from MiniMax" in error.message


async def test_a_rate_limited_poll_does_not_fail_the_video(gw: RunningGateway) -> None:
    video = await create(gw, model="hailuo", prompt="[busy] later")
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}")
    assert status == 429 and headers["Retry-After"] == "10", body
    final = (await poll_until_done(gw, video["id"]))[-1]
    assert final["status"] == "completed"


async def test_a_task_minimax_no_longer_knows_is_not_found(gw: RunningGateway, minimax: FakeMiniMax) -> None:
    """MiniMax answers a query for a task it does not know with 2013 'invalid params' in an HTTP 200;
    its one parameter is the task_id MiniMax itself gave, so the job is gone: 404 video_not_found, as
    for any provider's 404 of a known video, not a 400 telling the client its request was wrong."""
    video = await create(gw, model="hailuo", prompt="forgotten")
    minimax.tasks.clear()
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}")
    assert status == 404 and body["error"]["code"] == "video_not_found", body
    assert video["id"] in body["error"]["message"]


async def test_failed_and_content_filtered_tasks(gw: RunningGateway) -> None:
    failed = await create(gw, model="hailuo", prompt="[fail] please")
    final = (await poll_until_done(gw, failed["id"]))[-1]
    assert final["status"] == "failed" and final["error"]["code"] == "generation_failed"

    filtered = await create(gw, model="hailuo", prompt="[1027] please")
    final = (await poll_until_done(gw, filtered["id"]))[-1]
    assert final["status"] == "failed"
    assert final["error"] == {"code": "content_filter", "message": "output video sensitive"}


async def test_every_download_fetches_a_fresh_url(
    gw: RunningGateway, minimax: FakeMiniMax, media: dict[str, Path]
) -> None:
    video = await create(gw, model="hailuo", prompt="stream me")
    await poll_until_done(gw, video["id"])
    for _ in range(2):
        status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
        assert (
            status == 200 and body == media["video"].read_bytes() and headers["Content-Type"] == "video/mp4"
        )
    first, second = minimax.minted
    assert first != second
    async with aiohttp.ClientSession() as session, session.get(first) as stale:
        assert stale.status == 403, "the first signed URL expired when the second was minted"

    await assert_variant_missing(gw, video["id"])
    minimax.files.clear()
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 410 and body["error"]["code"] == "video_expired", body


async def test_delete_removes_the_result_file(gw: RunningGateway, minimax: FakeMiniMax) -> None:
    video = await create(gw, model="hailuo", prompt="short-lived")
    await poll_until_done(gw, video["id"])
    (file_id,) = minimax.files
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{video['id']}")
    assert status == 200 and body["deleted"] is True
    assert minimax.deleted == [int(file_id)] and minimax.files == {}

    running = await create(gw, model="hailuo", prompt="no cancel at MiniMax")
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{running['id']}")
    assert status == 200 and body["deleted"] is True and minimax.deleted == [int(file_id)]


async def test_official_sdk_end_to_end(gw: RunningGateway, media: dict[str, Path]) -> None:
    assert await assert_sdk_roundtrip(gw, "hailuo", prompt="sdk", size="1920x1080", seconds="6") == (
        media["video"].read_bytes()
    )


async def test_a_task_id_is_used_whole(gw: RunningGateway, minimax: FakeMiniMax) -> None:
    await assert_task_id_kept_whole(gw, minimax, "hailuo")


async def test_an_image_given_as_bracketed_form_fields_counts_for_the_default_size(
    gw: RunningGateway, minimax: FakeMiniMax
) -> None:
    """OpenAI's default, 720x1280, is a size I2V-01 makes only from an image: given as the SDK's
    bracketed form fields (input_reference[image_url]), the image is there as much as an upload."""
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("prompt", "animate")
    form.add_field("model", "i2v-01")
    form.add_field("input_reference[image_url]", "https://images.example/portrait.png")
    status, _, body = await request(gw, "POST", "/v1/videos", data=form)
    assert status == 200 and (body["size"], body["seconds"]) == ("720x1280", "6"), body


async def test_a_moments_404_ends_nothing(
    gw: RunningGateway, minimax: FakeMiniMax, monkeypatch: pytest.MonkeyPatch
) -> None:
    await assert_a_moments_404_ends_nothing(
        gw, minimax.tasks, monkeypatch, model="hailuo", prompt="a red fox"
    )
