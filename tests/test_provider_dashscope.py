"""The DashScope (Alibaba Wan) adapter against a fake of DashScope's API (tests/fakes/dashscope.py)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import ProviderConfig
from gateway.providers import ADAPTERS
from gateway.providers import dashscope as dashscope_adapter
from gateway.providers.base import AdapterEnv
from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway
from tests.fakes.dashscope import CREATE, FakeDashScope
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

MODELS = """
    wan-t2v:
      provider: native
      model: wan2.1-t2v-turbo
    wan-t2v-plus:
      provider: native
      model: wan2.1-t2v-plus
    wan-25:
      provider: native
      model: wan2.5-t2v-preview
    wan-i2v:
      provider: native
      model: wan2.2-i2v-plus
    wan-i2v-turbo:
      provider: native
      model: wan2.1-i2v-turbo
"""


@pytest.fixture
async def dashscope(aiohttp_server: Any, media: dict[str, Path]) -> tuple[FakeDashScope, str]:
    fake = FakeDashScope(api_key=UPSTREAM_KEY, video=media["video"])
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("")).rstrip("/")


async def start(
    start_gateway: StartGateway, tmp_path: Path, url: str, key: str = "${UPSTREAM_KEY}"
) -> RunningGateway:
    provider = f"""
        kind: dashscope
        base_url: {url}
        api_key: {key}
        poll_after_ms: 100
        options: {{workspace: llm-test-workspace}}
    """
    return await start_provider_gateway(start_gateway, tmp_path, provider, MODELS)


@pytest.fixture
async def gw(
    start_gateway: StartGateway, tmp_path: Path, dashscope: tuple[FakeDashScope, str]
) -> RunningGateway:
    return await start(start_gateway, tmp_path, dashscope[1])


async def test_text_to_video_request_and_status_sequence(
    gw: RunningGateway, dashscope: tuple[FakeDashScope, str]
) -> None:
    fake, _ = dashscope
    video = await create(
        gw,
        model="wan-t2v",
        prompt="a red fox",
        size="832x480",
        seconds="5",
        negative_prompt="blurry",
        prompt_extend=False,
        watermark=True,
        seed=42,
    )
    assert video["model"] == "wan-t2v" and video["size"] == "832x480" and video["seconds"] == "5"
    assert fake.creates == [
        {
            "model": "wan2.1-t2v-turbo",
            "input": {"prompt": "a red fox", "negative_prompt": "blurry"},
            "parameters": {
                "size": "832*480",
                "duration": 5,
                "prompt_extend": False,
                "watermark": True,
                "seed": 42,
            },
        }
    ]
    headers = fake.headers[-1]
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}" and headers["X-DashScope-Async"] == "enable"
    assert headers["X-DashScope-WorkSpace"] == "llm-test-workspace"

    seen = await poll_until_done(gw, video["id"])
    assert [v["status"] for v in seen] == ["queued", "in_progress", "completed"]
    assert seen[0]["progress"] == 0 and 0 < seen[1]["progress"] < 100 and seen[-1]["progress"] == 100
    assert seen[-1]["completed_at"] is not None and seen[-1]["error"] is None
    assert seen[-1]["expires_at"] > seen[-1]["created_at"]
    assert "X-DashScope-Async" not in fake.headers[-1], "only creates are asynchronous calls"
    assert ALPHA_KEY not in str(fake.headers)


async def test_a_model_dashscope_does_not_have_is_the_operators_to_fix(
    start_gateway: StartGateway, tmp_path: Path, dashscope: tuple[FakeDashScope, str]
) -> None:
    """DashScope answers a model its region lacks (here Beijing's name for Wan 2.1 at the
    international endpoint) with 400 InvalidParameter "Model not exist.": the routing config's
    fault, which the create fails over from, not the client's invalid value."""
    provider = f"""
        kind: dashscope
        base_url: {dashscope[1]}
        api_key: ${{UPSTREAM_KEY}}
    """
    models = """
        wan:
          provider: native
          model: wanx2.1-t2v-turbo
    """
    gw = await start_provider_gateway(start_gateway, tmp_path, provider, models)
    status, _, body = await request(gw, "POST", "/v1/videos", json={"model": "wan", "prompt": "x"})
    assert status == 502 and body["error"]["code"] == "upstream_model_not_found", body
    assert "wanx2.1-t2v-turbo" in body["error"]["message"]
    assert dashscope[0].tasks == {}


async def test_image_to_video_sends_the_image_as_img_url(
    gw: RunningGateway, dashscope: tuple[FakeDashScope, str]
) -> None:
    fake, _ = dashscope
    image = png()
    form = {"prompt": "animate", "model": "wan-i2v", "size": "1920x1080", "seconds": "5"}
    status, _, body = await request(gw, "POST", "/v1/videos", data={**form, "input_reference": image})
    assert status == 200, body
    assert fake.creates[-1] == {
        "model": "wan2.2-i2v-plus",
        "input": {
            "prompt": "animate",
            "img_url": "data:image/png;base64," + base64.b64encode(image).decode(),
        },
        "parameters": {"resolution": "1080P", "duration": 5},
    }

    url = "https://images.example.com/cat.png"
    await create(
        gw,
        model="wan-i2v-turbo",
        prompt="a cat walks",
        size="480x832",
        seconds="3",
        input_reference={"image_url": url},
    )
    sent = fake.creates[-1]
    assert sent["input"]["img_url"] == url
    assert sent["parameters"] == {"resolution": "480P", "duration": 3}


async def test_text_and_image_models_are_kept_apart(gw: RunningGateway) -> None:
    await assert_refused(gw, {"prompt": "no image", "model": "wan-i2v"}, status=400, param="input_reference")
    image = {"image_url": "https://images.example.com/cat.png"}
    await assert_refused(
        gw,
        {"prompt": "an image", "model": "wan-t2v", "input_reference": image},
        status=400,
        param="input_reference",
    )


async def test_unsupported_size_and_seconds_list_the_allowed_values(gw: RunningGateway) -> None:
    await assert_refused(
        gw,
        {"prompt": "x", "model": "wan-t2v-plus", "size": "832x480"},
        status=400,
        param="size",
        mentions=("1280x720", "720x1280", "960x960", "1088x832", "832x1088"),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "wan-t2v-plus", "seconds": "10"},
        status=400,
        param="seconds",
        mentions=("5",),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "wan-25", "seconds": "8"},
        status=400,
        param="seconds",
        mentions=("5, 10",),
    )


async def test_failed_filtered_cancelled_and_expired_tasks(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """UNKNOWN ends a task as expired once it is as old as DashScope keeps tasks (made 0 here); a
    younger task's UNKNOWN is a 404 the gateway waits out (test_a_moments_404_ends_nothing)."""
    monkeypatch.setattr(dashscope_adapter, "TASK_LIFETIME_SECONDS", 0)
    expected = {
        "[fail]": ("InternalError.Algo", "Algorithm process error."),
        "[filter]": ("content_filter", "Output data may contain inappropriate content."),
        "[cancel]": ("cancelled", None),
        "[expire]": ("expired", "24 hours"),
    }
    for marker, (code, message) in expected.items():
        video = await create(gw, model="wan-t2v", prompt=f"{marker} please")
        final = (await poll_until_done(gw, video["id"]))[-1]
        assert final["status"] == "failed" and final["error"]["code"] == code, (marker, final)
        if message is not None:
            assert message in final["error"]["message"], (marker, final)


async def test_refusals_at_create(
    gw: RunningGateway, start_gateway: StartGateway, tmp_path: Path, dashscope: tuple[FakeDashScope, str]
) -> None:
    headers = await assert_refused(
        gw, {"prompt": "[429]", "model": "wan-t2v"}, status=429, mentions=("rate limit exceeded",)
    )
    assert int(headers["Retry-After"]) > 0

    got, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "[sensitive]", "model": "wan-t2v"})
    assert got == 400 and body["error"]["code"] == "content_filter", body

    wrong = await start(start_gateway, tmp_path / "wrong", dashscope[1], key="sk-not-the-key")
    got, _, body = await request(wrong, "POST", "/v1/videos", json={"prompt": "x", "model": "wan-t2v"})
    assert got == 401 and body["error"]["code"] == "upstream_auth_failed", body
    assert "Invalid API-key provided." in body["error"]["message"]


async def test_the_fake_insists_on_asynchronous_creates(dashscope: tuple[FakeDashScope, str]) -> None:
    """A create without X-DashScope-Async is refused, so the create test proves the adapter sends it."""
    _, url = dashscope
    body = {
        "model": "wan2.1-t2v-turbo",
        "input": {"prompt": "x"},
        "parameters": {"size": "1280*720", "duration": 5},
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + CREATE, json=body, headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}
        ) as response,
    ):
        answer = await response.json()
    assert response.status == 403 and answer["code"] == "AccessDenied"
    assert answer["message"] == "current user api does not support synchronous calls"


async def test_content_streams_through_the_gateway(
    gw: RunningGateway, dashscope: tuple[FakeDashScope, str], media: dict[str, Path]
) -> None:
    fake, _ = dashscope
    video = await create(gw, model="wan-t2v", prompt="stream me")
    await poll_until_done(gw, video["id"])
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and body == media["video"].read_bytes() and headers["Content-Type"] == "video/mp4"
    assert fake.downloads and "Authorization" not in fake.downloads[-1], "the key never goes to OSS"

    path = f"/v1/videos/{video['id']}/content"
    status, headers, body = await request(gw, "GET", path, headers={"Range": "bytes=0-99"})
    assert status == 206 and body == media["video"].read_bytes()[:100]
    assert fake.downloads[-1]["Range"] == "bytes=0-99"
    for ignored in ("items=0-5", "bytes=0-1,5-6", "bytes=abc"):
        status, _, body = await request(gw, "GET", path, headers={"Range": ignored})
        assert status == 200 and body == media["video"].read_bytes(), ignored
        assert "Range" not in fake.downloads[-1], "a Range the gateway ignores is not passed on"

    await assert_variant_missing(gw, video["id"])


async def test_an_expired_result_is_410(gw: RunningGateway) -> None:
    video = await create(gw, model="wan-t2v", prompt="[stale] old news")
    assert (await poll_until_done(gw, video["id"]))[-1]["status"] == "completed"
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 410 and body["error"]["code"] == "video_expired", body


async def test_delete_cancels_a_pending_task(
    gw: RunningGateway, dashscope: tuple[FakeDashScope, str]
) -> None:
    fake, _ = dashscope
    video = await create(gw, model="wan-t2v", prompt="short-lived")
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{video['id']}")
    assert status == 200 and body["deleted"] is True and len(fake.cancelled) == 1
    assert fake.headers[-1]["Authorization"] == f"Bearer {UPSTREAM_KEY}"

    running = await create(gw, model="wan-t2v", prompt="already running")
    await request(gw, "GET", f"/v1/videos/{running['id']}")
    await request(gw, "GET", f"/v1/videos/{running['id']}")
    status, _, body = await request(gw, "DELETE", f"/v1/videos/{running['id']}")
    assert status == 200 and body["deleted"] is True and len(fake.cancelled) == 1
    status, _, _ = await request(gw, "GET", f"/v1/videos/{running['id']}")
    assert status == 404


async def test_official_sdk_end_to_end(gw: RunningGateway, media: dict[str, Path]) -> None:
    assert await assert_sdk_roundtrip(gw, "wan-t2v", prompt="sdk", size="1280x720", seconds="5") == (
        media["video"].read_bytes()
    )


async def test_a_task_id_is_used_whole(gw: RunningGateway, dashscope: tuple[FakeDashScope, str]) -> None:
    await assert_task_id_kept_whole(gw, dashscope[0], "wan-t2v")


# Alibaba Model Studio's own list of the OSS hosts results are served from, for firewalls' allow-lists
# ("OSS域名列表" in its Wan and image API references); the first is where Beijing's Wan videos are.
ALIBABA_RESULT_HOSTS = (
    "dashscope-result-wlcb-acdr-1.oss-cn-wulanchabu-acdr-1.aliyuncs.com",
    "dashscope-result-bj.oss-cn-beijing.aliyuncs.com",
    "dashscope-result-hz.oss-cn-hangzhou.aliyuncs.com",
    "dashscope-result-sh.oss-cn-shanghai.aliyuncs.com",
    "dashscope-result-wlcb.oss-cn-wulanchabu.aliyuncs.com",
    "dashscope-result-zjk.oss-cn-zhangjiakou.aliyuncs.com",
    "dashscope-result-sz.oss-cn-shenzhen.aliyuncs.com",
    "dashscope-result-hy.oss-cn-heyuan.aliyuncs.com",
    "dashscope-result-cd.oss-cn-chengdu.aliyuncs.com",
    "dashscope-result-gz.oss-cn-guangzhou.aliyuncs.com",
)


def test_every_result_host_alibaba_lists_is_followed_and_no_other(tmp_path: Path) -> None:
    """A Wan video from any of them downloads with the default config; the fakes serve results from
    their own host, so this is the test of the built-in list."""
    config = ProviderConfig(
        name="wan", kind="dashscope", base_url="https://dashscope.aliyuncs.com", api_key="k"
    )
    adapter = ADAPTERS["dashscope"](config, AdapterEnv(data_dir=tmp_path, hosted=None))
    for host in ALIBABA_RESULT_HOSTS:
        assert adapter.result_host_allowed(f"https://{host}/1d/31/v.mp4?Expires=1&Signature=x"), host
    for host in ("oss-cn-beijing.aliyuncs.com.example.com", "example.com", "aliyuncs.com"):
        assert not adapter.result_host_allowed(f"https://{host}/v.mp4"), host


async def test_a_moments_404_ends_nothing(
    gw: RunningGateway, dashscope: tuple[FakeDashScope, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await assert_a_moments_404_ends_nothing(
        gw, dashscope[0].tasks, monkeypatch, model="wan-t2v", prompt="a red fox"
    )
