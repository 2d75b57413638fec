"""Checks every native provider adapter must pass, shared by the tests/test_provider_*.py files.

Each provider test starts its fake on loopback, a gateway routing public models to it, and calls
these with what that provider should show. They talk HTTP to the gateway, as a client would.
"""

from __future__ import annotations

import asyncio
import io
import json
import textwrap
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from tests.conftest import ALPHA_KEY, RunningGateway, StartGateway

AUTH = {"Authorization": f"Bearer {ALPHA_KEY}"}
STATUSES = {"queued", "in_progress", "completed", "failed"}
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


async def start_provider_gateway(
    start_gateway: StartGateway, tmp_path: Path, provider_yaml: str, models_yaml: str, extra: str = ""
) -> RunningGateway:
    """A gateway with one provider (``provider_yaml``: the body of ``providers.<name>``) and its models."""
    return await start_gateway(provider_gateway_yaml(tmp_path, provider_yaml, models_yaml, extra))


def provider_gateway_yaml(tmp_path: Path, provider_yaml: str, models_yaml: str, extra: str = "") -> str:
    """The config of :func:`start_provider_gateway`."""
    text = textwrap.dedent("""
        data_dir: __DATA__
        keys:
          - name: alpha
            key: ${ALPHA_KEY}
        providers:
          native:
        __PROVIDER__
        models:
        __MODELS__
        __EXTRA__
    """)
    text = (
        text.replace("__DATA__", str(tmp_path))
        .replace("__PROVIDER__", textwrap.indent(textwrap.dedent(provider_yaml).strip("\n"), "    "))
        .replace("__MODELS__", textwrap.indent(textwrap.dedent(models_yaml).strip("\n"), "  "))
        .replace("__EXTRA__", textwrap.dedent(extra))
    )
    return text


def png(width: int = 64, height: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(out, format="PNG")
    return out.getvalue()


def _form(fields: dict[str, Any]) -> aiohttp.FormData:
    """Form fields as the SDKs send them (multipart, file or not): bytes become a file part, with a
    filename; ``(bytes, content_type)`` one that says its type."""
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in fields.items():
        if isinstance(value, bytes):
            value = (value, "application/octet-stream")
        if isinstance(value, tuple):
            form.add_field(name, value[0], filename=name, content_type=value[1])
        else:
            form.add_field(name, value)
    return form


async def request(
    gw: RunningGateway, method: str, path: str, **kwargs: Any
) -> tuple[int, dict[str, str], Any]:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    if isinstance(kwargs.get("data"), dict):
        kwargs["data"] = _form(kwargs["data"])
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.url + path, headers=headers, **kwargs) as response,
    ):
        raw = await response.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        return response.status, dict(response.headers), body


async def create_with_a_huge_image(gw: RunningGateway, model: str, mib: int) -> tuple[int, Any, int]:
    """A create whose ``input_reference`` is ``mib`` MiB, streamed: the status and body of the answer,
    and the peak of memory Python allocated meanwhile (client and gateway: both run here)."""

    async def stream() -> AsyncIterator[bytes]:
        yield (
            f'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
            '--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhuge\r\n'
            '--b\r\nContent-Disposition: form-data; name="input_reference"; filename="i.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        chunk = bytes(1024 * 1024)
        for _ in range(mib):
            yield chunk
        yield b"\r\n--b--\r\n"

    headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}
    tracemalloc.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(gw.url + "/v1/videos", data=stream(), headers=headers) as response,
        ):
            status, body = response.status, await response.json()
        return status, body, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def create(gw: RunningGateway, **fields: Any) -> dict[str, Any]:
    status, _, body = await request(gw, "POST", "/v1/videos", json=fields)
    assert status == 200, body
    assert set(body) == VIDEO_KEYS and body["status"] in STATUSES and body["id"].startswith("video_")
    return dict(body)


async def poll_until_done(gw: RunningGateway, video_id: str, max_polls: int = 30) -> list[dict[str, Any]]:
    """Every state the client sees until a terminal one; checks vocabulary, keys and monotonic progress."""
    seen = []
    for _ in range(max_polls):
        status, headers, body = await request(gw, "GET", f"/v1/videos/{video_id}")
        assert status == 200, body
        assert set(body) == VIDEO_KEYS and body["status"] in STATUSES, body
        assert isinstance(body["progress"], int) and 0 <= body["progress"] <= 100
        seen.append(body)
        if body["status"] in ("completed", "failed"):
            assert "openai-poll-after-ms" not in headers
            break
        assert int(headers["openai-poll-after-ms"]) > 0
    progress = [v["progress"] for v in seen]
    assert progress == sorted(progress), f"progress went backwards: {progress}"
    assert seen[-1]["status"] in ("completed", "failed"), f"never finished: {[v['status'] for v in seen]}"
    return seen


async def assert_a_moments_404_ends_nothing(
    gw: RunningGateway, jobs: dict[str, Any], monkeypatch: pytest.MonkeyPatch, **fields: Any
) -> None:
    """A provider answering 404 for a job it is still running (its front redeployed, a replica that
    has not heard of it yet) must not end the video, which it would then make and bill, never
    delivered and never polled again. The client gets a 404 until the job is known again; only a
    404 that lasts ``LOST_AFTER_SECONDS`` (shortened here) fails the video as lost.

    ``jobs`` is the fake's own record of its jobs, emptied to make the provider forget them."""
    from gateway import api

    monkeypatch.setattr(api, "LOST_AFTER_SECONDS", 0.3)
    video_id = (await create(gw, **fields))["id"]
    known = dict(jobs)
    jobs.clear()
    status, _, body = await request(gw, "GET", f"/v1/videos/{video_id}")
    assert status == 404 and body["error"]["code"] == "video_not_found", body
    jobs.update(known)
    status, _, body = await request(gw, "GET", f"/v1/videos/{video_id}")
    assert status == 200 and body["status"] in ("queued", "in_progress"), body
    jobs.clear()
    status, _, body = await request(gw, "GET", f"/v1/videos/{video_id}")
    assert status == 404, body
    await asyncio.sleep(0.4)
    status, _, body = await request(gw, "GET", f"/v1/videos/{video_id}")
    assert status == 200 and body["status"] == "failed", body
    assert body["error"]["code"] == "video_not_found", body


async def assert_an_unsendable_job_name_is_refused(gw: RunningGateway, model: str) -> None:
    """A job name the provider answers that no request line could carry as it is (here one ending in
    a line break) is no job name: each poll would put it in a request line, and what follows a line
    break there is a header of a request that carries the gateway's credential. The create is a 502,
    and no video is kept."""
    status, _, body = await request(gw, "POST", "/v1/videos", json={"model": model, "prompt": "[odd name] x"})
    assert status == 502, body
    status, _, page = await request(gw, "GET", "/v1/videos")
    assert status == 200 and page["data"] == [], page


async def assert_refused(
    gw: RunningGateway,
    fields: dict[str, Any],
    *,
    status: int,
    param: str | None = None,
    mentions: tuple[str, ...] = (),
) -> dict[str, Any]:
    got, headers, body = await request(gw, "POST", "/v1/videos", json=fields)
    assert got == status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param, body
    for text in mentions:
        assert text in body["error"]["message"], body
    return dict(headers)


async def assert_sdk_roundtrip(gw: RunningGateway, model: str, **create: Any) -> bytes:
    """create_and_poll then download_content through the official SDK; returns the video bytes."""
    client = gw.sdk()
    video = await client.videos.create_and_poll(model=model, poll_interval_ms=10, **create)
    assert video.status == "completed" and video.model == model and video.progress == 100
    content = await client.videos.download_content(video.id)
    assert content.content[4:8] == b"ftyp", "an MP4 came back"
    return bytes(content.content)


async def assert_variant_missing(gw: RunningGateway, video_id: str, variant: str = "thumbnail") -> None:
    """A variant the provider does not offer: 404 ``variant_not_available`` naming it."""
    status, _, body = await request(gw, "GET", f"/v1/videos/{video_id}/content?variant={variant}")
    assert status == 404 and body["error"]["code"] == "variant_not_available", body
    assert variant in body["error"]["message"]


ODD_TASK_ID = "a/b?c#d e%41.."  # every character here means something in a URL


async def assert_task_id_kept_whole(gw: RunningGateway, fake: Any, model: str) -> str:
    """The provider's task ID is used whole: one made of characters that mean something in a URL
    is polled at its own path (the fake finds the task, else the poll would be a 404), and an empty
    one is no task the gateway could ever poll (502). ``fake.next_id`` sets the ID its next create
    answers. Returns the video made with the odd ID."""
    fake.next_id = ODD_TASK_ID
    video = await create(gw, model=model, prompt="an odd task id")
    status, _, polled = await request(gw, "GET", f"/v1/videos/{video['id']}")
    assert status == 200 and polled["id"] == video["id"], polled
    fake.next_id = ""
    await assert_refused(gw, {"model": model, "prompt": "an empty task id"}, status=502)
    return str(video["id"])
