"""The routing table: which deployments serve a public model, in which order, through which adapter.

A table is one immutable generation of the config. A reload builds a new one and swaps the
gateway's reference; each request captures the table once, at entry, and keeps it. Follow-ups are
never re-balanced: they go to the deployment recorded with the video, whose adapter stays
reachable here even after a reload removed it from routing.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from functools import partial

from gateway.auth import KeyRing
from gateway.config import Deployment, GatewayConfig
from gateway.errors import ApiError, model_not_found
from gateway.health import HealthBoard
from gateway.providers import Adapter


class RoutingTable:
    def __init__(
        self,
        config: GatewayConfig,
        adapters: Mapping[str, Adapter],
        health: HealthBoard,
        retired: Mapping[str, Adapter] | None = None,
    ) -> None:
        self.config = config
        self.adapters = dict(adapters)
        self.keys = KeyRing(config.keys)
        self.health = health
        self.models = config.models
        self.deployments = {d.name: d for ds in config.models.values() for d in ds}
        self._siblings = {model: tuple(d.name for d in ds) for model, ds in config.models.items()}
        self._retired = dict(retired or {})
        self._recorders: dict[tuple[str, bool], Callable[[str | None], None]] = {}

    def resolve_model(self, requested: object) -> str:
        """The public model a request asks for (the default when it names none), or a 400/404."""
        if requested is None or requested == "":
            if self.config.default_model is None:
                raise ApiError(400, "'model' is required.", param="model", code="missing_required_parameter")
            return self.config.default_model
        if not isinstance(requested, str):
            raise ApiError(400, "'model' must be a string.", param="model", code="invalid_type")
        if requested not in self.models:
            raise model_not_found(requested)
        return requested

    def candidates(self, model: str) -> list[Deployment]:
        """Deployments to try for a create, best first.

        Priority tiers in ascending order; within a tier, a weighted random order. Ejected
        deployments are left out (a model's last available one never is ejected).
        """
        eligible = [d for d in self.models[model] if self.health.eligible(d.name)]
        ordered: list[Deployment] = []
        for tier in sorted({d.priority for d in eligible}):
            pool = [d for d in eligible if d.priority == tier]
            while pool:
                chosen = random.choices(pool, weights=[d.weight for d in pool])[0]
                ordered.append(chosen)
                pool.remove(chosen)
        return ordered

    def outcome_recorder(self, deployment: Deployment, *, create: bool) -> Callable[[str | None], None]:
        """What reports one call's outcome to the health board: a failure kind, or None."""
        recorder = self._recorders.get((deployment.name, create))
        if recorder is None:
            siblings = self._siblings.get(deployment.model, ())
            recorder = self._recorders[deployment.name, create] = partial(
                self.health.record, deployment.name, siblings=siblings, create=create
            )
        return recorder

    def adapter(self, provider: str) -> Adapter:
        adapter = self.adapters.get(provider) or self._retired.get(provider)
        if adapter is None:
            raise ApiError(
                503,
                "The provider that holds this video is no longer configured on this gateway.",
                type="upstream_error",
                code="provider_unavailable",
            )
        return adapter

    def all_adapters(self) -> dict[str, Adapter]:
        return {**self._retired, **self.adapters}
