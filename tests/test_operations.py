"""Live operations: hot reload under load, invalid reloads, SIGTERM drain, hostile clients."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from gateway import logs
from gateway import server as server_module
from gateway.app import build_app
from gateway.state import GATEWAY
from tests.conftest import ALPHA_KEY, BETA_KEY, ENV, RunningGateway, StartGateway, gateway_yaml, load
from tests.fakes import openai_upstream
from tests.fakes.faulty_upstream import FaultyUpstream
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.test_cli import free_port, wait_healthy
from tests.test_resilience import ADMIN, AUTH, TWO_TIERS, config, get, post

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reloads read the file again, with ${ENV} references from the real environment."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)


def two_generations(tmp_path: Path, url: str) -> tuple[str, str]:
    before = config(
        tmp_path,
        url,
        """
        m:
          - {provider: up, model: primary}
    """,
    )
    after = before.replace("  up:\n", "  up2:\n").replace(
        "{provider: up, model: primary}", "{provider: up2, model: secondary}"
    )
    return before, after


async def test_reload_under_load_loses_nothing(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    before, after = two_generations(tmp_path, url)
    gw, path = await start_from_file(start_gateway, tmp_path, before)
    failures: list[Any] = []
    created: list[str] = []
    stop = asyncio.Event()

    async def worker() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                async with session.post(
                    gw.url + "/v1/videos", json={"prompt": "x", "model": "m"}, headers=AUTH
                ) as r:
                    body = await r.json()
                    if r.status != 200:
                        failures.append(body)
                        continue
                    created.append(body["id"])
                async with session.get(f"{gw.url}/v1/videos/{body['id']}", headers=AUTH) as r:
                    if r.status != 200:
                        failures.append(await r.json())

    workers = [asyncio.create_task(worker()) for _ in range(16)]
    await asyncio.sleep(0.5)
    first_generation = list(created)
    path.write_text(after)
    status, result = await post_admin(gw.url, "/admin/reload")
    assert status == 200 and result == {"reloaded": True, "problems": [], "needs_restart": []}
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*workers)

    assert failures == []
    assert fake.hits_for("primary") and fake.hits_for("secondary")
    hits = [h for h in fake.hits if h.method == "POST"]
    switch = next(i for i, h in enumerate(hits) if h.model == "secondary")
    assert all(h.model == "secondary" for h in hits[switch + 16 :]), (
        "after the swap, new creates use the new table"
    )
    for video_id in first_generation[:5]:
        status, video = await get(gw, f"/v1/videos/{video_id}")
        assert status == 200 and video["status"] == "completed", "videos of a removed provider stay reachable"


async def post_admin(url: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url + path, headers=ADMIN) as r:
        return r.status, await r.json()


def reload_count(result: str) -> float:
    return REGISTRY.get_sample_value("gateway_config_reloads_total", {"result": result}) or 0.0


async def test_invalid_reload_keeps_the_old_table(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    before, _ = two_generations(tmp_path, url)
    gw, path = await start_from_file(start_gateway, tmp_path, before)
    failures_before = reload_count("failure")
    path.write_text(before.replace("{provider: up, model: primary}", "{provider: opnai, model: primary}"))
    status, result = await post_admin(gw.url, "/admin/reload")
    assert status == 422 and result["reloaded"] is False
    (problem,) = result["problems"]
    assert (
        str(path) in problem and 'unknown provider "opnai"' in problem and "models.m[0].provider" in problem
    )
    assert reload_count("failure") == failures_before + 1
    assert (await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"}))[0] == 200
    assert len(fake.hits_for("primary")) == 1


async def test_an_admin_reload_whose_client_left_still_takes_effect(
    start_gateway: StartGateway,
    tmp_path: Path,
    faulty: tuple[FaultyUpstream, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that gave up on ``POST /admin/reload`` while the file was being read (a large
    config, a slow disk) cancelled the reload half-way: nothing applied, nothing logged, and the
    file marked as loaded, so the file watcher never applied it either. It now runs to its end."""
    from gateway import reload as reloading

    fake, url = faulty
    before, after = two_generations(tmp_path, url)
    gw, path = await start_from_file(start_gateway, tmp_path, before)
    real_read = reloading.read_config

    def slow_read(config_path: Path) -> Any:
        time.sleep(0.3)
        return real_read(config_path)

    monkeypatch.setattr(reloading, "read_config", slow_read)
    path.write_text(after)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(
                gw.url + "/admin/reload", headers=ADMIN, timeout=aiohttp.ClientTimeout(total=0.1)
            )
    from gateway.state import GATEWAY

    deadline = time.monotonic() + 5
    while "up2" not in gw.app[GATEWAY].table.adapters and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert (await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"}))[0] == 200
    assert fake.hits_for("secondary") and not fake.hits_for("primary"), "the new table serves"


async def test_a_provider_replaced_while_a_create_reads_its_body_leaves_no_pool_open(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """A create keeps the table it started with, so a reload that replaces its provider leaves it
    the old adapter, closed once no call was open. The create, still reading its body then, opened
    a new pool on that adapter which nobody closed (a socket to the provider, and an "Unclosed client
    session" error at garbage collection). A replaced adapter now closes again after each use."""
    from gateway.state import GATEWAY

    fake, url = faulty
    before, _ = two_generations(tmp_path, url)
    gw, path = await start_from_file(start_gateway, tmp_path, before)
    old = gw.app[GATEWAY].table.adapters["up"]
    body = json.dumps({"model": "m", "prompt": "pinned"}).encode()

    async def slowly() -> AsyncIterator[bytes]:
        yield body[:10]
        await asyncio.sleep(1.0)
        yield body[10:]

    async with aiohttp.ClientSession() as session:
        headers = {**AUTH, "Content-Type": "application/json", "Content-Length": str(len(body))}
        creating = asyncio.ensure_future(session.post(gw.url + "/v1/videos", data=slowly(), headers=headers))
        await asyncio.sleep(0.3)
        await reload_to(gw, path, before.replace("read: 1, request: 2", "read: 2, request: 3"))
        assert gw.app[GATEWAY].table.adapters["up"] is not old, "the provider was replaced"
        async with await creating as response:
            assert response.status == 200, await response.text()
    await asyncio.sleep(0.2)
    assert fake.hits_for("primary") and old._session is None, "the old adapter's pool is closed"


async def test_a_named_deployment_repointed_by_a_reload_keeps_its_old_videos_where_they_are(
    start_gateway: StartGateway, tmp_path: Path, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """A deployment's ``name`` can outlive what it names: a reload may point "main" at another
    provider or upstream model. Its videos stay with the provider and model that made them, and
    a remix of one must not send that provider the new deployment's model."""
    from gateway.app import RELOADER

    fake, url = upstream
    text = gateway_yaml(tmp_path, upstream_url=url).replace(
        "sora-remote:\n    provider: dialect\n    model: upstream-sora",
        "sora-remote:\n  - {provider: dialect, model: upstream-sora, name: main}",
    )
    assert "name: main" in text
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    gw = await start_gateway(load(text), config_path=path)
    client = gw.sdk()
    video = await client.videos.create(prompt="first", model="sora-remote")
    repointed = text.replace(
        "{provider: dialect, model: upstream-sora, name: main}",
        "{provider: elsewhere, model: upstream-next, name: main}",
    ).replace(
        "providers:\n",
        f"providers:\n  elsewhere:\n    kind: openai\n    base_url: {url}/v1\n"
        "    api_key: ${UPSTREAM_KEY}\n",
        1,
    )
    path.write_text(repointed)
    assert await gw.app[RELOADER].reload("test") == (True, [])

    remix_body = {"prompt": "again", "model": "sora-remote"}
    status, _, answer = await post(gw, f"/v1/videos/{video.id}/remix", json=remix_body)
    assert status == 200, answer
    (remix,) = fake.requests("POST", "/v1/videos/up_")
    assert json.loads(remix.body)["model"] == "upstream-sora", "the model that made the video"
    assert (await client.videos.retrieve(video.id)).model == "sora-remote"
    # and its calls are counted under a name of their own (health, metrics and logs are by name):
    # "main" names the new deployment now
    from gateway import api
    from gateway.state import GATEWAY

    table = gw.app[GATEWAY].table
    task = await gw.app[GATEWAY].store.get(video.id, "alpha")
    assert task is not None
    old, _ = api._deployment_of(table, task)
    assert old.name == "main@dialect" and table.deployments["main"].provider == "elsewhere"


async def test_file_change_is_picked_up(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    before, after = two_generations(tmp_path, url)
    gw, path = await start_from_file(start_gateway, tmp_path, before)
    path.write_text(after)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and not fake.hits_for("secondary"):
        await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"})
        await asyncio.sleep(0.3)
    assert fake.hits_for("secondary"), "the watcher reloaded the changed file"


async def start_from_file(
    start_gateway: StartGateway, tmp_path: Path, text: str
) -> tuple[RunningGateway, Path]:
    """A gateway started from ``text`` written to a file, so that it can be reloaded from there."""
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return await start_gateway(load(text), config_path=path), path


async def reload_to(gw: RunningGateway, path: Path, text: str, needs_restart: tuple[str, ...] = ()) -> None:
    path.write_text(text)
    answer = {"reloaded": True, "problems": [], "needs_restart": list(needs_restart)}
    assert await post_admin(gw.url, "/admin/reload") == (200, answer)


async def status_of(url: str, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as response:
        return response.status


def logged(session_log: Path, event: str, since: int = 0) -> list[dict[str, Any]]:
    entries = map(json.loads, session_log.read_text().splitlines()[since:])
    return [e for e in entries if e["event"] == event]


async def test_reload_rotates_the_metrics_key(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    text = config(tmp_path, faulty[1], TWO_TIERS, extra="metrics: {key: metrics-old-key}")
    gw, path = await start_from_file(start_gateway, tmp_path, text)
    old, new = ({"Authorization": f"Bearer metrics-{k}-key"} for k in ("old", "new"))
    assert await status_of(gw.url + "/metrics", old) == 200

    await reload_to(gw, path, text.replace("metrics-old-key", "metrics-new-key"))
    assert await status_of(gw.url + "/metrics", old) == 401, "the replaced key no longer works"
    assert await status_of(gw.url + "/metrics", new) == 200
    assert await status_of(gw.url + "/metrics") == 401

    await reload_to(gw, path, text.replace("metrics: {key: metrics-old-key}", ""))
    assert await status_of(gw.url + "/metrics") == 200, "a removed key opens the endpoint"
    await reload_to(gw, path, text)
    assert await status_of(gw.url + "/metrics") == 401, "a key added by a reload guards it"


async def test_a_key_removed_by_a_reload_stops_working_at_once(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """Keys that authenticated are remembered for speed; a reload that removes one must still
    refuse it on the next request."""
    text = config(tmp_path, faulty[1], TWO_TIERS)
    gw, path = await start_from_file(start_gateway, tmp_path, text)
    beta = {"Authorization": f"Bearer {BETA_KEY}"}
    for _ in range(2):
        assert await status_of(gw.url + "/v1/videos", beta) == 200

    await reload_to(gw, path, text.replace("  - name: beta\n    key: ${BETA_KEY}\n", ""))
    assert await status_of(gw.url + "/v1/videos", beta) == 401, "the removed key no longer works"
    assert await status_of(gw.url + "/v1/videos", AUTH) == 200


async def test_reload_applies_the_resilience_policy(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    fake.behaviour["primary"] = "status:500"
    text = config(tmp_path, url, TWO_TIERS, extra="resilience: {consecutive_failures: 5}")
    gw, path = await start_from_file(start_gateway, tmp_path, text)
    stricter = "resilience: {consecutive_failures: 1, base_ejection_seconds: 300}"
    await reload_to(gw, path, text.replace("resilience: {consecutive_failures: 5}", stricter))

    assert (await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"}))[0] == 200
    _, state = await get(gw, "/admin/deployments", ADMIN)
    primary = {row["deployment"]: row for row in state["deployments"]}["up/primary"]
    assert primary["state"] == "ejected", "one failure ejects under the reloaded policy"
    assert primary["ejected_for_seconds"] > 200, "for the reloaded base_ejection_seconds"


@pytest.fixture
def session_level() -> Any:
    """A test that reloads the log level gives the session its debug level back."""
    yield
    logs.set_level("debug")


async def test_reload_applies_the_log_level(
    start_gateway: StartGateway,
    tmp_path: Path,
    faulty: tuple[FaultyUpstream, str],
    session_log: Path,
    session_level: None,
) -> None:
    text = config(tmp_path, faulty[1], TWO_TIERS, extra="logging: {level: debug}")
    gw, path = await start_from_file(start_gateway, tmp_path, text)

    async def access_logged(request_id: str) -> bool:
        await get(gw, "/v1/models", {**AUTH, "X-Request-ID": request_id})
        return any(e.get("request_id") == request_id for e in logged(session_log, "request"))

    await reload_to(gw, path, text.replace("level: debug", "level: warning"))
    assert not await access_logged("level-warning"), "info lines stop at level warning"
    await reload_to(gw, path, text)
    assert await access_logged("level-debug")


async def test_reload_names_the_settings_that_need_a_restart(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str], session_log: Path
) -> None:
    text = config(tmp_path, faulty[1], TWO_TIERS)
    gw, path = await start_from_file(start_gateway, tmp_path, text)
    seen = len(session_log.read_text().splitlines())
    # the admin answer names them too: at 3 a.m. the log is not where one looks first
    changed = text + "server: {port: 18999}\nlogging: {format: json}\n"
    await reload_to(gw, path, changed, needs_restart=("server.port", "logging.format"))
    (entry,) = logged(session_log, "config_reload_needs_restart", seen)
    assert entry["settings"] == ["server.port", "logging.format"]


async def test_a_reload_that_changes_data_dir_moves_no_provider_s_files(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """``data_dir`` takes a restart (the store stays where it opened), but a provider restarted by
    the same reload started in the new one: the local renderer's finished videos could no longer be
    downloaded, and its unfinished ones were lost."""
    first, second = tmp_path / "first", tmp_path / "second"
    admin = "admin: {key: admin-key-0123}"
    gw, path = await start_from_file(start_gateway, tmp_path, gateway_yaml(first, extra=admin))
    client = gw.sdk()
    video = await client.videos.create_and_poll(prompt="kept where it was made", size="320x240", seconds="1")
    assert video.status == "completed"

    changed = gateway_yaml(second, extra=admin).replace("run_seconds: 0.4", "run_seconds: 0.3")
    await reload_to(gw, path, changed, needs_restart=("data_dir", "store.path"))
    content = await client.videos.download_content(video.id)
    assert content.content[4:8] == b"ftyp", "an MP4, from where the renderer made it"
    later = await client.videos.create_and_poll(prompt="made after the reload", size="320x240", seconds="1")
    assert later.status == "completed"
    assert (await client.videos.download_content(later.id)).content[4:8] == b"ftyp"
    assert not second.exists(), "nothing goes to a data_dir the process has not opened"


async def test_reload_can_turn_the_file_watch_off(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    before, after = two_generations(tmp_path, url)
    off = "server: {watch_config: false}\nadmin:"
    gw, path = await start_from_file(start_gateway, tmp_path, before)
    await reload_to(gw, path, before.replace("admin:", off))
    path.write_text(after.replace("admin:", off))
    await asyncio.sleep(3)  # the watcher looks every 2 s
    assert (await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"}))[0] == 200
    assert fake.hits_for("primary") and not fake.hits_for("secondary"), "the changed file was not loaded"


async def test_rejected_reload_never_shows_a_secret(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str], session_log: Path
) -> None:
    text = config(tmp_path, faulty[1], TWO_TIERS)
    gw, path = await start_from_file(start_gateway, tmp_path, text)
    seen = len(session_log.read_text().splitlines())
    path.write_text(
        text.replace("admin: {key: admin-key-0123}", "admin: {key: Adm1nP4}").replace(
            "api_key: ${UPSTREAM_KEY}", "api_key: 84736251907364", 1
        )
    )
    status, result = await post_admin(gw.url, "/admin/reload")
    assert status == 422 and len(result["problems"]) == 2
    assert any("admin.key: is too short" in p for p in result["problems"])
    assert any("providers.up.api_key: must be a string" in p for p in result["problems"])
    new_lines = "\n".join(session_log.read_text().splitlines()[seen:])
    assert "config_reload_rejected" in new_lines
    for secret in ("Adm1nP4", "84736251907364"):
        assert secret not in json.dumps(result) and secret not in new_lines


async def test_expect_continue_only_after_key_and_size(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    _, url = faulty
    gw = await start_gateway(
        config(
            tmp_path,
            url,
            """
        m:
          - {provider: up, model: primary}
    """,
            extra="limits: {max_upload_bytes: 100000}",
        )
    )
    host, port = gw.server.host, gw.server.port

    async def first_line(key: str, length: int) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            f"POST /v1/videos HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        return line

    assert (await first_line("sk-wrong-key-0000", 50)).startswith(b"HTTP/1.1 401")
    assert (await first_line(ALPHA_KEY, 10_000_000)).startswith(b"HTTP/1.1 413")
    assert (await first_line(ALPHA_KEY, 50)).startswith(b"HTTP/1.1 100 Continue")

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/v1/videos",
            json={"prompt": "x", "model": "m"},
            headers={**AUTH, "Expect": "100-continue"},
        ) as response,
    ):
        assert response.status == 200


@pytest.fixture
def gateway_process(tmp_path: Path, faulty: tuple[FaultyUpstream, str]) -> Any:
    processes: list[subprocess.Popen[bytes]] = []

    def start(
        extra: str, beta: str = "", read_timeout: float = 1, drain_seconds: float = 10
    ) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        text = (
            config(
                tmp_path,
                faulty[1],
                """
            m:
              - {provider: up, model: primary}
        """,
                extra=extra,
                beta=beta,
            )
            .replace(
                "admin:",
                f"server: {{port: {port}, drain_delay_seconds: 1, drain_seconds: {drain_seconds}}}\n"
                "limits: {header_timeout: 1}\nadmin:",
            )
            .replace("read: 1, request: 2", f"read: {read_timeout}, request: {2 * read_timeout}")
        )
        path = tmp_path / "gateway.yaml"
        path.write_text(text)
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            cwd=REPO,
            env={**os.environ, **ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        return process, port

    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


async def slow_form(sent: asyncio.Event, *, pieces: int, pause: float) -> AsyncIterator[bytes]:
    """A create's form for model ``m`` whose prompt arrives in ``pieces`` pieces ``pause`` seconds
    apart; ``sent`` is set once the model and the prompt's start are on their way."""
    yield b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
    yield b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nslow'
    sent.set()
    for _ in range(pieces):
        await asyncio.sleep(pause)
        yield b" upload"
    yield b"\r\n--b--\r\n"


async def post_form(url: str, form: AsyncIterator[bytes]) -> tuple[int, dict[str, str], bytes]:
    """POST ``form`` as a create to the gateway at ``url``: the status, headers and raw body."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/videos", data=form, headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"}
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def test_sigterm_drains_an_upload_in_flight(gateway_process: Any) -> None:
    process, port = gateway_process("")
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url + "/healthz", process)
    sent = asyncio.Event()
    task = asyncio.create_task(post_form(url, slow_form(sent, pieces=10, pause=0.2)))
    await sent.wait()
    await asyncio.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as session, session.get(url + "/readyz") as response:
        assert response.status == 503
    status, _, _ = await task
    code = await asyncio.to_thread(process.wait, 15)
    output = process.stdout.read().decode() if process.stdout else ""
    assert status == 200, f"the upload in flight completed\n{output}"
    assert code == 0
    assert "draining" in output and "Traceback" not in output


async def test_an_upload_the_drain_cuts_off_may_be_sent_again(
    gateway_process: Any, faulty: tuple[FaultyUpstream, str]
) -> None:
    """An upload still arriving when the drain's time is up is cut off on its way to the provider,
    which then starts nothing. Its answer said the provider closed the connection, with
    ``x-should-retry: false`` as if a job might exist, and blamed the provider; it is the gateway's
    503, which the client may retry (elsewhere, or after the restart)."""
    fake, _ = faulty
    process, port = gateway_process("", drain_seconds=0.5)
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url + "/healthz", process)
    sent = asyncio.Event()
    task = asyncio.create_task(post_form(url, slow_form(sent, pieces=100, pause=0.1)))
    await sent.wait()
    process.send_signal(signal.SIGTERM)
    status, headers, raw = await asyncio.wait_for(task, 15)
    body = json.loads(raw)
    code = await asyncio.to_thread(process.wait, 15)
    output = process.stdout.read().decode() if process.stdout else ""
    assert status == 503 and body["error"]["code"] == "shutting_down", (body, output)
    assert headers.get("Retry-After") == "1" and "x-should-retry" not in headers
    assert fake.jobs == {}
    assert code == 0 and "upstream_failed" not in output and "Traceback" not in output, output


async def test_a_create_its_provider_has_not_answered_when_the_drain_ends_is_answered_not_dropped(
    gateway_process: Any, faulty: tuple[FaultyUpstream, str]
) -> None:
    """A create whose provider still had not answered when the drain's time was up lost its
    connection without an answer, which an SDK takes for one it may retry: a second job, perhaps.
    It is answered first, 504 with ``x-should-retry: false`` (the provider may have the job)."""
    fake, _ = faulty
    fake.behaviour["primary"] = "hang"
    process, port = gateway_process("", read_timeout=10, drain_seconds=0.5)
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url + "/healthz", process)

    async def create() -> tuple[int, dict[str, str], Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/v1/videos", json={"prompt": "x", "model": "m"}, headers=AUTH) as response,
        ):
            return response.status, dict(response.headers), await response.json()

    waiting = asyncio.create_task(create())
    while not fake.hits_for("primary"):
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    status, headers, body = await asyncio.wait_for(waiting, 15)
    code = await asyncio.to_thread(process.wait, 15)
    output = process.stdout.read().decode() if process.stdout else ""
    assert status == 504 and body["error"]["code"] == "shutting_down", (body, output)
    assert headers.get("x-should-retry") == "false"
    assert code == 0 and "abandoned_at_shutdown" in output and "Traceback" not in output, output


async def test_what_comes_after_the_drains_time_is_refused_before_it_reaches_the_provider(
    tmp_path: Path, upstream: tuple[FakeOpenAIUpstream, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the drain's time is up, the shutdown leaves a create no time for its provider's answer.
    An upload whose last bytes came then was let through whole: the provider made (and billed) the
    job, the connection was dropped without an answer and the job left unrecorded, and the SDK sent
    the create again. So was a create sent then on a kept-alive connection. Both are refused 503
    ``shutting_down`` now, with nothing sent: the client may send them again after the restart."""
    fake, url = upstream
    monkeypatch.setattr(openai_upstream, "SLOW_SECONDS", 5.0)  # a provider slow to answer
    port = free_port()
    text = gateway_yaml(tmp_path, upstream_url=url).replace("read: 2, request: 3", "read: 20, request: 30")
    text += "server: {drain_delay_seconds: 0, drain_seconds: 0.3}\n"
    apps: list[web.Application] = []

    def keep(*args: Any, **kwargs: Any) -> web.Application:
        apps.append(build_app(*args, **kwargs))
        return apps[-1]

    monkeypatch.setattr(server_module, "build_app", keep)
    loop = asyncio.get_running_loop()
    serving = asyncio.create_task(server_module.serve(load(text), None, "127.0.0.1", port))
    try:
        (uploading, upload), (idle, later) = [await open_when_listening(port) for _ in range(2)]
        form_start = (
            b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nsora-remote\r\n'
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nlate upload [slow]\r\n'
            b'--b\r\nContent-Disposition: form-data; name="input_reference"; filename="r.png"\r\n\r\n'
        ) + b"\0" * 1000
        form_end = b"\0" * 1000 + b"\r\n--b--\r\n"
        upload.write(
            f"POST /v1/videos HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(form_start) + len(form_end)}\r\n\r\n".encode()
            + form_start
        )
        gw = apps[0][GATEWAY]
        await until(lambda: gw.in_flight == 1)
        os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it: the drain begins
        await until(gw.drain_over.is_set)
        await asyncio.sleep(0.1)  # the upload's last bytes come just after the drain's time is up
        upload.write(form_end)
        json_create = json.dumps({"model": "sora-remote", "prompt": "late json [slow]"}).encode()
        later.write(
            f"POST /v1/videos HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {ALPHA_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(json_create)}\r\n\r\n".encode()
            + json_create
        )
        answers = [await asyncio.wait_for(reader.read(65536), 15) for reader in (uploading, idle)]
        await asyncio.wait_for(serving, 15)
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 503") and b"shutting_down" in answer, answer
        assert fake.jobs == {}, "nothing reached the provider whole"
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if not serving.done():
            serving.cancel()


async def until(condition: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never came"
        await asyncio.sleep(0.01)


async def open_when_listening(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    for _ in range(300):
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
    raise AssertionError("the gateway never listened")


async def test_a_streamed_create_the_drain_ends_is_cut_not_answered_twice(
    gateway_process: Any, faulty: tuple[FaultyUpstream, str]
) -> None:
    """A streamed create relaying its provider's events when the drain's time is up has answered
    already (200, an event stream): it is cut, as a stream its provider breaks off is, and gets no
    second answer written into its stream."""
    fake, _ = faulty
    fake.behaviour["primary"] = "held-stream"
    process, port = gateway_process("", read_timeout=10, drain_seconds=0.5)
    await wait_healthy(f"http://127.0.0.1:{port}/healthz", process)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": "m", "prompt": "x", "stream": True}).encode()
    writer.write(
        b"POST /v1/videos HTTP/1.1\r\nHost: gw\r\nAuthorization: "
        + AUTH["Authorization"].encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    received = b""
    while b"video.queued" not in received:
        received += await asyncio.wait_for(reader.read(65536), 10)
    process.send_signal(signal.SIGTERM)
    while chunk := await asyncio.wait_for(reader.read(65536), 15):
        received += chunk
    writer.close()
    code = await asyncio.to_thread(process.wait, 15)
    output = process.stdout.read().decode() if process.stdout else ""
    assert received.startswith(b"HTTP/1.1 200") and received.count(b"HTTP/1.1") == 1, received[-400:]
    assert b"shutting_down" not in received and not received.endswith(b"0\r\n\r\n"), "cut, not ended"
    assert code == 0 and "Traceback" not in output, output


async def test_a_drain_waits_for_a_create_whose_client_left(
    gateway_process: Any, faulty: tuple[FaultyUpstream, str]
) -> None:
    """SIGTERM just after a client gave up on a create the provider is still answering: the drain
    lets the create record its video before the process exits, so it is there after the restart."""
    fake, _ = faulty
    fake.behaviour["primary"] = "delay:2.5"  # past the drain delay (1 s): the drain itself must wait
    process, port = gateway_process("", read_timeout=5)
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url + "/healthz", process)
    with pytest.raises(asyncio.TimeoutError):
        await create_status(url, timeout=0.3)
    process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(process.wait, 15)
    output = process.stdout.read().decode() if process.stdout else ""
    assert code == 0, output
    for _ in range(60):  # the provider made the job either way
        if fake.jobs:
            break
        await asyncio.sleep(0.05)

    fake.behaviour["primary"] = "ok"
    process, port = gateway_process("")
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url + "/healthz", process)
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/videos", headers=BETA) as r:
        assert r.status == 200
        listed = await r.json()
    assert [v["status"] for v in listed["data"]] == ["completed"], listed


async def test_slow_headers_are_cut_off(gateway_process: Any) -> None:
    process, port = gateway_process("")
    await wait_healthy(f"http://127.0.0.1:{port}/healthz", process)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 10)
    assert data == b"" and time.monotonic() - started < 4, "the server closed the half-open request"
    writer.close()


async def test_slow_headers_of_a_later_request_are_cut_off(gateway_process: Any) -> None:
    """Only a connection's first request was timed: after one answer, a client could send part of a
    second request's headers and hold the connection (and what it sent) for an hour."""
    process, port = gateway_process("")
    await wait_healthy(f"http://127.0.0.1:{port}/healthz", process)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(reader.readuntil(b"}"), 10)  # {"status": "ok"}
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    await writer.drain()
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 10)
    assert data == b"" and time.monotonic() - started < 4, "the server closed the half-sent request"
    writer.close()


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """aiohttp keeps an idle connection an hour by default: thousands of idle clients held a
    descriptor each until the process ran out (new clients were reset, creates failed 503)."""
    gw = await start_gateway(gateway_yaml(tmp_path, extra="limits: {keepalive_timeout: 0.5}"))
    reader, writer = await asyncio.open_connection(gw.server.host, gw.server.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(reader.readuntil(b"}"), 10)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    assert 0.4 < time.monotonic() - started < 3
    writer.close()


async def test_reload_applies_drain_times(gateway_process: Any) -> None:
    process, port = gateway_process("")
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url + "/healthz", process)
    path = Path(process.args[-1])
    path.write_text(
        path.read_text().replace("drain_delay_seconds: 1, drain_seconds: 10", "drain_seconds: 0.2")
    )
    reloaded = {"reloaded": True, "problems": [], "needs_restart": []}
    assert await post_admin(url, "/admin/reload") == (200, reloaded)
    sent = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
        sent.set()
        for _ in range(50):
            await asyncio.sleep(0.2)
            yield b" upload"

    async def upload() -> None:
        async with aiohttp.ClientSession() as session:
            headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}
            async with session.post(url + "/v1/videos", data=slow_body(), headers=headers) as response:
                await response.read()

    task = asyncio.create_task(upload())
    await sent.wait()
    await asyncio.sleep(0.2)
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(process.wait, 15)
    took = time.monotonic() - started
    await asyncio.gather(task, return_exceptions=True)
    output = process.stdout.read().decode() if process.stdout else ""
    assert code == 0 and took < 3, f"drained in {took:.1f} s\n{output}"
    assert "drain_seconds=0.2" in output and "abandoned=1" in output


BETA = {"Authorization": f"Bearer {BETA_KEY}"}


async def create_status(url: str, timeout: float = 10) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.post(url + "/v1/videos", json={"prompt": "x", "model": "m"}, headers=BETA) as response,
    ):
        return response.status, await response.json()


async def test_a_create_cut_off_by_a_crash_does_not_hold_its_key_at_the_cap(
    gateway_process: Any, faulty: tuple[FaultyUpstream, str]
) -> None:
    """kill -9 while a create waits for its upstream: after the restart the key may create again
    at once, not after the 15-minute backstop on pending creates."""
    fake, _ = faulty
    fake.behaviour["primary"] = "hang"
    process, port = gateway_process("", beta="limits: {max_in_progress: 1}")
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url + "/healthz", process)
    cut_off = asyncio.create_task(create_status(url))
    while not fake.hits_for("primary"):
        await asyncio.sleep(0.05)
    process.kill()
    process.wait()
    await asyncio.gather(cut_off, return_exceptions=True)

    fake.behaviour["primary"] = "ok"
    process, port = gateway_process("", beta="limits: {max_in_progress: 1}")
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url + "/healthz", process)
    status, body = await create_status(url)
    assert status == 200, body
    fake.behaviour["primary"] = "status:503"  # polls fail, so the new video stays in progress
    status, body = await create_status(url)
    assert status == 429 and body["error"]["code"] == "too_many_in_progress", "the cap still holds"


async def test_a_create_abandoned_while_the_store_is_busy_does_not_count_as_in_progress(
    gateway_process: Any, faulty: tuple[FaultyUpstream, str], tmp_path: Path
) -> None:
    """The client gives up while its create waits for the store (another process holds the write
    lock); the admission the store makes afterwards is settled, not left pending."""
    fake, _ = faulty
    process, port = gateway_process("", beta="limits: {max_in_progress: 1}")
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url + "/healthz", process)
    other = sqlite3.connect(tmp_path / "gateway.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(asyncio.TimeoutError):
        await create_status(url, timeout=0.5)
    await asyncio.sleep(0.3)
    other.execute("ROLLBACK")
    other.close()
    status, body = await create_status(url)
    assert status == 200, body
    fake.behaviour["primary"] = "status:503"  # polls fail, so the new video stays in progress
    status, body = await create_status(url)
    assert status == 429 and body["error"]["code"] == "too_many_in_progress", "the cap still holds"


async def test_videos_of_a_local_provider_a_reload_removed_still_finish(
    start_gateway: StartGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A removed provider's videos stay reachable (README): for the built-in renderer that means
    they still render. Its engine was closed once idle, cancelling the renders still queued, and
    its videos stayed in progress at 99 % for good."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    text = f"""
data_dir: {tmp_path}
admin: {{key: admin-key-0123}}
keys:
  - name: alpha
    key: ${{ALPHA_KEY}}
providers:
  local: {{kind: local, poll_after_ms: 100, options: {{queue_seconds: 0.1, run_seconds: 0.3}}}}
  second: {{kind: local, poll_after_ms: 250, options: {{queue_seconds: 0.1, run_seconds: 0.3}}}}
models:
  sora-2: {{provider: local}}
  sora-b: {{provider: second}}
"""
    gw, path = await start_from_file(start_gateway, tmp_path, text)
    client = gw.sdk()
    videos = [
        await client.videos.create(prompt=f"b{i}", model="sora-b", size="320x240", seconds="1")
        for i in range(3)
    ]
    await reload_to(
        gw, path, text.replace("  second: ", "  # second: ").replace("  sora-b: ", "  # sora-b: ")
    )
    last = await client.videos.with_raw_response.retrieve(videos[-1].id)
    assert last.parse().status in ("queued", "in_progress")
    assert last.headers["openai-poll-after-ms"] == "250", "the pace its provider was configured with"
    for video in videos:
        done = await asyncio.wait_for(client.videos.poll(video.id, poll_interval_ms=100), 30)
        assert done.status == "completed", done


async def test_a_superseded_adapter_leaves_open_a_pool_its_next_call_uses(
    faulty: tuple[FaultyUpstream, str], tmp_path: Path
) -> None:
    """A request under the old config may make calls back to back (a poll, then the download it
    names). Closing the pool as the first ended closed it under the second, a 502 counted against
    the provider; it closes only if still idle when the close runs."""
    from aiohttp.test_utils import make_mocked_request

    from gateway.config import Deployment, ProviderConfig
    from gateway.providers.base import AdapterEnv, Call
    from gateway.providers.openai import OpenAIAdapter

    fake, url = faulty
    fake.jobs["job_1"] = {"id": "job_1", "object": "video", "model": "primary", "status": "completed"}
    fake.behaviour["primary"] = "delay:0.2"
    config = ProviderConfig(name="up", kind="openai", base_url=f"{url}/v1", api_key="sk-upstream-0000")
    adapter = OpenAIAdapter(config, AdapterEnv(data_dir=tmp_path))
    call = Call(
        make_mocked_request("GET", "/"), "req-1", Deployment("up/primary", "m", "up", "primary"), "content"
    )
    try:
        async with adapter.send(
            call, "GET", f"{url}/v1/videos/job_1/content", headers={}, streaming=True
        ) as r:
            await r.read()  # the pool is open
        await adapter.superseded()
        await adapter.exchange(call, "GET", f"{url}/v1/videos/job_1", headers={})  # its last open call ends
        async with adapter.send(
            call, "GET", f"{url}/v1/videos/job_1/content", headers={}, streaming=True
        ) as r:
            assert r.status == 200 and len(await r.read()) > 0
        await asyncio.sleep(0)
        assert adapter._session is None, "closed once the second call ended too"
    finally:
        await adapter.close()
