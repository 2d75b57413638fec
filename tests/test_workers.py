"""``video-gateway serve --workers 2`` as a user runs it: one port, two worker processes, one gateway.

Every request here opens a fresh connection, so the kernel spreads them over the workers; the
admin endpoint names the worker that answered, which shows that both took part.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import metrics
from gateway.workers import WORKER_ENV, cgroup_cpu_quota, process_alive, workers_count
from tests.conftest import ALPHA_KEY, BETA_KEY, StartGateway, gateway_yaml
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.test_cli import REPO, free_port

ADMIN_KEY = "sk-admin-for-workers-test"
ROUNDS = 24  # with two workers, the chance that all of these land on one worker is 2**-23


@dataclass
class Workers:
    process: subprocess.Popen[bytes]
    url: str
    config: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _config(tmp_path: Path, port: int) -> str:
    text = gateway_yaml(tmp_path / "data")
    return text.replace(
        "data_dir:",
        f"server: {{port: {port}, workers: 2, watch_config: false, drain_seconds: 5}}\n"
        f"admin: {{key: {ADMIN_KEY}}}\ndata_dir:",
        1,
    )


def _spawn(tmp_path: Path, beta_limits: str | None = None, env: dict[str, str] | None = None) -> Workers:
    """``video-gateway serve`` with two workers on a free port, its output in a log file."""
    port = free_port()
    config = tmp_path / "gateway.yaml"
    text = _config(tmp_path, port)
    if beta_limits is not None:
        text = text.replace("key: ${BETA_KEY}", "key: ${BETA_KEY}\n    limits: " + beta_limits)
    config.write_text(text)
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            cwd=REPO,
            env={**os.environ, "ALPHA_KEY": ALPHA_KEY, "BETA_KEY": BETA_KEY, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Workers(process, f"http://127.0.0.1:{port}", config, log)


@pytest.fixture
def start_workers(tmp_path: Path) -> Iterator[Any]:
    started: list[Workers] = []

    async def start(beta_limits: str | None = None) -> Workers:
        workers = _spawn(tmp_path, beta_limits)
        started.append(workers)
        await _until(lambda: _worker_pids(workers), lambda pids: len(pids) == 2, workers)
        return workers

    yield start
    for workers in started:
        if workers.process.poll() is None:
            workers.process.send_signal(signal.SIGTERM)
            try:
                workers.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                workers.process.kill()


@pytest.fixture
async def fresh() -> AsyncIterator[aiohttp.ClientSession]:
    """A session that opens a new connection for every request."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        yield session


async def _call(
    session: aiohttp.ClientSession, method: str, url: str, key: str = ALPHA_KEY, **kwargs: Any
) -> tuple[int, Any]:
    async with session.request(method, url, headers={"Authorization": f"Bearer {key}"}, **kwargs) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


async def _worker_pids(workers: Workers) -> set[int]:
    pids = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for _ in range(ROUNDS):
            try:
                status, body = await _call(session, "GET", f"{workers.url}/admin/deployments", ADMIN_KEY)
            except aiohttp.ClientConnectionError:
                continue
            if status == 200:
                pids.add(body["worker"]["pid"])
                assert body["worker"]["workers"] == 2
    return pids


async def _until(probe: Any, done: Any, workers: Workers, seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        assert workers.process.poll() is None, workers.log_text()
        value = await probe()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"gave up waiting; last value {value!r}\n{workers.log_text()}"
        await asyncio.sleep(0.2)


async def test_both_workers_serve_the_same_videos_and_see_a_delete_at_once(start_workers, fresh) -> None:
    workers = await start_workers()
    status, video = await _call(
        fresh, "POST", f"{workers.url}/v1/videos", json={"prompt": "w", "size": "320x240", "seconds": "1"}
    )
    assert status == 200
    url = f"{workers.url}/v1/videos/{video['id']}"

    async def status_of() -> str:
        return str((await _call(fresh, "GET", url))[1]["status"])

    await _until(status_of, lambda status: status == "completed", workers)
    for _ in range(ROUNDS):  # every worker reads it and caches it: a completed video needs no provider
        status, seen = await _call(fresh, "GET", url)
        assert status == 200 and seen["id"] == video["id"] and seen["status"] == "completed"
        assert (await _call(fresh, "GET", url, BETA_KEY))[0] == 404
    status, listed = await _call(fresh, "GET", f"{workers.url}/v1/videos")
    assert [v["id"] for v in listed["data"]] == [video["id"]]

    assert (await _call(fresh, "DELETE", url))[0] == 200
    for _ in range(ROUNDS):
        status, body = await _call(fresh, "GET", url)
        assert status == 404 and body["error"]["code"] == "video_not_found"


async def test_a_video_a_sibling_saw_finish_is_answered_from_the_store_when_its_provider_fails(
    start_gateway: StartGateway, tmp_path: Path, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """Two gateways on one store file stand in for two workers. Each caches what it read: b's copies
    still said in progress after a saw the videos complete, so b asked the provider again, and
    answered its 500 with a 503, or its 404 (a job it since purged) with a 404, for videos the
    store holds as completed."""
    fake, url = upstream
    config = gateway_yaml(tmp_path, upstream_url=url, extra="resilience: {read_attempts: 1}")
    a, b = await start_gateway(config), await start_gateway(config)
    videos = [await a.sdk().videos.create(prompt=p, model="sora-remote") for p in ("failing", "purged")]
    for video in videos:  # the provider's jobs move a step with each retrieve
        assert (await b.sdk().videos.retrieve(video.id)).status == "in_progress"  # cached so by b
        assert (await a.sdk().videos.retrieve(video.id)).status == "completed"
    jobs = {job["prompt"]: job for job in fake.jobs.values()}
    jobs["failing"]["prompt"] += " [unreadable]"  # its retrieves fail from now on
    del fake.jobs[jobs["purged"]["id"]]
    for video in videos:
        seen = await b.sdk().videos.retrieve(video.id)
        assert seen.status == "completed" and seen.progress == 100


async def test_one_scrape_counts_every_worker(start_workers, fresh) -> None:
    workers = await start_workers()
    for _ in range(30):
        assert (await _call(fresh, "GET", f"{workers.url}/v1/models"))[0] == 200
    models = 'gateway_http_requests_total{code="200",method="GET",route="/v1/models"}'

    async def scrape() -> tuple[str, dict[str, str]]:
        async with fresh.get(f"{workers.url}/metrics") as response:
            text = await response.text()
        return text, dict(
            line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
        )

    # Each worker flushes its hot-path tallies every second (FLUSH_SECONDS): after that, every scrape
    # has all 30, whichever worker answers it. Waited for, not slept: a busy machine may be late.
    await _until(scrape, lambda got: float(got[1].get(models, 0)) == 30, workers, seconds=10)
    for _ in range(4):
        text, samples = await scrape()
        assert float(samples[models]) == 30
        assert sum(name.startswith("gateway_build_info{") for name in samples) == 1
        assert float(samples["process_resident_memory_bytes"]) > 0
        assert float(samples["process_open_fds"]) > 0
    promtool = shutil.which("promtool")
    if promtool is not None:  # the merged exposition is as well-formed as one process's
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
            result.stdout + result.stderr
        )


async def test_key_limits_hold_across_workers(start_workers, fresh) -> None:
    workers = await start_workers(beta_limits="{creates_per_minute: 3}")
    body = {"prompt": "w", "size": "320x240", "seconds": "1"}
    statuses = [
        (await _call(fresh, "POST", f"{workers.url}/v1/videos", BETA_KEY, json=body))[0] for _ in range(8)
    ]
    assert sorted(statuses) == [200] * 3 + [429] * 5


async def test_an_admin_reload_reaches_every_worker(start_workers, fresh) -> None:
    workers = await start_workers()
    model_url = f"{workers.url}/v1/models/sora-later"
    assert (await _call(fresh, "GET", model_url))[0] == 404
    workers.config.write_text(workers.config.read_text() + "  sora-later:\n    provider: local\n")
    status, answer = await _call(fresh, "POST", f"{workers.url}/admin/reload", ADMIN_KEY)
    assert status == 200 and answer == {"reloaded": True, "problems": [], "workers": 2, "needs_restart": []}

    async def answers() -> list[int]:
        return [(await _call(fresh, "GET", model_url))[0] for _ in range(ROUNDS)]

    await _until(answers, lambda statuses: set(statuses) == {200}, workers, seconds=10)
    async with fresh.get(f"{workers.url}/metrics") as response:
        scraped = await response.text()
    assert 'gateway_config_reloads_total{result="success"} 2.0' in scraped, "each worker counts its load"

    workers.config.write_text(workers.config.read_text() + "bogus: 1\n")
    status, answer = await _call(fresh, "POST", f"{workers.url}/admin/reload", ADMIN_KEY)
    assert status == 422 and any("bogus" in p for p in answer["problems"])
    assert set(await answers()) == {200}, "a rejected file changes nothing"
    # rejected as a reload is: logged and counted (it was neither with several workers)
    async with fresh.get(f"{workers.url}/metrics") as response:
        scraped = await response.text()
    assert 'gateway_config_reloads_total{result="failure"} 1.0' in scraped, scraped
    assert "config_reload_rejected" in workers.log_text()


async def test_reloads_while_workers_start_neither_kill_them_nor_go_missing(tmp_path: Path, fresh) -> None:
    """A SIGHUP (``systemctl reload``, a config tool) that reached a worker before it had installed
    its handler ended it (the signal's default action); reloads repeated while workers started or
    were replaced stopped the whole gateway after five such deaths. A worker now holds the signal
    until it can act on it, so an edit reloaded while it started is served all the same."""
    workers = _spawn(tmp_path)
    process, config = workers.process, workers.config
    try:
        while "supervisor_started" not in workers.log_text():
            assert process.poll() is None, workers.log_text()
            await asyncio.sleep(0.01)
        config.write_text(config.read_text() + "  sora-later:\n    provider: local\n")
        for _ in range(20):  # over the workers' start, before either could serve
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(0.02)
        await _until(lambda: _worker_pids(workers), lambda pids: len(pids) == 2, workers)
        statuses = [
            (await _call(fresh, "GET", f"{workers.url}/v1/models/sora-later"))[0] for _ in range(ROUNDS)
        ]
        assert set(statuses) == {200}, workers.log_text()
        assert "worker_died" not in workers.log_text(), workers.log_text()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)


async def test_an_admin_reload_refuses_a_provider_that_cannot_start(
    start_workers, fresh, tmp_path: Path
) -> None:
    """The workers would each refuse it and keep the old table, so the admin answer must say no."""
    workers = await start_workers()
    missing = _add_a_provider_that_cannot_start(workers, tmp_path)
    status, answer = await _call(fresh, "POST", f"{workers.url}/admin/reload", ADMIN_KEY)
    assert status == 422 and answer["reloaded"] is False, answer
    refusal = f"providers.vertex: options.service_account_file {missing}"
    assert any(problem.startswith(refusal) for problem in answer["problems"]), answer
    statuses = [(await _call(fresh, "GET", f"{workers.url}/v1/models/veo-later"))[0] for _ in range(ROUNDS)]
    assert set(statuses) == {404}, "no worker reloaded"
    assert "config_reloaded" not in workers.log_text()


async def test_a_dead_worker_is_replaced_and_sigterm_stops_them_all(start_workers, fresh) -> None:
    workers = await start_workers()
    before = await _worker_pids(workers)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    after = await _until(
        lambda: _worker_pids(workers), lambda pids: len(pids) == 2 and victim not in pids, workers
    )
    assert len(after & before) == 1
    assert (await _call(fresh, "GET", f"{workers.url}/v1/models"))[0] == 200

    workers.process.send_signal(signal.SIGTERM)
    assert workers.process.wait(timeout=15) == 0
    for pid in after:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "worker_died" in workers.log_text()


def test_sigterm_while_a_worker_that_died_at_start_up_waits_to_be_replaced_stops_the_gateway(
    tmp_path: Path,
) -> None:
    """A worker that dies at start-up is replaced after a back-off. A SIGTERM during the back-off
    (``docker stop``, ``systemctl stop``) signalled only the workers there were; the replacement
    started after it, never heard of the stop and served on, and the supervisor waited for it
    forever. Worker 0 dies at start (a ``sitecustomize`` the workers inherit through PYTHONPATH)
    until the crash file goes; the third death's back-off is 1.6 s, the SIGTERM lands in it."""
    hook, crash = tmp_path / "hook", tmp_path / "crash"
    hook.mkdir()
    crash.touch()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        f"if os.environ.get('{WORKER_ENV}', '').startswith('0/') and os.path.exists({str(crash)!r}):\n"
        "    os._exit(1)\n"
    )
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    workers = _spawn(tmp_path, env={"PYTHONPATH": path})
    process = workers.process
    try:
        while workers.log_text().count("worker_died") < 3:
            assert process.poll() is None, workers.log_text()
            time.sleep(0.01)
        crash.unlink()  # a replacement started now would serve, as one that came up well would
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            left = _workers_of(process.pid)
            pytest.fail(f"the supervisor still runs 10 s after SIGTERM, workers {left}\n{workers.log_text()}")
        assert code == 0, workers.log_text()
        assert _workers_of(process.pid) == [], workers.log_text()
        assert workers.log_text().count("worker_died") == 3, "no worker started after the stop"
    finally:
        for pid in _workers_of(process.pid):
            os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
            process.wait()


def _workers_of(supervisor: int) -> list[int]:
    """Live workers started by the supervisor with that pid, whether or not it is still their parent."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            slot = _environment(int(entry.name)).get(WORKER_ENV, "")
        except OSError:
            continue
        if slot.rpartition("/")[2] == str(supervisor) and process_alive(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


async def test_a_replacement_worker_runs_the_config_the_others_run(start_workers, fresh) -> None:
    """A worker that dies is replaced from the supervisor's copy of the config, not from the file
    as it is now: an edit saved but not yet reloaded (watch_config is off here) is not served by the
    replacement alone, and a typo in the file does not stop it from starting (which, repeated,
    stopped the whole gateway). A reload moves the copy to the file once the file is valid."""
    workers = await start_workers()
    later = f"{workers.url}/v1/models/sora-later"
    good = workers.config.read_text()

    async def answers() -> set[int]:
        return {(await _call(fresh, "GET", later))[0] for _ in range(ROUNDS)}

    workers.config.write_text(good + "  sora-later:\n    provider: local\n")  # saved, not reloaded
    await _replace_a_worker(workers)
    assert await answers() == {404}, "one generation of the config serves"
    workers.config.write_text(good + "  sora-later:\n    provider: locl\n")  # a typo
    for _ in range(2):
        await _replace_a_worker(workers)
    assert await answers() == {404} and workers.process.poll() is None

    workers.config.write_text(good + "  sora-later:\n    provider: local\n")
    status, answer = await _call(fresh, "POST", f"{workers.url}/admin/reload", ADMIN_KEY)
    assert status == 200 and answer["reloaded"] is True, answer
    await _until(answers, lambda statuses: statuses == {200}, workers, seconds=10)
    await _replace_a_worker(workers)
    assert await answers() == {200}, "the replacement takes the reloaded config"


async def test_a_replacement_worker_keeps_the_restart_only_settings_the_others_run(
    start_workers, fresh, tmp_path: Path
) -> None:
    """A reload leaves what only a restart changes (``data_dir`` here) as it was, and says so
    (``config_reload_needs_restart``); but the supervisor's copy of the config followed the file,
    and a worker replaced after it (a crash, the OOM killer) started on the new ``data_dir``: a
    second task store, and half the connections answered 404 for the tenants' videos. The rest of
    the reload (a model added) reaches the replacement as it reached the others."""
    workers = await start_workers()
    status, video = await _call(
        fresh, "POST", f"{workers.url}/v1/videos", json={"prompt": "w", "size": "320x240", "seconds": "1"}
    )
    assert status == 200
    workers.config.write_text(
        workers.config.read_text().replace(
            f"data_dir: {tmp_path / 'data'}\n", f"data_dir: {tmp_path / 'moved'}\n", 1
        )
        + "  sora-later:\n    provider: local\n"
    )
    workers.process.send_signal(signal.SIGHUP)  # systemctl reload
    await _until(
        lambda: _logged(workers, "config_reload_needs_restart"), lambda n: n == 2, workers, seconds=10
    )
    await _replace_a_worker(workers)
    for _ in range(ROUNDS):
        status, seen = await _call(fresh, "GET", f"{workers.url}/v1/videos/{video['id']}")
        assert status == 200 and seen["id"] == video["id"], (status, seen)
        assert (await _call(fresh, "GET", f"{workers.url}/v1/models/sora-later"))[0] == 200
    assert not (tmp_path / "moved").exists(), "no worker opened the new data_dir"
    assert await _logged(workers, "config_reload_needs_restart") == 2


async def test_a_sighup_the_workers_refuse_does_not_stop_the_gateway_at_the_next_worker_crash(
    start_workers, fresh, tmp_path: Path
) -> None:
    """A SIGHUP (``systemctl reload``) of a file whose new provider cannot start: every worker
    refuses it and keeps the old table. The supervisor only parsed the file, so its copy took the
    refused config; the next worker that died was replaced from that copy, could not start, and the
    supervisor stopped the whole gateway. It now adopts only what the workers' reload would."""
    workers = await start_workers()
    _add_a_provider_that_cannot_start(workers, tmp_path)
    workers.process.send_signal(signal.SIGHUP)
    await _until(lambda: _logged(workers, "config_reload_rejected"), lambda n: n == 2, workers, seconds=10)
    await _replace_a_worker(workers)  # any crash; _until fails at once if the gateway stopped
    statuses = [(await _call(fresh, "GET", f"{workers.url}/v1/models/veo-later"))[0] for _ in range(ROUNDS)]
    assert set(statuses) == {404}, "the replacement runs the config the others run"
    assert "supervisor_keeps_config" in workers.log_text()
    assert "startup_failed" not in workers.log_text()
    # The check loads the adapters, and with them the metrics: the supervisor's must not be counted
    # with the workers' (a build-info gauge of three processes, say, for two workers).
    worker = min(await _worker_pids(workers))
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    (metrics_dir,) = [
        v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")
    ]
    supervisors = list(Path(metrics_dir).glob(f"*_{workers.process.pid}.db"))
    assert supervisors == [], "the supervisor wrote metrics files"


def _add_a_provider_that_cannot_start(workers: Workers, tmp_path: Path) -> Path:
    """Save a config whose new provider (Vertex, model ``veo-later``) has no readable credential:
    the file it names, which is missing."""
    missing = tmp_path / "no-such-account.json"
    workers.config.write_text(
        workers.config.read_text().replace(
            "models:\n",
            "  vertex:\n    kind: vertex_veo\n"
            f"    options: {{project: demo, service_account_file: '{missing}'}}\n"
            "models:\n  veo-later:\n    provider: vertex\n    model: veo-3.0-generate-001\n",
            1,
        )
    )
    return missing


async def _replace_a_worker(workers: Workers) -> None:
    """Kill a worker as a crash would, and wait until its replacement serves."""
    victim = min(await _worker_pids(workers))
    os.kill(victim, signal.SIGKILL)
    await _until(lambda: _worker_pids(workers), lambda pids: len(pids) == 2 and victim not in pids, workers)


async def _logged(workers: Workers, event: str) -> int:
    """How many of the gateway's log lines are ``event`` (async: a probe for :func:`_until`)."""
    return workers.log_text().count(f'"event": "{event}"')


async def test_the_gateways_cpu_counter_never_falls_when_a_worker_is_replaced(start_workers, fresh) -> None:
    """process_cpu_seconds_total sums the gateway's processes; a replaced worker's time must stay in
    it (else rate() sees a counter reset: a spike of every survivor's lifetime CPU). Counters that
    are one worker's alone (the GC's) are not exported as the gateway's."""
    workers = await start_workers()

    async def cpu() -> float:
        async with fresh.get(f"{workers.url}/metrics") as response:
            text = await response.text()
        assert "python_gc_collections_total" not in text
        return next(
            float(x.split()[1]) for x in text.splitlines() if x.startswith("process_cpu_seconds_total ")
        )

    for _ in range(ROUNDS):  # some work for every worker, so each has CPU time to lose
        await _call(fresh, "GET", f"{workers.url}/v1/models")
    before = await cpu()
    victim = min(await _worker_pids(workers))
    os.kill(victim, signal.SIGKILL)
    await _until(lambda: _worker_pids(workers), lambda pids: len(pids) == 2 and victim not in pids, workers)
    readings = [await cpu() for _ in range(ROUNDS)]  # each worker answers some of these
    assert min(readings) >= before, (before, readings)


def test_the_cpu_counter_is_the_same_for_the_same_ticks_however_they_are_summed() -> None:
    """Which worker answers a scrape decides the order of the sum, and a replaced worker's ticks
    move from its own count to the supervisor's reaped count: the same ticks, summed otherwise, came
    out a hair lower (4.619999999999999 for 4.62), which rate() reads as a counter reset. The test
    above failed now and then on this."""
    import itertools

    ticks = os.sysconf("SC_CLK_TCK")
    parts = [31 / ticks, 12 / ticks, 50 / ticks, 107 / ticks, 243 / ticks, 19 / ticks]
    assert len({sum(order) for order in itertools.permutations(parts)}) > 1, "float sums do differ"
    assert {metrics._whole_ticks(sum(order)) for order in itertools.permutations(parts)} == {462 / ticks}


def test_the_gateways_cpu_counter_adds_the_reaped_workers_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reaped workers' time was never added: the family is named process_cpu_seconds (only its
    sample has _total), so the check for it never matched. The test above passed all the same while
    a new worker's start-up CPU made up for an idle one's; a worker with hours of CPU would not."""
    monkeypatch.setattr(metrics, "_reaped_children_cpu", lambda pid: 3600.0)
    (cpu,) = [f for f in metrics.GatewayProcesses(tmp_path).collect() if f.name == "process_cpu_seconds"]
    assert cpu.samples[0].name == "process_cpu_seconds_total" and cpu.samples[0].value >= 3600.0


def test_a_reaped_workers_cpu_time_stays_counted() -> None:
    """What keeps the counter from falling: a child's CPU time, once its parent has reaped it, is in
    the parent's cutime and cstime, which the gateway's counter adds to the live processes' own."""
    from gateway.metrics import _reaped_children_cpu

    before = _reaped_children_cpu(os.getpid())
    burn = "import time\nend = time.process_time() + 0.4\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", burn], check=True, timeout=30)  # run and reaped
    assert _reaped_children_cpu(os.getpid()) - before >= 0.35


async def test_workers_leave_when_their_supervisor_is_killed(start_workers) -> None:
    workers = await start_workers()
    pids = await _worker_pids(workers)
    metrics_dir = Path(_environment(next(iter(pids)))["PROMETHEUS_MULTIPROC_DIR"])
    assert metrics_dir.is_dir()
    workers.process.kill()
    workers.process.wait(timeout=5)
    deadline = time.monotonic() + 15
    while any(process_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "orphaned workers kept running"
        await asyncio.sleep(0.2)
    assert "supervisor_gone" in workers.log_text()
    assert not metrics_dir.exists(), "the last worker out leaves the metrics directory behind"


def _environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode().partition("=")[::2] for item in raw.split(b"\0") if item)


def _cgroup_tree(tmp_path: Path, membership: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup and /proc/self/cgroup, laid out as the kernel documents them."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(membership)
    return root, proc


V1_QUOTA = "cpu/cpu.cfs_quota_us"
V1_PERIOD = "cpu/cpu.cfs_period_us"


@pytest.mark.parametrize(
    ("membership", "files", "quota", "auto"),
    [
        # cgroup v2 (docker --cpus=2 on a host with more cores): "$MAX $PERIOD" in cpu.max
        ("0::/\n", {"cpu.max": "200000 100000"}, 2.0, 2),
        ("0::/\n", {"cpu.max": "max 100000"}, None, 8),
        ("0::/kubepods/pod1/c1\n", {"kubepods/pod1/c1/cpu.max": "150000 100000"}, 1.5, 1),
        # cgroup v1: cfs_quota_us is -1 without a quota
        ("4:cpu,cpuacct:/docker/abc\n", {V1_QUOTA: "50000", V1_PERIOD: "100000"}, 0.5, 1),
        ("4:cpu,cpuacct:/\n", {V1_QUOTA: "-1", V1_PERIOD: "100000"}, None, 8),
        # a hybrid host: the unified hierarchy carries no cpu controller, v1 has the quota
        ("0::/\n4:cpu,cpuacct:/\n", {V1_QUOTA: "300000", V1_PERIOD: "100000"}, 3.0, 3),
        ("0::/\n", {}, None, 8),
    ],
)
def test_auto_workers_respect_a_cgroup_cpu_quota(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    membership: str,
    files: dict[str, str],
    quota: float | None,
    auto: int,
) -> None:
    root, proc = _cgroup_tree(tmp_path, membership, files)
    assert cgroup_cpu_quota(root, proc) == quota

    monkeypatch.setattr("gateway.workers.cgroup_cpu_quota", lambda: quota)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert workers_count("auto") == auto  # 8 cores; a quota rounds down, never below one
    assert workers_count(3) == 3


def test_auto_workers_without_cgroup_files_use_the_cores(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path / "none", tmp_path / "missing") is None


async def test_a_replaced_worker_still_reaches_a_provider_a_reload_removed(start_workers, fresh) -> None:
    """A reload keeps a removed provider's adapter for the videos it holds. A worker started in place
    of one that died must keep it too, or the same download answers 200 or 503 by the worker that
    takes it. Here the provider came with one reload and went with the next: the config the gateway
    started with never named it."""
    workers = await start_workers()
    original = workers.config.read_text()
    extra = "providers:\n  extra:\n    kind: local\n    options: {queue_seconds: 0.1, run_seconds: 0.4}\n"
    added = original.replace("providers:\n", extra, 1) + "  sora-extra:\n    provider: extra\n"
    model_url = f"{workers.url}/v1/models/sora-extra"

    async def reload(text: str, model_status: int) -> None:
        workers.config.write_text(text)
        status, answer = await _call(fresh, "POST", f"{workers.url}/admin/reload", ADMIN_KEY)
        assert status == 200 and answer["reloaded"] is True, answer

        async def statuses() -> set[int]:
            return {(await _call(fresh, "GET", model_url))[0] for _ in range(ROUNDS)}

        await _until(statuses, lambda seen: seen == {model_status}, workers, seconds=10)

    await reload(added, 200)
    status, video = await _call(
        fresh,
        "POST",
        f"{workers.url}/v1/videos",
        json={"prompt": "w", "model": "sora-extra", "size": "320x240"},
    )
    assert status == 200, video
    url = f"{workers.url}/v1/videos/{video['id']}"

    async def state() -> str:
        return str((await _call(fresh, "GET", url))[1]["status"])

    await _until(state, lambda status: status == "completed", workers)
    await reload(original, 404)

    async def downloads() -> set[int]:
        seen = set()
        for _ in range(ROUNDS):
            async with fresh.get(url + "/content", headers={"Authorization": f"Bearer {ALPHA_KEY}"}) as r:
                await r.read()
                seen.add(r.status)
        return seen

    assert await downloads() == {200}
    await _replace_a_worker(workers)
    assert await downloads() == {200}
