"""Live operations: hot reload under load, invalid reloads, SIGTERM drain, hostile clients."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from tests.conftest import ALPHA_KEY, ENV, StartGateway, load
from tests.fakes.faulty_upstream import FaultyUpstream
from tests.test_cli import free_port, wait_healthy
from tests.test_resilience import ADMIN, AUTH, config, get, post

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
    path = tmp_path / "gateway.yaml"
    path.write_text(before)
    gw = await start_gateway(load(before), config_path=path)
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
    assert status == 200 and result == {"reloaded": True, "problems": []}
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
    path = tmp_path / "gateway.yaml"
    path.write_text(before)
    gw = await start_gateway(load(before), config_path=path)
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


async def test_file_change_is_picked_up(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    before, after = two_generations(tmp_path, url)
    path = tmp_path / "gateway.yaml"
    path.write_text(before)
    gw = await start_gateway(load(before), config_path=path)
    path.write_text(after)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and not fake.hits_for("secondary"):
        await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"})
        await asyncio.sleep(0.3)
    assert fake.hits_for("secondary"), "the watcher reloaded the changed file"


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

    def start(extra: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        text = config(
            tmp_path,
            faulty[1],
            """
            m:
              - {provider: up, model: primary}
        """,
            extra=extra,
        ).replace(
            "admin:",
            f"server: {{port: {port}, drain_delay_seconds: 1, drain_seconds: 10}}\n"
            "limits: {header_timeout: 1}\nadmin:",
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


async def test_sigterm_drains_an_upload_in_flight(gateway_process: Any) -> None:
    process, port = gateway_process("")
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url + "/healthz", process)
    sent = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
        yield b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nslow'
        sent.set()
        for _ in range(10):
            await asyncio.sleep(0.2)
            yield b" upload"
        yield b"\r\n--b--\r\n"

    async def upload() -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                url + "/v1/videos",
                data=slow_body(),
                headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"},
            ) as response,
        ):
            return response.status

    task = asyncio.create_task(upload())
    await sent.wait()
    await asyncio.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as session, session.get(url + "/readyz") as response:
        assert response.status == 503
    status = await task
    code = await asyncio.to_thread(process.wait, 15)
    output = process.stdout.read().decode() if process.stdout else ""
    assert status == 200, f"the upload in flight completed\n{output}"
    assert code == 0
    assert "draining" in output and "Traceback" not in output


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
