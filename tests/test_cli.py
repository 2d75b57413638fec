"""The command line as a user runs it: serve on the default config, simulate, and the two together."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.simulator import build_simulator
from tests.conftest import ALPHA_KEY, StartGateway, gateway_yaml
from tests.test_sdk_e2e import decode_mp4

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def run_process(tmp_path: Path) -> Iterator[Any]:
    processes: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


async def wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became healthy")


async def test_serve_on_the_embedded_default(run_process: Any, tmp_path: Path) -> None:
    """The README's first command: no config, no keys, the demo key works and renders a video."""
    port = free_port()
    env = {"VIDEO_GATEWAY_DATA_DIR": str(tmp_path / "data")}
    env.pop("VIDEO_GATEWAY_API_KEY", None)
    process = run_process("serve", "--port", str(port), env=env, cwd=tmp_path)
    await wait_healthy(f"http://127.0.0.1:{port}/healthz", process)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-gateway-demo", max_retries=0
    )
    video = await client.videos.create_and_poll(
        prompt="default config", model="sora-2", size="320x240", seconds="1", poll_interval_ms=200
    )
    assert video.status == "completed"
    assert decode_mp4((await client.videos.download_content(video.id)).content)[0] == "h264"
    await client.close()
    assert (tmp_path / "data" / "gateway.sqlite3").exists()


async def test_serve_with_a_config_and_key_from_env(run_process: Any, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "gw.yaml"
    config.write_text(
        gateway_yaml(tmp_path / "data").replace("data_dir:", f"server: {{port: {port}}}\ndata_dir:")
    )
    process = run_process(
        "serve", "--config", str(config), env={"ALPHA_KEY": ALPHA_KEY, "BETA_KEY": "sk-beta-xxxxxx"}
    )
    await wait_healthy(f"http://127.0.0.1:{port}/healthz", process)
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": f"Bearer {ALPHA_KEY}"}
        ) as response:
            assert response.status == 200 and (await response.json())["data"][0]["id"] == "sora-2"
        async with session.get(
            f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer sk-gateway-demo"}
        ) as response:
            assert response.status == 401


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_reload_asked_for_while_starting_is_done_once_started(
    run_process: Any, tmp_path: Path, workers: str
) -> None:
    """systemd's ExecReload (or a config tool) may send SIGHUP right after a start: before the
    gateway could reload, the signal's default action ended it, without a log line. It is held now,
    and the reload happens once the gateway is up."""
    port = free_port()
    config = tmp_path / "gw.yaml"
    text = gateway_yaml(tmp_path / "data")
    config.write_text(text)
    env = {"ALPHA_KEY": ALPHA_KEY, "BETA_KEY": "sk-beta-xxxxxx"}
    args = ("serve", "--config", str(config), "--port", str(port), "--workers", workers)
    process = run_process(*args, env=env)
    assert process.stdout is not None
    for line in process.stdout:  # the config is read; the server is still being built
        if b"serving" in line:
            break
    config.write_text(text.replace("models:\n", "models:\n  sora-late:\n    provider: local\n", 1))
    process.send_signal(signal.SIGHUP)
    await wait_healthy(f"http://127.0.0.1:{port}/healthz", process)
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ALPHA_KEY}"}) as session:
        while True:
            async with session.get(f"http://127.0.0.1:{port}/v1/models") as response:
                models = {m["id"] for m in (await response.json())["data"]}
            if "sora-late" in models or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    assert "sora-late" in models and process.poll() is None


def test_serve_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("keys: []\nproviders: {}\nmodels: {}\nbogus: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "bogus" in result.stderr and "Traceback" not in result.stderr


async def test_simulator_process_serves_the_dialect(run_process: Any, tmp_path: Path) -> None:
    port = free_port()
    process = run_process(
        "simulate",
        "--port",
        str(port),
        "--data-dir",
        str(tmp_path / "sim"),
        "--api-key",
        "sim-key-123",
        "--queue-seconds",
        "0.1",
        "--run-seconds",
        "0.3",
    )
    await wait_healthy_sim(port, process)
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sim-key-123", max_retries=0)
    video = await client.videos.create_and_poll(
        prompt="straight to the simulator", size="320x240", seconds="1"
    )
    assert video.status == "completed" and video.seconds == "1"
    await client.close()
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0
    ) as wrong:
        with pytest.raises(openai.AuthenticationError):
            await wrong.videos.list()


async def wait_healthy_sim(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert process.poll() is None
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError("simulator did not start")


async def test_gateway_in_front_of_the_simulator(
    start_gateway: StartGateway, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The local provider served as an OpenAI-dialect upstream is a realistic upstream for the gateway."""
    simulator = await aiohttp_server(
        build_simulator(
            tmp_path / "sim", api_key="sk-upstream-secret-abcdef", queue_seconds=0.1, run_seconds=0.3
        )
    )
    text = gateway_yaml(tmp_path, upstream_url=str(simulator.make_url("")).rstrip("/"))
    gw = await start_gateway(text)
    client = gw.sdk()
    video = await client.videos.create_and_poll(
        prompt="through the gateway", model="sora-remote", size="320x240", seconds="2"
    )
    assert video.status == "completed" and video.model == "sora-remote" and video.seconds == "2"
    codec, width, height, _ = decode_mp4((await client.videos.download_content(video.id)).content)
    assert (codec, width, height) == ("h264", 320, 240)
    remix = await client.videos.poll((await client.videos.remix(video.id, prompt="again")).id)
    assert remix.status == "completed" and remix.remixed_from_video_id == video.id
    assert (await client.videos.delete(video.id)).deleted


def test_check_config_on_the_shipped_files() -> None:
    """The file as an argument, or as serve takes it (--config): one command line checks and runs."""
    for args in (["config/gateway.yaml"], ["gateway/default.yaml"], ["--config", "config/gateway.yaml"]):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "check-config", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert "OK" in result.stdout
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "--config" in result.stderr and "Traceback" not in result.stderr


def test_check_config_meets_what_serve_would_meet_starting(tmp_path: Path) -> None:
    """A Vertex provider naming a service account file that is not there: serve refuses to start,
    so check-config must not say OK."""
    missing = tmp_path / "no-such-account.json"
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "keys: [{name: ci, key: sk-test-0123456789}]\n"
        "providers:\n"
        f"  vertex: {{kind: vertex_veo, options: {{project: demo, service_account_file: '{missing}'}}}}\n"
        "models:\n  veo: {provider: vertex, model: veo-3.0-generate-001}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stdout
    assert f"providers.vertex: options.service_account_file {missing}" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("serve", "--port", "99999"),
        ("serve", "--port", "0"),
        ("serve", "--port", "-1"),
        ("serve", "--port", "\u00b2"),
        ("serve", "--workers", "\u00b2"),
        ("serve", "--workers", "0"),
        ("simulate", "--port", "65536"),
        ("simulate", "--queue-seconds", "-1"),
        ("simulate", "--run-seconds", "nan"),
    ],
)
def test_numeric_flags_out_of_range_are_usage_errors(args: tuple[str, ...], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", *args], cwd=REPO, capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2, result.stderr
    assert f"argument {args[1]}:" in result.stderr and "Traceback" not in result.stderr
    assert "invalid" not in result.stderr, "argparse's own wording names a function of ours"


@pytest.fixture
def port_in_use() -> Iterator[int]:
    """A port another process listens on (without SO_REUSEPORT, so workers cannot share it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ("server: {port: __PORT_IN_USE__}", "address already in use"),
        ("server: {port: __FREE__}\ndata_dir: /proc/nope/x", "/proc/nope"),
        ("server: {port: __FREE__, host: 256.1.1.1}", "cannot listen on 256.1.1.1"),
        ("server: {port: __FREE__}\nstore: {path: __GARBAGE__}", "file is not a database"),
    ],
)
def test_start_up_failure_is_one_error_and_status_1(
    tmp_path: Path, port_in_use: int, setting: str, reason: str, workers: str
) -> None:
    text = gateway_yaml(tmp_path / "data") + setting.replace("__PORT_IN_USE__", str(port_in_use))
    if "/proc/nope" in setting:
        text = text.replace(f"data_dir: {tmp_path / 'data'}\n", "")
    garbage = tmp_path / "garbage.sqlite3"  # a store file that is none: a workers' failure, not a crash
    garbage.write_bytes(b"not a database" * 500)
    config = tmp_path / "gw.yaml"
    config.write_text(text.replace("__FREE__", str(free_port())).replace("__GARBAGE__", str(garbage)))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", workers],
        cwd=REPO,
        env={**os.environ, "ALPHA_KEY": ALPHA_KEY, "BETA_KEY": "sk-beta-xxxxxx"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    errors = [e for e in map(json.loads, output.splitlines()) if e["level"] == "error"]
    assert errors and all(e["event"] == "startup_failed" for e in errors), output
    assert len(errors) <= int(workers), "one line per process that tried"
    assert all(reason in e["reason"] for e in errors), output


async def test_a_low_soft_limit_on_open_files_does_not_cap_the_connections(tmp_path: Path) -> None:
    """systemd and recent container runtimes start a service with a soft limit of 1024 open files
    (a hard one far higher): the gateway raises it, as Go and nginx do, instead of refusing
    connections past a few hundred requests in flight. Here the soft limit is 64, and 300 clients
    hold a connection each."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard limit here ({hard}) leaves no room to show it")
    port = free_port()
    log = tmp_path / "gateway.log"  # a file: a pipe read only at the end would fill and stall the gateway
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-format", "json"],
            cwd=tmp_path,
            env={**os.environ, "VIDEO_GATEWAY_DATA_DIR": str(tmp_path / "data")},
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)),
        )
    try:
        await wait_healthy(f"http://127.0.0.1:{port}/healthz", process)
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def hold_one() -> int:
                async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
                    await response.read()
                    await asyncio.sleep(1)  # every connection stays open while the others arrive
                    return response.status

            statuses = await asyncio.wait_for(asyncio.gather(*(hold_one() for _ in range(300))), 30)
        assert statuses == [200] * 300
    finally:
        process.terminate()
        process.wait(timeout=10)
    (serving,) = [json.loads(line) for line in log.read_text().splitlines() if '"serving"' in line]
    assert serving["open_files"] == (None if hard == resource.RLIM_INFINITY else hard)
