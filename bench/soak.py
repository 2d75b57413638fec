"""A bounded soak: minutes of mixed traffic with 20 % injected faults; RSS and open FDs must stay flat.

Starts, on 127.0.0.1, the fault-injecting fake upstream of the test suite and ``video-gateway serve``
in front of it, then runs a steady mix (creates, polls, downloads) where one request in five meets a
fault: a create for a model whose upstream fails (503, 500, reset, hang, non-JSON), a poll or
download of a video whose upstream is flaky, truncates or drips its content, or a client's own
fault on a raw connection (malformed HTTP, a chunked body that breaks off, an HTTP/2.0 request line,
an upload the client abandons halfway). Every few seconds it
samples the gateway's RSS and open file descriptors and prints them; at the end it compares the last
samples with those after warm-up, and counts the answers by status.

    .venv/bin/python bench/soak.py --minutes 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from upload_memory import (
    Child,
    MiB,
    free_port,
    gateway_command,
    proc_status,
    process_tree,
    spawn,
    stop,
    wait_ready,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "soak.json"
KEY = "sk-soak-client-key"
# Public model -> the fake upstream's behaviour for it (tests/fakes/faulty_upstream.py), by name:
# creates for the first kind fail; downloads of videos made with the second do.
CREATE_FAULTS = {
    "f503": "status:503",
    "f500": "status:500",
    "reset": "reset",
    "hang": "hang",
    "html": "nonjson",
}
DOWNLOAD_FAULTS = {"truncate": "truncate", "drip": "drip:0.01"}
MODELS = ["ok", *CREATE_FAULTS, *DOWNLOAD_FAULTS]


def serve_fake(port: int) -> None:
    from aiohttp import web

    from tests.fakes.faulty_upstream import FaultyUpstream

    fake = FaultyUpstream(behaviour={**CREATE_FAULTS, **DOWNLOAD_FAULTS})
    web.run_app(fake.app(), host="127.0.0.1", port=port, print=None, access_log=None)


def sample(pid: int) -> tuple[float, int]:
    """RSS (MiB) and open descriptors of the gateway: the process and its workers, summed."""
    rss, fds = 0.0, 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            rss += proc_status(member)["VmRSS"] / MiB
            fds += len(os.listdir(f"/proc/{member}/fd"))
    return rss, fds


def client_faults(key: str) -> list[bytes]:
    """Requests a broken or hostile client sends, as bytes on the wire (each ends the connection)."""
    auth = f"Authorization: Bearer {key}\r\n".encode()
    chunked = b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n" + auth
    return [
        b"GET /v1/videos HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        chunked + b'Content-Type: application/json\r\n\r\n5\r\n{"pro\r\nzz\r\n',
        b"GET /v1/videos HTTP/2.0\r\nHost: x\r\n" + auth + b"\r\n",
        b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n"
        + auth
        + b"Content-Type: multipart/form-data; boundary=b\r\n\r\n"
        + b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nok\r\n--b\r\n'
        + b'Content-Disposition: form-data; name="input_reference"; filename="x.png"\r\n\r\n'
        + b"\0" * 65536,  # and then the client is gone
    ]


async def client_fault(base: str, raw: bytes) -> str:
    """One raw request; the status the gateway answered, or ``closed`` when the client left first."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        if raw.startswith(b"POST") and b"Content-Length" in raw:  # the abandoned upload
            return "closed"
        return (await asyncio.wait_for(reader.readline(), 15)).split()[1].decode()
    finally:
        writer.close()


async def traffic(base: str, stop_at: float, counts: dict[str, int]) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        videos: dict[bool, list[str]] = {False: [], True: []}  # by whether their downloads fail
        while time.monotonic() < stop_at:
            faulty, roll = random.random() < 0.2, random.random()
            try:
                if faulty and roll >= 0.8:
                    status = await client_fault(base, random.choice(client_faults(KEY)))
                    counts[status] = counts.get(status, 0) + 1
                    continue
                if not videos[faulty] or (roll < 0.5 if faulty else roll < 0.2):
                    if faulty:  # half fail as creates; the other half are downloads that fail
                        model = random.choice(list(CREATE_FAULTS if videos[True] else DOWNLOAD_FAULTS))
                    else:
                        model = "ok"
                    async with session.post(
                        f"{base}/v1/videos", json={"prompt": "soak", "model": model}
                    ) as r:
                        body = await r.read()
                        if r.status == 200:
                            made = videos[model != "ok"]
                            made.append(json.loads(body)["id"])
                            del made[:-200]
                else:
                    path = f"/v1/videos/{random.choice(videos[faulty])}"
                    download = faulty or roll >= 0.8
                    async with session.get(base + path + ("/content" if download else "")) as r:
                        await r.read()
                counts[str(r.status)] = counts.get(str(r.status), 0) + 1
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1


async def soak(base: str, gateway: Child, minutes: float, workers: int, every: float) -> dict[str, object]:
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, gateway, base + "/healthz")
    counts: dict[str, int] = {}
    started = time.monotonic()
    stop_at = started + minutes * 60
    tasks = [asyncio.create_task(traffic(base, stop_at, counts)) for _ in range(workers)]
    samples = []
    print(f"{'t (s)':>6} {'RSS MiB':>9} {'FDs':>5} {'requests':>9}")
    while time.monotonic() < stop_at:
        await asyncio.sleep(every)
        rss, fds = sample(gateway.process.pid)
        samples.append({"t": round(time.monotonic() - started, 1), "rss_mib": round(rss, 1), "fds": fds})
        print(f"{samples[-1]['t']:>6} {rss:>9.1f} {fds:>5} {sum(counts.values()):>9}", flush=True)
    await asyncio.gather(*tasks)
    return {"samples": samples, "answers": counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=16, help="concurrent clients")
    parser.add_argument("--gateway-workers", default="1", help="gateway worker processes (or auto)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--serve-fake", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fake:
        serve_fake(args.serve_fake)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    children: list[Child] = []
    try:
        env = {**os.environ, "SOAK_KEY": KEY, "PYTHONPATH": str(ROOT)}
        fake_port, gw_port = free_port(), free_port()
        children.append(
            spawn("fake", [sys.executable, __file__, "--serve-fake", str(fake_port)], fake_port, workdir, env)
        )
        config = {
            "data_dir": str(workdir / "data"),
            "logging": {"format": "json", "level": "warning"},
            "keys": [{"name": "soak", "key": "${SOAK_KEY}"}],
            "providers": {
                "up": {
                    "kind": "openai",
                    "base_url": f"http://127.0.0.1:{fake_port}/v1",
                    "api_key": "upstream-key",
                    "timeouts": {"connect": 1, "read": 1, "request": 2},
                }
            },
            "models": {name: {"provider": "up", "model": name} for name in MODELS},
        }
        (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
        gateway = spawn(
            "gateway",
            [
                *gateway_command(),
                "serve",
                "--config",
                str(workdir / "gateway.yaml"),
                "--port",
                str(gw_port),
                "--workers",
                args.gateway_workers,
            ],
            gw_port,
            workdir,
            env,
        )
        children.append(gateway)
        result = asyncio.run(
            soak(f"http://127.0.0.1:{gw_port}", gateway, args.minutes, args.workers, args.every)
        )
        samples = result["samples"]
        assert isinstance(samples, list) and len(samples) >= 4, "soak too short to judge"
        warm, last = samples[len(samples) // 4], samples[-1]
        rss_growth = last["rss_mib"] - warm["rss_mib"]
        fd_growth = last["fds"] - warm["fds"]
        flat = rss_growth < 16 and fd_growth <= 8
        print(f"\nanswers: {result['answers']}")
        print(
            f"after warm-up: RSS {warm['rss_mib']} -> {last['rss_mib']} MiB ({rss_growth:+.1f}), "
            f"FDs {warm['fds']} -> {last['fds']} ({fd_growth:+d}): {'FLAT' if flat else 'GROWING'}"
        )
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({**result, "flat": flat, "minutes": args.minutes}, indent=2) + "\n")
        return 0 if flat else 1
    finally:
        for child in reversed(children):
            with contextlib.suppress(Exception):
                stop(child)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
