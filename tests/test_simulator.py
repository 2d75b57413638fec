"""``video-gateway simulate`` as an OpenAI-dialect upstream: edits, extensions, finished sources."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway.render import render_video
from gateway.simulator import build_simulator
from tests.conftest import UPSTREAM_KEY, StartGateway, gateway_yaml

AUTH = {"Authorization": f"Bearer {UPSTREAM_KEY}"}


async def post(server: TestServer, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(str(server.make_url(path)), headers=AUTH, **kwargs) as response,
    ):
        return response.status, await response.json()


@pytest.fixture
async def simulator(aiohttp_server: Any, tmp_path: Path) -> TestServer:
    app = build_simulator(tmp_path / "sim", api_key=UPSTREAM_KEY, queue_seconds=0.1, run_seconds=0.3)
    server: TestServer = await aiohttp_server(app)
    return server


@pytest.fixture
async def client(simulator: TestServer) -> AsyncIterator[openai.AsyncOpenAI]:
    url = str(simulator.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=url, api_key=UPSTREAM_KEY, max_retries=0) as sdk:
        yield sdk


async def test_edits_and_extensions_by_id_and_by_upload(
    simulator: TestServer, client: openai.AsyncOpenAI, tmp_path: Path
) -> None:
    source = await client.videos.create_and_poll(prompt="base", size="320x240", seconds="2")
    status, edited = await post(
        simulator, "/v1/videos/edits", json={"prompt": "e", "video": {"id": source.id}}
    )
    assert status == 200 and edited["remixed_from_video_id"] is None and edited["seconds"] == "2"
    assert edited["size"] == "320x240" and edited["model"] == source.model

    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("prompt", "more")
    form.add_field("seconds", "4")
    form.add_field("video[id]", source.id)
    status, extended = await post(simulator, "/v1/videos/extensions", data=form)
    assert status == 200 and extended["seconds"] == "6"

    clip = render_video(tmp_path / "clip", prompt="upload", width=64, height=64, seconds=3)
    upload = ("clip.mp4", clip.video.read_bytes(), "video/mp4")
    by_upload = await client.videos.extend(prompt="more", seconds="4", video=upload)
    assert by_upload.seconds == "7" and by_upload.size == "64x64"
    assert (await client.videos.poll(by_upload.id)).status == "completed"
    assert (await client.videos.edit(prompt="e", video=upload)).seconds == "3"


async def test_an_extension_needs_seconds_and_a_finished_source(
    simulator: TestServer, client: openai.AsyncOpenAI
) -> None:
    running = await client.videos.create(prompt="still queued", size="320x240", seconds="2")
    body = {"prompt": "more", "seconds": "4", "video": {"id": running.id}}
    status, answer = await post(simulator, "/v1/videos/extensions", json=body)
    assert status == 409 and answer["error"]["code"] == "video_not_ready"
    status, answer = await post(simulator, f"/v1/videos/{running.id}/remix", json={"prompt": "again"})
    assert status == 409 and answer["error"]["param"] == "video_id"

    done = await client.videos.poll(running.id)
    status, answer = await post(
        simulator, "/v1/videos/extensions", json={"prompt": "more", "video": {"id": done.id}}
    )
    assert status == 400 and answer["error"]["param"] == "seconds"


async def test_the_gateway_edits_and_extends_through_the_simulator(
    start_gateway: StartGateway, simulator: TestServer, tmp_path: Path
) -> None:
    gw = await start_gateway(gateway_yaml(tmp_path, upstream_url=str(simulator.make_url("")).rstrip("/")))
    client = gw.sdk()
    source = await client.videos.create_and_poll(
        prompt="through the gateway", model="sora-remote", size="320x240", seconds="2"
    )
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {client.api_key}"}) as session:
        body = {"prompt": "more", "seconds": "4", "video": {"id": source.id}}
        async with session.post(gw.url + "/v1/videos/extensions", json=body) as response:
            extended = json.loads(await response.read())
            assert response.status == 200 and extended["seconds"] == "6"
        body = {"prompt": "edited", "video": {"id": source.id}}
        async with session.post(gw.url + "/v1/videos/edits", json=body) as response:
            edited = json.loads(await response.read())
            assert response.status == 200 and edited["remixed_from_video_id"] is None
    done = await client.videos.poll(extended["id"])
    assert done.status == "completed" and done.seconds == "6" and done.model == "sora-remote"


async def test_list_parameters_are_checked_like_the_gateways(simulator: TestServer) -> None:
    async with aiohttp.ClientSession(headers=AUTH) as session:
        for query in ("limit=abc", "limit=-1", "limit=101", "order=sideways"):
            async with session.get(str(simulator.make_url(f"/v1/videos?{query}"))) as response:
                body = await response.json()
            assert response.status == 400 and body["error"]["param"] in ("limit", "order"), query
        async with session.get(str(simulator.make_url("/v1/videos?limit=2&order=asc"))) as response:
            assert response.status == 200 and (await response.json())["object"] == "list"
        async with session.get(
            str(simulator.make_url("/v1/videos")), headers={"Authorization": UPSTREAM_KEY}
        ) as response:
            assert response.status == 401, "the key must come as a bearer token"


async def test_a_page_goes_on_after_its_last_video_is_deleted(
    simulator: TestServer, client: openai.AsyncOpenAI
) -> None:
    """The SDK pages with ``after`` set to the last ID it saw; that video deleted meanwhile, the next
    page must still start after it (the gateway's list does), not come back empty, which ends the
    SDK's paging with the rest unseen. An ``after`` that never named a video is a 400, as there."""
    made = [(await client.videos.create(prompt=f"v{i}", seconds="4")).id for i in range(4)]
    first = await client.videos.list(limit=2, order="asc")
    assert len(first.data) == 2 and first.has_more
    await client.videos.delete(first.data[-1].id)
    rest = await client.videos.list(limit=2, order="asc", after=first.data[-1].id)
    seen = [v.id for v in first.data] + [v.id for v in rest.data]
    assert sorted(seen) == sorted(made) and not rest.has_more, seen
    newest_first = await client.videos.list(limit=1, order="desc", after=first.data[-1].id)
    assert [v.id for v in newest_first.data] == [first.data[0].id]
    async with aiohttp.ClientSession(headers=AUTH) as session:
        url = simulator.make_url(f"/v1/videos?after=video_{'0' * 32}")
        async with session.get(str(url)) as response:
            body = await response.json()
    assert response.status == 400 and body["error"]["param"] == "after", body


async def test_characters_are_checked_like_the_local_providers(
    simulator: TestServer, client: openai.AsyncOpenAI, media: dict[str, Path]
) -> None:
    clip = ("clip.mp4", media["video"].read_bytes(), "video/mp4")
    character = await client.videos.create_character(name="Ada", video=clip)
    assert (await client.videos.get_character(character.id)).name == "Ada"
    with pytest.raises(openai.BadRequestError):  # a clip that is no video
        await client.videos.create_character(name="Ada", video=("clip.mp4", b"\0" * 64, "video/mp4"))
    for fields, param in (({"name": "Ada"}, "video"), ({"name": "x" * 81}, "name")):
        status, body = await post(
            simulator, "/v1/videos/characters", data=aiohttp.FormData(fields, default_to_multipart=True)
        )
        assert status == 400 and body["error"]["param"] == param, body


async def test_a_video_deleted_while_the_list_is_read_is_left_out(
    simulator: TestServer, client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list reads every job's file on a worker thread while a delete may remove one: a job
    listed and gone by its turn is left out, not a 500."""
    video = await client.videos.create(prompt="kept", model="sora-2")
    real_glob = Path.glob

    def listed_then_gone(path: Path, pattern: str) -> Iterator[Path]:
        if pattern == "video_*/job.json":
            yield path / f"video_{'0' * 32}" / "job.json"  # deleted since it was listed
        yield from real_glob(path, pattern)

    monkeypatch.setattr(Path, "glob", listed_then_gone)
    assert [v.id for v in (await client.videos.list()).data] == [video.id]


async def test_a_range_for_another_copy_of_the_file_gets_the_whole_file(
    simulator: TestServer, client: openai.AsyncOpenAI
) -> None:
    """``If-Range`` names the copy a client holds part of; aiohttp's own file answer honoured only
    the date form, and answered a part of this file to a client holding another one (whose ETag it
    sent). The simulator answers as the gateway does: that part only for the very file."""
    video = await client.videos.create_and_poll(prompt="ranged", size="320x240", seconds="1")
    url = str(simulator.make_url(f"/v1/videos/{video.id}/content"))
    async with aiohttp.ClientSession(headers=AUTH) as session:
        async with session.get(url) as whole:
            etag, size = whole.headers["ETag"], len(await whole.read())
        for if_range, status, length in (('"another-file"', 200, size), (etag, 206, 2)):
            headers = {"Range": "bytes=0-1", "If-Range": if_range}
            async with session.get(url, headers=headers) as answer:
                assert (answer.status, len(await answer.read())) == (status, length), if_range


async def test_every_answer_has_a_request_id_and_aiohttps_own_are_in_the_envelope(
    simulator: TestServer, client: openai.AsyncOpenAI
) -> None:
    """As the API answers: the SDK's errors carry ``request_id``, an unknown route or method is a
    coded error, and a 405 says which methods the route takes."""
    with pytest.raises(openai.NotFoundError) as missing:
        await client.videos.retrieve("video_0123")
    assert missing.value.request_id
    ok = await client.videos.with_raw_response.list()
    assert ok.headers["x-request-id"]
    async with aiohttp.ClientSession(headers={**AUTH, "X-Request-ID": "req_mine"}) as session:
        async with session.put(str(simulator.make_url("/v1/videos"))) as response:
            body = await response.json()
            assert (response.status, body["error"]["code"]) == (405, "method_not_allowed")
            assert set(response.headers["Allow"].split(",")) == {"GET", "HEAD", "POST"}
            assert response.headers["x-request-id"] == "req_mine"
        async with session.get(str(simulator.make_url("/v2/nothing"))) as response:
            assert (response.status, (await response.json())["error"]["code"]) == (404, "not_found")
