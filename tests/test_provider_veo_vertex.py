"""The Veo adapter for Vertex AI against a fake of it and of Google's token endpoint."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, ProviderConfig
from gateway.errors import ApiError
from gateway.providers.base import AdapterEnv
from gateway.providers.veo_vertex import VeoVertexAdapter
from gateway.reload import Reloader
from gateway.state import GATEWAY
from tests.conftest import ALPHA_KEY, RunningGateway, StartGateway
from tests.fakes.veo_vertex import FakeVertexVeo, ServiceAccountKey
from tests.provider_contract import (
    assert_a_moments_404_ends_nothing,
    assert_an_unsendable_job_name_is_refused,
    assert_refused,
    assert_sdk_roundtrip,
    create,
    png,
    poll_until_done,
    provider_gateway_yaml,
    request,
    start_provider_gateway,
)

PROJECT = "test-project"
STATIC_TOKEN = "ya29.static-test-token"
MODELS = """
    veo:
      provider: native
      model: veo-3.0-generate-001
    veo-2:
      provider: native
      model: veo-2.0-generate-001
"""


@pytest.fixture
async def vertex(aiohttp_server: Any, media: dict[str, Path]) -> tuple[FakeVertexVeo, str]:
    fake = FakeVertexVeo(project=PROJECT, video=media["video"], tokens={STATIC_TOKEN})
    server = await aiohttp_server(fake.app())
    return fake, str(server.make_url("")).rstrip("/")


def provider(url: str, credential: str) -> str:
    return f"""
        kind: vertex_veo
        base_url: {url}
        {credential}
        poll_after_ms: 100
        options:
          project: {PROJECT}
          region: us-central1
    """


def service_account(path: Path) -> str:
    return f"options: {{project: {PROJECT}, service_account_file: '{path}'}}"


@pytest.fixture
async def gw(
    start_gateway: StartGateway, tmp_path: Path, vertex: tuple[FakeVertexVeo, str]
) -> RunningGateway:
    return await start_provider_gateway(
        start_gateway, tmp_path, provider(vertex[1], f"api_key: {STATIC_TOKEN}"), MODELS
    )


async def sa_gateway(
    start_gateway: StartGateway, tmp_path: Path, vertex: tuple[FakeVertexVeo, str], key: ServiceAccountKey
) -> RunningGateway:
    url = vertex[1]
    path = key.write(tmp_path / "service-account.json", f"{url}/token")
    config = f"""
        kind: vertex_veo
        base_url: {url}
        {service_account(path)}
    """
    return await start_provider_gateway(start_gateway, tmp_path, config, MODELS)


def cached_videos(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "veo_vertex" / "native").glob("*.mp4"))


async def test_text_to_video_with_an_access_token(
    gw: RunningGateway, vertex: tuple[FakeVertexVeo, str], tmp_path: Path
) -> None:
    fake, _ = vertex
    extras = {"seed": 42, "generateAudio": False, "enhancePrompt": True}
    video = await create(gw, model="veo", prompt="a red fox", size="1920x1080", seconds="8", **extras)
    assert video["status"] == "queued" and video["size"] == "1920x1080"
    ((path, body),) = fake.creates
    assert path == (
        f"/v1/projects/{PROJECT}/locations/us-central1/publishers/google/models/"
        "veo-3.0-generate-001:predictLongRunning"
    )
    assert body == {
        "instances": [{"prompt": "a red fox"}],
        "parameters": {
            "aspectRatio": "16:9",
            "resolution": "1080p",
            "durationSeconds": 8,
            "seed": 42,
            "generateAudio": False,
            "enhancePrompt": True,
        },
    }
    headers = fake.headers[-1]
    assert headers["Authorization"] == f"Bearer {STATIC_TOKEN}" and headers["x-goog-user-project"] == PROJECT
    assert ALPHA_KEY not in str(fake.headers)

    seen = await poll_until_done(gw, video["id"])
    assert [v["status"] for v in seen] == ["in_progress", "in_progress", "completed"]
    assert all(1 <= v["progress"] <= 95 for v in seen[:-1]) and seen[-1]["progress"] == 100
    (name,) = fake.operations
    assert fake.fetches == [{"operationName": name}] * 3
    assert len(cached_videos(tmp_path)) == 1, "the inline video was written when it completed"


async def test_service_account_tokens_are_minted_and_cached(
    start_gateway: StartGateway, tmp_path: Path, vertex: tuple[FakeVertexVeo, str]
) -> None:
    fake, url = vertex
    fake.account = ServiceAccountKey()
    gw = await sa_gateway(start_gateway, tmp_path, vertex, fake.account)
    fake.token_lifetime = 100  # shorter than the refresh margin: every call mints a new one
    await create(gw, model="veo", prompt="one")
    await create(gw, model="veo", prompt="two")
    fake.token_lifetime = 3599
    await create(gw, model="veo", prompt="three")
    await create(gw, model="veo", prompt="four")
    assert len(fake.assertions) == 3
    header, claims = fake.assertions[0]["header"], fake.assertions[0]["claims"]
    assert header["alg"] == "RS256" and header["kid"] == fake.account.key_id
    assert claims["iss"] == fake.account.email and claims["aud"] == f"{url}/token"
    assert claims["scope"] == "https://www.googleapis.com/auth/cloud-platform"
    tokens = [h["Authorization"] for h in fake.headers]
    assert len(set(tokens[:3])) == 3 and tokens[2] == tokens[3] and STATIC_TOKEN not in str(tokens)
    assert all(h["x-goog-user-project"] == PROJECT for h in fake.headers)


async def test_a_service_account_google_does_not_know_is_refused(
    start_gateway: StartGateway, tmp_path: Path, vertex: tuple[FakeVertexVeo, str]
) -> None:
    fake, _ = vertex
    fake.account = ServiceAccountKey()
    gw = await sa_gateway(start_gateway, tmp_path, vertex, ServiceAccountKey())
    got, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "x", "model": "veo"})
    assert got == 502 and body["error"]["code"] == "upstream_auth_failed"
    assert "Invalid JWT Signature" in body["error"]["message"] and fake.creates == []


async def test_a_provider_without_credential_is_refused_at_load(
    start_gateway: StartGateway, tmp_path: Path, vertex: tuple[FakeVertexVeo, str]
) -> None:
    with pytest.raises(ConfigError) as refused:
        await start_provider_gateway(start_gateway, tmp_path, provider(vertex[1], ""), MODELS)
    assert "providers.native: needs a credential" in str(refused.value)
    assert "api_key" in str(refused.value) and "service_account_file" in str(refused.value)

    # An adapter made without the loader (so without its checks) still answers in the envelope.
    bare = VeoVertexAdapter(
        ProviderConfig(name="v", kind="vertex_veo", options={"project": "p"}), AdapterEnv(data_dir=tmp_path)
    )
    with pytest.raises(ApiError) as error:
        await bare.access_token(None)  # type: ignore[arg-type]  # refused before any call is made
    assert error.value.status == 500 and error.value.code == "provider_misconfigured"


def test_regions_pick_the_host(tmp_path: Path) -> None:
    def adapter(region: str) -> VeoVertexAdapter:
        config = ProviderConfig(name="v", kind="vertex_veo", options={"project": "p", "region": region})
        return VeoVertexAdapter(config, AdapterEnv(data_dir=tmp_path))

    assert adapter("europe-west4").model_url("veo-3.0-generate-001") == (
        "https://europe-west4-aiplatform.googleapis.com/v1/projects/p/locations/europe-west4"
        "/publishers/google/models/veo-3.0-generate-001"
    )
    assert adapter("global").model_url("m") == (
        "https://aiplatform.googleapis.com/v1/projects/p/locations/global/publishers/google/models/m"
    )


async def test_image_is_sent_inline_and_urls_are_refused(
    gw: RunningGateway, vertex: tuple[FakeVertexVeo, str]
) -> None:
    fake, _ = vertex
    image = png()
    form = {"prompt": "animate", "model": "veo-2", "size": "1280x720", "seconds": "7"}
    status, _, body = await request(gw, "POST", "/v1/videos", data={**form, "input_reference": image})
    assert status == 200, body
    ((_, sent),) = fake.creates
    assert sent["instances"][0]["image"] == {
        "bytesBase64Encoded": base64.b64encode(image).decode(),
        "mimeType": "image/png",
    }
    assert sent["parameters"] == {"aspectRatio": "16:9", "durationSeconds": 7}
    await assert_refused(
        gw,
        {"prompt": "x", "model": "veo", "input_reference": {"image_url": "https://example.com/a.png"}},
        status=400,
        param="input_reference",
    )


async def test_unsupported_size_and_seconds_list_the_allowed_values(gw: RunningGateway) -> None:
    await assert_refused(
        gw,
        {"prompt": "x", "model": "veo-2", "seconds": "4"},
        status=400,
        param="seconds",
        mentions=("5, 6, 7, 8",),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "veo-2", "size": "1080x1920"},
        status=400,
        param="size",
        mentions=("1280x720, 720x1280",),
    )
    await assert_refused(
        gw,
        {"prompt": "x", "model": "veo", "seconds": "5"},
        status=400,
        param="seconds",
        mentions=("4, 6, 8",),
    )


async def test_failed_and_content_filtered_operations(gw: RunningGateway) -> None:
    failed = await create(gw, model="veo", prompt="[fail] please")
    final = (await poll_until_done(gw, failed["id"]))[-1]
    assert final["status"] == "failed" and final["error"]["code"] == "invalid_argument"
    assert "support code 58061214" in final["error"]["message"]

    filtered = await create(gw, model="veo", prompt="[filter] forbidden")
    final = (await poll_until_done(gw, filtered["id"]))[-1]
    assert final["error"] == {"code": "content_filter", "message": "Unsafe content was detected."}


async def test_rate_limit_becomes_429_with_retry_after(gw: RunningGateway) -> None:
    headers = await assert_refused(gw, {"prompt": "[429]", "model": "veo"}, status=429, mentions=("Quota",))
    assert headers["Retry-After"] == "45"


async def test_content_is_served_from_the_data_dir_with_range(
    gw: RunningGateway, vertex: tuple[FakeVertexVeo, str], media: dict[str, Path], tmp_path: Path
) -> None:
    fake, _ = vertex
    expected = media["video"].read_bytes()
    video = await create(gw, model="veo", prompt="stream me")
    await poll_until_done(gw, video["id"])
    fetched = len(fake.fetches)
    status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and body == expected and headers["Content-Type"] == "video/mp4"
    status, headers, body = await request(
        gw, "GET", f"/v1/videos/{video['id']}/content", headers={"Range": "bytes=0-99"}
    )
    assert status == 206 and body == expected[:100] and headers["Content-Range"].startswith("bytes 0-99/")
    assert len(fake.fetches) == fetched, "served from the local copy"

    (cached,) = cached_videos(tmp_path)
    cached.unlink()
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and body == expected and len(fake.fetches) == fetched + 1

    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content?variant=spritesheet")
    assert status == 404 and body["error"]["code"] == "variant_not_available"

    status, _, body = await request(gw, "DELETE", f"/v1/videos/{video['id']}")
    assert status == 200 and body["deleted"] is True and cached_videos(tmp_path) == []


async def test_cloud_storage_results_are_refused_clearly(gw: RunningGateway) -> None:
    video = await create(gw, model="veo", prompt="[gcs] to a bucket")
    assert (await poll_until_done(gw, video["id"]))[-1]["status"] == "completed"
    status, _, body = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 502 and body["error"]["code"] == "result_in_cloud_storage"
    assert "gs://" not in body["error"]["message"]


async def test_official_sdk_end_to_end(gw: RunningGateway, media: dict[str, Path]) -> None:
    assert await assert_sdk_roundtrip(gw, "veo", prompt="sdk", size="720x1280", seconds="6") == (
        media["video"].read_bytes()
    )


async def test_an_unusable_service_account_file_stops_the_start_and_the_reload(
    start_gateway: StartGateway,
    tmp_path: Path,
    vertex: tuple[FakeVertexVeo, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found when the gateway starts or reloads, not at the first create of a user."""
    missing = tmp_path / "nowhere.json"
    broken = f"""
        kind: vertex_veo
        base_url: {vertex[1]}
        {service_account(missing)}
    """
    with pytest.raises(ConfigError) as refused:
        await start_provider_gateway(start_gateway, tmp_path / "a", broken, MODELS)
    assert f"providers.native: options.service_account_file {missing}" in str(refused.value)
    assert "FileNotFoundError" in str(refused.value)

    working = provider(vertex[1], f"api_key: {STATIC_TOKEN}")
    gw = await start_provider_gateway(start_gateway, tmp_path / "b", working, MODELS)
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(provider_gateway_yaml(tmp_path / "b", broken, MODELS))
    monkeypatch.setenv("ALPHA_KEY", ALPHA_KEY)  # a reload reads the environment
    ok, problems = await Reloader(gw.app[GATEWAY], config_file).reload("test")
    assert not ok and any("options.service_account_file" in p for p in problems)
    status, _, body = await request(gw, "POST", "/v1/videos", json={"prompt": "still here", "model": "veo"})
    assert status == 200, body


async def test_a_full_disk_when_the_video_is_kept_is_a_503_until_there_is_room(
    gw: RunningGateway, media: dict[str, Path], tmp_path: Path, full_disk: Callable[[], None]
) -> None:
    """Vertex's finished video arrives inline once and is kept on the gateway's disk. A full disk
    then is the gateway's trouble: the poll answers 503 to retry, the half-written file goes (a full
    disk must not fill further), and the next poll after room is made keeps the video."""
    video = await create(gw, model="veo", prompt="keep me")
    for _ in range(30):
        status, headers, body = await request(gw, "GET", f"/v1/videos/{video['id']}")
        if status != 200:
            break
        assert body["status"] != "completed", "completed without the video kept"
    assert status == 503 and headers["Retry-After"] == "5", body
    assert body["error"]["code"] == "storage_unavailable"
    assert "No space left on device" in body["error"]["message"]
    assert list(tmp_path.rglob("*.part")) == [] and cached_videos(tmp_path) == []

    full_disk()  # room again
    assert (await poll_until_done(gw, video["id"]))[-1]["status"] == "completed"
    status, _, content = await request(gw, "GET", f"/v1/videos/{video['id']}/content")
    assert status == 200 and content == media["video"].read_bytes()


async def test_a_moments_404_ends_nothing(
    gw: RunningGateway, vertex: tuple[FakeVertexVeo, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    await assert_a_moments_404_ends_nothing(
        gw, vertex[0].operations, monkeypatch, model="veo", prompt="a red fox"
    )


async def test_an_unsendable_job_name_is_refused(gw: RunningGateway) -> None:
    await assert_an_unsendable_job_name_is_refused(gw, "veo")
