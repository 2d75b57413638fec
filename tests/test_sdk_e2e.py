"""The official openai SDK drives the gateway exactly as an application would.

Once against the built-in local provider, once against a fake OpenAI-dialect upstream that
records what reached it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import av
import openai
import pytest
from PIL import Image

from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway, gateway_yaml
from tests.fakes.openai_upstream import FakeOpenAIUpstream

VIDEO_KEYS = {
    "id",
    "object",
    "model",
    "status",
    "progress",
    "created_at",
    "completed_at",
    "expires_at",
    "prompt",
    "size",
    "seconds",
    "remixed_from_video_id",
    "error",
}


def png_bytes(width: int = 64, height: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def decode_mp4(data: bytes) -> tuple[str, int, int, int]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return stream.codec_context.name, stream.codec_context.width, stream.codec_context.height, frames


@pytest.fixture(params=["local", "dialect"])
async def backend(
    request: pytest.FixtureRequest,
    start_gateway: StartGateway,
    tmp_path: Path,
    aiohttp_server: Any,
    media: dict[str, Path],
) -> tuple[RunningGateway, str]:
    """The gateway, and the public model that reaches the chosen backend."""
    if request.param == "local":
        return await start_gateway(gateway_yaml(tmp_path)), "sora-2"
    fake = FakeOpenAIUpstream(api_key=UPSTREAM_KEY, media=media)
    server = await aiohttp_server(fake.app())
    url = str(server.make_url("")).rstrip("/")
    return await start_gateway(gateway_yaml(tmp_path, upstream_url=url)), "sora-remote"


async def test_full_lifecycle_through_the_sdk(backend: tuple[RunningGateway, str]) -> None:
    gw, model = backend
    client = gw.sdk()

    plain = await client.videos.create(
        prompt="A calico cat playing a piano",
        model=model,
        size="320x240" if model == "sora-2" else "1280x720",
        seconds="4",
    )
    assert set(plain.model_dump()) >= VIDEO_KEYS
    assert plain.id.startswith("video_") and plain.model == model and plain.status == "queued"
    assert plain.seconds == "4"

    with_ref = await client.videos.create(
        prompt="Animate this picture",
        model=model,
        size="320x240" if model == "sora-2" else "1280x720",
        seconds="4",
        input_reference=("ref.png", png_bytes(), "image/png"),
    )
    assert with_ref.status == "queued"

    done = await client.videos.create_and_poll(
        prompt="A dog surfing", model=model, seconds="4", size="320x240" if model == "sora-2" else "1280x720"
    )
    assert done.status == "completed" and done.progress == 100 and done.completed_at is not None
    again = await client.videos.retrieve(done.id)
    assert again.id == done.id and again.status == "completed" and again.model == model

    video = await client.videos.download_content(done.id)
    codec, width, height, frames = decode_mp4(video.content)
    assert codec == "h264" and frames > 0 and width > 0 and height > 0
    thumbnail = await client.videos.download_content(done.id, variant="thumbnail")
    assert Image.open(io.BytesIO(thumbnail.content)).format == "WEBP"
    sprites = await client.videos.download_content(done.id, variant="spritesheet")
    assert Image.open(io.BytesIO(sprites.content)).format == "JPEG"

    remix = await client.videos.remix(done.id, prompt="The same dog, at night")
    assert remix.id != done.id and remix.remixed_from_video_id == done.id and remix.model == model
    remixed = await client.videos.poll(remix.id)
    assert remixed.status == "completed" and remixed.remixed_from_video_id == done.id

    deleted = await client.videos.delete(done.id)
    assert deleted.id == done.id and deleted.deleted is True and deleted.object == "video.deleted"
    with pytest.raises(openai.NotFoundError):
        await client.videos.retrieve(done.id)
    with pytest.raises(openai.NotFoundError):
        await client.videos.download_content(done.id)


async def test_list_auto_paginates_over_pages(backend: tuple[RunningGateway, str]) -> None:
    gw, model = backend
    client = gw.sdk()
    created = [
        (
            await client.videos.create(
                prompt=f"clip {i}",
                model=model,
                seconds="4",
                size="320x240" if model == "sora-2" else "1280x720",
            )
        ).id
        for i in range(5)
    ]
    first = await client.videos.list(limit=2)
    assert len(first.data) == 2 and first.has_more is True and first.last_id == first.data[-1].id
    seen = [v.id async for v in await client.videos.list(limit=2)]
    assert sorted(seen) == sorted(created) and len(set(seen)) == len(seen)
    ascending = [v.id async for v in await client.videos.list(limit=2, order="asc")]
    assert ascending == created


async def test_passthrough_reaches_upstream_byte_for_byte(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    fake, _ = upstream
    sent: list[bytes] = []

    async def capture(request: Any) -> None:
        if request.method == "POST":
            sent.append(await request.aread())

    client = openai.AsyncOpenAI(
        base_url=dialect_gateway.url + "/v1",
        api_key=ALPHA_KEY,
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [capture]}),
    )
    image = png_bytes(400, 300)
    video = await client.videos.create(
        prompt="byte for byte",
        model="sora-remote",
        seconds="8",
        size="1280x720",
        input_reference=("frame.png", image, "image/png"),
    )
    assert video.model == "sora-remote"

    (got,) = fake.requests("POST", "/v1/videos")
    expected = sent[0].replace(
        b'name="model"\r\n\r\nsora-remote\r\n', b'name="model"\r\n\r\nupstream-sora\r\n'
    )
    assert expected != sent[0], "the SDK body should name the public model"
    assert got.body == expected
    boundary = sent[0].split(b"\r\n", 1)[0][2:].decode()
    assert got.headers["Content-Type"] == f"multipart/form-data; boundary={boundary}"
    assert got.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    for request in fake.received:
        assert ALPHA_KEY not in " ".join(request.headers.values())
        assert "Connection" not in request.headers or request.headers["Connection"].lower() != "upgrade"

    remix = await client.videos.remix(video.id, prompt="again")
    (remix_request,) = fake.requests("POST", f"/v1/videos/{got_job_id(fake)}/remix")
    assert remix_request.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert remix.remixed_from_video_id == video.id
    await client.close()


def got_job_id(fake: FakeOpenAIUpstream) -> str:
    return sorted(fake.jobs)[0]


async def test_retrieve_goes_to_upstream_with_its_id_and_hides_it(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    fake, _ = upstream
    client = dialect_gateway.sdk()
    video = await client.videos.create(prompt="where does it go", model="sora-remote")
    (upstream_id,) = fake.jobs
    fetched = await client.videos.retrieve(video.id)
    assert fake.requests("GET", f"/v1/videos/{upstream_id}")
    assert fetched.id == video.id and upstream_id not in fetched.model_dump_json()
    assert fetched.model == "sora-remote" and fetched.status == "in_progress"


async def test_both_prefixes_behave_the_same(local_gateway: RunningGateway, tmp_path: Path) -> None:
    plain, aliased = local_gateway.sdk(prefix="/v1"), local_gateway.sdk(prefix="/v1/openai")
    a = await plain.videos.create(prompt="one", size="320x240")
    b = await aliased.videos.create(prompt="two", size="320x240")
    assert (await aliased.videos.retrieve(a.id)).id == a.id
    assert (await plain.videos.retrieve(b.id)).id == b.id
    listed = {v.id async for v in await aliased.videos.list()}
    assert {a.id, b.id} <= listed
    done = await aliased.videos.poll(b.id)
    assert done.status == "completed"
    content = await aliased.videos.download_content(b.id)
    assert decode_mp4(content.content)[0] == "h264"
    assert (await aliased.videos.delete(a.id)).deleted


async def test_edits_and_extensions_by_id_as_the_readme_shows(backend: tuple[RunningGateway, str]) -> None:
    """The SDK cannot send ``video={"id": ...}`` itself (it raises before sending: it takes any
    dict there for a file); the README's form, the ID in ``extra_body``, reaches the owning
    deployment as ``video[id]`` and makes a new video of the same model."""
    gw, model = backend
    client = gw.sdk()
    source = await client.videos.create_and_poll(
        prompt="source", model=model, size="1280x720", seconds="4", poll_interval_ms=100
    )
    edited = await client.videos.edit(
        prompt="edited", video=openai.NOT_GIVEN, extra_body={"video": {"id": source.id}}
    )
    extended = await client.videos.extend(
        prompt="more", seconds="4", video=openai.NOT_GIVEN, extra_body={"video": {"id": source.id}}
    )
    for made in (edited, extended):
        assert (
            made.id not in (source.id,) and made.model == model and made.status in ("queued", "in_progress")
        )
    assert (await client.videos.retrieve(extended.id)).id == extended.id
