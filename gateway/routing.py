"""The routing table: which deployment serves a public model, and which adapter talks to it.

A table is immutable once built; a config reload (later) builds a new one and swaps the reference,
so a request keeps the table it started with. Follow-ups never come here to be re-balanced: they
go to the deployment recorded with the video.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from gateway.config import Deployment, GatewayConfig
from gateway.errors import ApiError, model_not_found
from gateway.providers import Adapter


class RoutingTable:
    def __init__(self, config: GatewayConfig, adapters: Mapping[str, Adapter]) -> None:
        self.config = config
        self.adapters = dict(adapters)
        self.models = config.models
        self.deployments = {d.name: d for ds in config.models.values() for d in ds}

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

    def pick(self, model: str) -> Deployment:
        """A deployment of the best priority tier (lowest number), chosen at random by weight."""
        deployments = self.models[model]
        tier = min(d.priority for d in deployments)
        candidates = [d for d in deployments if d.priority == tier]
        if len(candidates) == 1:
            return candidates[0]
        return random.choices(candidates, weights=[d.weight for d in candidates])[0]

    def adapter(self, provider: str) -> Adapter:
        adapter = self.adapters.get(provider)
        if adapter is None:
            raise ApiError(
                503,
                "The provider that holds this video is no longer configured on this gateway.",
                type="upstream_error",
                code="provider_unavailable",
            )
        return adapter
