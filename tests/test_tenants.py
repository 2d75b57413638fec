"""Tenancy: a key sees only its own videos, on every route; IDs cannot be guessed or forged."""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

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


def video_routes(video_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        ("GET", f"/v1/videos/{video_id}", {}),
        ("DELETE", f"/v1/videos/{video_id}", {}),
        ("GET", f"/v1/videos/{video_id}/content", {}),
        ("GET", f"/v1/videos/{video_id}/content?variant=thumbnail", {}),
        ("GET", f"/v1/videos/{video_id}/content?variant=spritesheet", {}),
        ("POST", f"/v1/videos/{video_id}/remix", {"json": {"prompt": "steal it"}}),
        ("POST", "/v1/videos/edits", {"json": {"prompt": "edit it", "video": {"id": video_id}}}),
        (
            "POST",
            "/v1/videos/extensions",
            {"json": {"prompt": "extend it", "seconds": "4", "video": {"id": video_id}}},
        ),
        ("GET", f"/v1/openai/videos/{video_id}", {}),
        ("DELETE", f"/v1/openai/videos/{video_id}", {}),
    ]


def without_id(body: Any, video_id: str) -> str:
    return json.dumps(body).replace(video_id, "<id>")


async def test_other_tenant_gets_the_unknown_id_404_on_every_route(local_gateway: RunningGateway) -> None:
    alpha = local_gateway.sdk(ALPHA_KEY)
    video = await alpha.videos.poll((await alpha.videos.create(prompt="alpha's secret", size="320x240")).id)
    unknown = "video_" + secrets.token_hex(16)

    for method, path, kwargs in video_routes(video.id):
        status, _, body = await call(local_gateway, method, path, key=BETA_KEY, **kwargs)
        unknown_status, _, unknown_body = await call(
            local_gateway,
            method,
            path.replace(video.id, unknown),
            key=ALPHA_KEY,
            **json.loads(json.dumps(kwargs).replace(video.id, unknown)),
        )
        assert status == unknown_status == 404, (method, path, body)
        assert without_id(body, video.id) == without_id(unknown_body, unknown), (method, path)

    beta_list = [v.id async for v in await local_gateway.sdk(BETA_KEY).videos.list()]
    assert video.id not in beta_list
    still_there = await alpha.videos.retrieve(video.id)
    assert still_there.status == "completed"
    assert len((await alpha.videos.download_content(video.id)).content) > 0


async def test_characters_are_private_too(local_gateway: RunningGateway, media: dict[str, Any]) -> None:
    character = await local_gateway.sdk(ALPHA_KEY).videos.create_character(
        name="Ada", video=("clip.mp4", media["video"].read_bytes(), "video/mp4")
    )
    assert character.id.startswith("char_") and character.name == "Ada"
    assert (await local_gateway.sdk(ALPHA_KEY).videos.get_character(character.id)).name == "Ada"
    status, _, body = await call(local_gateway, "GET", f"/v1/videos/characters/{character.id}", key=BETA_KEY)
    assert status == 404 and body["error"]["code"] == "character_not_found"


@pytest.mark.parametrize(
    "forged",
    [
        "video_" + "0" * 32,
        "video_" + secrets.token_hex(16),
        "video_abc",
        "video_",
        "x" * 300,
        "..%2F..%2Fetc",
        "video_" + secrets.token_hex(16).upper(),
    ],
)
async def test_forged_and_malformed_ids_get_the_same_404(local_gateway: RunningGateway, forged: str) -> None:
    reference_status, _, reference = await call(
        local_gateway, "GET", "/v1/videos/video_" + "f" * 32, key=ALPHA_KEY
    )
    status, _, body = await call(local_gateway, "GET", f"/v1/videos/{forged}", key=ALPHA_KEY)
    assert status == reference_status == 404
    assert body["error"]["code"] == reference["error"]["code"] == "video_not_found"
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_deleted_video_is_gone_for_its_owner(local_gateway: RunningGateway) -> None:
    client = local_gateway.sdk()
    video = await client.videos.create(prompt="short-lived", size="320x240")
    await client.videos.delete(video.id)
    for method, path, kwargs in video_routes(video.id):
        status, _, body = await call(local_gateway, method, path, key=ALPHA_KEY, **kwargs)
        assert status == 404, (method, path, body)


async def test_keys_and_model_permissions(start_gateway: StartGateway, tmp_path: Any) -> None:
    text = gateway_yaml(tmp_path).replace("key: ${BETA_KEY}", "key: ${BETA_KEY}\n    models: [sora-2]")
    text = text.replace("\nmodels:\n  sora-2:", "\nmodels:\n  sora-2-pro:\n    provider: local\n  sora-2:")
    gw = await start_gateway(text)

    status, _, body = await call(
        gw, "POST", "/v1/videos", key=BETA_KEY, json={"prompt": "x", "model": "sora-2-pro"}
    )
    assert (
        status == 403 and body["error"]["code"] == "model_not_allowed" and body["error"]["param"] == "model"
    )
    status, _, body = await call(gw, "GET", "/v1/models", key=BETA_KEY)
    assert [m["id"] for m in body["data"]] == ["sora-2"]
    status, _, body = await call(gw, "GET", "/v1/models", key=ALPHA_KEY)
    assert {m["id"] for m in body["data"]} == {"sora-2", "sora-2-pro"}
    assert all(m["object"] == "model" for m in body["data"]) and body["object"] == "list"

    async with aiohttp.ClientSession() as session:
        for headers in (
            {},
            {"Authorization": "Bearer sk-wrong-key-000000"},
            {"Authorization": ALPHA_KEY},
            {"Authorization": "Basic " + ALPHA_KEY},
        ):
            async with session.get(gw.url + "/v1/videos", headers=headers) as response:
                error = (await response.json())["error"]
                assert response.status == 401 and error["type"] == "invalid_request_error", headers
                assert ALPHA_KEY not in json.dumps(error)


async def test_a_rotated_key_sees_its_tenants_videos(start_gateway: StartGateway, tmp_path: Any) -> None:
    """A tenant is its key's name: while a key is rotated, the old and the new value are two entries
    of one name, both in force, and both see the same videos; the other tenant still sees none."""
    new_key = "sk-alpha-rotated-" + secrets.token_hex(8)
    text = gateway_yaml(tmp_path).replace(
        "  - name: beta", f"  - name: alpha\n    key: {new_key}\n  - name: beta", 1
    )
    assert new_key in text
    gw = await start_gateway(text)
    status, _, video = await call(gw, "POST", "/v1/videos", json={"prompt": "mine", "size": "320x240"})
    assert status == 200
    status, _, body = await call(gw, "GET", f"/v1/videos/{video['id']}", key=new_key)
    assert status == 200 and body["id"] == video["id"]
    status, _, listed = await call(gw, "GET", "/v1/videos", key=new_key)
    assert [v["id"] for v in listed["data"]] == [video["id"]]
    assert (await call(gw, "GET", f"/v1/videos/{video['id']}", key=BETA_KEY))[0] == 404


class IdempotentUpstream(FakeOpenAIUpstream):
    """The OpenAI-dialect fake, honouring ``Idempotency-Key`` as idempotent APIs do (Stripe's
    convention; the OpenAI SDKs can send one): per account, a create with a key seen before gets
    the job that key made. The gateway's account is every tenant's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.made: dict[str, str] = {}

    async def create(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("Idempotency-Key")
        if key in self.made:
            return web.json_response(self.jobs[self.made[key]])
        response = await super().create(request)
        if key is not None:
            self.made[key] = json.loads(cast(web.Response, response).text)["id"]
        return response


async def test_one_tenants_idempotency_key_never_replays_anothers_job(
    start_gateway: StartGateway, tmp_path: Path, aiohttp_server: Any, media: dict[str, Path]
) -> None:
    """Every tenant reaches a provider on the gateway's account, where an Idempotency-Key is kept:
    beta, sending the key alpha used (guessed, or an ``order-42`` of its own), was given alpha's job
    under a new video ID, and with it alpha's prompt, video and the power to delete it. A tenant's
    own retry with its key still gets its own video back."""
    fake = IdempotentUpstream(api_key=UPSTREAM_KEY, media=media)
    server = await aiohttp_server(fake.app())
    gw = await start_gateway(gateway_yaml(tmp_path, upstream_url=str(server.make_url("")).rstrip("/")))
    once = {"Idempotency-Key": "order-42"}
    alpha = await gw.sdk(ALPHA_KEY).videos.create(
        prompt="alpha's storyboard", model="sora-remote", extra_headers=once
    )
    beta = await gw.sdk(BETA_KEY).videos.create(prompt="beta's own", model="sora-remote", extra_headers=once)
    assert beta.prompt == "beta's own" and len(fake.jobs) == 2
    status, _, _ = await call(gw, "GET", f"/v1/videos/{alpha.id}/content", key=BETA_KEY)
    assert status == 404
    again = await gw.sdk(ALPHA_KEY).videos.create(
        prompt="alpha's storyboard", model="sora-remote", extra_headers=once
    )
    assert again.id == alpha.id and len(fake.jobs) == 2, "alpha's retry is alpha's video"
    sent = [r.headers["Idempotency-Key"] for r in fake.requests("POST", "/v1/videos")]
    assert sent[0] == sent[2] != sent[1] and all(key.endswith("-order-42") for key in sent)


class BusyIdempotentUpstream(IdempotentUpstream):
    """:class:`IdempotentUpstream` on a busy day: it answers no create until ``together`` of them
    have come, as a provider slow to answer gets a client's retries (the SDK's, after a timeout)
    while the first try is still under way; the answers then all arrive at once."""

    def __init__(self, *args: Any, together: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.together = together
        self.arrived = 0
        self.all_in = asyncio.Event()

    async def create(self, request: web.Request) -> web.StreamResponse:
        self.arrived += 1
        if self.arrived >= self.together:
            self.all_in.set()
        await self.all_in.wait()
        return await super().create(request)


async def test_creates_under_one_idempotency_key_at_once_are_one_video(
    start_gateway: StartGateway, tmp_path: Path, aiohttp_server: Any, media: dict[str, Path]
) -> None:
    """Retries of one create under one Idempotency-Key that overlap get the provider's one job, and
    from the gateway one video: each used to be recorded as a video of its own (each looked for the
    job before any had recorded it), all listed and counted, and deleting one deleted the job under
    the others."""
    fake = BusyIdempotentUpstream(api_key=UPSTREAM_KEY, media=media, together=4)
    server = await aiohttp_server(fake.app())
    gw = await start_gateway(gateway_yaml(tmp_path, upstream_url=str(server.make_url("")).rstrip("/")))
    once = {"Idempotency-Key": "order-7"}
    sdk = gw.sdk(ALPHA_KEY)
    videos = await asyncio.gather(
        *(sdk.videos.create(prompt="one", model="sora-remote", extra_headers=once) for _ in range(4))
    )
    assert len(fake.jobs) == 1 and len({video.id for video in videos}) == 1, [v.id for v in videos]
    status, _, listed = await call(gw, "GET", "/v1/videos", key=ALPHA_KEY)
    assert status == 200 and [v["id"] for v in listed["data"]] == [videos[0].id]


class NeverFinishing(IdempotentUpstream):
    """The idempotent fake whose jobs stay in progress (a long render)."""

    async def retrieve(self, request: web.Request) -> web.Response:
        job = self._job(request)
        job.update(status="in_progress", progress=30)
        return web.json_response(job)


async def test_a_retry_under_its_idempotency_key_gets_its_video_at_the_in_progress_cap(
    start_gateway: StartGateway, tmp_path: Path, aiohttp_server: Any, media: dict[str, Path]
) -> None:
    """README: a tenant's retry with its key gets back the video it has. At max_in_progress: 1 the
    retry was refused 429 too_many_in_progress before its provider could replay the job, though that
    video, unfinished, is what put the key at its cap. Another prompt under the key is another
    request, and is refused."""
    fake = NeverFinishing(api_key=UPSTREAM_KEY, media=media)
    server = await aiohttp_server(fake.app())
    text = gateway_yaml(tmp_path, upstream_url=str(server.make_url("")).rstrip("/")).replace(
        "    key: ${ALPHA_KEY}", "    key: ${ALPHA_KEY}\n    limits: {max_in_progress: 1}"
    )
    gw = await start_gateway(text)
    once = {"Idempotency-Key": "order-9"}
    sdk = gw.sdk(ALPHA_KEY)
    made = await sdk.videos.create(prompt="long", model="sora-remote", extra_headers=once)
    again = await sdk.videos.create(prompt="long", model="sora-remote", extra_headers=once)
    assert again.id == made.id and len(fake.jobs) == 1
    body = {"prompt": "another", "model": "sora-remote"}
    status, _, refused = await call(gw, "POST", "/v1/videos", json=body, headers=once)
    assert status == 429 and refused["error"]["code"] == "too_many_in_progress"
    status, _, refused = await call(gw, "POST", "/v1/videos", json={"prompt": "long", "model": "sora-remote"})
    assert status == 429, "without its key, a create is a new one"


async def test_only_the_same_request_under_a_reused_key_is_its_video_again(
    start_gateway: StartGateway, tmp_path: Path, aiohttp_server: Any, media: dict[str, Path]
) -> None:
    """A remix of S under the key an earlier create used, with the same prompt, is another request:
    at the key's cap it was answered with that create's video (no remix, not of S), and nothing was
    sent; below its cap too. It is refused at the cap, and sent below it."""
    fake = IdempotentUpstream(api_key=UPSTREAM_KEY, media=media)
    server = await aiohttp_server(fake.app())
    url = str(server.make_url("")).rstrip("/")
    for cap in (1, 2):
        text = gateway_yaml(tmp_path / str(cap), upstream_url=url).replace(
            "    key: ${ALPHA_KEY}", f"    key: ${{ALPHA_KEY}}\n    limits: {{max_in_progress: {cap}}}"
        )
        gw = await start_gateway(text)
        body = {"model": "sora-remote", "prompt": "src"}
        status, _, source = await call(gw, "POST", "/v1/videos", json=body)
        while source["status"] != "completed":  # the fake moves a job a step per retrieve
            _, _, source = await call(gw, "GET", f"/v1/videos/{source['id']}")
        once = {"Idempotency-Key": f"k-same-words-{cap}"}
        words = {"model": "sora-remote", "prompt": "same words"}
        status, _, created = await call(gw, "POST", "/v1/videos", json=words, headers=once)
        assert status == 200
        remix = f"/v1/videos/{source['id']}/remix"
        status, _, remixed = await call(gw, "POST", remix, json={"prompt": "same words"}, headers=once)
        if cap == 1:
            assert status == 429 and remixed["error"]["code"] == "too_many_in_progress", remixed
        else:
            assert status == 200 and remixed["id"] != created["id"], remixed
            assert remixed["remixed_from_video_id"] == source["id"]
