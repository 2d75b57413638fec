"""OpenAI-compatible gateway for video generation."""

__version__ = "0.1.0"
