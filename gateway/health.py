"""Outlier ejection: deployments that keep failing are taken out of rotation for a while.

After ``consecutive_failures`` failures in a row (connect errors, timeouts, resets, 5xx) of its
creates, or of the calls about its videos, a deployment is ejected for ``base_ejection_seconds``
times the number of times it has been ejected, up to ``max_ejection_seconds``. When that time is
up, exactly one create probes it: success puts it back, failure ejects it again for longer. A
model's last available deployment is never ejected (Envoy's max ejection percentage, taken to its
safe end). The board outlives config reloads: it is keyed by deployment name; a reload that
changes a deployment's provider (its settings, or which provider or upstream model it names) starts
it afresh, and one that removes it forgets it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Gauge

from gateway.config import Resilience
from gateway.logs import log

EJECTIONS = Counter("gateway_deployment_ejections_total", "Times a deployment was ejected.", ["deployment"])
EJECTED = Gauge(
    "gateway_deployment_ejected",
    "1 while a deployment is ejected, else 0.",
    ["deployment"],
    multiprocess_mode="livemax",  # with several workers: ejected by at least one of them
)


@dataclass
class DeploymentHealth:
    consecutive_failures: int = 0  # of creates
    read_failures: int = 0  # in a row, of the calls about videos it has (polls, downloads, deletes)
    ejections: int = 0
    ejected_until: float = 0.0
    probing: bool = False
    last_failure: str | None = None


class HealthBoard:
    def __init__(self, policy: Resilience, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._states: dict[str, DeploymentHealth] = {}

    def state(self, deployment: str) -> DeploymentHealth:
        state = self._states.get(deployment)
        if state is None:
            state = self._states[deployment] = DeploymentHealth()
        return state

    def is_ejected(self, deployment: str) -> bool:
        state = self._states.get(deployment)
        return state is not None and (state.ejected_until > self._clock() or state.probing)

    def eligible(self, deployment: str) -> bool:
        """Could this deployment take a new create now (healthy, or its probe is due)?"""
        state = self._states.get(deployment)
        return state is None or (not state.probing and state.ejected_until <= self._clock())

    def claim(self, deployment: str) -> bool:
        """Right before sending a create: False if ejected; the first caller after an ejection probes."""
        if not self.eligible(deployment):
            return False
        state = self._states.get(deployment)
        if state is not None and state.ejected_until:
            state.probing = True
            log.info("deployment_probe", deployment=deployment)
        return True

    def probing(self, deployment: str) -> bool:
        state = self._states.get(deployment)
        return state is not None and state.probing

    def abandon_probe(self, deployment: str) -> None:
        """A probe's create ended with no word from the provider (its client left mid-upload, its
        body was refused, a bulkhead was full): no verdict, so the next create probes instead."""
        state = self._states.get(deployment)
        if state is not None and state.probing:
            state.probing = False
            log.info("deployment_probe_abandoned", deployment=deployment)

    def record(
        self, deployment: str, failure: str | None, siblings: Sequence[str], *, create: bool = True
    ) -> None:
        """The outcome of one upstream call: ``failure`` is its kind, or None for a success.

        Creates and the calls about videos a deployment has (``create=False``: polls, downloads,
        deletes) keep streaks of their own, either of which ejects: a provider whose creates fail
        while its status API answers was kept in rotation by the polls of its videos, each success
        of which ended the creates' streak. Only a create (the probe) puts it back."""
        state = self._states.get(deployment)
        if failure is None:
            if state is None:
                return  # never failed: every poll of a healthy deployment passes here
            if not create:
                state.read_failures = 0
                return
            if state.ejected_until:
                log.info("deployment_restored", deployment=deployment)
                EJECTED.labels(deployment).set(0)
            state.consecutive_failures, state.read_failures = 0, 0
            state.ejected_until, state.probing = 0.0, False
            return
        if state is None:
            state = self.state(deployment)
        if create:
            state.consecutive_failures += 1
        else:
            state.read_failures += 1
        state.last_failure = failure
        if state.ejected_until > self._clock() and not state.probing:
            return  # already out (its videos' polls fail too): ejected again only if its probe fails
        streak = max(state.consecutive_failures, state.read_failures)
        if state.probing or streak >= self.policy.consecutive_failures:
            others_available = any(s != deployment and not self.is_ejected(s) for s in siblings)
            if others_available:
                self._eject(deployment, state)
            else:
                state.probing = False

    def _eject(self, deployment: str, state: DeploymentHealth) -> None:
        state.ejections += 1
        seconds = min(self.policy.base_ejection_seconds * state.ejections, self.policy.max_ejection_seconds)
        state.ejected_until = until = self._clock() + seconds
        state.probing = False
        EJECTIONS.labels(deployment).inc()
        EJECTED.labels(deployment).set(1)
        # The gauge falls when the ejection ends, whether or not a create comes to probe it.
        with contextlib.suppress(RuntimeError):  # no event loop: a board driven by hand
            asyncio.get_running_loop().call_later(seconds, self._ejection_over, deployment, until)
        log.warning(
            "deployment_ejected",
            deployment=deployment,
            seconds=seconds,
            ejections=state.ejections,
            failure=state.last_failure,
            consecutive_failures=state.consecutive_failures,
            read_failures=state.read_failures,
        )

    def _ejection_over(self, deployment: str, until: float) -> None:
        state = self._states.get(deployment)
        if state is not None and state.ejected_until == until and not state.probing:
            EJECTED.labels(deployment).set(0)

    def forget(self, deployments: Iterable[str]) -> None:
        """Start these deployments afresh (a reload changed what they reach: what failed may not)."""
        for deployment in deployments:
            if self._states.pop(deployment, None) is not None:
                EJECTED.labels(deployment).set(0)

    def snapshot(self, deployments: Sequence[str]) -> list[dict[str, Any]]:
        now = self._clock()
        out = []
        for name in deployments:
            state = self._states.get(name, DeploymentHealth())
            ejected = state.ejected_until > now
            out.append(
                {
                    "deployment": name,
                    "state": "ejected" if ejected else ("probing" if state.probing else "healthy"),
                    "consecutive_failures": state.consecutive_failures,
                    "consecutive_read_failures": state.read_failures,
                    "ejections": state.ejections,
                    "ejected_for_seconds": round(state.ejected_until - now, 1) if ejected else 0,
                    "last_failure": state.last_failure,
                }
            )
        return out
