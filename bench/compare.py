"""How does the gateway compare with calling the upstream directly, with nginx, and with LiteLLM?

One command starts, on 127.0.0.1, a fast OpenAI-Videos upstream (the one in ``upload_memory.py``,
answering at once, or for a job created so, after a fixed latency), the gateway in front of it, nginx
as a plain reverse proxy (Debian package, installed if missing), and LiteLLM's proxy
(``litellm[proxy]`` from PyPI, installed into ``bench/.litellm-venv`` on first use), all routed to
the same upstream. It measures each path in the same run, rounds interleaved in a
fresh random order so machine drift hits all alike:

- poll path ``GET /v1/videos/{id}`` (the upstream keeps answering ``in_progress``, so every proxy
  forwards every poll): saturation throughput (wrk, closed loop) with the CPU time each poll cost
  the process answering wrk (the proxy; for direct, the upstream), and latency at fixed arrival rates
  (an open-loop asyncio driver that schedules each request on the clock and measures from the
  scheduled time, so queueing delay is not hidden); the added latency is the target's minus direct.
  Measured twice: for a job the upstream answers at once (what the proxy itself costs), and for one
  it answers after ``--latency-ms`` (a provider's own time, as in production: rows ``poll+N ms``);
- create with a small multipart body: latency p50/p99 at a fixed rate;
- a SIZE ``input_reference`` upload and a SIZE content download: throughput and peak RSS growth of
  each proxy process (for the gateway with workers, of the worker that grew most).

It prints one table with each figure for direct, gateway, nginx and LiteLLM and the ratios
gateway/direct, gateway/nginx and gateway/LiteLLM, and writes ``bench/results/compare.json``.

    .venv/bin/python bench/compare.py                      # full run (1 GiB transfers)
    .venv/bin/python bench/compare.py --quick              # short rounds, 64 MiB transfers
    .venv/bin/python bench/compare.py --skip-litellm       # no LiteLLM install
    .venv/bin/python bench/compare.py --workers auto       # one gateway worker per core (default: 1)

A path that cannot be measured (e.g. LiteLLM does not serve an endpoint) shows ``n/a`` and the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.cli import loop_factory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upload_memory import (
    GATEWAY_KEY,
    GATEWAY_KEY_ENV,
    UPSTREAM_KEY,
    UPSTREAM_KEY_ENV,
    Child,
    MiB,
    MultipartBody,
    RssSampler,
    free_port,
    gateway_command,
    process_tree,
    spawn,
    stop,
    wait_ready,
    write_gateway_config,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "compare.json"
LITELLM_VENV = ROOT / "bench" / ".litellm-venv"
LITELLM_KEY = "sk-bench-litellm-master"
POLL = "poll"  # the label of polls the upstream answers at once; "poll+N ms" for those it takes N ms


@dataclass
class Target:
    name: str
    base: str
    key: str
    process: Child | None = None
    video_ids: dict[str, str] = field(default_factory=dict)  # poll label -> a video of that kind
    serving: Child | None = None  # whose CPU a poll is charged to: the proxy, or for direct the upstream
    problems: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ensure_tool(binary: str, package: str) -> str | None:
    found = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if found:
        return found
    print(f"installing {package} (Debian) ...", flush=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)


def tool_versions(litellm: bool) -> dict[str, object]:
    """What ran: the machine's cores and each contender's version."""
    from importlib.metadata import version

    def first_line(argv: list[str]) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "?"

    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    versions: dict[str, object] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "gateway": version("video-gateway"),
        "aiohttp": aiohttp.__version__,
        "uvloop": version("uvloop"),
        "nginx": first_line([nginx, "-v"]).rpartition("/")[2] if Path(nginx).exists() else "n/a",
        "wrk": first_line(["wrk", "-v"]).split(" ")[1] if shutil.which("wrk") else "n/a",
    }
    if litellm and (LITELLM_VENV / "bin" / "python").exists():
        versions["litellm"] = first_line(
            [
                str(LITELLM_VENV / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ]
        )
    return versions


def start_nginx(workdir: Path, upstream_port: int, port: int, env: dict[str, str]) -> Child | None:
    nginx = ensure_tool("nginx", "nginx")
    if nginx is None:
        return None
    conf = workdir / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    upstream videos {{ server 127.0.0.1:{upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://videos;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {UPSTREAM_KEY}";
            proxy_request_buffering off;
            proxy_buffering off;
        }}
    }}
}}
""")
    return spawn("nginx", [nginx, "-c", str(conf), "-g", "daemon off;"], port, workdir, env)


def start_litellm(workdir: Path, upstream_port: int, port: int, env: dict[str, str]) -> Child | None:
    python = LITELLM_VENV / "bin" / "python"
    if not (LITELLM_VENV / "bin" / "litellm").exists():
        print("installing litellm[proxy] into bench/.litellm-venv (first run only) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", "litellm[proxy]"], check=False)
        if done.returncode != 0:
            return None
    conf = workdir / "litellm.yaml"
    conf.write_text(f"""
model_list:
  - model_name: sora-2
    litellm_params:
      model: openai/upstream-model
      api_base: http://127.0.0.1:{upstream_port}/v1
      api_key: {UPSTREAM_KEY}
general_settings:
  master_key: {LITELLM_KEY}
litellm_settings:
  set_verbose: false
""")
    return spawn(
        "litellm",
        [
            str(LITELLM_VENV / "bin" / "litellm"),
            "--config",
            str(conf),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--num_workers",
            "1",
        ],
        port,
        workdir,
        {**env, "LITELLM_LOG": "ERROR"},
    )


async def create_video(session: aiohttp.ClientSession, target: Target, prompt: str = "bench") -> str | None:
    form = aiohttp.FormData(default_to_multipart=True)
    for name, value in (("prompt", prompt), ("model", "sora-2"), ("seconds", "4"), ("size", "1280x720")):
        form.add_field(name, value)
    try:
        async with session.post(f"{target.base}/v1/videos", data=form, headers=target.headers) as response:
            body = await response.text()
            if response.status != 200:
                target.problems.append(f"create answered {response.status}: {body[:200]}")
                return None
            return str(json.loads(body)["id"])
    except (aiohttp.ClientError, ValueError, KeyError) as exc:
        target.problems.append(f"create failed: {exc!r}")
        return None


async def fixed_rate(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    rate: float,
    seconds: float,
    body: Any = None,
) -> dict[str, Any]:
    """Open-loop load: request i is due at t0 + i/rate; latency counts from when it was due."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter() + 0.05

    async def one(due: float) -> None:
        nonlocal errors
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        try:
            data = body() if callable(body) else body
            async with session.request(method, url, headers=headers, data=data) as response:
                await response.read()
                if response.status != 200:
                    errors += 1
                    return
        except aiohttp.ClientError:
            errors += 1
            return
        latencies.append((time.perf_counter() - due) * 1000)

    await asyncio.gather(*(one(start + i / rate) for i in range(int(rate * seconds))))
    return {
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "errors": errors,
        "count": len(latencies),
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU time that ``pid`` and its descendants (a gateway's workers) have used."""
    ticks = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{member}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()  # from field 3 on: utime and stime are 14, 15
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def saturation(
    wrk: str | None, url: str, headers: dict[str, str], seconds: float, serving: Child | None
) -> dict[str, Any]:
    if wrk is None:
        return {"rps": float("nan"), "note": "wrk missing"}
    argv = [wrk, "-t1", "-c32", f"-d{max(1, int(seconds))}s"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    pid = serving.process.pid if serving else None
    cpu_before = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run([*argv, url], capture_output=True, text=True, check=False).stdout
    cpu = cpu_seconds(pid) - cpu_before if pid else float("nan")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    done = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": float(rps.group(1)) if rps else float("nan"),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "cpu_us_per_request": cpu / int(done.group(1)) * 1e6 if done and int(done.group(1)) else float("nan"),
    }


async def transfer(session: aiohttp.ClientSession, target: Target, size: int) -> dict[str, Any]:
    """A SIZE upload and a SIZE download through ``target``, with its peak RSS growth."""
    out: dict[str, Any] = {}
    pid = target.process.process.pid if target.process else None
    for kind in ("upload", "download"):
        async with contextlib.AsyncExitStack() as stack:
            sampler = await stack.enter_async_context(RssSampler(pid)) if pid else None
            started = time.perf_counter()
            ok = await _move(session, target, kind, size)
            seconds = time.perf_counter() - started
        out[kind] = {
            "mib_s": size / MiB / seconds if ok else float("nan"),
            "rss_growth_mib": sampler.growth / MiB if sampler else float("nan"),
            "ok": ok,
        }
    return out


async def _move(session: aiohttp.ClientSession, target: Target, kind: str, size: int) -> bool:
    try:
        if kind == "upload":
            body = MultipartBody(size)
            headers = {
                **target.headers,
                "Content-Type": body.content_type,
                "Content-Length": str(body.length("sora-2")),
            }
            async with session.post(
                f"{target.base}/v1/videos", data=body.stream("sora-2", "upstream-model"), headers=headers
            ) as r:
                await r.read()
                return r.status == 200
        async with session.get(
            f"{target.base}/v1/videos/{target.video_ids[POLL]}/content", headers=target.headers
        ) as r:
            got = 0
            async for chunk in r.content.iter_chunked(256 * 1024):
                got += len(chunk)
            return r.status == 200 and got == size
    except aiohttp.ClientError as exc:
        target.problems.append(f"{kind}: {exc!r}")
        return False


async def run(args: argparse.Namespace, targets: list[Target], wrk: str | None) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=256)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    results: dict[str, Any] = {
        t.name: {"saturation": {}, "poll": {}, "create": [], "problems": t.problems} for t in targets
    }
    kinds = {POLL: "bench"}  # poll label -> the prompt that makes such a job upstream
    if args.latency_ms:
        kinds[f"{POLL}+{args.latency_ms} ms"] = f"latency {args.latency_ms} ms"
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        for target in targets:
            for label, prompt in kinds.items():
                video_id = await create_video(session, target, prompt)
                if video_id is not None:
                    target.video_ids[label] = video_id
        live = [t for t in targets if len(t.video_ids) == len(kinds)]
        for round_no in range(args.rounds):
            order = random.sample(live, len(live))
            print(f"round {round_no + 1}/{args.rounds}: {', '.join(t.name for t in order)}", flush=True)
            for target in order:
                for label, video_id in target.video_ids.items():
                    url = f"{target.base}/v1/videos/{video_id}"
                    results[target.name]["saturation"].setdefault(label, []).append(
                        await asyncio.to_thread(
                            saturation, wrk, url, target.headers, args.seconds, target.serving
                        )
                    )
                    for rate in args.rates:
                        results[target.name]["poll"].setdefault(label, {}).setdefault(str(rate), []).append(
                            await fixed_rate(session, "GET", url, target.headers, rate, args.seconds)
                        )
                form = MultipartBody(1024)
                results[target.name]["create"].append(
                    await fixed_rate(
                        session,
                        "POST",
                        f"{target.base}/v1/videos",
                        {**target.headers, "Content-Type": form.content_type},
                        20,
                        args.seconds,
                        body=lambda form=form: form.stream("sora-2", "upstream-model"),
                    )
                )
        upstream = targets[0].base
        async with session.post(f"{upstream}/_retrieve_status/completed") as response:
            await response.read()
        for target in live:
            if target.name == "litellm" and args.skip_litellm_transfers:
                continue
            print(f"transfers through {target.name} ...", flush=True)
            results[target.name]["transfer"] = await transfer(session, target, args.size_mib * MiB)
    return results


def summarise(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        row: dict[str, float] = {}
        for label, rounds in r["saturation"].items():
            row[f"{label} saturation req/s"] = statistics.median([x["rps"] for x in rounds])
            cpu = [x.get("cpu_us_per_request", float("nan")) for x in rounds]
            row[f"{label} CPU us/req @saturation"] = statistics.median(cpu)
            bad = sum(x.get("non_2xx", 0) for x in rounds)
            if bad:
                r["problems"].append(f"{label}: {bad} non-2xx answers under saturation load")
        for label, by_rate in r["poll"].items():
            for rate, rounds in by_rate.items():
                row[f"{label} p50 ms @{rate}/s"] = statistics.median([x["p50_ms"] for x in rounds])
                row[f"{label} p99 ms @{rate}/s"] = statistics.median([x["p99_ms"] for x in rounds])
        if r["create"]:
            row["create p50 ms @20/s"] = statistics.median([x["p50_ms"] for x in r["create"]])
            row["create p99 ms @20/s"] = statistics.median([x["p99_ms"] for x in r["create"]])
        for kind, figures in r.get("transfer", {}).items():
            row[f"{kind} MiB/s"] = figures["mib_s"]
            row[f"{kind} RSS growth MiB"] = figures["rss_growth_mib"]
        rows[name] = row
    return rows


def table(rows: dict[str, dict[str, float]]) -> str:
    names = ["direct", "gateway", "nginx", "litellm"]
    metrics = list(dict.fromkeys(k for row in rows.values() for k in row))
    head = (
        f"{'figure':36}"
        + "".join(f"{n:>11}" for n in names)
        + f"{'gw/direct':>11}{'gw/nginx':>10}{'gw/litellm':>11}"
    )
    lines = [head, "-" * len(head)]

    def cell(name: str, metric: str) -> float:
        return rows.get(name, {}).get(metric, float("nan"))

    for metric in metrics:
        values = "".join(f"{cell(n, metric):>11.2f}" for n in names)
        ratios = "".join(
            f"{cell('gateway', metric) / d if d and d == d else float('nan'):>{w}.2f}"
            for d, w in (
                (cell("direct", metric), 11),
                (cell("nginx", metric), 10),
                (cell("litellm", metric), 11),
            )
        )
        lines.append(f"{metric:36}{values}{ratios}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[100, 300], help="fixed arrival rates (req/s)"
    )
    parser.add_argument(
        "--latency-ms",
        type=int,
        default=20,
        help="the upstream's own time to answer a poll, for the second set of poll figures (0: none)",
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="upload and download size")
    parser.add_argument(
        "--workers",
        default="1",
        help="gateway worker processes (default 1, as nginx runs here: on a small machine shared with "
        "the upstream and the load generator, a second worker only adds contention; auto: one per core)",
    )
    parser.add_argument("--skip-litellm", action="store_true")
    parser.add_argument("--skip-litellm-transfers", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s, 64 MiB transfers")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.size_mib = 1, 2.0, 64

    workdir = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    env = {**os.environ, GATEWAY_KEY_ENV: GATEWAY_KEY, UPSTREAM_KEY_ENV: UPSTREAM_KEY, "TMPDIR": str(workdir)}
    children: list[Child] = []
    try:
        size = args.size_mib * MiB
        up_port = free_port()
        upstream = spawn(
            "upstream",
            [
                sys.executable,
                str(ROOT / "bench" / "upload_memory.py"),
                "--serve-upstream",
                str(up_port),
                "--content-bytes",
                str(size),
                "--retrieve-status",
                "in_progress",
            ],
            up_port,
            workdir,
            env,
        )
        children.append(upstream)
        targets = [Target("direct", f"http://127.0.0.1:{up_port}", UPSTREAM_KEY, serving=upstream)]
        gw_port = free_port()
        config = write_gateway_config(workdir, up_port, max_upload=2 * size + 64 * MiB)
        gateway = spawn(
            "gateway",
            [
                *gateway_command(),
                "serve",
                "--config",
                str(config),
                "--port",
                str(gw_port),
                "--workers",
                str(args.workers),
            ],
            gw_port,
            workdir,
            env,
        )
        children.append(gateway)
        targets.append(
            Target("gateway", f"http://127.0.0.1:{gw_port}", GATEWAY_KEY, gateway, serving=gateway)
        )
        nginx_port = free_port()
        nginx = start_nginx(workdir, up_port, nginx_port, env)
        if nginx is not None:
            children.append(nginx)
            targets.append(Target("nginx", f"http://127.0.0.1:{nginx_port}", "unused", nginx, serving=nginx))
        if not args.skip_litellm:
            litellm_port = free_port()
            litellm = start_litellm(workdir, up_port, litellm_port, env)
            if litellm is not None:
                children.append(litellm)
                targets.append(
                    Target(
                        "litellm", f"http://127.0.0.1:{litellm_port}", LITELLM_KEY, litellm, serving=litellm
                    )
                )
        wrk = ensure_tool("wrk", "wrk")

        async def ready() -> None:
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, upstream, f"http://127.0.0.1:{up_port}/_last")
                await wait_ready(session, gateway, f"http://127.0.0.1:{gw_port}/healthz")
                for t in targets[2:]:
                    probe = "/health/liveliness" if t.name == "litellm" else "/_last"
                    assert t.process is not None
                    await wait_ready(session, t.process, t.base + probe, timeout=120)

        with asyncio.Runner(loop_factory=loop_factory()) as runner:  # a lighter load generator
            runner.run(ready())
            results = runner.run(run(args, targets, wrk))
        rows = summarise(results)
        versions = tool_versions(nginx is not None and not args.skip_litellm)
        print(
            f"\n{os.cpu_count()} CPUs, " + ", ".join(f"{k} {v}" for k, v in versions.items() if k != "cpus")
        )
        print(
            f"gateway workers {args.workers}, "
            f"poll latency 0{f' and {args.latency_ms}' if args.latency_ms else ''} ms, "
            f"{args.rounds} rounds of {args.seconds} s, "
            f"{args.size_mib} MiB transfers\n"
        )
        print(table(rows))
        for name, r in results.items():
            for problem in r["problems"]:
                print(f"n/a {name}: {problem}")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            json.dumps(
                {"versions": versions, "args": vars(args), "summary": rows, "raw": results},
                indent=2,
                default=str,
            )
            + "\n"
        )
        print(f"\nresults written to {RESULTS.relative_to(ROOT)}")
        return 0
    finally:
        for child in reversed(children):
            with contextlib.suppress(Exception):
                stop(child)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
