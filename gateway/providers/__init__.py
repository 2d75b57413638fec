"""Provider adapters, one module each; ``ADAPTERS`` maps a config ``kind`` to its class."""

from gateway.providers.base import Adapter
from gateway.providers.local import LocalAdapter
from gateway.providers.openai import OpenAIAdapter

ADAPTERS: dict[str, type[Adapter]] = {adapter.kind: adapter for adapter in (OpenAIAdapter, LocalAdapter)}

__all__ = ["ADAPTERS", "Adapter"]
