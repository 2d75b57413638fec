"""Hot reload: a new config becomes a new routing table, swapped in one assignment.

On SIGHUP, on ``POST /admin/reload``, or when the file changes: parse and check the file; if it is
valid, build the new table and swap it (requests in flight keep the table they started with); if
not, keep the old one and log every problem. Adapters whose provider config is unchanged are kept,
with their connection pools. Adapters of removed providers stay reachable for the videos they hold,
and their pools close once idle. Keys, limits, the admin and metrics keys, the resilience policy,
the log level, drain times and ``watch_config`` take effect at once; what :data:`RESTART_ONLY`
names keeps its old value until a restart, and a reload that changes it says so in the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import time
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge

from gateway import metrics
from gateway.api import FAILOVERS, READ_RETRIES
from gateway.config import ConfigError, GatewayConfig, ProviderConfig, load_config, parse_config, read_config
from gateway.health import EJECTED, EJECTIONS, HealthBoard
from gateway.limits import BULKHEAD_REJECTED, RATE_LIMITED
from gateway.logs import log, register_secrets, set_level
from gateway.providers import ADAPTERS, Adapter
from gateway.providers.base import AdapterEnv
from gateway.routing import RoutingTable
from gateway.state import Gateway
from gateway.workers import remember_loaded

T = TypeVar("T")

RELOADS = Counter(
    "gateway_config_reloads_total",
    "Config reloads after start, by result: success or failure. Each worker process counts its own.",
    ["result"],
)
LAST_SUCCESS = Gauge(
    "gateway_config_last_reload_success_timestamp_seconds",
    "Unix time of the last config load that took effect.",
    multiprocess_mode="livemin",  # with several workers: the one that has been waiting longest
)
for _result in ("success", "failure"):
    RELOADS.labels(_result)

# GatewayConfig attribute -> the setting as written in the file.
RESTART_ONLY = {
    "host": "server.host",
    "port": "server.port",
    "workers": "server.workers",
    "data_dir": "data_dir",
    "store_path": "store.path",
    "metrics_path": "metrics.path",
    "public_base_url": "server.public_base_url",
    "signing_key": "server.signing_key",
    "log_format": "logging.format",
}


def keep_restart_only(config: GatewayConfig, running: GatewayConfig) -> GatewayConfig:
    """``config`` with the settings :data:`RESTART_ONLY` names as ``running`` has them: how a reload
    leaves them, and how a worker started after one (a replacement) runs them, as the others do."""
    return dataclasses.replace(config, **{name: getattr(running, name) for name in RESTART_ONLY})


async def build_table(
    config: GatewayConfig,
    gw: Gateway,
    previous: RoutingTable | None,
    retired: Mapping[str, ProviderConfig] | None = None,
) -> RoutingTable:
    """The table for ``config``, reusing the previous table's adapters where the provider is unchanged.

    ``retired``: providers a reload removed before this process started (a worker replacing one that
    died), kept reachable for their videos as the other workers keep theirs. One that cannot start
    is left out (its videos answer 503 here), not a failed start."""
    old = previous.all_adapters() if previous is not None else {}
    for name, provider in (retired or {}).items():
        try:
            kept, _ = await _start_adapters(dataclasses.replace(config, providers={name: provider}), gw, {})
        except ConfigError as exc:
            log.warning("retired_provider_unavailable", provider=name, problems=exc.problems)
            continue
        old = {**old, **kept}
    adapters, _ = await _start_adapters(config, gw, old)
    for name, adapter in old.items():
        if name in adapters and adapters[name] is not adapter:
            asyncio.get_running_loop().create_task(adapter.superseded())
        elif name not in adapters:  # its videos still reach it through the new table (retired)
            asyncio.get_running_loop().create_task(adapter.close_when_idle())
    changed = {name for name, adapter in adapters.items() if name in old and old[name] is not adapter}
    gw.health.forget(_fresh_starts(config, previous, changed, gw.health))
    retired = {name: adapter for name, adapter in old.items() if name not in adapters}
    _prime_resilience(config)
    metrics.prime(
        {
            name: [(d.name, d.model) for ds in config.models.values() for d in ds if d.provider == name]
            for name in config.providers
        }
    )
    return RoutingTable(config, adapters, gw.health, retired)


def _fresh_starts(
    config: GatewayConfig, previous: RoutingTable | None, changed: set[str], health: HealthBoard
) -> set[str]:
    """The deployments whose health record no longer describes them: those on a provider whose
    settings ``changed``, those a reload points at another provider or upstream model (the record
    is the old target's; that target's videos poll as ``name@provider``), and those it removes (so
    that none stays ejected, in the gauge too, for a deployment no create can reach). And those of a
    model the reload left with no deployment that can take a create (the healthy ones removed): a
    model's last deployment is never ejected, or its creates would all be refused until the
    ejection ran out."""
    now = {d.name: d for ds in config.models.values() for d in ds}
    before = previous.deployments if previous is not None else {}
    moved = {
        name
        for name, d in before.items()
        if name not in now or (now[name].provider, now[name].upstream_model) != (d.provider, d.upstream_model)
    }
    fresh = moved | {name for name, d in now.items() if d.provider in changed}
    stranded = {
        d.name
        for ds in config.models.values()
        if not any(d.name in fresh or health.eligible(d.name) for d in ds)
        for d in ds
    }
    return fresh | stranded


async def _start_adapters(
    config: GatewayConfig, gw: Gateway, old: dict[str, Adapter]
) -> tuple[dict[str, Adapter], list[Adapter]]:
    """An adapter for every provider of ``config``, reusing those of ``old`` whose provider is
    unchanged; and the ones newly started. An adapter that cannot start (a credential file that
    cannot be read) is a ConfigError, after the ones started before it are closed again. The
    config's secrets are registered first, so that no log line or error message shows them."""
    register_secrets(p.api_key for p in config.providers.values())
    register_secrets(v for p in config.providers.values() for v in p.headers.values())
    register_secrets([config.metrics_key, config.admin_key, config.signing_key])
    env = AdapterEnv(data_dir=config.data_dir, hosted=gw.hosted)
    adapters: dict[str, Adapter] = {}
    started: list[Adapter] = []
    for name, provider in config.providers.items():
        reused = old.get(name)
        if reused is not None and reused.config == provider:
            adapters[name] = reused
            continue
        adapter = ADAPTERS[provider.kind](provider, env)
        try:
            await adapter.start()
        except ConfigError as exc:
            for other in started:
                await other.close()
            raise ConfigError([f"providers.{name}: {problem}" for problem in exc.problems]) from None
        started.append(adapter)
        adapters[name] = adapter
    return adapters, started


def _prime_resilience(config: GatewayConfig) -> None:
    """Zero series for the resilience counters, so their panels read 0 rather than "no data"."""
    for model, deployments in config.models.items():
        FAILOVERS.labels(model)
        for d in deployments:
            EJECTIONS.labels(d.name)
            EJECTED.labels(d.name)
            READ_RETRIES.labels(d.provider)
            for kind in ("requests", "uploads"):
                BULKHEAD_REJECTED.labels(d.name, kind)
    for limit in ("creates_per_minute", "max_in_progress"):
        RATE_LIMITED.labels(limit)


class Reloader:
    def __init__(self, gw: Gateway, path: Path | None) -> None:
        self._gw = gw
        self._path = path
        self._lock = asyncio.Lock()
        self._running: set[asyncio.Future[Any]] = set()
        self._fingerprint = self._read_fingerprint()
        self._watching = False
        # the changed settings the last reload (or check) of the file left for a restart
        self.needs_restart: list[str] = []
        LAST_SUCCESS.set(time.time())

    def _read_fingerprint(self) -> bytes | None:
        if self._path is None:
            return None
        try:
            return hashlib.sha256(self._path.read_bytes()).digest()
        except OSError:
            return None

    async def check(self, reason: str) -> list[str]:
        """The problems a reload of the file would meet, without applying it: the file's own, and
        those of a changed provider whose adapter cannot start (started here, then closed). A reload
        asked for (``reason``) that they stop is rejected as :meth:`reload` rejects one: logged and
        counted.

        Like :meth:`reload`, it runs to its end even when its caller is cancelled (adapters it
        started must be closed)."""
        return await self._to_the_end(self._check(reason))

    async def _check(self, reason: str) -> list[str]:
        if self._path is None:
            return ["the gateway was started without a config file"]
        try:
            config = await asyncio.to_thread(load_config, self._path)
            _, started = await _start_adapters(config, self._gw, self._gw.table.all_adapters())
        except ConfigError as exc:
            self._rejected(reason, exc.problems)
            return exc.problems
        for adapter in started:
            await adapter.close()
        self.needs_restart = self._needs_restart(config, self._gw.table.config)
        return []

    async def reload(self, reason: str) -> tuple[bool, list[str]]:
        """Load the file again; True and no problems when the new table took effect.

        It runs to its end even when its caller is cancelled (an admin request whose client left):
        half a reload would apply nothing, log nothing, and leave the file marked as loaded."""
        return await self._to_the_end(self._reload(reason))

    def _rejected(self, reason: str, problems: list[str]) -> None:
        RELOADS.labels("failure").inc()
        log.error("config_reload_rejected", reason=reason, path=str(self._path), problems=problems)

    async def _to_the_end(self, work: Coroutine[Any, Any, T]) -> T:
        """``work``, shielded from its caller's cancellation (and kept referenced till it ends)."""
        task = asyncio.ensure_future(work)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    async def _reload(self, reason: str) -> tuple[bool, list[str]]:
        if self._path is None:
            return False, ["the gateway was started without a config file"]
        async with self._lock:
            self._fingerprint = await asyncio.to_thread(self._read_fingerprint)
            current = self._gw.table.config
            try:
                text = await asyncio.to_thread(read_config, self._path)
                config = await asyncio.to_thread(parse_config, text, str(self._path), os.environ)
                ignored = self._needs_restart(config, current)
                # What only a restart changes stays as the process runs it, for every reader of the
                # table's config: adapters started by this reload keep their files in the data_dir
                # the store is in.
                config = keep_restart_only(config, current)
                table = await build_table(config, self._gw, self._gw.table)
            except ConfigError as exc:  # the file, or an adapter that cannot start with it
                self._rejected(reason, exc.problems)
                return False, exc.problems
            self.needs_restart = ignored
            if ignored:
                log.warning("config_reload_needs_restart", settings=ignored)
            self._apply_process_settings(config, current)
            self._gw.table = table
            try:
                await asyncio.to_thread(remember_loaded, text)
            except OSError as exc:  # a full disk, say: the reload stands; a replacement may miss it
                log.warning("config_reload_not_recorded", error=str(exc))
            RELOADS.labels("success").inc()
            LAST_SUCCESS.set(time.time())
            log.info(
                "config_reloaded",
                reason=reason,
                path=str(self._path),
                models=sorted(config.models),
                providers=sorted(config.providers),
            )
            return True, []

    def _needs_restart(self, config: GatewayConfig, current: GatewayConfig) -> list[str]:
        """The changed settings this process cannot apply while it runs."""
        changed = [
            key for name, key in RESTART_ONLY.items() if getattr(config, name) != getattr(current, name)
        ]
        if config.watch_config and not self._watching:  # started without a watcher: none to resume
            changed.append("server.watch_config")
        return changed

    def _apply_process_settings(self, config: GatewayConfig, current: GatewayConfig) -> None:
        """What lives outside the routing table: the health board's policy and the log level.
        Drain times, the metrics and admin keys and ``watch_config`` are read from the table."""
        self._gw.health.policy = config.resilience
        if config.log_level != current.log_level:
            set_level(config.log_level)

    async def watch(self, interval: float = 2.0) -> None:
        """Reload whenever the file's content changes (checked every ``interval`` seconds), while
        the current config's ``server.watch_config`` is on."""
        self._watching = True
        while True:
            await asyncio.sleep(interval)
            if not self._gw.table.config.watch_config:
                continue
            fingerprint = await asyncio.to_thread(self._read_fingerprint)
            if fingerprint is not None and fingerprint != self._fingerprint:
                await self.reload("file changed")
