"""Provider adapters, one module each; ``ADAPTERS`` maps a config ``kind`` to its class.

A new provider is one module in this package defining an :class:`Adapter` subclass with a ``kind``;
it is found here, so the config accepts that kind without any other change.
"""

import importlib
import pkgutil

from gateway.config import GatewayConfig
from gateway.providers.base import Adapter

_SHARED = {"base", "native"}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_module.name}")


def _concrete(cls: type[Adapter]) -> list[type[Adapter]]:
    found = []
    for sub in cls.__subclasses__():
        if "kind" in sub.__dict__:
            found.append(sub)
        found.extend(_concrete(sub))
    return found


ADAPTERS: dict[str, type[Adapter]] = {adapter.kind: adapter for adapter in _concrete(Adapter)}


def startup_problems(config: GatewayConfig) -> list[str]:
    """What would stop the adapters of ``config`` from starting (:meth:`Adapter.startup_problems`),
    checked without starting them: for ``check-config``, and for the supervisor of several workers,
    which hands a replacement worker only a config the workers' own reload would accept."""
    return [
        f"providers.{name}: {problem}"
        for name, provider in config.providers.items()
        for problem in ADAPTERS[provider.kind].startup_problems(provider)
    ]


__all__ = ["ADAPTERS", "Adapter", "startup_problems"]
