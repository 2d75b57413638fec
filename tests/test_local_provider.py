"""The built-in local provider through the gateway: derived videos, finished states, strict fields."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from PIL import Image

from gateway.providers import local as local_module
from gateway.render import render_video
from tests.conftest import ALPHA_KEY, RunningGateway, StartGateway, gateway_yaml
from tests.provider_contract import create_with_a_huge_image
from tests.test_cli import free_port, wait_healthy
from tests.test_routes import send
from tests.test_sdk_e2e import decode_mp4


def error_of(raw: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(raw)["error"]
    return error


def mp4(folder: Path, seconds: int) -> tuple[str, bytes, str]:
    """A small real MP4 of ``seconds`` seconds, as an SDK file tuple."""
    assets = render_video(folder, prompt="uploaded clip", width=64, height=64, seconds=seconds)
    return "clip.mp4", assets.video.read_bytes(), "video/mp4"


@pytest.fixture
async def slow_gateway(start_gateway: StartGateway, tmp_path: Path) -> RunningGateway:
    """Jobs stay in progress for 3 s: long enough to act on them before they finish."""
    return await start_gateway(gateway_yaml(tmp_path).replace("run_seconds: 0.4", "run_seconds: 3"))


async def test_an_extension_is_the_stitched_total_and_renders_that_long(
    local_gateway: RunningGateway,
) -> None:
    client = local_gateway.sdk()
    source = await client.videos.create_and_poll(prompt="eight seconds", size="320x240", seconds="8")
    status, _, raw = await send(
        local_gateway,
        "POST",
        "/v1/videos/extensions",
        json={"prompt": "and sixteen more", "seconds": "16", "video": {"id": source.id}},
    )
    assert status == 200 and json.loads(raw)["seconds"] == "24"
    extended = await client.videos.poll(json.loads(raw)["id"])
    assert extended.status == "completed" and extended.seconds == "24"
    _, _, _, frames = decode_mp4((await client.videos.download_content(extended.id)).content)
    assert frames == 24 * 12


async def test_an_extension_of_an_uploaded_video_adds_to_its_length(
    local_gateway: RunningGateway, tmp_path: Path
) -> None:
    client = local_gateway.sdk()
    extended = await client.videos.extend(prompt="more", seconds="4", video=mp4(tmp_path / "clip", 2))
    assert extended.seconds == "6" and extended.size == "64x64"
    edited = await client.videos.edit(prompt="recoloured", video=mp4(tmp_path / "clip", 2))
    assert edited.seconds == "2" and edited.remixed_from_video_id is None


async def test_an_extension_longer_than_the_renderer_draws_is_refused(
    local_gateway: RunningGateway, tmp_path: Path
) -> None:
    form = aiohttp.FormData()
    form.add_field("prompt", "four more")
    form.add_field("seconds", "4")
    _, data, content_type = mp4(tmp_path / "long", 38)
    form.add_field("video", data, filename="long.mp4", content_type=content_type)
    status, _, raw = await send(local_gateway, "POST", "/v1/videos/extensions", data=form)
    assert status == 400 and error_of(raw)["param"] == "seconds" and "42 s" in error_of(raw)["message"]


async def test_an_extension_needs_seconds(local_gateway: RunningGateway) -> None:
    source = await local_gateway.sdk().videos.create_and_poll(prompt="base", size="320x240", seconds="2")
    status, _, raw = await send(
        local_gateway, "POST", "/v1/videos/extensions", json={"prompt": "longer", "video": {"id": source.id}}
    )
    assert status == 400 and error_of(raw)["param"] == "seconds"


async def test_an_edit_is_not_a_remix(local_gateway: RunningGateway) -> None:
    client = local_gateway.sdk()
    source = await client.videos.create_and_poll(prompt="base", size="320x240", seconds="2")
    status, _, raw = await send(
        local_gateway, "POST", "/v1/videos/edits", json={"prompt": "edited", "video": {"id": source.id}}
    )
    assert status == 200 and json.loads(raw)["remixed_from_video_id"] is None
    assert (await client.videos.poll(json.loads(raw)["id"])).remixed_from_video_id is None
    remix = await client.videos.remix(source.id, prompt="remixed")
    assert remix.remixed_from_video_id == source.id


async def test_an_unfinished_source_is_not_ready(slow_gateway: RunningGateway) -> None:
    source = await slow_gateway.sdk().videos.create(prompt="still rendering", size="320x240", seconds="2")
    attempts = [
        ("/v1/videos/" + source.id + "/remix", {"prompt": "remixed"}, "video_id"),
        ("/v1/videos/edits", {"prompt": "edited", "video": {"id": source.id}}, "video"),
        ("/v1/videos/extensions", {"prompt": "more", "seconds": "4", "video": {"id": source.id}}, "video"),
    ]
    for path, body, param in attempts:
        status, headers, raw = await send(slow_gateway, "POST", path, json=body)
        assert status == 409 and headers["x-should-retry"] == "false"
        assert error_of(raw)["code"] == "video_not_ready" and error_of(raw)["param"] == param


async def test_a_failed_source_is_refused(local_gateway: RunningGateway) -> None:
    client = local_gateway.sdk()
    failed = await client.videos.create_and_poll(prompt="[fail] broken", size="320x240", seconds="2")
    assert failed.status == "failed"
    status, _, raw = await send(local_gateway, "POST", f"/v1/videos/{failed.id}/remix", json={"prompt": "x"})
    assert status == 400 and error_of(raw)["param"] == "video_id"
    assert error_of(raw)["type"] == "invalid_request_error" and error_of(raw)["code"] == "video_failed"
    status, _, raw = await send(
        local_gateway, "POST", "/v1/videos/edits", json={"prompt": "x", "video": {"id": failed.id}}
    )
    assert status == 400 and error_of(raw)["param"] == "video"


async def test_a_failed_video_keeps_its_progress_and_is_not_completed_in_the_future(
    slow_gateway: RunningGateway,
) -> None:
    client = slow_gateway.sdk()
    video = await client.videos.create(prompt="[fail] halfway", size="320x240", seconds="2")
    seen = [0]
    while video.status in ("queued", "in_progress"):
        seen.append(video.progress)
        await asyncio.sleep(0.05)
        video = await client.videos.retrieve(video.id)
        observed_at = time.time()
    assert video.status == "failed"
    assert video.progress >= max(seen) and video.progress > 0
    assert video.completed_at is not None and video.completed_at <= observed_at
    again = await client.videos.retrieve(video.id)
    assert (again.progress, again.completed_at) == (video.progress, video.completed_at)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"seconds": 0}, "seconds"),
        ({"seconds": ""}, "seconds"),
        ({"seconds": "²"}, "seconds"),
        ({"seconds": "５"}, "seconds"),
        ({"seconds": "9" * 5000}, "seconds"),
        ({"size": ""}, "size"),
        ({"input_reference": 5}, "input_reference"),
        ({"input_reference": ["data:image/png;base64,AAAA"]}, "input_reference"),
        ({"input_reference": "a picture of a cat"}, "input_reference"),
        ({"input_reference": {"image_url": 7}}, "input_reference"),
    ],
)
async def test_explicit_invalid_values_are_refused_not_defaulted(
    local_gateway: RunningGateway, fields: dict[str, Any], param: str
) -> None:
    body = {"prompt": "strict", "size": "320x240", **fields}
    status, _, raw = await send(local_gateway, "POST", "/v1/videos", json=body)
    assert status == 400 and error_of(raw)["param"] == param


@pytest.mark.parametrize("name", ["seconds", "model", "size"])
async def test_a_file_part_under_a_text_field_name_is_refused(
    local_gateway: RunningGateway, name: str
) -> None:
    form = aiohttp.FormData()
    form.add_field("prompt", "a file where text belongs")
    form.add_field(name, b"4", filename="field.txt", content_type="text/plain")
    status, _, raw = await send(local_gateway, "POST", "/v1/videos", data=form)
    assert status == 400 and error_of(raw)["param"] == name


async def test_a_plain_text_input_reference_part_is_refused(local_gateway: RunningGateway) -> None:
    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("prompt", "text where an image belongs")
    form.add_field("size", "320x240")
    form.add_field("input_reference", "not an image")
    status, _, raw = await send(local_gateway, "POST", "/v1/videos", data=form)
    assert status == 400 and error_of(raw)["param"] == "input_reference"


async def test_a_video_is_rendered_once_however_often_it_is_polled(
    local_gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The render finishes before the job's run time is up; polls in between must not start another."""
    renders: list[str] = []
    real = local_module.render_video

    def counting(*args: Any, **kwargs: Any) -> Any:
        renders.append(kwargs["prompt"])
        return real(*args, **kwargs)

    monkeypatch.setattr(local_module, "render_video", counting)
    client = local_gateway.sdk()
    video = await client.videos.create(prompt="polled often", size="64x64", seconds="4")
    while (await client.videos.retrieve(video.id)).status != "completed":
        await asyncio.sleep(0.01)
    assert renders == ["polled often"]


@pytest.fixture
def held_renders(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[list[str], threading.Event]]:
    """Renders that wait for the test's go: the prompts of those begun, and the event that lets
    them draw."""
    begun: list[str] = []
    go = threading.Event()
    real = local_module.render_video

    def held(*args: Any, **kwargs: Any) -> Any:
        begun.append(kwargs["prompt"])
        go.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(local_module, "render_video", held)
    yield begun, go
    go.set()


async def test_creates_polls_and_deletes_answer_while_many_videos_wait_to_render(
    local_gateway: RunningGateway, held_renders: tuple[list[str], threading.Event], tmp_path: Path
) -> None:
    """Renders are CPU-bound: the local provider draws one at a time in its own thread, so that
    however many wait, the event loop keeps its CPU and the shared thread pool stays free for the
    job files that creates, polls and deletes read and write. A video deleted before its render
    began is never drawn."""
    begun, go = held_renders
    client = local_gateway.sdk()
    videos = []
    for i in range(40):  # more than the default thread pool's 32 threads at most
        video = await asyncio.wait_for(client.videos.create(prompt=f"waiting {i}", size="64x64"), 10)
        videos.append(video)
    polled = await asyncio.wait_for(client.videos.retrieve(videos[-1].id), 10)
    assert polled.status in ("queued", "in_progress")
    assert (await asyncio.wait_for(client.videos.delete(videos[-1].id), 10)).deleted
    assert begun == ["waiting 0"]

    go.set()
    for video in videos[:-1]:
        assert (await client.videos.poll(video.id, poll_interval_ms=20)).status == "completed"
    assert "waiting 39" not in begun and len(begun) == 39
    assert len(list((tmp_path / "local").glob("*/video_*"))) == 39


async def test_a_shutdown_waits_for_the_render_under_way_only_and_the_rest_render_after_the_restart(
    start_gateway: StartGateway, held_renders: tuple[list[str], threading.Event], tmp_path: Path
) -> None:
    begun, go = held_renders
    gateway = await start_gateway(gateway_yaml(tmp_path))
    videos = [await gateway.sdk().videos.create(prompt=f"before {i}", size="64x64") for i in range(3)]
    while not begun:
        await asyncio.sleep(0.01)
    closing = asyncio.ensure_future(gateway.server.close())
    await asyncio.sleep(0.2)
    assert not closing.done(), "the render under way is finished before the provider closes"
    go.set()
    await asyncio.wait_for(closing, 10)
    assert begun == ["before 0"]

    restarted = await start_gateway(gateway_yaml(tmp_path))
    for video in videos:
        assert (await restarted.sdk().videos.poll(video.id, poll_interval_ms=20)).status == "completed"
    assert begun == ["before 0", "before 1", "before 2"]


async def test_a_render_the_closing_engine_never_began_is_not_taken_for_a_failed_one(tmp_path: Path) -> None:
    """A close (shutdown, or a reload that replaced the provider) right after a create: the render
    finds the renderer shut down. That is not the video's failure: the next engine draws it."""
    engine = local_module.LocalEngine(tmp_path, queue_seconds=0, run_seconds=0)
    job = await engine.create(prompt="closed at once", model="m", size="64x64", seconds=1)
    await engine.close()
    assert not (tmp_path / job["id"] / "error.txt").exists()

    reopened = local_module.LocalEngine(tmp_path, queue_seconds=0, run_seconds=0)
    try:
        for _ in range(1000):
            video = await reopened.get(job["id"])
            if video is None or video["status"] != "in_progress":
                break
            await asyncio.sleep(0.01)
    finally:
        await reopened.close()
    assert video is not None and video["status"] == "completed"


async def test_a_render_cut_off_by_kill_9_is_done_again_after_the_restart_and_leaves_no_files(
    tmp_path: Path,
) -> None:
    """A gateway killed mid-render leaves the renderer's temporary files; after the restart the next
    poll renders the video again, and the files of the dead render are gone."""
    data, log = tmp_path / "data", tmp_path / "gateway.log"

    def leftovers() -> list[Path]:
        return sorted(data.glob("local/*/video_*/.*.tmp"))

    async def start() -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-format", "json"],
            cwd=tmp_path,
            env={**os.environ, "VIDEO_GATEWAY_DATA_DIR": str(data), "VIDEO_GATEWAY_API_KEY": ALPHA_KEY},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url + "/healthz", process)
        return process, url

    process, url = await start()
    try:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=ALPHA_KEY, max_retries=0) as client:
            video = await client.videos.create(prompt="cut off", size="1280x720", seconds="20")
            deadline = time.monotonic() + 20
            while not leftovers() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        process.kill()
        process.wait()
        assert leftovers(), "the render was under way when the gateway died"
        assert not list(data.glob("local/*/video_*/video.mp4"))

        process, url = await start()
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=ALPHA_KEY, max_retries=0) as client:
            done = await client.videos.poll(video.id, poll_interval_ms=100)
            assert done.status == "completed"
            content = (await client.videos.download_content(video.id)).content
        assert decode_mp4(content)[1:] == (1280, 720, 20 * 12)
        assert leftovers() == []
    finally:
        process.kill()
        process.wait()


async def test_a_full_disk_fails_neither_a_create_nor_a_render_for_good(
    local_gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A full data disk is the gateway's trouble, and it passes. A create that cannot write its job
    is a 503 to retry that leaves no half-made video behind; a render that runs out of room is not
    the video's failure, and the video's next poll renders it again."""
    client = local_gateway.sdk()
    real_write = local_module.LocalEngine._write_job

    def no_room_for_the_job(folder: Path, *args: Any) -> None:
        folder.mkdir(parents=True)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local_module.LocalEngine, "_write_job", staticmethod(no_room_for_the_job))
    with pytest.raises(openai.InternalServerError) as refused:
        await client.with_options(max_retries=0).videos.create(prompt="no room", size="64x64")
    assert refused.value.status_code == 503 and refused.value.code == "storage_unavailable"
    assert list(tmp_path.rglob("video_*")) == []
    monkeypatch.setattr(local_module.LocalEngine, "_write_job", staticmethod(real_write))

    renders: list[str] = []
    real_render = local_module.render_video

    def first_without_room(*args: Any, **kwargs: Any) -> Any:
        renders.append(kwargs["prompt"])
        if len(renders) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(local_module, "render_video", first_without_room)
    video = await client.videos.create(prompt="room later", size="64x64", seconds="1")
    for _ in range(200):
        video = await client.videos.retrieve(video.id)
        if video.status in ("completed", "failed"):
            break
        await asyncio.sleep(0.05)
    assert video.status == "completed", video.error
    assert len(renders) == 2


async def test_an_image_too_large_to_draw_is_refused_unread(local_gateway: RunningGateway) -> None:
    """The local provider draws its video from the reference image, held whole in memory: one over
    20 MiB is a 413 before it is read, as for the providers that take an image inline."""
    status, body, peak = await create_with_a_huge_image(local_gateway, "sora-2", mib=256)
    assert status == 413 and body["error"]["code"] == "request_too_large", body
    assert peak < 32 * 1024 * 1024, f"{peak / 2**20:.0f} MiB held for a refused image"
    assert (await local_gateway.sdk().videos.list()).data == []


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # what Pillow says of it
@pytest.mark.parametrize(("side", "said"), [(13000, "13000x13000 pixels"), (15000, "too many pixels")])
async def test_an_image_of_too_many_pixels_is_refused_before_it_is_decoded(
    local_gateway: RunningGateway, side: int, said: str
) -> None:
    """A PNG of a few KiB can claim 13000x13000 pixels: drawn from, it took over a GiB to decode
    (Pillow only warns below 179 million pixels, and refuses to open one above)."""
    picture = io.BytesIO()
    Image.new("1", (side, side)).save(picture, format="PNG")
    assert len(picture.getvalue()) < 1024 * 1024
    with pytest.raises(openai.BadRequestError) as caught:
        await local_gateway.sdk().videos.create(
            prompt="from a huge picture",
            size="320x240",
            input_reference=("huge.png", picture.getvalue(), "image/png"),
        )
    assert caught.value.param == "input_reference" and said in caught.value.message  # type: ignore[attr-defined]
    assert (await local_gateway.sdk().videos.list()).data == []


async def test_a_full_size_phone_photo_is_drawn_from(local_gateway: RunningGateway) -> None:
    """A 50-megapixel JPEG (a phone's full-resolution photo) is decoded at an eighth of its size
    for the render: no reason to refuse it, as a PNG of as many pixels is."""
    picture = io.BytesIO()
    Image.new("L", (8160, 6120), 128).save(picture, format="JPEG")
    client = local_gateway.sdk()
    video = await client.videos.create(
        prompt="from my phone",
        size="320x240",
        seconds="1",
        input_reference=("photo.jpg", picture.getvalue(), "image/jpeg"),
    )
    assert (await client.videos.poll(video.id, poll_interval_ms=50)).status == "completed"


async def test_a_character_needs_its_clip(local_gateway: RunningGateway) -> None:
    """The API requires a character's ``video``; the local provider draws none, but says so too."""
    form = aiohttp.FormData({"name": "Ada"}, default_to_multipart=True)
    status, _, body = await send(local_gateway, "POST", "/v1/videos/characters", data=form)
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == "video" and error["code"] == "missing_required_parameter"


@pytest.mark.parametrize(
    "reference",
    [
        {"input_reference": ("notes.txt", b"meeting notes, not a picture", "text/plain")},
        {"input_reference": ("photo.png", os.urandom(3000), "image/png")},
    ],
)
async def test_an_input_reference_that_is_no_image_is_refused(
    local_gateway: RunningGateway, reference: Any
) -> None:
    """The local provider draws its video from the image: a file that is none (whatever its name
    or type says) was taken and the video made without it, and the client never knew."""
    with pytest.raises(openai.BadRequestError) as caught:
        await local_gateway.sdk().videos.create(prompt="from my picture", size="320x240", **reference)
    assert caught.value.param == "input_reference"  # type: ignore[attr-defined]
    status, _, body = await send(
        local_gateway,
        "POST",
        "/v1/videos",
        json={
            "prompt": "x",
            "size": "320x240",
            "input_reference": {"image_url": "data:text/plain;base64,aGVsbG8="},
        },
    )
    assert status == 400 and error_of(body)["param"] == "input_reference"
    assert (await local_gateway.sdk().videos.list()).data == []


async def test_a_characters_clip_must_be_a_video(local_gateway: RunningGateway) -> None:
    """As an edit's upload is checked, so is a character's: junk bytes are a 400 naming 'video'."""
    with pytest.raises(openai.BadRequestError) as caught:
        await local_gateway.sdk().videos.create_character(name="Ada", video=("ada.mp4", b"junk", "video/mp4"))
    assert caught.value.param == "video"  # type: ignore[attr-defined]


@pytest.mark.both_loops
async def test_a_download_its_client_drops_is_logged_as_dropped(
    local_gateway: RunningGateway, tmp_path: Path, session_log: Path
) -> None:
    """A file the gateway serves itself, hung up on half-way, was logged and counted as a 200 with
    every byte of the file sent. On uvloop the hang-up reaches the handler as its cancellation, not
    as a reset: that too is the client gone."""
    from tests.test_upstream_failures import wait_for_event

    client = local_gateway.sdk()
    video = await client.videos.poll(
        (await client.videos.create(prompt="long", size="320x240", seconds="1")).id, poll_interval_ms=50
    )
    assert video.status == "completed"
    (rendered,) = tmp_path.rglob("video.mp4")
    rendered.write_bytes(bytes(64 * 1024 * 1024))  # a long video: more than the socket buffers hold
    request_id = f"drops-file-{video.id}"  # the session's log is one file: this run's line
    reader, writer = await asyncio.open_connection(local_gateway.server.host, local_gateway.server.port)
    writer.write(
        f"GET /v1/videos/{video.id}/content HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"
        f"X-Request-ID: {request_id}\r\n\r\n".encode()
    )
    assert await reader.read(65536)
    await asyncio.sleep(0.5)  # the socket buffers fill: the gateway waits to write more
    writer.transport.abort()
    access = await wait_for_event(session_log, request_id, "request")
    assert access["status"] == 499, access
    assert access["bytes_out"] < 64 * 1024 * 1024, access


async def test_a_remix_of_a_video_whose_render_is_gone_names_the_gateways_id(
    local_gateway: RunningGateway, tmp_path: Path
) -> None:
    """The local provider's files lost (a wiped volume): a remix, edit or extension of such a video
    is the gateway's 404 for its own ID, not one quoting the provider's job ID."""
    import shutil

    client = local_gateway.sdk()
    video = await client.videos.poll(
        (await client.videos.create(prompt="gone", size="320x240", seconds="1")).id, poll_interval_ms=50
    )
    (rendered,) = tmp_path.rglob("video.mp4")
    shutil.rmtree(rendered.parent)
    for path, body, param in (
        (f"/v1/videos/{video.id}/remix", {"prompt": "again"}, "video_id"),
        ("/v1/videos/edits", {"prompt": "again", "video": {"id": video.id}}, "video"),
    ):
        status, _, raw = await send(local_gateway, "POST", path, json=body)
        error = json.loads(raw)["error"]
        assert status == 404 and error["code"] == "video_not_found" and error["param"] == param, error
        assert error["message"] == f"No video found with id '{video.id}'.", error
