"""The Luma adapter against a fake of Luma's Dream Machine API (tests/fakes/luma.py)."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp.test_utils import unused_port

from gateway.app import build_app
from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, ServeGateway, StartGateway, load
from tests.fakes.luma import FakeLuma
from tests.provider_contract import (
    ODD_TASK_ID,
    assert_a_moments_404_ends_nothing,
    assert_refused,
    assert_sdk_roundtrip,
    assert_task_id_kept_whole,
    create,
    png,
    poll_until_done,
    request,
    start_provider_gateway,
)

MODELS = """
    dream:
      provider: native
      model: ray-2
    flash:
      provider: native
      model: ray-flash-2
    ray-legacy:
      provider: native
      model: ray-1-6
"""


def provider_yaml(luma_url: str, key: str = "${UPSTREAM_KEY}") -> str:
    return f"""
        kind: luma
        base_url: {luma_url}/dream-machine/v1
        api_key: {key}
        poll_after_ms: 100
    """


@pytest.fixture
async def luma(aiohttp_server: Any, media: dict[str, Path]) -> tuple[FakeLuma, str]:
    fake = FakeLuma(api_key=UPSTREAM_KEY, media=media)
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def gw(start_gateway: StartGateway, tmp_path: Path, luma: tuple[FakeLuma, str]) -> RunningGateway:
    """A gateway without ``server.public_base_url``: it cannot host uploaded images."""
    return await start_provider_gateway(start_gateway, tmp_path, provider_yaml(luma[1]), MODELS)


@pytest.fixture
async def hosted_gw(
    gateway_server: ServeGateway, tmp_path: Path, luma: tuple[FakeLuma, str]
) -> RunningGateway:
    """A gateway whose ``server.public_base_url`` is its own loopback address, so the fake can fetch."""
    port = unused_port()

    async def start(text: str) -> RunningGateway:
        app = build_app(load(text))
        return RunningGateway(await gateway_server(app, port=port), app)

    extra = f"server: {{public_base_url: 'http://127.0.0.1:{port}'}}"
    gw = await start_provider_gateway(start, tmp_path, provider_yaml(luma[1]), MODELS, extra=extra)
    assert gw.url == f"http://127.0.0.1:{port}"
    return gw


async def test_text_to_video_request_and_status_sequence(
    gw: RunningGateway, luma: tuple[FakeLuma, str]
) -> None:
    fake, _ = luma
    video = await create(gw, model="dream", prompt="a red fox", size="1920x1080", seconds="9")
    assert video["model"] == "dream" and video["size"] == "1920x1080" and video["seconds"] == "9"
    assert fake.creates == [
        {
            "model": "ray-2",
            "prompt": "a red fox",
            "aspect_ratio": "16:9",
            "resolution": "1080p",
            "duration": "9s",
        }
    ]
    assert fake.headers[-1]["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert ALPHA_KEY not in str(fake.headers)

    seen = await poll_until_done(gw, video["id"])
    assert [v["status"] for v in seen] == ["queued", "in_progress", "in_progress", "completed"]
    assert seen[0]["progress"] == 0 and 1 <= seen[1]["progress"] <= 95 and seen[-1]["progress"] == 100
    assert seen[-1]["error"] is None and seen[-1]["completed_at"] is not None


async def test_square_sizes_and_extra_params(gw: RunningGateway, luma: tuple[FakeLuma, str]) -> None:
    fake, _ = luma
    await create(gw, model="flash", prompt="loop me", size="960x960", seconds="5", loop=True)
    await create(gw, model="flash", prompt="tall", size="540x1260", callback_url="https://evil.example/")
    assert fake.creates == [
        {
            "model": "ray-flash-2",
            "prompt": "loop me",
            "aspect_ratio": "1:1",
            "resolution": "720p",
            "duration": "5s",
            "loop": True,
        },
        {
            "model": "ray-flash-2",
            "prompt": "tall",
            "aspect_ratio": "9:21",
            "resolution": "540p",
            "duration": "5s",
        },
    ]


async def test_ray_1_6_gets_neither_resolution_nor_duration(
    gw: RunningGateway, luma: tuple[FakeLuma, str]
) -> None:
    video = await create(gw, model="ray-legacy", prompt="old school", size="720x1280")
    assert video["seconds"] == "5"
    assert luma[0].creates == [{"model": "ray-1-6", "prompt": "old school", "aspect_ratio": "9:16"}]
    await assert_refused(
        gw,
        {"prompt": "x", "model": "ray-legacy", "seconds": "9"},
        status=400,
        param="seconds",
        mentions=("5",),
    )
    await assert_refused(
        gw, {"prompt": "x", "model": "ray-legacy", "size": "1920x1080"}, status=400, param="size"
    )


async def test_uploaded_image_is_hosted_at_a_signed_url_luma_downloads(
    hosted_gw: RunningGateway, luma: tuple[FakeLuma, str]
) -> None:
    fake, _ = luma
    image = png()
    form = {"prompt": "animate", "model": "dream", "size": "1280x720", "input_reference": image}
    status, _, body = await request(hosted_gw, "POST", "/v1/videos", data=form)
    assert status == 200, body
    frame0 = fake.creates[0]["keyframes"]["frame0"]
    assert frame0["type"] == "image" and frame0["url"].startswith(f"{hosted_gw.url}/files/")
    (download,) = fake.downloads
    assert download.status == 200 and download.body == image and download.content_type == "image/png"
    assert ALPHA_KEY not in frame0["url"] and UPSTREAM_KEY not in frame0["url"]

    tampered = frame0["url"][:-1] + ("1" if frame0["url"].endswith("0") else "0")
    async with aiohttp.ClientSession() as session, session.get(tampered) as response:
        assert response.status == 404

    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    await create(hosted_gw, model="dream", prompt="again", input_reference={"image_url": data_url})
    assert fake.downloads[-1].body == image and fake.downloads[-1].url != frame0["url"]

    # Deleting the video deletes the image uploaded for it; the other video's image stays.
    status, _, _ = await request(hosted_gw, "DELETE", f"/v1/videos/{body['id']}")
    assert status == 200
    async with aiohttp.ClientSession() as session:
        async with session.get(frame0["url"]) as response:
            assert response.status == 404
        async with session.get(fake.downloads[-1].url) as response:
            assert response.status == 200 and await response.read() == image


async def test_a_hosted_link_with_any_other_query_is_the_same_404(
    hosted_gw: RunningGateway, luma: tuple[FakeLuma, str]
) -> None:
    """Links anyone can send: odd expiries and signatures (a superscript digit, 5 000 digits,
    text that is not ASCII) are the envelope's 404 like any wrong link, never a 500."""
    form = {"prompt": "animate", "model": "dream", "size": "1280x720", "input_reference": png()}
    status, _, body = await request(hosted_gw, "POST", "/v1/videos", data=form)
    assert status == 200, body
    url = luma[0].creates[0]["keyframes"]["frame0"]["url"]
    path, _, query = url.partition("?")
    expires, sig = (part.partition("=")[2] for part in query.split("&"))
    odd = [
        f"expires=%C2%B2&sig={sig}",
        f"expires={'9' * 5000}&sig={sig}",
        f"expires={expires}&sig={'%C3%A9' * 64}",
        f"expires={expires}&sig={sig.upper()}",
        f"expires={expires}",
        "",
    ]
    async with aiohttp.ClientSession() as session:
        for target in [*(f"{path}?{q}" for q in odd), f"{path}%0A?{query}"]:
            async with session.get(yarl.URL(target, encoded=True)) as response:
                answer = await response.json()
                assert response.status == 404 and answer["error"]["code"] == "not_found", (target, answer)
        async with session.get(url) as response:
            assert response.status == 200


async def test_upload_without_public_base_url_is_refused_but_urls_pass(
    gw: RunningGateway, luma: tuple[FakeLuma, str]
) -> None:
    fake, _ = luma
    form = {"prompt": "animate", "model": "dream", "input_reference": png()}
    status, _, body = await request(gw, "POST", "/v1/videos", data=form)
    assert status == 400 and body["error"]["param"] == "input_reference", body
    assert "server.public_base_url" in body["error"]["message"] and "image URL" in body["error"]["message"]
    assert fake.creates == []

    url = "https://images.example.com/cat.png"
    await create(gw, model="dream", prompt="animate", input_reference={"image_url": url})
    assert fake.creates[-1]["keyframes"] == {"frame0": {"type": "image", "url": url}}
    assert fake.downloads[-1].url == url


async def test_unsupported_size_and_seconds_list_the_allowed_values(gw: RunningGateway) -> None:
    await assert_refused(
        gw,
        {"prompt": "x", "model": "dream", "size": "1792x1024"},
        status=400,
        param="size",
        mentions=("1280x720", "720x1280", "1920x1080", "960x960"),
    )
    await assert_refused(
        gw, {"prompt": "x", "model": "dream", "seconds": "8"}, status=400, param="seconds", mentions=("5, 9",)
    )


async def test_failed_and_moderated_generations(gw: RunningGateway) -> None:
    failed = await create(gw, model="dream", prompt="[fail] please")
    final = (await poll_until_done(gw, failed["id"]))[-1]
    assert final["status"] == "failed"
    assert final["error"] == {
        "code": "generation_failed",
        "message": "Generation failed due to an internal error",
    }

    moderated = await create(gw, model="dream", prompt="[moderation] forbidden")
    final = (await poll_until_done(gw, moderated["id"]))[-1]
    assert final["status"] == "failed" and final["error"]["code"] == "content_filter"
    assert "moderation failed" in final["error"]["message"]


async def test_rate_limit_becomes_429_with_retry_after(gw: RunningGateway) -> None:
    headers = await assert_refused(
        gw, {"prompt": "[429]", "model": "dream"}, status=429, mentions=("Too many requests",)
    )
    assert headers["Retry-After"] == "10"


async def test_rejected_upstream_key_is_named(
    start_gateway: StartGateway, tmp_path: Path, luma: tuple[FakeLuma, str]
) -> None:
    gw = await start_provider_gateway(start_gateway, tmp_path, provider_yaml(luma[1], key="wrong"), MODELS)
    status, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "x", "model": "dream"})
    assert status == 401 and body["error"]["code"] == "upstream_auth_failed"
    assert "Invalid API key provided" in body["error"]["message"]


async def test_content_and_thumbnail_stream_through_the_gateway(
    gw: RunningGateway, media: dict[str, Path]
) -> None:
    video = await create(gw, model="dream", prompt="stream me")
    await poll_until_done(gw, video["id"])
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and body == media["video"].read_bytes() and headers["Content-Type"] == "video/mp4"
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content?variant=thumbnail")
    assert status == 200 and body == media["spritesheet"].read_bytes()
    assert headers["Content-Type"] == "image/jpeg"
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content?variant=spritesheet")
    assert status == 404 and body["error"]["code"] == "variant_not_available"
    assert "spritesheet" in body["error"]["message"]


async def test_expired_result_is_410(gw: RunningGateway, luma: tuple[FakeLuma, str]) -> None:
    fake, _ = luma
    video = await create(gw, model="dream", prompt="short-lived result")
    await poll_until_done(gw, video["id"])
    (upstream_id,) = fake.generations
    fake.expire(upstream_id)
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 410 and body["error"]["code"] == "video_expired"


async def test_delete_removes_the_generation_at_luma(gw: RunningGateway, luma: tuple[FakeLuma, str]) -> None:
    fake, _ = luma
    video = await create(gw, model="dream", prompt="short-lived")
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{video['id']}")
    assert status == 200 and body["deleted"] is True and fake.generations == {}


async def test_official_sdk_end_to_end(gw: RunningGateway, media: dict[str, Path]) -> None:
    assert await assert_sdk_roundtrip(gw, "dream", prompt="sdk", size="720x1280") == (
        media["video"].read_bytes()
    )


async def test_a_task_id_is_used_whole(gw: RunningGateway, luma: tuple[FakeLuma, str]) -> None:
    video_id = await assert_task_id_kept_whole(gw, luma[0], "dream")
    status, _, deleted = await request(gw, "DELETE", f"/v1/videos/{video_id}")
    assert status == 200 and deleted["deleted"] is True, deleted
    assert ODD_TASK_ID not in luma[0].generations  # the delete reached the generation's own path


async def test_an_image_type_in_another_spelling_is_the_image_it_is(
    hosted_gw: RunningGateway, luma: tuple[FakeLuma, str]
) -> None:
    """Media types are case-insensitive and libraries send aliases (``image/x-png``): a PNG is
    hosted as ``image/png``, the type Luma takes, whatever the client called it."""
    fake, _ = luma
    image = png()
    data_url = "data:image/PNG;base64," + base64.b64encode(image).decode()
    await create(hosted_gw, model="dream", prompt="upper", input_reference={"image_url": data_url})
    form = {"model": "dream", "prompt": "alias", "input_reference": (image, "image/x-png")}
    status, _, body = await request(hosted_gw, "POST", "/v1/videos", data=form)
    assert status == 200, body
    assert [(d.body, d.content_type) for d in fake.downloads] == [(image, "image/png")] * 2


async def test_a_full_disk_when_the_image_is_hosted_is_a_503_and_luma_gets_nothing(
    hosted_gw: RunningGateway, luma: tuple[FakeLuma, str], tmp_path: Path, full_disk: Callable[[], None]
) -> None:
    """The image Luma is to fetch is written to the gateway's disk first. A full disk there is the
    gateway's trouble: 503 to retry, no half-written image left behind, and no create at Luma."""
    fake, _ = luma
    form = {"prompt": "animate", "model": "dream", "size": "1280x720", "input_reference": png()}
    status, headers, body = await request(hosted_gw, "POST", "/v1/videos", data=form)
    assert status == 503 and headers["Retry-After"] == "5", body
    assert body["error"]["code"] == "storage_unavailable"
    assert fake.creates == []
    assert [p for p in tmp_path.rglob("hosted/*") if p.is_file()] == []

    full_disk()  # room again
    status, _, body = await request(hosted_gw, "POST", "/v1/videos", data=form)
    assert status == 200 and len(fake.creates) == 1, body


async def test_an_image_swept_by_another_request_meanwhile_is_no_failure(
    hosted_gw: RunningGateway, luma: tuple[FakeLuma, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each hosted image sweeps out expired ones, on a worker thread, while other creates do the same
    and deletes remove theirs: a file listed and then gone before its turn must not fail a create
    (it was a 503 storage_unavailable)."""
    fake, _ = luma
    real_iterdir = Path.iterdir

    def listed_then_gone(path: Path) -> Iterator[Path]:
        if path.name == "hosted":
            yield path / f"{'0' * 32}.png"  # removed by someone else since it was listed
        yield from real_iterdir(path)

    monkeypatch.setattr(Path, "iterdir", listed_then_gone)
    form = {"prompt": "animate", "model": "dream", "size": "1280x720", "input_reference": png()}
    status, _, body = await request(hosted_gw, "POST", "/v1/videos", data=form)
    assert status == 200 and len(fake.creates) == 1, body


async def test_hosted_images_are_swept_once_in_a_while_not_at_each_upload(
    hosted_gw: RunningGateway, luma: tuple[FakeLuma, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each hosted image looked at every file in the directory for expired ones: 45 ms an upload
    with 10 000 files, 213 ms with 50 000. A minute apart at most now."""
    fake, _ = luma
    real_iterdir = Path.iterdir
    sweeps = []

    def counted(path: Path) -> Iterator[Path]:
        if path.name == "hosted":
            sweeps.append(path)
        return real_iterdir(path)

    monkeypatch.setattr(Path, "iterdir", counted)
    for _ in range(3):
        form = {"prompt": "animate", "model": "dream", "size": "1280x720", "input_reference": png()}
        status, _, body = await request(hosted_gw, "POST", "/v1/videos", data=form)
        assert status == 200, body
    assert len(fake.creates) == 3 and len(sweeps) == 1


async def test_a_moments_404_ends_nothing(
    gw: RunningGateway, luma: tuple[FakeLuma, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await assert_a_moments_404_ends_nothing(
        gw, luma[0].generations, monkeypatch, model="dream", prompt="a red fox"
    )


async def test_extras_the_sdk_flattens_into_a_form_arrive_whole(
    gw: RunningGateway, luma: tuple[FakeLuma, str]
) -> None:
    """The SDK sends a create as a form, writing a list of objects as ``concepts[][key]`` fields and
    ``True`` as ``true`` (openai-videos-api §4.2): Luma gets the list and the boolean back."""
    fake, _ = luma
    concepts = [{"key": "dolly_zoom"}, {"key": "orbit_left"}]
    await gw.sdk().videos.create(
        prompt="zoom",
        model="flash",  # type: ignore[arg-type]
        size="960x960",  # type: ignore[arg-type]
        seconds="5",  # type: ignore[arg-type]
        extra_body={"concepts": concepts, "loop": True},
    )
    (sent,) = fake.creates
    assert sent["concepts"] == concepts and sent["loop"] is True


@pytest.mark.parametrize(
    "fields",
    [
        [("concepts[][key][]", "a")],  # a list inside a list's objects: which object's is it?
        [("concepts[][key]", "a"), ("concepts[][key]", "b"), ("concepts[][weight]", "1")],  # ragged
        [("concepts[key]", "a"), ("concepts[key][deeper]", "b")],  # a value and an object at once
        [("concepts[key", "a")],
    ],
)
async def test_a_flattened_extra_a_form_cannot_say_unambiguously_is_refused(
    gw: RunningGateway, luma: tuple[FakeLuma, str], fields: list[tuple[str, str]]
) -> None:
    fake, _ = luma
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in [("model", "flash"), ("prompt", "p"), ("size", "960x960"), *fields]:
        form.add_field(name, value)
    status, _, body = await request(gw, "POST", "/v1/videos", data=form)
    assert status == 400 and body["error"]["param"] == "concepts", body
    assert fake.creates == []
