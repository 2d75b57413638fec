"""Does the gateway stream big uploads and downloads in bounded memory, and at what cost in speed?

Starts two subprocesses on 127.0.0.1: a tiny OpenAI-Videos upstream (defined in this file; it hashes
every byte it receives and streams downloads generated on the fly) and ``video-gateway serve`` routed
to it. Then it sends one multipart create with a SIZE-byte ``input_reference`` directly to the
upstream and once through the gateway, and downloads SIZE bytes of video content both ways, while
sampling the gateway's RSS every 50 ms. It checks the upstream received exactly the client's bytes
(with ``model`` renamed on the gateway path) and prints throughput and RSS figures, one PASS/FAIL
line per check, and writes them to ``bench/results/upload_memory.json``.

Run it from the project root (Linux only: it reads /proc):

    .venv/bin/python bench/upload_memory.py --size-mib 1024

``--keep`` keeps the temporary directory (config, data dir, subprocess logs) and prints its path.
Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

MiB = 1024 * 1024
CHUNK = 256 * 1024
RSS_LIMIT_MIB = 64
SAMPLE_SECONDS = 0.05

PUBLIC_MODEL = "sora-2"
UPSTREAM_MODEL = "upstream-model"
GATEWAY_KEY = "sk-bench-gateway-demo-key"
UPSTREAM_KEY = "sk-bench-upstream-key"
GATEWAY_KEY_ENV = "BENCH_GATEWAY_API_KEY"
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_API_KEY"

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "upload_memory.json"
ROOT = Path(__file__).resolve().parent.parent


# The upstream: a minimal OpenAI Videos server, run as `upload_memory.py --serve-upstream PORT`.

_PATTERN = bytes(range(256)) * (CHUNK // 256)
_MODEL_FIELD = re.compile(rb'name="model"\r\n(?:[^\r\n]+\r\n)*?\r\n([^\r\n]*)\r\n')
_PROMPT_FIELD = re.compile(rb'name="prompt"\r\n(?:[^\r\n]+\r\n)*?\r\n([^\r\n]*)\r\n')
# A create whose prompt is "latency N ms" makes a job whose polls each take N ms: the job's ID carries
# the figure (``video_x7_20ms``), so any proxy in front, which passes the ID on, reaches the same delay.
LATENCY_PROMPT = re.compile(rb"latency (\d{1,5}) ms")
_ID_LATENCY = re.compile(r"_(\d{1,5})ms$")
LAST = web.AppKey("last", dict)
COUNTER = web.AppKey("counter", list)
STATUS = web.AppKey("status", list)


def _video(video_id: str, status: str) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": video_id,
        "object": "video",
        "model": UPSTREAM_MODEL,
        "status": status,
        "progress": 100 if status == "completed" else 0,
        "created_at": now,
        "completed_at": now if status == "completed" else None,
        "size": "1280x720",
        "seconds": "4",
    }


def build_upstream(
    content_bytes: int, api_key: str, retrieve_status: str = "completed", latency_ms: float = 0.0
) -> web.Application:
    """POST /v1/videos hashes the raw body as it streams; GET .../content streams ``content_bytes``.

    Retrieve answers ``retrieve_status`` (``in_progress`` keeps a gateway forwarding every poll);
    every answer waits ``latency_ms`` first, to model a provider's own time, or for a poll, the
    latency its job was created with (:data:`LATENCY_PROMPT`).
    """

    async def create(request: web.Request) -> web.Response:
        digest, size, head = hashlib.sha256(), 0, bytearray()
        async for chunk in request.content.iter_chunked(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if len(head) < 64 * 1024:
                head += chunk[: 64 * 1024 - len(head)]
        if latency_ms:
            await asyncio.sleep(latency_ms / 1000)
        model = _MODEL_FIELD.search(head)
        counter = request.app[COUNTER]
        counter[0] += 1
        video_id = f"video_x{counter[0]}"
        prompt = _PROMPT_FIELD.search(head)
        if prompt and (asked := LATENCY_PROMPT.fullmatch(prompt.group(1))):
            video_id += f"_{int(asked.group(1))}ms"
        request.app[LAST].clear()
        request.app[LAST].update(
            id=video_id,
            sha256=digest.hexdigest(),
            bytes=size,
            content_length=request.content_length,
            content_type=request.headers.get("Content-Type", ""),
            model=model.group(1).decode("utf-8", "replace") if model else None,
            auth_ok=request.headers.get("Authorization") == f"Bearer {api_key}",
        )
        return web.json_response(_video(video_id, "queued"))

    async def retrieve(request: web.Request) -> web.Response:
        video_id = request.match_info["video_id"]
        own = _ID_LATENCY.search(video_id)
        delay = int(own.group(1)) if own else latency_ms
        if delay:
            await asyncio.sleep(delay / 1000)
        return web.json_response(_video(video_id, request.app[STATUS][0]))

    async def content(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "video/mp4"})
        response.content_length = content_bytes
        await response.prepare(request)
        view, left = memoryview(_PATTERN), content_bytes
        while left > 0:
            n = min(CHUNK, left)
            await response.write(view[:n])
            left -= n
        await response.write_eof()
        return response

    async def last(request: web.Request) -> web.Response:
        return web.json_response(request.app[LAST])

    async def set_status(request: web.Request) -> web.Response:
        request.app[STATUS][0] = request.match_info["status"]
        return web.json_response({"retrieve_status": request.app[STATUS][0]})

    app = web.Application()
    app[STATUS] = [retrieve_status]
    app[LAST] = {}
    app[COUNTER] = [0]
    app.router.add_post("/v1/videos", create)
    app.router.add_get("/v1/videos/{video_id}", retrieve)
    app.router.add_get("/v1/videos/{video_id}/content", content)
    app.router.add_get("/_last", last)
    app.router.add_post("/_retrieve_status/{status}", set_status)
    return app


# The client side: a multipart body generated on the fly, hashed as it goes.


class MultipartBody:
    """prompt, model, seconds, size, then an ``input_reference`` file of ``file_bytes`` pseudo-random bytes.

    :meth:`stream` yields the body with one ``model`` value and hashes, in the same pass, both that
    body and the body an upstream should receive once the gateway renamed the model.
    """

    def __init__(self, file_bytes: int, seed: int = 1) -> None:
        self.file_bytes = file_bytes
        self.boundary = f"bench-{random.Random(seed).getrandbits(128):032x}"
        self.seed = seed
        self.sent_sha256 = ""
        self.renamed_sha256 = ""

    def _text_part(self, name: str, value: str) -> bytes:
        return (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()

    def _head(self, model: str) -> bytes:
        return b"".join(
            [
                self._text_part("prompt", "A paper boat drifting down a rain gutter, close-up."),
                self._text_part("model", model),
                self._text_part("seconds", "4"),
                self._text_part("size", "1280x720"),
                (
                    f'--{self.boundary}\r\nContent-Disposition: form-data; name="input_reference"; '
                    f'filename="reference.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
                ).encode(),
            ]
        )

    def _tail(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def length(self, model: str) -> int:
        return len(self._head(model)) + self.file_bytes + len(self._tail())

    def _file_chunks(self) -> Iterator[bytes]:
        """Pseudo-random, incompressible bytes: slices of a 4 MiB pool at scattered offsets."""
        pool_size = 4 * MiB
        pool = memoryview(random.Random(self.seed).randbytes(pool_size + CHUNK))
        left, i = self.file_bytes, 0
        while left > 0:
            n = min(CHUNK, left)
            offset = (i * 1_048_583) % pool_size
            yield bytes(pool[offset : offset + n])
            left -= n
            i += 1

    async def stream(self, model: str, renamed: str) -> AsyncIterator[bytes]:
        sent, expected = hashlib.sha256(), hashlib.sha256()
        head = self._head(model)
        sent.update(head)
        expected.update(self._head(renamed))
        yield head
        for chunk in self._file_chunks():
            sent.update(chunk)
            expected.update(chunk)
            yield chunk
        tail = self._tail()
        sent.update(tail)
        expected.update(tail)
        yield tail
        self.sent_sha256, self.renamed_sha256 = sent.hexdigest(), expected.hexdigest()


# RSS sampling from /proc.


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    if "VmRSS" not in out:
        raise ProcessLookupError(f"process {pid} is no longer running")
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, same user); False when not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a gateway with workers is a supervisor and its children)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        with (
            contextlib.suppress(OSError),
            open(f"/proc/{current}/task/{current}/children", encoding="ascii") as f,
        ):
            todo.extend(int(child) for child in f.read().split())
    return tree


class RssSampler:
    """Samples VmRSS of a process and its children every 50 ms while the ``async with`` block runs.

    The sampling task runs in a thread, so a busy event loop (the client generating and hashing
    the body) cannot stretch the interval; VmHWM, reset on entry, catches peaks between samples.
    ``growth`` is that of the process that grew most (the worker that carried the transfer).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pids: list[int] = []
        self.baseline: dict[int, int] = {}
        self.peaks: dict[int, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._hwm_reset: dict[int, bool] = {}

    async def __aenter__(self) -> RssSampler:
        self.pids = process_tree(self.pid)
        for pid in self.pids:
            self._hwm_reset[pid] = reset_peak(pid)
            self.baseline[pid] = self.peaks[pid] = proc_status(pid)["VmRSS"]
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(SAMPLE_SECONDS)

    def _sample(self, key: str = "VmRSS") -> None:
        for pid in self.pids:
            with contextlib.suppress(OSError):
                self.peaks[pid] = max(self.peaks[pid], proc_status(pid)[key])
        self.samples += 1

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.to_thread(self._thread.join)
        self._sample()
        for pid in self.pids:
            if self._hwm_reset[pid]:
                with contextlib.suppress(OSError):
                    self.peaks[pid] = max(self.peaks[pid], proc_status(pid)["VmHWM"])

    @property
    def peak(self) -> int:
        return max(self.peaks.values())

    @property
    def growth(self) -> int:
        return max(self.peaks[pid] - self.baseline[pid] for pid in self.pids)


# Subprocesses.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


_PRCTL = getattr(ctypes.CDLL(None), "prctl", None)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the benchmark dies without cleaning up."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, argv: list[str], port: int, workdir: Path, env: dict[str, str]) -> Child:
    log = workdir / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return Child(name, process, port, log)


def stop(child: Child) -> None:
    if child.process.poll() is not None:
        return
    child.process.terminate()
    try:
        child.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        child.process.kill()
        child.process.wait(timeout=10)


def gateway_command() -> list[str]:
    for candidate in (
        Path(sys.executable).with_name("video-gateway"),
        ROOT / ".venv" / "bin" / "video-gateway",
    ):
        if candidate.exists():
            return [str(candidate)]
    found = shutil.which("video-gateway")
    return [found] if found else [sys.executable, "-m", "gateway"]


def write_gateway_config(workdir: Path, upstream_port: int, max_upload: int) -> Path:
    config = {
        "data_dir": str(workdir / "gateway-data"),
        "limits": {"max_upload_bytes": max_upload},
        "logging": {"format": "json", "level": "warning"},
        "keys": [{"name": "bench", "key": "${" + GATEWAY_KEY_ENV + "}"}],
        "providers": {
            "bench-upstream": {
                "kind": "openai",
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "api_key": "${" + UPSTREAM_KEY_ENV + "}",
            }
        },
        "models": {PUBLIC_MODEL: {"provider": "bench-upstream", "model": UPSTREAM_MODEL}},
    }
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


async def wait_ready(session: aiohttp.ClientSession, child: Child, url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.tail()}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.get(url) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{child.name} did not become ready in {timeout:.0f}s:\n{child.tail()}")


# Transfers.


@dataclass
class Transfer:
    path: str
    seconds: float
    bytes: int
    status: int
    ok: bool
    detail: str
    mib_per_s: float = 0.0
    rss: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mib_per_s = self.bytes / MiB / self.seconds if self.seconds > 0 else 0.0


async def upload(
    session: aiohttp.ClientSession, path: str, url: str, key: str, body: MultipartBody, upstream: str
) -> tuple[Transfer, dict[str, Any]]:
    """POST the big multipart create; check what the upstream received via GET /_last."""
    length = body.length(PUBLIC_MODEL)
    headers = {
        "Authorization": f"Bearer {key}",
        "Content-Type": body.content_type,
        "Content-Length": str(length),
    }
    started = time.perf_counter()
    async with session.post(url, data=body.stream(PUBLIC_MODEL, UPSTREAM_MODEL), headers=headers) as r:
        answer_raw = await r.read()
        status = r.status
    seconds = time.perf_counter() - started
    try:
        answer = json.loads(answer_raw)
    except ValueError:
        answer = {"raw": answer_raw[:500].decode("utf-8", "replace")}
    async with session.get(f"{upstream}/_last") as r:
        seen = await r.json()
    return Transfer(path, seconds, length, status, status == 200, ""), {"answer": answer, "upstream": seen}


async def download(session: aiohttp.ClientSession, path: str, url: str, key: str, expected: int) -> Transfer:
    """GET the content, streaming and discarding; check length and the first bytes of the pattern."""
    started = time.perf_counter()
    received, first = 0, b""
    async with session.get(url, headers={"Authorization": f"Bearer {key}"}) as r:
        status = r.status
        async for chunk in r.content.iter_chunked(CHUNK):
            if not first:
                first = bytes(chunk[:256])
            received += len(chunk)
    seconds = time.perf_counter() - started
    ok = status == 200 and received == expected and first == _PATTERN[: len(first)]
    detail = f"HTTP {status}, {received} of {expected} bytes" + ("" if ok else " (wrong bytes or length)")
    return Transfer(path, seconds, received, status, ok, detail)


def rss_figures(sampler: RssSampler) -> dict[str, float]:
    return {
        "baseline_mib": sum(sampler.baseline.values()) / MiB,
        "peak_mib": sampler.peak / MiB,
        "growth_mib": sampler.growth / MiB,
        "processes": len(sampler.pids),
        "samples": sampler.samples,
    }


# The benchmark.


async def bench(size: int, upstream: Child, gateway: Child, checks: list[tuple[bool, str]]) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    up = f"http://127.0.0.1:{upstream.port}"
    gw = f"http://127.0.0.1:{gateway.port}"
    gpid = gateway.process.pid
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    connector = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False) as session:
        await wait_ready(session, upstream, f"{up}/_last")
        await wait_ready(session, gateway, f"{gw}/healthz")
        started_rss = proc_status(gpid)["VmRSS"]

        # Warm the gateway up (imports, upstream session, SQLite) so the baseline is steady.
        small = MultipartBody(16 * 1024, seed=2)
        warm, _ = await upload(session, "gateway", f"{gw}/v1/videos", GATEWAY_KEY, small, up)
        if not warm.ok:
            raise RuntimeError(f"warm-up create through the gateway failed: HTTP {warm.status}")
        await asyncio.sleep(0.5)
        warm_rss = proc_status(gpid)["VmRSS"]

        print(f"gateway RSS: {started_rss / MiB:.1f} MiB at start, {warm_rss / MiB:.1f} MiB after warm-up")
        print()

        # Uploads: directly, then through the gateway.
        body = MultipartBody(size)
        print(f"upload: {body.length(PUBLIC_MODEL) / MiB:.1f} MiB multipart create ...", flush=True)
        direct_up, direct_seen = await upload(session, "direct", f"{up}/v1/videos", UPSTREAM_KEY, body, up)
        seen = direct_seen["upstream"]
        direct_up.ok = direct_up.ok and seen.get("sha256") == body.sent_sha256
        direct_up.detail = f"HTTP {direct_up.status}, upstream got {seen.get('bytes')} bytes"
        checks.append(
            (direct_up.ok, f"direct upload: upstream SHA-256 equals the body sent ({direct_up.detail})")
        )

        async with RssSampler(gpid) as sampler:
            gw_up, gw_seen = await upload(session, "gateway", f"{gw}/v1/videos", GATEWAY_KEY, body, up)
        gw_up.rss = rss_figures(sampler)
        seen = gw_seen["upstream"]
        expected_len = body.length(UPSTREAM_MODEL)
        problems = []
        if gw_up.status != 200:
            problems.append(f"gateway answered HTTP {gw_up.status}: {json.dumps(gw_seen['answer'])[:300]}")
        if seen.get("bytes") != expected_len:
            problems.append(f"upstream got {seen.get('bytes')} bytes, expected {expected_len}")
        if seen.get("content_length") not in (None, expected_len):
            problems.append(f"upstream Content-Length {seen.get('content_length')}, expected {expected_len}")
        if seen.get("model") != UPSTREAM_MODEL:
            problems.append(f"upstream saw model {seen.get('model')!r}, expected {UPSTREAM_MODEL!r}")
        if seen.get("sha256") != body.renamed_sha256:
            problems.append(
                f"upstream SHA-256 {str(seen.get('sha256'))[:16]}… != expected {body.renamed_sha256[:16]}…"
            )
        if not seen.get("auth_ok"):
            problems.append("upstream did not get the provider's API key")
        gw_up.ok = not problems
        gw_up.detail = "; ".join(problems) or (
            f"HTTP 200, upstream got {seen.get('bytes')} bytes, model={seen.get('model')}, "
            f"SHA-256 {str(seen.get('sha256'))[:16]}… as expected"
        )
        checks.append(
            (gw_up.ok, f"gateway upload: upstream received the body with model renamed ({gw_up.detail})")
        )

        # Downloads: create a video through the gateway, then fetch its content both ways.
        created, info = await upload(
            session, "gateway", f"{gw}/v1/videos", GATEWAY_KEY, MultipartBody(1024, seed=3), up
        )
        video_id = info["answer"].get("id")
        upstream_id = info["upstream"].get("id")
        if not created.ok or not video_id:
            raise RuntimeError(f"create for the download failed: HTTP {created.status} {info['answer']}")
        print(f"download: {size / MiB:.1f} MiB of content ...", flush=True)
        direct_down = await download(
            session, "direct", f"{up}/v1/videos/{upstream_id}/content", UPSTREAM_KEY, size
        )
        checks.append((direct_down.ok, f"direct download: {direct_down.detail}"))
        await asyncio.sleep(0.5)
        async with RssSampler(gpid) as sampler:
            gw_down = await download(
                session, "gateway", f"{gw}/v1/videos/{video_id}/content", GATEWAY_KEY, size
            )
        gw_down.rss = rss_figures(sampler)
        checks.append((gw_down.ok, f"gateway download: {gw_down.detail}"))

    return {
        "gateway_rss_start_mib": started_rss / MiB,
        "gateway_rss_after_warmup_mib": warm_rss / MiB,
        "upload": {"direct": asdict(direct_up), "gateway": asdict(gw_up)},
        "download": {"direct": asdict(direct_down), "gateway": asdict(gw_down)},
    }


def report(results: dict[str, Any], checks: list[tuple[bool, str]]) -> None:
    print()
    header = (
        f"{'transfer':<10}{'direct MiB/s':>14}{'gateway MiB/s':>15}{'gw/direct':>11}"
        f"{'gw RSS base':>13}{'peak':>9}{'growth':>9}  (MiB)"
    )
    print(header)
    print("-" * len(header))
    for name in ("upload", "download"):
        direct, gw = results[name]["direct"], results[name]["gateway"]
        ratio = gw["mib_per_s"] / direct["mib_per_s"] if direct["mib_per_s"] else 0.0
        results[name]["ratio_gateway_direct"] = ratio
        rss = gw["rss"]
        print(
            f"{name:<10}{direct['mib_per_s']:>14.1f}{gw['mib_per_s']:>15.1f}{ratio:>11.2f}"
            f"{rss['baseline_mib']:>13.1f}{rss['peak_mib']:>9.1f}{rss['growth_mib']:>9.1f}"
        )
    print()
    for name in ("upload", "download"):
        direct, gw = results[name]["direct"], results[name]["gateway"]
        rss = gw["rss"]
        print(
            f"{name}: direct {direct['seconds']:.2f} s, gateway {gw['seconds']:.2f} s for "
            f"{gw['bytes'] / MiB:.1f} MiB; gateway RSS baseline {rss['baseline_mib']:.1f} MiB, peak "
            f"{rss['peak_mib']:.1f} MiB ({rss['processes']} processes, {rss['samples']} samples, "
            "VmRSS and VmHWM)"
        )
    print()
    for name in ("upload", "download"):
        growth = results[name]["gateway"]["rss"]["growth_mib"]
        passed = growth < RSS_LIMIT_MIB
        results[name]["rss_pass"] = passed
        checks.append((passed, f"{name}: gateway peak RSS growth {growth:.1f} MiB < {RSS_LIMIT_MIB} MiB"))
    for passed, line in checks:
        print(f"{'PASS' if passed else 'FAIL'}  {line}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="upload and download size (default 1024)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (config, logs) and print it")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--content-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--retrieve-status", default="completed", help=argparse.SUPPRESS)
    parser.add_argument("--latency-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve_upstream is not None:
        key = os.environ.get(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
        app = build_upstream(args.content_bytes, key, args.retrieve_status, args.latency_ms)
        web.run_app(app, host="127.0.0.1", port=args.serve_upstream, print=None, access_log=None)
        return 0

    size = args.size_mib * MiB
    if size <= 0:
        parser.error("--size-mib must be positive")

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    workdir = Path(tempfile.mkdtemp(prefix="bench-upload-memory-"))
    children: list[Child] = []
    checks: list[tuple[bool, str]] = []
    try:
        env = {
            **os.environ,
            GATEWAY_KEY_ENV: GATEWAY_KEY,
            UPSTREAM_KEY_ENV: UPSTREAM_KEY,
            "TMPDIR": str(workdir),
            "PYTHONFAULTHANDLER": "1",
        }
        upstream_port, gateway_port = free_port(), free_port()
        children.append(
            spawn(
                "upstream",
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--serve-upstream",
                    str(upstream_port),
                    "--content-bytes",
                    str(size),
                ],
                upstream_port,
                workdir,
                env,
            )
        )
        config = write_gateway_config(workdir, upstream_port, max_upload=2 * size + 64 * MiB)
        children.append(
            spawn(
                "gateway",
                [*gateway_command(), "serve", "--config", str(config), "--port", str(gateway_port)],
                gateway_port,
                workdir,
                env,
            )
        )
        upstream, gateway = children
        print(
            f"video-gateway upload/download memory benchmark: {args.size_mib} MiB, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}"
        )
        print(
            f"upstream pid {upstream.process.pid} on :{upstream.port}, "
            f"gateway pid {gateway.process.pid} on :{gateway.port}"
        )
        results = asyncio.run(bench(size, upstream, gateway, checks))
        report(results, checks)
        passed = all(ok for ok, _ in checks)
        results.update(
            size_mib=args.size_mib,
            cpus=os.cpu_count(),
            python=platform.python_version(),
            aiohttp=aiohttp.__version__,
            rss_limit_mib=RSS_LIMIT_MIB,
            checks=[{"pass": ok, "check": line} for ok, line in checks],
            passed=passed,
            finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"\nresults written to {RESULTS_PATH.relative_to(ROOT)}")
        for child in children:
            if child.process.poll() is not None:
                print(f"warning: {child.name} exited early:\n{child.tail()}", file=sys.stderr)
        return 0 if passed else 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"\nbenchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        for child in children:
            state = "running" if child.process.poll() is None else f"exit status {child.process.returncode}"
            print(f"--- {child.name} ({state}) log, last lines ---\n{child.tail()}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for child in reversed(children):
            with contextlib.suppress(Exception):
                stop(child)
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
