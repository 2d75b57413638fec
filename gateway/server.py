"""Running the gateway as a process: signals, graceful drain, and slow-client protection.

SIGTERM or SIGINT: ``/readyz`` answers 503 at once; after ``drain_delay_seconds`` the listener stops
accepting; requests in flight get up to ``drain_seconds`` to finish; then the process exits.
SIGHUP: reload the config. A worker (one of several processes on the port) also stops when its
supervisor is gone. A connection that has not finished sending its request headers within
``limits.header_timeout`` is closed (aiohttp itself has no such timeout; bodies are guarded by
``limits.client_idle_timeout`` in the body reader). Drain times and the header timeout are read from
the current config, so a reload changes them. What stops the gateway from starting (the address
cannot be listened on, the store or data dir cannot be opened) is a :class:`StartupError`.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from aiohttp import web

from gateway.app import RELOADER, build_app
from gateway.config import ConfigError, GatewayConfig, ProviderConfig
from gateway.connections import GatewayRunner
from gateway.logs import log
from gateway.state import GATEWAY
from gateway.store import StoreUnavailable
from gateway.workers import leave_orphaned_metrics, supervised


async def serve(
    config: GatewayConfig,
    config_path: Path | None,
    host: str,
    port: int,
    *,
    workers: int = 1,
    signing_key: bytes | None = None,
    retired: Mapping[str, ProviderConfig] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT. ``workers`` > 1: this is one of several processes on the port,
    ``retired`` the providers its siblings' reloads removed (see ``build_app``)."""
    app = build_app(
        config, config_path=config_path, workers=workers, signing_key=signing_key, retired=retired
    )
    runner = GatewayRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    site = await _start(runner, config, host, port, reuse_port=workers > 1)
    log.info("listening", url=f"http://{host}:{port}/v1")

    gw = app[GATEWAY]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(app[RELOADER].reload("SIGHUP")))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGHUP,))  # a worker's, held since its start
    watchdog = loop.create_task(_close_slow_headers(runner, lambda: gw.table.config.limits.header_timeout))
    orphan_check = loop.create_task(_stop_when_orphaned(stop)) if workers > 1 else None
    try:
        await stop.wait()
        gw.draining = True
        current = gw.table.config
        log.info(
            "draining",
            delay_seconds=current.drain_delay_seconds,
            drain_seconds=current.drain_seconds,
            in_flight=gw.in_flight,
        )
        await asyncio.sleep(current.drain_delay_seconds)
        await site.stop()
        started = time.monotonic()
        # aiohttp's own shutdown stops reading request bodies at once, which would cut off uploads in
        # flight: wait for them here first, and let runner.cleanup() only sweep what is left. Creates
        # whose client left are waited for too: they are recording what their provider started.
        while (gw.in_flight or gw.left_by_client) and time.monotonic() - started < current.drain_seconds:
            await asyncio.sleep(0.05)
        log.info(
            "drained",
            seconds=round(time.monotonic() - started, 3),
            abandoned=gw.in_flight + len(gw.left_by_client),
        )
        if gw.in_flight:
            # Creates and deletes still waiting on their provider answer their clients (api.shielded)
            # before aiohttp's shutdown drops what is left.
            gw.drain_over.set()
            answering = time.monotonic()
            while gw.in_flight and time.monotonic() - answering < _ANSWER_SECONDS:
                await asyncio.sleep(0.02)
    finally:
        watchdog.cancel()
        orphaned = orphan_check is not None and orphan_check.done() and not orphan_check.cancelled()
        if orphan_check is not None:
            orphan_check.cancel()
        await runner.cleanup()
        if orphaned:
            leave_orphaned_metrics()
        log.info("stopped")


# How long the requests still open when the drain's time is up have to write their answers.
_ANSWER_SECONDS = 0.5


class StartupError(Exception):
    """The gateway cannot start; the message says what failed, for one log line."""


async def _start(
    runner: web.AppRunner, config: GatewayConfig, host: str, port: int, *, reuse_port: bool
) -> web.TCPSite:
    """Open the store and adapters, then listen; failures the operator must fix are StartupErrors."""
    try:
        await runner.setup()
    except ConfigError as exc:  # an adapter that cannot start, e.g. an unreadable credential file
        raise StartupError("; ".join(exc.problems)) from None
    except (OSError, sqlite3.Error, StoreUnavailable) as exc:  # the store wraps what SQLite raised
        where = f"data_dir {config.data_dir} (store {config.store_path})"
        raise StartupError(f"cannot open {where}: {_reason(exc)}") from None
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot listen on {host}:{port}: {_reason(exc)}") from None
    return site


def _reason(exc: Exception) -> str:
    """An OS error without its errno prefix and asyncio's wording around it."""
    if isinstance(exc, OSError) and exc.strerror:
        # asyncio words a bind failure "error while attempting to bind on address (...): <reason>"
        reason = exc.strerror.rpartition("): ")[2]
        return f"{reason}: {exc.filename}" if exc.filename else reason
    return str(exc)


async def _stop_when_orphaned(stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL, OOM) drains and exits instead of holding the port."""
    while supervised():
        await asyncio.sleep(1.0)
    log.warning("supervisor_gone", action="draining")
    stop.set()


async def _close_slow_headers(runner: web.AppRunner, current_timeout: Callable[[], float]) -> None:
    """Close connections that opened but never completed their first request's headers in time, or
    whose later request's headers began to arrive that long ago (an idle kept-alive connection is
    aiohttp's to close, after ``limits.keepalive_timeout``)."""
    first_seen: dict[object, float] = {}
    while True:
        timeout = current_timeout()
        await asyncio.sleep(min(1.0, timeout / 2))
        server = runner.server
        if server is None:
            continue
        now = time.monotonic()
        live = set(server.connections)
        for handler in list(first_seen):
            if handler not in live:
                del first_seen[handler]
        for handler in live:
            seen = first_seen.setdefault(handler, now)
            # aiohttp counts a request once its headers are parsed; zero means still waiting for them.
            started = getattr(handler, "headers_since", None)  # _Connection's, for later requests
            late = started is not None and now - started >= timeout and not handler._request_in_progress
            if (handler._request_count == 0 and now - seen >= timeout) or late:
                log.warning("slow_headers_closed", seconds=round(now - (started if late else seen), 1))
                handler.force_close()
                if handler.transport is not None:
                    handler.transport.close()
                del first_seen[handler]
