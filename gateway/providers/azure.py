"""Azure OpenAI video generation (sora-2) on Azure's v1 API: the OpenAI Videos dialect.

Wire format (provider reference §b1: MicrosoftDocs/azure-ai-docs
``articles/ai-foundry/openai/concepts/video-generation.md``; BerriAI/litellm
``azure/videos/transformation.py``):

- ``base_url`` is ``https://{resource}.openai.azure.com/openai/v1``; paths, bodies (JSON or
  multipart), the Video object, ``/content?variant=...`` and remix are OpenAI's, so everything but
  the credential is :class:`~gateway.providers.openai.OpenAIAdapter`'s;
- the key travels as ``api-key: <key>``, never as ``Authorization: Bearer``;
- ``model`` is the Azure deployment name: the upstream model the gateway's config names;
- the v1 surface needs no ``api-version``; ``options.api_version``, when set, is appended as
  ``?api-version=...`` to every request sent to ``base_url`` (not to result redirects);
- Azure validates ``size`` (1280x720, 720x1280) and ``seconds`` ("4", "8", "12") itself and answers
  400 in the OpenAI error envelope, which is passed on; its gateway puts the HTTP status in
  ``error.code`` for auth and rate-limit refusals (``{"code": "401", "message": "Access denied due to
  invalid subscription key ..."}``), replaced here by the gateway's own codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote

from gateway.errors import ApiError
from gateway.providers.openai import OpenAIAdapter


class AzureAdapter(OpenAIAdapter):
    kind = "azure"
    required_fields = ("base_url", "api_key")
    credential_header = "api-key"
    provider_name = "Azure"
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "api_version": {
                "type": "string",
                "minLength": 1,
                "description": "Sent as ?api-version=... on every request (the v1 API needs none)",
            }
        },
    }

    def auth_headers(self) -> dict[str, str]:
        return {"api-key": self.config.api_key} if self.config.api_key else {}

    def upstream_url(self, url: str) -> str:
        version = self.config.options.get("api_version")
        if not version or not url.startswith(self.base_url + "/"):
            return url
        return f"{url}{'&' if '?' in url else '?'}api-version={quote(str(version), safe='')}"

    def provider_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ApiError:
        error = super().provider_error(status, headers, raw)
        if error.code is not None and error.code.isdigit():
            error.code = "rate_limited" if status == 429 else None
        return error
