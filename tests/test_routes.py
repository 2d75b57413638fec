"""Route behaviour beyond the SDK happy path: body forms, headers, newer endpoints, streams, media."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import time
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway.state import GATEWAY
from tests.conftest import (
    ALPHA_KEY,
    BETA_KEY,
    UPSTREAM_KEY,
    RunningGateway,
    StartGateway,
    call,
    gateway_yaml,
)
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.test_sdk_e2e import VIDEO_KEYS, png_bytes

AUTH = {"Authorization": f"Bearer {ALPHA_KEY}"}


async def send(
    gw: RunningGateway, method: str, path: str, **kwargs: Any
) -> tuple[int, CIMultiDict[str], bytes]:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.url + path, headers=headers, **kwargs) as response,
    ):
        return response.status, CIMultiDict(response.headers), await response.read()


async def test_json_and_form_bodies_with_every_reference_form(local_gateway: RunningGateway) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    status, _, raw = await send(
        local_gateway,
        "POST",
        "/v1/videos",
        json={
            "prompt": "json with an object reference",
            "seconds": 4,
            "size": "320x240",
            "input_reference": {"image_url": data_url},
        },
    )
    video = json.loads(raw)
    assert status == 200 and video["seconds"] == "4" and set(video) == VIDEO_KEYS

    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("prompt", "bracketed reference")
    form.add_field("seconds", "4")
    form.add_field("size", "320x240")
    form.add_field("input_reference[image_url]", data_url)
    status, _, raw = await send(local_gateway, "POST", "/v1/videos", data=form)
    assert status == 200 and json.loads(raw)["prompt"] == "bracketed reference"

    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("input_reference", png_bytes(), filename="first.png", content_type="image/png")
    form.add_field("prompt", "file before the model field")
    form.add_field("model", "sora-2")
    form.add_field("size", "320x240")
    status, _, raw = await send(local_gateway, "POST", "/v1/openai/videos", data=form)
    assert status == 200 and json.loads(raw)["model"] == "sora-2"

    status, _, raw = await send(
        local_gateway,
        "POST",
        "/v1/videos",
        json={
            "prompt": "bad data url",
            "input_reference": {"image_url": "data:image/png;base64,@@@"},
        },
    )
    assert status == 400 and json.loads(raw)["error"]["param"] == "input_reference"


async def test_poll_header_only_while_unfinished(local_gateway: RunningGateway) -> None:
    video = await local_gateway.sdk().videos.create(prompt="poll me", size="320x240")
    status, headers, raw = await send(local_gateway, "GET", f"/v1/videos/{video.id}")
    assert status == 200 and json.loads(raw)["status"] in ("queued", "in_progress")
    assert int(headers["openai-poll-after-ms"]) == 100
    await local_gateway.sdk().videos.poll(video.id)
    status, headers, raw = await send(local_gateway, "GET", f"/v1/videos/{video.id}")
    assert json.loads(raw)["status"] == "completed" and "openai-poll-after-ms" not in headers


async def test_failed_generation_is_reported_not_raised(local_gateway: RunningGateway) -> None:
    failed = await local_gateway.sdk().videos.create_and_poll(prompt="please [fail]", size="320x240")
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "generation_failed"
    status, _, _ = await send(local_gateway, "GET", f"/v1/videos/{failed.id}/content")
    assert status == 409


async def test_content_range_requests(dialect_gateway: RunningGateway) -> None:
    gw = dialect_gateway
    for model in ("sora-2", "sora-remote"):
        client = gw.sdk()
        done = await client.videos.create_and_poll(
            prompt="ranged", model=model, size="320x240" if model == "sora-2" else "1280x720"
        )
        full = (await client.videos.download_content(done.id)).content
        status, headers, part = await send(
            gw, "GET", f"/v1/videos/{done.id}/content", headers={"Range": "bytes=10-99"}
        )
        assert status == 206 and part == full[10:100]
        assert (
            headers["Content-Range"] == f"bytes 10-99/{len(full)}" and headers["Content-Type"] == "video/mp4"
        )


async def test_head_of_content_is_the_headers_alone(dialect_gateway: RunningGateway) -> None:
    """HEAD (a download manager sizing a file, ``curl -I``) gets a GET's status and headers and no
    body: a body after them would be read as the next answer on a kept-alive connection."""
    for model in ("sora-2", "sora-remote"):
        client = dialect_gateway.sdk()
        done = await client.videos.create_and_poll(
            prompt="sized", model=model, size="320x240" if model == "sora-2" else "1280x720"
        )
        url = f"{dialect_gateway.url}/v1/videos/{done.id}/content"
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.head(url) as head:
                assert head.status == 200 and head.headers["Content-Type"] == "video/mp4"
                length = int(head.headers["Content-Length"])
            async with session.get(url) as get:  # the same connection, read as the next answer
                assert get.status == 200 and len(await get.read()) == length > 0


async def test_redirected_content_is_followed_inside_the_gateway(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], media: dict[str, Path]
) -> None:
    client = dialect_gateway.sdk()
    done = await client.videos.create_and_poll(prompt="[redirect] signed urls", model="sora-remote")
    status, headers, body = await send(
        dialect_gateway, "GET", f"/v1/videos/{done.id}/content", allow_redirects=False
    )
    assert status == 200 and "Location" not in headers
    assert body == media["video"].read_bytes()
    signed = upstream[0].requests("GET", "/signed/")
    assert signed and "Authorization" not in signed[0].headers

    upstream[0].signed_urls_expired = True  # past its time, the signed URL is the provider's lost file
    status, _, body = await send(dialect_gateway, "GET", f"/v1/videos/{done.id}/content")
    assert status == 410 and json.loads(body)["error"]["code"] == "video_expired", body


async def test_seconds_as_a_json_number_reaches_an_openai_dialect_upstream_as_text(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """The gateway takes ``"seconds": 8`` (openai-videos-api §8.2); the dialect's ``seconds`` is a
    string enum, which OpenAI and Azure refuse a number for, so it goes on as ``"8"``."""
    fake, _ = upstream
    status, _, raw = await send(
        dialect_gateway, "POST", "/v1/videos", json={"prompt": "x", "model": "sora-remote", "seconds": 8}
    )
    assert status == 200, raw
    assert json.loads(raw)["seconds"] == "8"
    assert json.loads(fake.requests("POST", "/v1/videos")[-1].body)["seconds"] == "8"
    source = json.loads(raw)["id"]
    status, _, raw = await send(
        dialect_gateway,
        "POST",
        "/v1/videos/extensions",
        json={"prompt": "more", "video": {"id": source}, "seconds": 4},
    )
    assert status == 200, raw
    assert json.loads(fake.requests("POST", "/v1/videos/extensions")[-1].body)["seconds"] == "4"


async def test_fields_after_the_model_in_a_streamed_form_are_shown_when_the_upstream_does_not_say(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """The SDKs send a form's parts in the order prompt, model, seconds, size, file. The gateway
    routes on ``model`` and streams the rest on, and still shows the size and seconds asked for when
    the provider's answers leave them out (apifree's do, §7). A prompt over the API's bound that
    comes after the model is refused on the way, its upload cut short."""
    fake, _ = upstream
    fake.terse = True

    async def form(*fields: tuple[str, str]) -> AsyncIterator[bytes]:
        for name, value in fields:
            yield f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
            await asyncio.sleep(0.05)  # each part in a read of its own, as the SDK's writes may come
        yield b'--b\r\nContent-Disposition: form-data; name="input_reference"; filename="r.png"\r\n'
        yield b"Content-Type: image/png\r\n\r\n" + png_bytes() + b"\r\n--b--\r\n"

    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    sdk_order = form(("prompt", "a cat"), ("model", "sora-remote"), ("seconds", "8"), ("size", "1280x720"))
    status, _, raw = await send(dialect_gateway, "POST", "/v1/videos", data=sdk_order, headers=multipart)
    video = json.loads(raw)
    assert status == 200, video
    assert (video["prompt"], video["seconds"], video["size"]) == ("a cat", "8", "1280x720")
    polled = await dialect_gateway.sdk().videos.retrieve(video["id"])
    assert (polled.status, polled.seconds, polled.size) == ("in_progress", "8", "1280x720")

    fake.terse = False
    late_prompt = form(("model", "sora-remote"), ("prompt", "x" * 32001))
    status, _, raw = await send(dialect_gateway, "POST", "/v1/videos", data=late_prompt, headers=multipart)
    assert status == 400 and json.loads(raw)["error"]["param"] == "prompt", raw
    assert len(fake.jobs) == 1


async def test_a_model_smuggled_under_an_escaped_part_name_never_reaches_the_upstream(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """A remix passes the client's form on byte for byte, the gateway rewriting ``model`` only where
    it saw that field. A part named ``"mo\\del"`` is no ``model`` to the gateway, but aiohttp (and
    other servers) unescape it to ``model``: the upstream would bill a model the client's key may not
    use. Such a part is refused, before anything is sent."""
    fake, _ = upstream
    source = await dialect_gateway.sdk().videos.create(prompt="source", model="sora-remote")
    body = (
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nagain\r\n'
        b'--b\r\nContent-Disposition: form-data; name="mo\\del"\r\n\r\nsora-2-pro-expensive\r\n--b--\r\n'
    )
    status, _, raw = await send(
        dialect_gateway,
        "POST",
        f"/v1/videos/{source.id}/remix",
        data=body,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert status == 400 and json.loads(raw)["error"]["code"] == "invalid_multipart", raw
    assert fake.requests("POST", f"/v1/videos/{next(iter(fake.jobs))}/remix") == []


_FORM_TAIL = b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nagain\r\n--b--\r\n'
_SMUGGLED = b'Content-Disposition: form-data; name="model"\r\n\r\nsora-2-pro-expensive\r\n'


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        pytest.param(  # aiohttp and Go read a part with an empty filename as a field, email as a file
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="model"; filename=""\r\n\r\nsora-2-pro\r\n'
            + _FORM_TAIL,
            id="model-with-an-empty-filename",
        ),
        pytest.param(  # the gateway read the first boundary, werkzeug reads the last
            "multipart/form-data; boundary=b; boundary=c",
            b"--c\r\n" + _SMUGGLED + b"--c--\r\n" + _FORM_TAIL,
            id="two-boundary-parameters",
        ),
        pytest.param(  # email and werkzeug end a value at a delimiter after a bare LF
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhello\n--b\r\n'
            + _SMUGGLED
            + b"--b--\r\n",
            id="delimiter-after-a-bare-lf",
        ),
        pytest.param(
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhello\r--b\r\n'
            + _SMUGGLED
            + b"--b--\r\n",
            id="delimiter-after-a-bare-cr",
        ),
        pytest.param(  # ... and in the preamble, where a first-wins parser then takes it
            "multipart/form-data; boundary=b",
            b"x\n--b\r\n" + _SMUGGLED + _FORM_TAIL,
            id="delimiter-after-a-bare-lf-in-the-preamble",
        ),
    ],
)
async def test_a_form_another_parser_reads_otherwise_never_reaches_the_upstream(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], content_type: str, body: bytes
) -> None:
    """A remix passes the client's form on byte for byte, rewriting only the fields the gateway saw.
    Where the provider's parser could find a part the gateway did not (or the gateway's ``model`` in
    a part it reads as a file), the provider would bill a model the client's key may not use: such a
    form is refused before anything is sent."""
    fake, _ = upstream
    source = await dialect_gateway.sdk().videos.create(prompt="source", model="sora-remote")
    status, _, raw = await send(
        dialect_gateway,
        "POST",
        f"/v1/videos/{source.id}/remix",
        data=body,
        headers={"Content-Type": content_type},
    )
    assert status == 400 and json.loads(raw)["error"]["code"] == "invalid_multipart", raw
    assert fake.requests("POST", f"/v1/videos/{next(iter(fake.jobs))}/remix") == []


async def test_an_edits_video_id_given_as_a_file_part_is_refused(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """``video[id]`` with an empty filename was no ID to the gateway, so no ownership check ran, and
    the edit, routed by ``model`` with its uploaded video, took the part on to the provider, which
    may read it as the ID of another tenant's job."""
    fake, _ = upstream
    await dialect_gateway.sdk().videos.create(prompt="someone's", model="sora-remote")
    body = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nsora-remote\r\n'
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nmine now\r\n'
        b'--b\r\nContent-Disposition: form-data; name="video[id]"; filename=""\r\n\r\n'
        + next(iter(fake.jobs)).encode()
        + b'\r\n--b\r\nContent-Disposition: form-data; name="video"; filename="v.mp4"\r\n'
        b"Content-Type: video/mp4\r\n\r\n\0\0\0\x18ftypmp42\r\n--b--\r\n"
    )
    status, _, raw = await send(
        dialect_gateway,
        "POST",
        "/v1/videos/edits",
        data=body,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    error = json.loads(raw)["error"]
    assert status == 400 and error["code"] == "invalid_multipart" and error["param"] == "video[id]", raw
    assert fake.requests("POST", "/v1/videos/edits") == []


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
@pytest.mark.parametrize("image", [b"\x89PNG" + b"\0" * 300_000, b"\x89PNG" + os.urandom(200_000)])
async def test_a_compressed_upload_reaches_the_upstream_whole(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], encoding: str, image: bytes
) -> None:
    """A body sent with Content-Encoding is decoded on the way in; its Content-Length is the encoded
    size, so the upstream must not be promised that many bytes: a body that compresses well was cut
    there (the upstream got a broken form, the client a 200), one that does not left the upstream
    waiting for bytes that never came (a 504)."""
    fake, _ = upstream
    body = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nsora-remote\r\n'
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\npacked\r\n'
        b'--b\r\nContent-Disposition: form-data; name="input_reference"; filename="r.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + image + b"\r\n--b--\r\n"
    )
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    headers = {"Content-Type": "multipart/form-data; boundary=b", "Content-Encoding": encoding}
    status, _, raw = await send(dialect_gateway, "POST", "/v1/videos", data=packed, headers=headers)
    assert status == 200, raw
    (received,) = fake.requests("POST", "/v1/videos")
    assert received.body == body.replace(b"sora-remote", b"upstream-sora")
    assert int(received.headers.get("Content-Length", len(received.body))) == len(received.body)


async def test_transport_padding_after_a_delimiter_reaches_the_upstream_as_sent(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """Spaces and tabs after a delimiter (RFC 2046 §5.1.1, which receivers must accept): the form is
    read, and streamed on byte for byte but for the model."""
    fake, _ = upstream
    body = (
        b'--b \t\r\nContent-Disposition: form-data; name="model"\r\n\r\nsora-remote\r\n'
        b'--b  \r\nContent-Disposition: form-data; name="prompt"\r\n\r\npadded\r\n--b--\r\n'
    )
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    status, _, raw = await send(dialect_gateway, "POST", "/v1/videos", data=body, headers=headers)
    assert status == 200 and json.loads(raw)["prompt"] == "padded", raw
    (received,) = fake.requests("POST", "/v1/videos")
    assert received.body == body.replace(b"sora-remote", b"upstream-sora")


async def test_edits_extensions_and_characters_reach_the_owning_upstream(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    fake, _ = upstream
    client = dialect_gateway.sdk()
    source = await client.videos.create(prompt="source", model="sora-remote")
    upstream_id = next(iter(fake.jobs))

    status, _, raw = await send(
        dialect_gateway,
        "POST",
        "/v1/videos/edits",
        json={"prompt": "make it blue", "video": {"id": source.id}},
    )
    edited = json.loads(raw)
    assert status == 200 and edited["id"].startswith("video_") and edited["model"] == "sora-remote"
    (edit_request,) = fake.requests("POST", "/v1/videos/edits")
    assert json.loads(edit_request.body)["video"] == {"id": upstream_id}

    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("prompt", "longer")
    form.add_field("seconds", "8")
    form.add_field("video[id]", source.id)
    status, _, raw = await send(dialect_gateway, "POST", "/v1/openai/videos/extensions", data=form)
    assert status == 200, raw
    (extend_request,) = fake.requests("POST", "/v1/videos/extensions")
    assert f'name="video[id]"\r\n\r\n{upstream_id}\r\n'.encode() in extend_request.body
    assert source.id.encode() not in extend_request.body
    assert (await client.videos.retrieve(json.loads(raw)["id"])).model == "sora-remote"

    character = await client.videos.create_character(
        name="Mochi", video=("c.mp4", b"\x00" * 32, "video/mp4"), extra_body={"model": "sora-remote"}
    )
    assert character.id.startswith("char_") and character.name == "Mochi"
    (char_request,) = fake.requests("POST", "/v1/videos/characters")
    assert b'name="name"\r\n\r\nMochi' in char_request.body
    assert b'name="model"\r\n\r\nupstream-sora\r\n' in char_request.body, "the deployment's model"
    assert b"sora-remote" not in char_request.body
    fetched = await client.videos.get_character(character.id)
    assert fetched.id == character.id and fetched.name == "Mochi"
    assert fake.requests("GET", "/v1/videos/characters/upchar_")


async def test_a_model_sent_with_an_edit_by_id_goes_upstream_as_the_deployments(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """An edit or extension by ID is routed by its source; a ``model`` field the client adds must
    not reach the provider as written (a public name, or a model the key may not use)."""
    fake, _ = upstream
    source = await dialect_gateway.sdk().videos.create(prompt="source", model="sora-remote")
    status, _, raw = await send(
        dialect_gateway,
        "POST",
        "/v1/videos/edits",
        json={"prompt": "blue", "video": {"id": source.id}, "model": "premium-upstream-model"},
    )
    assert status == 200, raw
    (edit_request,) = fake.requests("POST", "/v1/videos/edits")
    assert json.loads(edit_request.body)["model"] == "upstream-sora"

    extension = form(
        ("prompt", "longer"), ("video[id]", source.id), ("seconds", "4"), ("model", "sora-remote")
    )
    status, _, raw = await send(dialect_gateway, "POST", "/v1/videos/extensions", data=extension)
    assert status == 200, raw
    (extend_request,) = fake.requests("POST", "/v1/videos/extensions")
    assert b'name="model"\r\n\r\nupstream-sora\r\n' in extend_request.body
    assert b"sora-remote" not in extend_request.body


async def test_local_provider_does_edits_and_extensions(local_gateway: RunningGateway) -> None:
    client = local_gateway.sdk()
    source = await client.videos.create_and_poll(prompt="base clip", size="320x240", seconds="4")
    status, _, raw = await send(
        local_gateway,
        "POST",
        "/v1/videos/extensions",
        json={"prompt": "and then", "seconds": "4", "video": {"id": source.id}},
    )
    assert status == 200 and json.loads(raw)["seconds"] == "8"
    status, _, raw = await send(
        local_gateway, "POST", "/v1/videos/edits", json={"prompt": "edited", "video": {"id": source.id}}
    )
    assert status == 200 and json.loads(raw)["size"] == "320x240"
    status, _, raw = await send(local_gateway, "POST", "/v1/videos/edits", json={"prompt": "no video"})
    assert status == 400 and json.loads(raw)["error"]["param"] == "video"


@pytest.mark.parametrize("prompt", ["streamed", "streamed [crlf events]"])
async def test_stream_is_relayed_with_gateway_ids(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], prompt: str
) -> None:
    """Events are translated one by one, however their lines end and however they arrive: a CRLF
    split between two reads glued an event to the next, whose data, no JSON then, went to the
    client as the provider wrote it, with its job ID and model."""
    status, headers, raw = await send(
        dialect_gateway,
        "POST",
        "/v1/videos",
        json={"prompt": prompt, "model": "sora-remote", "stream": True},
    )
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    videos = [json.loads(line[6:]) for e in events for line in e.split("\n") if line.startswith("data: {")]
    assert [v["status"] for v in videos] == ["queued", "in_progress", "completed"]
    assert len({v["id"] for v in videos}) == 1 and videos[0]["id"].startswith("video_")
    assert all(v["model"] == "sora-remote" and set(v) == VIDEO_KEYS for v in videos)
    assert "event: video.completed" in raw.decode() and events[-1].strip() == "data: [DONE]"
    assert "up_" not in raw.decode()
    assert json.loads(upstream[0].requests("POST", "/v1/videos")[0].body)["stream"] is True
    again = await dialect_gateway.sdk().videos.retrieve(videos[0]["id"])
    assert again.status == "completed"


async def test_stream_events_that_are_no_json_pass_as_they_are(dialect_gateway: RunningGateway) -> None:
    """Events whose data is no JSON (nested 100 000 deep, NaN) or nested too deep to be written
    back (1 000 levels) are relayed untouched; the video events after them still get the gateway's
    IDs."""
    body = {"prompt": "[odd events]", "model": "sora-remote", "stream": True}
    status, _, raw = await send(dialect_gateway, "POST", "/v1/videos", json=body)
    assert status == 200
    events = [e for e in raw.decode().split("\n\n") if e.strip()]
    assert events[:2] == ["event: progress\ndata: " + "[" * 100_000, "data: NaN"]
    assert events[2].startswith('data: {"id": "up_') and events[2].endswith("]" * 1000 + "}")
    assert events[-2].startswith("event: video.completed\ndata: {") and events[-1] == "data: [DONE]"
    assert json.loads(events[-2].partition("data: ")[2])["id"].startswith("video_")


async def test_a_providers_words_reach_the_client_without_its_credentials(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """A provider may quote the key it was sent in a failure message or an event it streams, or a
    signed URL: what the gateway passes on has them masked, and no event ID of the provider's."""
    failed = await dialect_gateway.sdk().videos.create_and_poll(
        prompt="[fail leaky]", model="sora-remote", poll_interval_ms=10
    )
    assert failed.status == "failed" and failed.error is not None
    assert UPSTREAM_KEY not in failed.error.message and "[REDACTED]" in failed.error.message
    body = {"prompt": "[leaky events]", "model": "sora-remote", "stream": True}
    status, _, raw = await send(dialect_gateway, "POST", "/v1/videos", json=body)
    assert status == 200
    text = raw.decode()
    assert "auth failed for Bearer [REDACTED]" in text and "X-Amz-Signature=[REDACTED]" in text, text[:400]
    assert UPSTREAM_KEY not in text and "5f0c0ffee" not in text and "up_evt_1" not in text
    assert "event: video.completed" in text
    body = {"prompt": "[400 leaky]", "model": "sora-remote"}
    status, _, raw = await send(dialect_gateway, "POST", "/v1/videos", json=body)
    error = json.loads(raw)["error"]
    assert status == 400 and UPSTREAM_KEY not in raw.decode(), error
    assert all("[REDACTED]" in error[field] for field in ("message", "type", "param", "code")), error


async def test_models_list_and_single(local_gateway: RunningGateway) -> None:
    models = await local_gateway.sdk().models.list()
    assert [m.id for m in models.data] == ["sora-2"]
    assert (await local_gateway.sdk().models.retrieve("sora-2")).id == "sora-2"
    status, _, raw = await send(local_gateway, "GET", "/v1/models/nope")
    assert status == 404 and json.loads(raw)["error"]["code"] == "model_not_found"


async def test_videos_survive_a_restart(
    start_gateway: StartGateway, tmp_path: Path, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    text = gateway_yaml(tmp_path, upstream_url=upstream[1])
    first = await start_gateway(text)
    local = await first.sdk().videos.create_and_poll(prompt="before restart", size="320x240")
    pending = await first.sdk().videos.create(prompt="unfinished at restart", size="320x240")
    remote = await first.sdk().videos.create(prompt="remote before restart", model="sora-remote")
    await first.server.close()

    second = await start_gateway(text)
    client = second.sdk()
    assert (await client.videos.retrieve(local.id)).status == "completed"
    assert (await client.videos.download_content(local.id)).content[4:8] == b"ftyp"
    assert (await client.videos.poll(pending.id)).status == "completed"
    assert (await client.videos.retrieve(remote.id)).model == "sora-remote"
    listed = [v.id async for v in await client.videos.list()]
    assert set(listed) == {local.id, pending.id, remote.id}


async def test_a_video_whose_provider_left_the_config_can_still_be_deleted(
    start_gateway: StartGateway, tmp_path: Path, upstream: tuple[FakeOpenAIUpstream, str], session_log: Path
) -> None:
    """After a restart without its provider (renamed or removed), a video cannot be asked about any
    more: polls answer 503 provider_unavailable. A delete forgets it here (logged with its provider's
    ID, for an operator to cancel it there), so it no longer sits in the list or holds a key at its
    max_in_progress cap for good."""
    text = gateway_yaml(tmp_path, upstream_url=upstream[1]).replace(
        "key: ${ALPHA_KEY}", "key: ${ALPHA_KEY}\n    limits: {max_in_progress: 1}", 1
    )
    first = await start_gateway(text)
    video = await first.sdk().videos.create(prompt="stranded", model="sora-remote")
    await first.server.close()
    second = await start_gateway(
        text.replace("dialect:", "renamed:").replace("provider: dialect", "provider: renamed")
    )
    status, _, body = await send(second, "GET", f"/v1/videos/{video.id}")
    assert status == 503 and json.loads(body)["error"]["code"] == "provider_unavailable"
    status, _, body = await send(
        second, "POST", "/v1/videos", json={"prompt": "next", "model": "sora-remote"}
    )
    assert status == 429, body
    status, _, body = await send(second, "DELETE", f"/v1/videos/{video.id}")
    assert status == 200 and json.loads(body)["deleted"] is True, body
    assert (await second.sdk().videos.list()).data == []
    status, _, body = await send(
        second, "POST", "/v1/videos", json={"prompt": "next", "model": "sora-remote"}
    )
    assert status == 200, body
    logged = [json.loads(line) for line in session_log.read_text().splitlines() if video.id in line]
    assert any(e["event"] == "deleted_without_provider" and e["upstream_id"] for e in logged), logged


async def test_a_streamed_create_counts_once_against_max_in_progress(
    start_gateway: StartGateway, tmp_path: Path, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """While its stream was relayed (usually until the video finished), a streamed create counted
    twice against its key's cap: as its video, and as the create's admission still open. A key that
    may have 2 videos at once could have one streamed video, and a second create was a 429."""
    fake, url = upstream
    text = gateway_yaml(tmp_path, upstream_url=url).replace(
        "key: ${ALPHA_KEY}", "key: ${ALPHA_KEY}\n    limits: {max_in_progress: 2}", 1
    )
    gw = await start_gateway(text)
    streamed = {"prompt": "[held stream]", "model": "sora-remote", "stream": True}
    async with (
        aiohttp.ClientSession(headers=AUTH) as session,
        session.post(gw.url + "/v1/videos", json=streamed) as stream,
    ):
        assert b"video_" in await stream.content.readuntil(b"\n\n")
        status, _, body = await send(gw, "POST", "/v1/videos", json={"prompt": "b", "model": "sora-remote"})
        assert status == 200, body
        status, _, body = await send(gw, "POST", "/v1/videos", json={"prompt": "c", "model": "sora-remote"})
        assert status == 429 and json.loads(body)["error"]["code"] == "too_many_in_progress", body
        fake.stream_gate.set()
        assert b"[DONE]" in await stream.read()


async def test_hop_by_hop_and_client_credentials_stay_behind(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    status, headers, _ = await send(
        dialect_gateway,
        "POST",
        "/v1/videos",
        json={"prompt": "hops", "model": "sora-remote"},
        headers={
            "Connection": "keep-alive, X-Private-Hop",
            "X-Private-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic c2VjcmV0",
            "Cookie": "session=abc",
            "OpenAI-Organization": "org-client",
            "X-Custom": "not on the allow-list",
        },
    )
    assert status == 200
    (received,) = upstream[0].requests("POST", "/v1/videos")
    for name in (
        "X-Private-Hop",
        "Keep-Alive",
        "TE",
        "Proxy-Authorization",
        "Cookie",
        "OpenAI-Organization",
        "X-Custom",
    ):
        assert name not in received.headers, name
    assert received.headers["Authorization"] == "Bearer sk-upstream-secret-abcdef"
    assert received.headers["X-Request-ID"] == headers["x-request-id"]


def form(*fields: tuple[str, str | bytes], file: str | None = None) -> aiohttp.FormData:
    """A multipart body with the fields in this order, repeats kept; ``file`` names one file part."""
    data = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields:
        if name == file:
            data.add_field(name, value, filename="big.bin", content_type="application/octet-stream")
        else:
            data.add_field(name, value)
    return data


async def error_of(gw: RunningGateway, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    status, _, raw = await send(gw, "POST", path, **kwargs)
    return status, json.loads(raw)["error"] if status >= 400 else json.loads(raw)


async def test_edits_and_extensions_need_a_video_they_can_name(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """Without a video (file or ID) an edit or extension is a 400, never a brand-new video."""
    gw, remote = dialect_gateway, {"model": "sora-remote", "prompt": "x", "seconds": "4"}
    for path in ("/v1/videos/edits", "/v1/videos/extensions"):
        status, error = await error_of(gw, path, data=form(*remote.items()))
        assert status == 400 and error["param"] == "video", (path, error)
        for video in ({}, None):
            status, error = await error_of(gw, path, json={**remote, "video": video})
            assert status == 400 and error["param"] == "video", (path, video, error)
            assert error["code"] == "missing_required_parameter", error
        for video in ("video_" + "0" * 32, 7, ["video_x"]):  # there, but neither a file nor {"id"}
            status, error = await error_of(gw, path, json={**remote, "video": video})
            assert status == 400 and error["param"] == "video", (path, video, error)
            assert error["code"] == "invalid_type" and '{"id": ...}' in error["message"], error
        for video_id in (None, 7, ["video_x"], {"id": "video_x"}):
            status, error = await error_of(gw, path, json={**remote, "video": {"id": video_id}})
            assert status == 400 and error["param"] == "video" and error["code"] == "invalid_type", error
        for video_id in ("video_" + "0" * 32, "None", "x" * 300, "\u2603"):
            for kwargs in (
                {"json": {**remote, "video": {"id": video_id}}},
                {"data": form(*remote.items(), ("video[id]", video_id))},
            ):
                status, error = await error_of(gw, path, **kwargs)
                assert status == 404 and error["code"] == "video_not_found", (path, video_id, error)
                assert error["param"] == "video"
    assert [r for r in upstream[0].received if r.method == "POST"] == []


async def test_extensions_need_seconds_before_any_provider(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    fake, _ = upstream
    source = await dialect_gateway.sdk().videos.create(prompt="source", model="sora-remote")
    for kwargs in (
        {"json": {"prompt": "longer", "video": {"id": source.id}}},
        {"json": {"prompt": "longer", "seconds": None, "video": {"id": source.id}}},
        {"data": form(("video[id]", source.id), ("prompt", "longer"))},
    ):
        status, error = await error_of(dialect_gateway, "/v1/videos/extensions", **kwargs)
        assert status == 400 and error["param"] == "seconds", error
    assert fake.requests("POST", "/v1/videos/extensions") == []
    status, _ = await error_of(
        dialect_gateway,
        "/v1/videos/extensions",
        data=form(("video[id]", source.id), ("prompt", "longer"), ("seconds", "4")),
    )
    assert status == 200 and len(fake.requests("POST", "/v1/videos/extensions")) == 1


async def test_a_checked_field_given_twice_is_refused(
    start_gateway: StartGateway, tmp_path: Path, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """A key limited to sora-remote must not reach the forbidden upstream model by naming it twice."""
    fake, url = upstream
    text = gateway_yaml(tmp_path, upstream_url=url).replace(
        "    key: ${BETA_KEY}\n", "    key: ${BETA_KEY}\n    models: [sora-remote]\n"
    )
    text += "  sora-secret:\n    provider: dialect\n    model: upstream-secret\n"
    gw = await start_gateway(text)
    beta = {"Authorization": f"Bearer {BETA_KEY}"}
    big = b"\0" * (3 * 1024 * 1024)  # past the head: the second copy comes while the body streams on
    for path, fields, file, param in (
        ("/v1/videos", [("model", "sora-secret"), ("model", "sora-remote"), ("prompt", "p")], None, "model"),
        (
            "/v1/videos",
            [("model", "sora-remote"), ("prompt", "p"), ("model", "upstream-secret")],
            None,
            "model",
        ),
        (
            "/v1/videos",
            [("model", "sora-remote"), ("input_reference", big), ("model", "upstream-secret")],
            "input_reference",
            "model",
        ),
        ("/v1/videos", [("prompt", "a"), ("model", "sora-remote"), ("prompt", "b")], None, "prompt"),
    ):
        status, error = await error_of(gw, path, data=form(*fields, file=file), headers=beta)
        assert status == 400 and error["param"] == param, (fields[:2], error)
    assert fake.requests("POST", "/v1/videos") == []

    source = await gw.sdk(BETA_KEY).videos.create(prompt="mine", model="sora-remote")
    for path, fields in (
        ("/v1/videos/extensions", [("video[id]", source.id), ("seconds", "4"), ("video[id]", "up_0099")]),
        ("/v1/videos/edits", [("video[id]", source.id), ("prompt", "p"), ("video", big), ("video[id]", "x")]),
        (f"/v1/videos/{source.id}/remix", [("prompt", "a"), ("prompt", "b")]),
    ):
        status, error = await error_of(gw, path, data=form(*fields, file="video"), headers=beta)
        assert status == 400 and error["param"] == fields[0][0], (path, error)
    assert [r.path for r in fake.received if r.method == "POST"] == ["/v1/videos"]

    # a field the gateway neither reads nor replaces may repeat: it reaches the upstream unchanged
    fields = [("model", "sora-remote"), ("prompt", "p"), ("tag", "a"), ("tag", "b")]
    status, _ = await error_of(gw, "/v1/videos", data=form(*fields), headers=beta)
    forwarded = fake.requests("POST", "/v1/videos")[-1].body
    assert status == 200 and forwarded.count(b'name="tag"') == 2

    # JSON keeps the last of repeated keys, and the gateway sends on what it checked, once
    raw = b'{"model": "sora-secret", "prompt": "first", "model": "sora-remote", "prompt": "second"}'
    status, video = await error_of(
        gw, "/v1/videos", data=raw, headers={**beta, "Content-Type": "application/json"}
    )
    assert status == 200 and video["model"] == "sora-remote" and video["prompt"] == "second"
    forwarded = fake.requests("POST", "/v1/videos")[-1].body
    assert json.loads(forwarded) == {"model": "upstream-sora", "prompt": "second"}
    assert forwarded.count(b'"model"') == 1 and b"secret" not in forwarded


async def test_a_video_or_character_the_provider_no_longer_has_is_the_gateways_own_404(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """A provider that purged a job answers 404 with its own ID in the message; the client hears the
    gateway's answer for its own ID, as for any unknown video, not the provider's words."""
    fake, _ = upstream
    client = dialect_gateway.sdk()
    video = await client.videos.create(prompt="purged later", model="sora-remote")
    character = await client.videos.create_character(
        name="Mochi", video=("c.mp4", b"\x00" * 32, "video/mp4"), extra_body={"model": "sora-remote"}
    )
    fake.jobs.clear()
    fake.characters.clear()

    for path in (f"/v1/videos/{video.id}", f"/v1/videos/{video.id}/content"):
        status, _, raw = await send(dialect_gateway, "GET", path)
        assert status == 404, raw
        assert json.loads(raw)["error"] == {
            "message": f"No video found with id '{video.id}'.",
            "type": "invalid_request_error",
            "param": "video_id",
            "code": "video_not_found",
        }
    status, _, raw = await send(dialect_gateway, "GET", f"/v1/videos/characters/{character.id}")
    assert status == 404 and json.loads(raw)["error"]["code"] == "character_not_found"
    assert character.id in json.loads(raw)["error"]["message"] and b"upchar_" not in raw
    assert len(fake.requests("GET", "/v1/videos/up_")) == 2, "one poll each: a 404 is not retried"

    # and a remix, edit or extension that starts from it
    starts = [
        (f"/v1/videos/{video.id}/remix", {"prompt": "again"}, "video_id"),
        ("/v1/videos/edits", {"prompt": "again", "video": {"id": video.id}}, "video"),
        ("/v1/videos/extensions", {"prompt": "on", "seconds": "4", "video": {"id": video.id}}, "video"),
    ]
    for path, body, param in starts:
        status, _, raw = await send(dialect_gateway, "POST", path, json=body)
        assert status == 404, (path, raw)
        assert json.loads(raw)["error"] == {
            "message": f"No video found with id '{video.id}'.",
            "type": "invalid_request_error",
            "param": param,
            "code": "video_not_found",
        }


async def test_a_route_the_provider_lacks_is_not_taken_for_a_purged_video(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], session_log: Path
) -> None:
    """A self-hosted OpenAI-dialect server without remix, edits or extensions answers those 404 too,
    while it still has the video: the client was told its video was not found, though it could
    retrieve it the moment after. It is now told what the provider answered, and that the video is
    still there."""
    fake, _ = upstream
    fake.without.update({"remix", "edits", "extensions"})
    client = dialect_gateway.sdk()
    video = await client.videos.create(prompt="no remix here", model="sora-remote")
    starts = [
        (f"/v1/videos/{video.id}/remix", {"prompt": "again"}),
        ("/v1/videos/edits", {"prompt": "again", "video": {"id": video.id}}),
        ("/v1/videos/extensions", {"prompt": "on", "seconds": "4", "video": {"id": video.id}}),
    ]
    for path, body in starts:
        status, headers, raw = await send(dialect_gateway, "POST", path, json=body)
        error = json.loads(raw)["error"]
        assert status == 404 and error["code"] != "video_not_found", (path, raw)
        assert "still has it" in error["message"] and "404" in error["message"], (path, raw)
        await asyncio.sleep(0.05)
        (entry,) = [
            line
            for line in map(json.loads, session_log.read_text().splitlines())
            if line.get("event") == "request" and line.get("request_id") == headers["x-request-id"]
        ]
        assert entry["upstream_status"] == 404, "the log shows the operation's answer, not the check's"
    assert (await client.videos.retrieve(video.id)).id == video.id

    # a provider whose refusal quotes its own job's ID: the client reads its video's ID instead
    fake.without.clear()
    video = await client.videos.create(prompt="[no remix] a one-off", model="sora-remote")
    (upstream_id,) = [job["id"] for job in fake.jobs.values() if job["prompt"] == "[no remix] a one-off"]
    status, _, raw = await send(dialect_gateway, "POST", f"/v1/videos/{video.id}/remix", json={"prompt": "x"})
    error = json.loads(raw)["error"]
    assert status == 404 and f"Video '{video.id}' cannot be remixed." in error["message"], raw
    assert upstream_id.encode() not in raw
    # and so does any other refusal of a remix
    video = await client.videos.create(prompt="[no remix 400] a one-off", model="sora-remote")
    (upstream_id,) = [job["id"] for job in fake.jobs.values() if job["prompt"] == "[no remix 400] a one-off"]
    status, _, raw = await send(dialect_gateway, "POST", f"/v1/videos/{video.id}/remix", json={"prompt": "x"})
    assert status == 400 and f"Video '{video.id}' cannot be remixed." in json.loads(raw)["error"]["message"]
    assert upstream_id.encode() not in raw


async def test_a_providers_error_names_the_video_by_the_gateways_id(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """A provider's own error message reaches the client (credentials scrubbed). One that quoted
    the provider's ID for the job showed the client an ID it has never seen and cannot use; the
    gateway's ID for the video now stands in its place."""
    fake, _ = upstream
    video = await dialect_gateway.sdk().videos.create(prompt="[unreadable] later", model="sora-remote")
    (upstream_id,) = fake.jobs
    for method in ("GET", "DELETE"):
        status, _, raw = await send(dialect_gateway, method, f"/v1/videos/{video.id}")
        assert status >= 500, raw
        assert video.id in json.loads(raw)["error"]["message"] and upstream_id.encode() not in raw, raw


async def test_content_the_provider_purged_after_its_expiry_is_gone_not_unknown(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """A completed video whose ``expires_at`` has passed is still the client's video (retrieve shows
    it): when the provider no longer has its content, the download is 410 ``video_expired``, as the
    native providers answer, not a 404 that says the video does not exist."""
    fake, _ = upstream
    client = dialect_gateway.sdk()
    video = await client.videos.create(prompt="downloaded too late", model="sora-remote")
    (job,) = fake.jobs.values()
    job.update(status="completed", progress=100, completed_at=int(time.time()) - 7200)
    job["expires_at"] = int(time.time()) - 3600
    assert (await client.videos.retrieve(video.id)).status == "completed"
    fake.jobs.clear()

    status, _, raw = await send(dialect_gateway, "GET", f"/v1/videos/{video.id}/content")
    assert status == 410 and json.loads(raw)["error"]["code"] == "video_expired"
    assert (await client.videos.retrieve(video.id)).expires_at == job["expires_at"]


async def test_a_variant_the_provider_lacks_is_not_a_missing_video(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """A server that makes no spritesheet (Azure documents the video alone) answers 404 for it. The
    video is still there, so the client hears that the variant is missing, as a native provider's
    client does; once the provider has purged the job, the video is what is gone."""
    fake, _ = upstream
    client = dialect_gateway.sdk()
    video = await client.videos.create_and_poll(prompt="no sheet", model="sora-remote")
    fake.media = {variant: path for variant, path in fake.media.items() if variant != "spritesheet"}
    status, _, raw = await send(dialect_gateway, "GET", f"/v1/videos/{video.id}/content?variant=spritesheet")
    error = json.loads(raw)["error"]
    assert status == 404 and (error["code"], error["param"]) == ("variant_not_available", "variant"), error
    (upstream_id,) = fake.jobs
    assert fake.requests("GET", "/v1/videos/")[-1].path == f"/v1/videos/{upstream_id}", "asked about it"
    assert (await client.videos.retrieve(video.id)).status == "completed"

    fake.jobs.clear()
    status, _, raw = await send(dialect_gateway, "GET", f"/v1/videos/{video.id}/content?variant=thumbnail")
    assert status == 404 and json.loads(raw)["error"]["code"] == "video_not_found"


async def test_a_download_asks_the_provider_for_its_bytes_uncompressed(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """Media are compressed already. A refusal a provider's front compressed for the client's
    ``Accept-Encoding: gzip`` (the SDK's) would be bytes the gateway cannot read the provider's
    words from, so the provider is asked for identity whatever the client accepts."""
    fake, _ = upstream
    video = await dialect_gateway.sdk().videos.create_and_poll(prompt="plain", model="sora-remote")
    status, _, _ = await send(
        dialect_gateway, "GET", f"/v1/videos/{video.id}/content", headers={"Accept-Encoding": "gzip, br"}
    )
    assert status == 200
    (asked,) = [r for r in fake.requests("GET", "/v1/videos/") if r.path.endswith("/content")]
    assert asked.headers["Accept-Encoding"] == "identity"


async def test_numbers_a_provider_writes_as_infinite_text_are_left_out_not_a_500(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """``"inf"`` parses as a float that no integer can hold; a timestamp like that is no timestamp."""
    fake, _ = upstream
    video = await dialect_gateway.sdk().videos.create(prompt="odd numbers", model="sora-remote")
    (job,) = fake.jobs.values()
    job["expires_at"] = "inf"
    status, _, raw = await send(dialect_gateway, "GET", f"/v1/videos/{video.id}")
    assert status == 200, raw
    polled = json.loads(raw)
    assert polled["status"] == "in_progress" and polled["progress"] == 40 and polled["expires_at"] is None


async def test_a_list_without_parameters_is_the_newest_twenty(local_gateway: RunningGateway) -> None:
    """OpenAI's defaults, which apps paging by hand rely on: 20 a page, newest first."""
    client = local_gateway.sdk()
    made = []
    for i in range(21):
        made.append((await client.videos.create(prompt=f"v{i}", size="320x240", seconds="1")).id)
    status, _, raw = await send(local_gateway, "GET", "/v1/videos")
    page = json.loads(raw)
    assert status == 200 and len(page["data"]) == 20 and page["has_more"] is True
    assert [v["id"] for v in page["data"]] == made[::-1][:20]
    rest = (await client.videos.list(after=page["last_id"])).data
    assert [v.id for v in rest] == made[:1]


async def test_an_unfinished_video_its_provider_lost_ends_as_failed(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider that restarted (or purged a job) answers 404 for a video still in progress. It was
    404 to the client and in_progress in its list for good, counted against its key's
    max_in_progress. A 404 of a moment is no loss; one that lasts is: the video ends failed."""
    from gateway import api

    monkeypatch.setattr(api, "LOST_AFTER_SECONDS", 0.3)
    fake, _ = upstream
    client = dialect_gateway.sdk()
    video = await client.videos.create(prompt="lost upstream", model="sora-remote")
    job = dict(fake.jobs)
    fake.jobs.clear()
    status, _, raw = await send(dialect_gateway, "GET", f"/v1/videos/{video.id}")
    assert status == 404 and json.loads(raw)["error"]["code"] == "video_not_found"
    await asyncio.sleep(0.4)
    fake.jobs.update(job)  # back again before another 404: it was a moment's, nothing lost
    assert (await client.videos.retrieve(video.id)).status in ("queued", "in_progress")
    fake.jobs.clear()
    status, _, raw = await send(dialect_gateway, "GET", f"/v1/videos/{video.id}")
    assert status == 404, "a new 404: the wait starts again, not from the first one"
    await asyncio.sleep(0.4)
    failed = await client.videos.retrieve(video.id)
    assert failed.status == "failed" and failed.error is not None and failed.error.code == "video_not_found"
    assert [(v.id, v.status) for v in (await client.videos.list()).data] == [(video.id, "failed")]
    polls = len(fake.requests("GET", "/v1/videos/up_"))
    assert (await client.videos.retrieve(video.id)).status == "failed"
    assert len(fake.requests("GET", "/v1/videos/up_")) == polls, "a failed video is not polled again"


async def test_a_lost_video_is_not_failed_on_a_workers_stale_copy(
    start_gateway: StartGateway,
    tmp_path: Path,
    upstream: tuple[FakeOpenAIUpstream, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two workers on one store, each with its own cache. A 404 noted by one, then cleared by the
    other when the provider knew the job again, was still in the first one's copy: its next 404,
    however brief, failed a video the provider was still making (a billed video never delivered)."""
    from gateway import api

    monkeypatch.setattr(api, "LOST_AFTER_SECONDS", 0.3)
    fake, url = upstream
    text = gateway_yaml(tmp_path, upstream_url=url)
    first, second = await start_gateway(text), await start_gateway(text)
    video = await first.sdk().videos.create(prompt="two workers", model="sora-remote")
    job = dict(fake.jobs)
    fake.jobs.clear()
    status, _, _ = await send(first, "GET", f"/v1/videos/{video.id}")
    assert status == 404  # noted by the first worker
    fake.jobs.update(job)
    assert (await second.sdk().videos.retrieve(video.id)).status in ("queued", "in_progress")
    await asyncio.sleep(0.4)
    fake.jobs.clear()  # a 404 of a moment, long after the first one
    status, _, raw = await send(first, "GET", f"/v1/videos/{video.id}")
    assert status == 404, raw
    fake.jobs.update(job)
    assert (await first.sdk().videos.retrieve(video.id)).status in ("in_progress", "completed")
    assert (await second.sdk().videos.retrieve(video.id)).status in ("in_progress", "completed")


async def test_a_lost_video_is_not_failed_on_a_404_its_sibling_never_saw(
    start_gateway: StartGateway,
    tmp_path: Path,
    upstream: tuple[FakeOpenAIUpstream, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, but the second worker cached the video before the first one's 404 and then heard
    nothing new (a job stuck at the same progress): it had nothing to save, so the store kept the
    first worker's note for good, and a brief 404 much later failed the video. A worker that keeps
    hearing from the provider says so in the store now and then, which clears such a note."""
    from gateway import api

    monkeypatch.setattr(api, "LOST_AFTER_SECONDS", 0.4)
    fake, url = upstream
    text = gateway_yaml(tmp_path, upstream_url=url)
    first, second = await start_gateway(text), await start_gateway(text)
    video = await first.sdk().videos.create(prompt="stuck at 40 %", model="sora-remote")
    (upstream_id,) = fake.jobs

    def stuck() -> None:  # the fake moves a job on at each retrieve: back, so it answers 40 % again
        fake.jobs[upstream_id].update(status="queued", progress=0)

    for gw in (first, second):
        assert (await gw.sdk().videos.retrieve(video.id)).progress == 40
        stuck()
    job = dict(fake.jobs)
    fake.jobs.clear()
    status, _, _ = await send(first, "GET", f"/v1/videos/{video.id}")
    assert status == 404  # noted by the first worker
    fake.jobs.update(job)
    for _ in range(3):  # the second worker hears from the provider throughout
        await asyncio.sleep(0.15)
        assert (await second.sdk().videos.retrieve(video.id)).progress == 40
        stuck()
    fake.jobs.clear()  # a 404 of a moment, long after the first one
    status, _, raw = await send(first, "GET", f"/v1/videos/{video.id}")
    assert status == 404, raw
    fake.jobs.update(job)
    assert (await second.sdk().videos.retrieve(video.id)).status == "in_progress"
    assert (await first.sdk().videos.retrieve(video.id)).status in ("in_progress", "completed")


async def test_a_characters_follow_ups_go_through_its_deployment_as_configured(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """A character keeps no upstream model of its own: taking that for a deployment pointed
    elsewhere, every lookup was given a deployment rebuilt from the task, without the configured
    one's limits (max_concurrent_requests) whenever its upstream model is not its public name."""
    from gateway import api

    character = await dialect_gateway.sdk().videos.create_character(
        name="Mochi", video=("c.mp4", b"\x00" * 32, "video/mp4"), extra_body={"model": "sora-remote"}
    )
    gw = dialect_gateway.app[GATEWAY]
    task = await gw.store.get(character.id, "alpha", "character")
    assert task is not None
    deployment, _ = api._deployment_of(gw.table, task)
    assert deployment is gw.table.deployments[task.deployment]
    assert deployment.upstream_model == "upstream-sora"


async def test_a_prompt_longer_than_the_api_allows_is_refused_and_never_stored_from_an_echo(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """The API bounds a prompt at 32 000 characters (``maxLength``), which a pass-through provider
    was left to enforce: a self-hosted one taking 1 MiB prompts and echoing them, each video held a
    megabyte in every process's cache of 10 000 (RSS 77 MB to 390 MB after 300 creates). Too long
    is a 400 where the gateway reads the prompt, and a provider's echo of one is not kept."""
    fake, _ = upstream
    status, _, body = await call(
        dialect_gateway, "POST", "/v1/videos", json={"model": "sora-remote", "prompt": "x" * 32_001}
    )
    assert status == 400 and body["error"]["param"] == "prompt", body
    assert fake.requests("POST", "/v1/videos") == []
    # a provider's echo of one (a pass-through form streams on unread) keeps the prompt as last known
    status, _, video = await call(
        dialect_gateway, "POST", "/v1/videos", json={"model": "sora-remote", "prompt": "short"}
    )
    assert status == 200
    (job,) = fake.jobs.values()
    job["prompt"] = "y" * 40_000
    status, _, again = await call(dialect_gateway, "GET", f"/v1/videos/{video['id']}")
    assert status == 200 and again["prompt"] == "short"


async def _raw_exchanges(
    gw: RunningGateway, requests: list[bytes]
) -> list[tuple[bytes, CIMultiDict[str], bytes]]:
    """Send ``requests`` pipelined on one connection; each answer's status line, headers and body."""
    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    writer.write(b"".join(requests))
    answers = []
    try:
        for _ in requests:
            status = (await reader.readline()).rstrip(b"\r\n")
            headers: CIMultiDict[str] = CIMultiDict()
            while (line := (await reader.readline()).rstrip(b"\r\n")) != b"":
                name, _, value = line.decode().partition(":")
                headers.add(name, value.strip())
            answers.append((status, headers, await reader.readexactly(int(headers["Content-Length"]))))
    finally:
        writer.close()
    return answers


async def test_whole_answers_carry_the_head_aiohttp_would_give_them(
    dialect_gateway: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JSON answers (a poll's, a list's, an error's) are written in one piece past aiohttp's own
    preparing (connections.write_whole). Their heads must be what aiohttp gives: the same status
    lines and headers, the connection kept for the next pipelined request, and closed after one
    that asks for it."""
    video = await dialect_gateway.sdk().videos.create_and_poll(prompt="heads", model="sora-remote")
    auth = f"Authorization: Bearer {ALPHA_KEY}\r\n"
    requests = [
        f"GET /v1/videos/{video.id} HTTP/1.1\r\nHost: gw\r\n{auth}\r\n".encode(),
        f"GET /v1/videos?limit=1 HTTP/1.1\r\nHost: gw\r\n{auth}\r\n".encode(),
        b"GET /v1/videos/video_nope HTTP/1.1\r\nHost: gw\r\n" + auth.encode() + b"\r\n",
        b"PATCH /v1/videos HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n" + auth.encode() + b"\r\n",
        b"GET /v1/videos HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    ]

    def comparable(answers: list[tuple[bytes, CIMultiDict[str], bytes]]) -> list[Any]:
        varying = {"date", "x-request-id", "x-gateway-overhead-ms", "content-length"}  # progress moves
        return [
            (status, sorted((k.lower(), v) for k, v in headers.items() if k.lower() not in varying))
            for status, headers, _ in answers
        ]

    from gateway import app

    written = []

    def counted(request: Any, response: Any) -> Any:
        written.append(outcome := write_whole(request, response))
        return outcome

    write_whole = app.write_whole
    monkeypatch.setattr(app, "write_whole", counted)
    ours = await _raw_exchanges(dialect_gateway, requests)
    assert len(written) == len(requests) and None not in written, "each was written whole"
    monkeypatch.setattr(app, "write_whole", lambda request, response: None)
    aiohttps = await _raw_exchanges(dialect_gateway, requests)
    assert [status for status, _, _ in ours] == [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 404 Not Found",
        b"HTTP/1.1 405 Method Not Allowed",
        b"HTTP/1.1 401 Unauthorized",
    ]
    assert comparable(ours) == comparable(aiohttps)
    assert ours[-1][1]["Connection"] == "close" and "Connection" not in ours[0][1]
    assert all(headers["Date"].endswith(" GMT") for _, headers, _ in ours)
    assert json.loads(ours[0][2])["id"] == video.id
