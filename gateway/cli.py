"""``video-gateway``: serve, simulate, check-config (also ``python -m gateway``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from gateway import __version__
from gateway.config import (
    DEFAULT_CONFIG_PATH,
    EMBEDDED_CONFIG_PATH,
    ConfigError,
    ProviderConfig,
    load_config,
    parse_config,
    read_config,
)
from gateway.logs import configure, log
from gateway.workers import (
    WORKER_COULD_NOT_START,
    supervise,
    take_signing_key,
    worker_config,
    worker_slot,
    workers_count,
)


def _default_config() -> Path:
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else EMBEDDED_CONFIG_PATH


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed: the same asyncio, a faster event loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def serve(args: argparse.Namespace) -> int:
    """``video-gateway serve``. A SIGHUP (a reload systemd's ExecReload asks for, say) that came while
    the gateway starts would end it: it is held until the gateway can reload (``server.serve``, or
    the supervisor), which then reloads."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGHUP,))
    try:
        return _serve(args)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _serve(args: argparse.Namespace) -> int:
    path = Path(args.config) if args.config else _default_config()
    worker = worker_slot()
    retired: dict[str, ProviderConfig] = {}  # a worker's: providers the others' reloads removed
    try:
        if worker is None:
            text = read_config(path)
            config = parse_config(text, str(path), os.environ)
        else:  # from its supervisor's copies of the config, not the file (see supervise)
            config, retired = worker_config(str(path))
    except ConfigError as exc:
        print(f"video-gateway: {path} is not a valid config:", file=sys.stderr)
        print("\n".join(f"  {p}" for p in exc.problems), file=sys.stderr)
        return 1
    log_format = args.log_format or config.log_format
    configure(log_format, config.log_level)
    open_files = _raise_open_files_limit()
    host = args.host or config.host
    port = args.port if args.port is not None else config.port
    workers = worker[1] if worker else workers_count(args.workers or config.workers)
    if workers > 1 and worker is None:
        log.info("serving", config=str(path), version=__version__, workers=workers, open_files=open_files)
        return supervise(path, text, host, port, workers, log_format, watching=config.watch_config)
    if worker is None:
        log.info("serving", config=str(path), version=__version__, open_files=open_files)
    from gateway.server import StartupError
    from gateway.server import serve as run

    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            signing_key = take_signing_key()
            runner.run(
                run(config, path, host, port, workers=workers, signing_key=signing_key, retired=retired)
            )
    except StartupError as exc:
        log.error("startup_failed", reason=str(exc))
        return WORKER_COULD_NOT_START if worker else 1
    return 0


def _raise_open_files_limit() -> int | None:
    """Raise the soft limit on open files to the hard one, as Go's runtime and nginx's
    ``worker_rlimit_nofile`` do; the limit in force after (None where there is none to read).

    A proxied request holds two descriptors (its client's and its provider's), an upload's spool
    a third. The soft limit systemd and recent container runtimes give a service, 1024, runs out at
    a few hundred requests in flight, and then the gateway stops accepting connections.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return None if soft == resource.RLIM_INFINITY else soft


def _workers_arg(value: str) -> int | str:
    if value == "auto":
        return value
    if not _ascii_digits(value) or int(value) < 1:
        raise argparse.ArgumentTypeError("a number of processes (1 or more) or 'auto'")
    return int(value)


def _port_arg(value: str) -> int:
    if not _ascii_digits(value) or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError("a TCP port, 1 to 65535")
    return int(value)


def _ascii_digits(value: str) -> bool:
    """str.isdigit() alone takes "²", which int() refuses."""
    return value.isascii() and value.isdigit() and len(value) <= 9


def _seconds_arg(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError("a number of seconds, 0 or more")
    return seconds


def simulate(args: argparse.Namespace) -> int:
    from aiohttp import web

    from gateway.simulator import build_simulator

    configure(args.log_format or "console", "info")
    root = Path(args.data_dir)
    app = build_simulator(
        root,
        api_key=args.api_key or os.environ.get("SIMULATOR_API_KEY"),
        queue_seconds=args.queue_seconds,
        run_seconds=args.run_seconds,
    )
    log.info("simulating", url=f"http://{args.host}:{args.port}/v1", data_dir=str(root))
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
    return 0


def healthcheck(args: argparse.Namespace) -> int:
    """Exit 0 when the gateway this config describes answers ``/healthz``: a container's health
    check, which follows ``server.host`` and ``server.port`` (or ``--host`` and ``--port``, as
    ``serve`` takes them) and never goes through the environment's HTTP proxy. Light: the config
    alone is read, every few seconds."""
    import urllib.request

    path = Path(args.config) if args.config else _default_config()
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"video-gateway healthcheck: {path} is not a valid config: {exc.problems[0]}", file=sys.stderr)
        return 1
    host = args.host or config.host
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # every interface: this one will do
    port = args.port if args.port is not None else config.port
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/healthz"
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with no_proxy.open(url, timeout=args.timeout) as response:
            return 0 if response.status == 200 else 1
    except (OSError, ValueError) as exc:
        print(f"video-gateway healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


def check_config(args: argparse.Namespace) -> int:
    if (args.path is None) == (args.config is None):
        print("video-gateway check-config: give the config file, as PATH or --config PATH", file=sys.stderr)
        return 2
    args.path = args.path or args.config
    from gateway.providers import startup_problems

    try:
        config = load_config(args.path)
        # what serve would meet starting the adapters
        problems = [f"{args.path}: {problem}" for problem in startup_problems(config)]
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        print(f"{args.path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    deployments = sum(len(d) for d in config.models.values())
    print(
        f"{args.path}: OK ({len(config.providers)} providers, {len(config.models)} models, "
        f"{deployments} deployments, {len(config.keys)} keys)"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="video-gateway", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("serve", help="run the gateway")
    p.add_argument("--config", help=f"config file (default {DEFAULT_CONFIG_PATH}, else the embedded default)")
    p.add_argument("--host")
    p.add_argument("--port", type=_port_arg)
    p.add_argument(
        "--workers", type=_workers_arg, help="worker processes sharing the port (default: server.workers)"
    )
    p.add_argument("--log-format", choices=["json", "console"])
    p.set_defaults(run=serve)

    p = commands.add_parser("simulate", help="run the local provider as an OpenAI-dialect upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port_arg, default=8090)
    data_dir = os.environ.get("VIDEO_GATEWAY_DATA_DIR") or ".video-gateway"
    p.add_argument(
        "--data-dir", default=f"{data_dir}/simulator", help="default: $VIDEO_GATEWAY_DATA_DIR/simulator"
    )
    p.add_argument("--api-key", help="require this bearer key (default: $SIMULATOR_API_KEY, else none)")
    p.add_argument("--queue-seconds", type=_seconds_arg, default=1.0)
    p.add_argument("--run-seconds", type=_seconds_arg, default=3.0)
    p.add_argument("--log-format", choices=["json", "console"])
    p.set_defaults(run=simulate)

    p = commands.add_parser("healthcheck", help="exit 0 when the gateway of this config answers /healthz")
    p.add_argument("--config", help="the config the gateway serves (as serve finds it)")
    p.add_argument("--host")
    p.add_argument("--port", type=_port_arg)
    p.add_argument("--timeout", type=_seconds_arg, default=4.0)
    p.set_defaults(run=healthcheck)

    p = commands.add_parser("check-config", help="validate a config file; exit 1 if it has problems")
    p.add_argument("path", nargs="?", help="the config file")
    p.add_argument("--config", help="the same, spelt as serve spells it")
    p.set_defaults(run=check_config)

    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code
