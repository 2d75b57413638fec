"""Several worker processes on one port, and the supervisor that keeps them running.

Each worker is a whole gateway (its own event loop, connection pools and task cache) listening on
the same port with SO_REUSEPORT, so the kernel spreads connections across them. What the workers
must agree on lives where all of them see it: videos and per-key limits in the task store, deletes
in the store's delete epoch, metrics in prometheus_client's multiprocess files (one scrape of any
worker reports the whole gateway), and the key that signs hosted-file URLs, chosen here when the
config names none. Outlier ejection and bulkheads are each worker's own (bulkheads
hold a share of the cap each).

The supervisor forwards SIGTERM and SIGINT (drain, then exit) and SIGHUP (reload) to every
worker, and replaces a worker that dies. Workers are fresh interpreters, not forks: each imports
prometheus_client after the multiprocess directory is named, and inherits no state but the config
file's path and the listen address. A worker that cannot start (a port in use, an unusable data
dir: it logs why and exits with :data:`WORKER_COULD_NOT_START`) stops the whole gateway with exit
status 1 at once, and one that keeps dying at start-up for other reasons does so after a few tries
instead of restarting forever.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.logs import log

if TYPE_CHECKING:
    from gateway.config import GatewayConfig, ProviderConfig

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_ENV = "VIDEO_GATEWAY_WORKER"
SIGNING_KEY_ENV = "VIDEO_GATEWAY_WORKER_SIGNING_KEY"
WORKER_CONFIG_ENV = "VIDEO_GATEWAY_WORKER_CONFIG"  # the supervisor's copy a worker starts from
STARTED_CONFIG_ENV = "VIDEO_GATEWAY_WORKER_STARTED_CONFIG"  # the config the gateway started with
# A worker's exit status when it logged a start-up failure a restart cannot fix.
WORKER_COULD_NOT_START = 3
_QUICK_DEATH_SECONDS = 5.0
_MAX_QUICK_DEATHS = 5


def workers_count(setting: int | str) -> int:
    """``server.workers``: a number, or ``auto`` for one per CPU this process may use: the cores it
    may run on, fewer when a cgroup CPU quota (a container's ``--cpus``, a pod's CPU limit) allows
    less."""
    if setting != "auto":
        return max(1, int(setting))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    # Rounded down, as Go's automaxprocs does: a worker beyond the quota only gets throttled.
    return max(1, min(cores, int(quota)) if quota is not None else cores)


def cgroup_cpu_quota(
    root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")
) -> float | None:
    """CPUs' worth of time per period this process's cgroup may use, or None without a quota.

    cgroup v2 keeps it in ``cpu.max`` ("200000 100000", or "max 100000" for none), v1 in
    ``cpu.cfs_quota_us`` (-1 for none) and ``cpu.cfs_period_us``. The cgroup's own directory is
    tried first, then the mount's root (a container sees only its own cgroup there).
    """
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, relative = parts[1], parts[2].lstrip("/")
        if controllers == "":
            for directory in (root / relative, root):
                fields = _read(directory / "cpu.max").split()
                if len(fields) == 2:
                    return _ratio(fields[0], fields[1])
        elif "cpu" in controllers.split(","):
            for directory in (root / "cpu" / relative, root / "cpu"):
                quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
                if quota and period:
                    return _ratio(quota, period)
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _ratio(quota: str, period: str) -> float | None:
    """quota / period; None for no quota ("max" in v2, -1 in v1) or nonsense."""
    try:
        return int(quota) / int(period) if int(period) > 0 and int(quota) > 0 else None
    except ValueError:
        return None


def prepare_metrics() -> Path:
    """A fresh multiprocess directory for the workers' metrics (named in their environment only:
    the supervisor's own metrics, of modules it imports to check a config, are none of them)."""
    return Path(tempfile.mkdtemp(prefix="video-gateway-metrics-"))


def supervise(
    config_path: Path, config_text: str, host: str, port: int, count: int, log_format: str, *, watching: bool
) -> int:
    """Run ``count`` workers until SIGTERM or SIGINT; the exit status of the whole gateway.

    Workers are fresh interpreters (``python -m gateway serve`` with the worker variables set), so
    each imports prometheus_client after the multiprocess directory is named.

    A worker starts from the supervisor's copy of the config (``config_text``, checked), as nginx's
    master hands a new worker the config it holds: a replacement for a worker that died must not
    read a file someone is half-way through editing (a typo there would stop it, and after a few
    tries the whole gateway), nor an edit the others have not been told to load. The copy follows
    the file when a reload is asked for (SIGHUP) and, with ``watching`` (the workers follow the file
    themselves), whenever a replacement starts; each time only if the workers' reload would accept
    the file: a valid config whose adapters can start. What a reload leaves as it was until a restart
    (reload.RESTART_ONLY: the data_dir, the signing key...) a new worker takes from the config the
    gateway started with, kept beside the copy (see :func:`worker_config`).
    """
    metrics_dir = prepare_metrics()
    copy = metrics_dir / "config.yaml"  # a private directory (0700): the text may hold keys
    original = metrics_dir / "started.yaml"  # the text the gateway started with

    def keep(text: str) -> None:
        """Write the copy whole or not at all: a worker starting meanwhile must never read half."""
        partial = copy.with_suffix(".yaml.partial")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, copy)

    keep(config_text)
    original.write_text(config_text, encoding="utf-8")
    env = {
        **os.environ,
        SIGNING_KEY_ENV: secrets.token_hex(32),  # used where the config names none
        WORKER_CONFIG_ENV: str(copy),
        MULTIPROC_ENV: str(metrics_dir),
        STARTED_CONFIG_ENV: str(original),
    }

    def follow_the_file(reason: str) -> None:
        """The file becomes the workers' copy if their reload would accept it (reload.Reloader): a
        valid config whose adapters can start; else the copy stays. A file they refuse would
        otherwise stop the next replacement at start-up, and with it the whole gateway.

        SIGHUP is held meanwhile: its handler runs this too, and a second one arriving in the middle
        of a write moved the first's partial file away, and the supervisor died of the error."""
        from gateway.config import ConfigError, parse_config, read_config
        from gateway.providers import startup_problems

        with _held(signal.SIGHUP):
            try:
                text = read_config(config_path)
                problems = startup_problems(parse_config(text, str(config_path), os.environ))
            except ConfigError as exc:
                problems = exc.problems
            if problems:
                log.warning("supervisor_keeps_config", reason=reason, problems=problems)
                return
            keep(text)

    argv = [
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--config",
        str(config_path),
        "--host",
        host,
        "--port",
        str(port),
        "--log-format",
        log_format,
    ]
    children: dict[int, tuple[int, float]] = {}  # pid -> (slot, started)
    stopping = False
    quick_deaths = 0

    def spawn(slot: int) -> None:
        """Start a worker in ``slot``, unless a stop was asked for: a worker started after the stop
        had signalled the others would never hear of it, and the supervisor would wait for it forever.

        The supervisor's signals are held from the check until the worker is in ``children``; one
        arriving in between is handled as they are let go, and so reaches the new worker too.
        """
        environ = {**env, WORKER_ENV: f"{slot}/{count}/{os.getpid()}"}
        with _held(signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if stopping:
                return
            # SIGHUP blocked until the worker can reload (server.serve unblocks it): one sent while
            # it starts waits for it, rather than ending it as the signal's default action would.
            pid = os.posix_spawn(sys.executable, argv, environ, setsigmask=(signal.SIGHUP,))
            children[pid] = (slot, time.monotonic())

    def back_off(seconds: float) -> None:
        """Wait before replacing a worker that died at start-up, but no longer than until a stop."""
        deadline = time.monotonic() + seconds
        while not stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    def forward(signum: int) -> None:
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log.info("supervisor_stopping", signal=signal.Signals(signum).name, workers=len(children))
        stopping = True
        forward(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}

    def reload(signum: int, _frame: object) -> None:
        follow_the_file("reload")
        forward(signum)

    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, reload)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGHUP,))  # held since the start (cli.serve)
    status = 0
    try:
        log.info("supervisor_started", workers=count, url=f"http://{host}:{port}/v1")
        for slot in range(count):
            spawn(slot)
        while children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            if pid not in children:
                continue
            slot, started = children.pop(pid)
            _forget_worker_metrics(pid, metrics_dir)
            code = os.waitstatus_to_exitcode(wait_status)
            if stopping:
                log.info("worker_stopped", pid=pid, code=code)
                status = status or (1 if code not in (0, -signal.SIGTERM) else 0)
                continue
            if code == WORKER_COULD_NOT_START:  # it logged why; the others would fail alike
                log.info("supervisor_stopping", reason="a worker could not start", workers=len(children))
                status, stopping = 1, True
                forward(signal.SIGTERM)
                continue
            log.error("worker_died", pid=pid, code=code, worker=slot)
            quick_deaths = quick_deaths + 1 if time.monotonic() - started < _QUICK_DEATH_SECONDS else 0
            if quick_deaths >= _MAX_QUICK_DEATHS:
                log.error(
                    "supervisor_giving_up", reason="workers keep dying at start-up", deaths=quick_deaths
                )
                status, stopping = 1, True
                forward(signal.SIGTERM)
                continue
            if quick_deaths:
                back_off(min(5.0, 0.2 * 2**quick_deaths))
            if watching and not stopping:
                follow_the_file("replacing a worker")
            spawn(slot)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("supervisor_stopped", status=status)
    return status


@contextlib.contextmanager
def _held(*signals: signal.Signals) -> Iterator[None]:
    """Block ``signals`` in this thread meanwhile; any that arrive are handled once they are let go."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def worker_slot() -> tuple[int, int] | None:
    """(number, count) when this process is a worker started by :func:`supervise`."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    slot, count, _ = value.split("/")
    return int(slot), int(count)


def worker_config(source: str) -> tuple[GatewayConfig, dict[str, ProviderConfig]]:
    """A worker's config: its supervisor's copy of the one the others run, with what only a restart
    changes as the gateway started with it, as the others keep it through their reloads (a worker
    replaced after a reload that changed ``data_dir`` must not open another task store). And the
    providers the others' reloads removed (:func:`retired_providers`)."""
    from gateway.config import parse_config, read_config
    from gateway.reload import keep_restart_only

    latest, first = (
        parse_config(read_config(os.environ.get(name) or source), source, os.environ)
        for name in (WORKER_CONFIG_ENV, STARTED_CONFIG_ENV)
    )
    config = keep_restart_only(latest, first)
    return config, retired_providers(config, first)


def _loaded_dir() -> Path | None:
    """Where workers keep the configs their reloads took effect with (beside the supervisor's copy,
    in its private directory); None in a process that is no worker."""
    directory = os.environ.get(MULTIPROC_ENV)
    return Path(directory) / "loaded" if directory and worker_slot() is not None else None


def remember_loaded(text: str) -> None:
    """From a worker whose reload took effect: the config it now runs, for :func:`retired_providers`.
    Each text is kept once, named by the time it was first loaded."""
    directory = _loaded_dir()
    if directory is None:
        return
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    directory.mkdir(exist_ok=True)
    if any(directory.glob(f"*-{digest}.yaml")):
        return
    partial = directory / f"{digest}.partial-{os.getpid()}"
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, directory / f"{time.time_ns():020d}-{digest}.yaml")


def retired_providers(current: GatewayConfig, started: GatewayConfig) -> dict[str, ProviderConfig]:
    """For a worker starting beside others: the providers their reloads removed, each as it was last
    loaded (``started``, the config the gateway started with, loaded first). The others keep such a
    provider's adapter for the videos it holds (reload.build_table); a replacement for a worker that
    died must reach them too, or the same download would answer 200 or 503 by the worker that took
    it."""
    from gateway.config import ConfigError, parse_config, read_config

    providers = dict(started.providers)
    directory = _loaded_dir()
    for path in sorted(directory.glob("*.yaml")) if directory is not None else []:  # oldest first
        try:
            providers.update(parse_config(read_config(path), str(path), os.environ).providers)
        except ConfigError:
            continue  # a file being replaced, say; the others still say what they say
    return {name: provider for name, provider in providers.items() if name not in current.providers}


def supervised() -> bool:
    """A worker whose supervisor is still its parent (one left orphaned must stop)."""
    value = os.environ.get(WORKER_ENV)
    return bool(value) and value.rpartition("/")[2] == str(os.getppid())


def take_signing_key() -> bytes | None:
    """The supervisor's signing key for hosted files, removed from the environment once read."""
    value = os.environ.pop(SIGNING_KEY_ENV, None)
    return value.encode() if value else None


def _forget_worker_metrics(pid: int, metrics_dir: Path) -> None:
    """A dead worker's live gauges (in-flight requests...) must not count any more."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))


def leave_orphaned_metrics() -> None:
    """A worker whose supervisor died without cleaning up (SIGKILL, OOM) removes its own metric
    files; the last worker out then removes the directory the supervisor would have removed.

    Each worker deletes its files before it looks, so whatever the order, the one that looks last
    finds only files of processes that are gone (workers replaced earlier), and removes the lot.
    """
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return
    for own in Path(path).glob(f"*_{os.getpid()}.db"):
        own.unlink(missing_ok=True)
    pids = {int(pid) for f in Path(path).glob("*_*.db") if (pid := f.stem.rpartition("_")[2]).isdigit()}
    if not any(process_alive(pid) for pid in pids):
        shutil.rmtree(path, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Running; a zombie (exited, not yet reaped by whoever adopted it) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc here (or it just exited): take it as alive and leave its files


def request_reload() -> bool:
    """From a worker: ask the supervisor to reload every worker. False when not under a supervisor."""
    if not supervised():
        return False
    os.kill(os.getppid(), signal.SIGHUP)
    return True
