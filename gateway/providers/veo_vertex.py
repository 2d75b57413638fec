"""Google Veo on Vertex AI ({region}-aiplatform.googleapis.com).

Wire format (provider reference §a2; googleapis/python-genai ``models.py``
``_GenerateVideosConfig_to_vertex``, ``_GenerateVideosResponse_from_vertex``, ``operations.py``;
the Vertex "Veo video generation" API reference):

- ``Authorization: Bearer <OAuth2 access token>`` plus ``x-goog-user-project: <project>``. The token
  is ``api_key`` (e.g. ``${VERTEX_ACCESS_TOKEN}``, minted elsewhere), or minted here from the
  service-account JSON in ``options.service_account_file``: an RS256 JWT assertion (iss = client
  email, scope cloud-platform, aud = token_uri, one hour) exchanged at the file's ``token_uri``
  (``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``, RFC 7523; google-auth's signer signs
  it), cached until shortly before it expires;
- ``POST /v1/projects/{project}/locations/{region}/publishers/google/models/{model}:predictLongRunning``
  with the Gemini API's body plus the Vertex-only ``seed`` and ``generateAudio``, answered
  ``{"name": "projects/…/locations/…/publishers/google/models/…/operations/{id}"}``. The ``global``
  region lives on ``aiplatform.googleapis.com``;
- ``POST …/{model}:fetchPredictOperation {"operationName": name}`` → ``{name, done?, error?,
  response?: {"videos": [{"bytesBase64Encoded" | "gcsUri", "mimeType"}], "raiMediaFilteredCount",
  "raiMediaFilteredReasons"}}``; follow-ups take project, region and model from the operation name;
- without ``storageUri`` the MP4 comes back inline: it is decoded, once, into
  ``<data_dir>/veo_vertex/<provider name>/`` when the operation is first seen completed and served
  from there (Range supported); delete removes it. A ``gcsUri`` result is refused for download;
- errors, status mapping and synthesised progress as on the Gemini API (``VeoBase``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from gateway.bodies import RequestBody
from gateway.config import ConfigError, ProviderConfig
from gateway.errors import ApiError, UpstreamError, expired_result, storage_failed
from gateway.providers.base import Call, FileAnswer, UpstreamVideo, json_or_none, read_limited
from gateway.providers.native import durations, expired_if_gone, model_must_exist, not_offered
from gateway.providers.veo_gemini import VEO_2, VEO_3, VeoBase, veo_spec
from gateway.store import Task

SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
DEFAULT_TOKEN_URI = "https://oauth2.googleapis.com/token"
TOKEN_LIFETIME = 3600
REFRESH_MARGIN = 300  # mint a new token this long before the current one expires

VERTEX_EXTRAS = frozenset({"negativePrompt", "personGeneration", "enhancePrompt", "seed", "generateAudio"})

MODELS = {
    "veo-3.1-generate-preview": veo_spec(VEO_3, durations(4, 6, 8), VERTEX_EXTRAS, expected=100),
    "veo-3.1-fast-generate-preview": veo_spec(VEO_3, durations(4, 6, 8), VERTEX_EXTRAS, expected=60),
    "veo-3.1-generate-001": veo_spec(VEO_3, durations(4, 6, 8), VERTEX_EXTRAS, expected=100),
    "veo-3.0-generate-001": veo_spec(VEO_3, durations(4, 6, 8), VERTEX_EXTRAS, expected=100),
    "veo-3.0-fast-generate-001": veo_spec(VEO_3, durations(4, 6, 8), VERTEX_EXTRAS, expected=60),
    # Vertex Veo reference: veo-2.0-generate-001 durationSeconds 5–8; it makes no audio.
    "veo-2.0-generate-001": veo_spec(
        VEO_2, durations(5, 6, 7, 8), VERTEX_EXTRAS - {"generateAudio"}, expected=90
    ),
}

_OPERATION = re.compile(
    r"projects/[A-Za-z0-9.:_\-]+/locations/(?P<region>[a-z0-9-]+)/publishers/google/models/[A-Za-z0-9.\-]+"
    r"/operations/[A-Za-z0-9_\-]+"
)


@dataclass(frozen=True)
class ServiceAccount:
    email: str
    token_uri: str
    signer: Any  # google.auth.crypt.Signer


def load_service_account(path: str) -> ServiceAccount:
    """The key file as a signer (blocking: call it in a thread)."""
    try:
        from google.auth.crypt import RSASigner
    except ImportError:
        raise ApiError(
            500,
            "options.service_account_file needs the google-auth package, which is not installed.",
            type="server_error",
            code="provider_misconfigured",
        ) from None
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
        return ServiceAccount(
            email=info["client_email"],
            token_uri=info.get("token_uri") or DEFAULT_TOKEN_URI,
            signer=RSASigner.from_service_account_info(info),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ApiError(
            500,
            f"The Vertex provider's service account file cannot be used ({type(exc).__name__}).",
            type="server_error",
            code="provider_misconfigured",
        ) from None


def write_video(path: Path, encoded: str) -> None:
    """Decode an inline video and write it atomically (blocking: call it in a thread)."""
    data = base64.b64decode(encoded, validate=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}.part")
    try:
        partial.write_bytes(data)
        partial.replace(path)
    except OSError:
        partial.unlink(missing_ok=True)  # a full disk must not fill up further
        raise


class VeoVertexAdapter(VeoBase):
    kind = "vertex_veo"
    product = "Vertex AI"
    required_fields = ("options",)
    models = MODELS
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["project"],
        "properties": {
            "project": {"type": "string", "minLength": 1, "description": "Google Cloud project ID"},
            "region": {
                "type": "string",
                "pattern": "^[a-z0-9-]+$",
                "default": "us-central1",
                "description": "Vertex AI location, e.g. us-central1, or global",
            },
            "service_account_file": {
                "type": "string",
                "description": "Service-account JSON key: access tokens are minted from it (instead "
                "of api_key holding an access token)",
            },
        },
    }

    @classmethod
    def config_problems(cls, raw: Mapping[str, Any]) -> list[tuple[tuple[str, ...], str]]:
        options = raw.get("options")
        if not raw.get("api_key") and not (isinstance(options, dict) and options.get("service_account_file")):
            return [((), "needs a credential: `api_key` (an access token) or `options.service_account_file`")]
        headers = raw.get("headers")
        return [  # the token (from either credential) and the project the adapter sets itself
            (("headers", name), "is set by the gateway (the access token, the project): remove it")
            for name in (headers if isinstance(headers, dict) else ())
            if isinstance(name, str) and name.lower() in ("authorization", "x-goog-user-project")
        ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._account: ServiceAccount | None = None
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()

    async def start(self) -> None:
        """Read the service account now, so that an unusable file stops the start or the reload
        that names it, rather than failing the first create."""
        await super().start()
        self._account = await asyncio.to_thread(_account_of, self.config)

    @classmethod
    def startup_problems(cls, config: ProviderConfig) -> list[str]:
        try:
            _account_of(config)
        except ConfigError as exc:
            return exc.problems
        return []

    @property
    def project(self) -> str:
        return str(self.config.options["project"])

    @property
    def region(self) -> str:
        return str(self.config.options.get("region", "us-central1"))

    def host(self, region: str) -> str:
        if self.config.base_url:
            return self.config.base_url.rstrip("/")
        if region == "global":
            return "https://aiplatform.googleapis.com"
        return f"https://{region}-aiplatform.googleapis.com"

    @property
    def base_url(self) -> str:
        return self.host(self.region)

    def model_url(self, model: str) -> str:
        return (
            f"{self.base_url}/v1/projects/{self.project}/locations/{self.region}"
            f"/publishers/google/models/{model}"
        )

    def auth_headers(self) -> dict[str, str]:
        return {"x-goog-user-project": self.project}

    # Credentials.

    async def credential_headers(self, call: Call) -> Mapping[str, str]:
        return {"Authorization": f"Bearer {await self.access_token(call)}"}

    async def access_token(self, call: Call) -> str:
        if self.config.api_key:
            return self.config.api_key
        path = self.config.options.get("service_account_file")
        if not path:
            raise ApiError(
                500,
                f"The Vertex provider '{self.config.name}' has no credential: set api_key (an access "
                "token) or options.service_account_file.",
                type="server_error",
                code="provider_misconfigured",
            )
        async with self._token_lock:
            if self._token is None or time.time() >= self._token_expires - REFRESH_MARGIN:
                if self._account is None:
                    self._account = await asyncio.to_thread(load_service_account, str(path))
                self._token, self._token_expires = await self._mint(call, self._account)
            return self._token

    async def _mint(self, call: Call, account: ServiceAccount) -> tuple[str, float]:
        """An access token for the service account: a signed JWT exchanged at its token URI."""
        from google.auth import jwt

        now = int(time.time())
        claims = {
            "iss": account.email,
            "scope": SCOPE,
            "aud": account.token_uri,
            "iat": now,
            "exp": now + TOKEN_LIFETIME,
        }
        assertion = jwt.encode(account.signer, claims).decode()
        form = urlencode({"grant_type": JWT_BEARER, "assertion": assertion}).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
        async with self.send(call, "POST", account.token_uri, headers=headers, data=form) as response:
            raw = await read_limited(response, 65536)
            status = response.status
        answer = json_or_none(raw)
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if status != 200 or not isinstance(token, str) or not token:
            detail = (
                answer.get("error_description") or answer.get("error") if isinstance(answer, dict) else None
            )
            raise UpstreamError(
                502,
                "Upstream error: Google refused the service account's token request"
                + (f": {detail}." if detail else f" (HTTP {status})."),
                kind="5xx" if status >= 500 else "4xx",
                upstream_status=status,
                code="upstream_auth_failed",
            )
        expires_in = answer.get("expires_in")
        lifetime = float(expires_in) if isinstance(expires_in, int | float) else float(TOKEN_LIFETIME)
        return token, time.time() + lifetime

    # Videos.

    async def create(self, call: Call, body: RequestBody) -> UpstreamVideo:
        request = await self.parse_veo(call, body)
        url = f"{self.model_url(call.deployment.upstream_model)}:predictLongRunning"
        with model_must_exist("Vertex AI", call.deployment.upstream_model):
            answer = await self.call_json(call, "POST", url, json_body=self.payload(request))
        name = answer.get("name") if isinstance(answer, dict) else None
        if not isinstance(name, str) or not _OPERATION.fullmatch(name):
            raise UpstreamError(
                502, "Upstream error: Vertex AI's answer has no operation name.", kind="payload"
            )
        return UpstreamVideo(name, {"status": "queued", "progress": 0, **request.seed()})

    async def _operation(self, call: Call, task: Task) -> dict[str, Any]:
        match = _OPERATION.fullmatch(task.upstream_id)
        if match is None:
            raise UpstreamError(
                502, "Upstream error: the stored operation name is malformed.", kind="payload"
            )
        model_path = task.upstream_id.rsplit("/operations/", 1)[0]
        url = f"{self.host(match['region'])}/v1/{model_path}:fetchPredictOperation"
        answer = await self.call_json(call, "POST", url, json_body={"operationName": task.upstream_id})
        if not isinstance(answer, dict):
            raise UpstreamError(
                502, "Upstream error: Vertex AI's operation is not an object.", kind="payload"
            )
        return answer

    @staticmethod
    def _result(operation: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The GenerateVideoResponse and its videos (inline or in Cloud Storage)."""
        result = operation.get("response")
        result = result if isinstance(result, dict) else {}
        videos = [
            v
            for v in result.get("videos") or ()
            if isinstance(v, dict) and (v.get("bytesBase64Encoded") or v.get("gcsUri"))
        ]
        return result, videos

    def video_path(self, task: Task) -> Path:
        digest = hashlib.sha256(task.upstream_id.encode()).hexdigest()[:40]
        return self.env.data_dir / "veo_vertex" / self.config.name / f"{digest}.mp4"

    async def _keep(self, path: Path, video: Mapping[str, Any]) -> None:
        """Write an inline video to ``path``; refuse a Cloud Storage one."""
        encoded = video.get("bytesBase64Encoded")
        if not isinstance(encoded, str) or not encoded:
            raise ApiError(
                502,
                "Vertex AI stored this video in Cloud Storage (storageUri); this gateway serves only "
                "inline results, and reading the bucket needs storage credentials it does not use. "
                "Fetch the video from the bucket instead.",
                type="upstream_error",
                code="result_in_cloud_storage",
            )
        try:
            await asyncio.to_thread(write_video, path, encoded)
        except (binascii.Error, ValueError):
            raise UpstreamError(
                502, "Upstream error: Vertex AI's inline video is not valid base64.", kind="payload"
            ) from None
        except OSError as exc:
            raise storage_failed("Vertex AI's video", exc) from None

    async def completed(self, task: Task, fields: dict[str, Any], found: list[Any]) -> None:
        if found[0].get("bytesBase64Encoded"):
            await self._keep(self.video_path(task), found[0])

    async def content(self, call: Call, task: Task, variant: str) -> web.StreamResponse:
        if variant != "video":
            raise not_offered(variant, self.kind)
        path = self.video_path(task)
        if not await asyncio.to_thread(path.is_file):
            with expired_if_gone():
                operation = await self._operation(call, task)
            _, videos = self._result(operation)
            if not videos:
                raise expired_result()
            await self._keep(path, videos[0])
        return FileAnswer(path, headers={"Content-Type": "video/mp4"})

    async def delete(self, call: Call, task: Task) -> None:
        """Vertex has no delete for Veo operations: only the local copy goes."""
        await asyncio.to_thread(self.video_path(task).unlink, missing_ok=True)


def _account_of(config: ProviderConfig) -> ServiceAccount | None:
    """The service account the provider names (None when it uses an access token instead)."""
    path = config.options.get("service_account_file")
    if not path or config.api_key:
        return None
    try:
        return load_service_account(str(path))
    except ApiError as exc:
        raise ConfigError([f"options.service_account_file {path}: {exc.message}"]) from None
