"""A fake Vertex AI Veo API and Google OAuth2 token endpoint, after the provider reference §a2.

Shapes from googleapis/python-genai (``_GenerateVideosConfig_to_vertex``,
``_GenerateVideosResponse_from_vertex``, ``operations.py`` fetchPredictOperation) and the Vertex
"Veo video generation" API reference; the token exchange from RFC 7523 / Google's service-account
OAuth2 flow (google-auth ``google/oauth2/_client.py`` ``jwt_grant``):

- auth: ``Authorization: Bearer <token>`` with a token from ``tokens`` (a static one, or one this fake
  minted) → else 401 ``UNAUTHENTICATED``; another project in the path → 403 ``PERMISSION_DENIED``;
  ``x-goog-user-project`` is recorded;
- ``POST /v1/projects/{p}/locations/{l}/publishers/google/models/{m}:predictLongRunning`` with the
  Gemini API's body plus ``seed``, ``generateAudio``, and ``gcsUri`` images → ``{"name":
  "projects/{p}/locations/{l}/publishers/google/models/{m}/operations/{id}"}``; ``[429]`` → 429
  ``RESOURCE_EXHAUSTED`` with a Retry-After header;
- ``POST …/{m}:fetchPredictOperation {"operationName"}``: one step per fetch, ``{name}`` → ``{name,
  done: false}`` → ``{name, done: true, response: {"@type": …GenerateVideoResponse,
  raiMediaFilteredCount: 0, videos: [{bytesBase64Encoded, mimeType}]}}``; ``[fail]`` ends with
  ``error: {code: 3, message}``, ``[filter]`` with no video and a filter count, ``[gcs]`` with a
  ``gcsUri`` video; an unknown operation → 404 ``NOT_FOUND``;
- ``POST /token`` (form ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>``):
  the JWT's RS256 signature is checked with the service account's public key and its claims (iss,
  scope, aud, iat, exp = iat + 3600); → ``{"access_token", "expires_in", "token_type"}``, or 400
  ``{"error": "invalid_grant", "error_description"}``.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.fakes.veo_gemini import check_body, durations_of, invalid, rpc_error

ALLOWED_PARAMETERS = {
    "aspectRatio",
    "resolution",
    "durationSeconds",
    "negativePrompt",
    "personGeneration",
    "enhancePrompt",
    "sampleCount",
    "seed",
    "generateAudio",
    "storageUri",
}
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
MODEL_PATH = "/v1/projects/{project}/locations/{region}/publishers/google/models/{model}"


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@dataclass
class ServiceAccountKey:
    """A throwaway service account: an RSA key and the JSON file Google would hand out for it."""

    email: str = "veo-gateway@test-project.iam.gserviceaccount.com"
    key_id: str = "0123456789abcdef"
    private_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )

    def write(self, path: Path, token_uri: str) -> Path:
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        info = {
            "type": "service_account",
            "project_id": "test-project",
            "private_key_id": self.key_id,
            "private_key": pem,
            "client_email": self.email,
            "client_id": "1234567890",
            "token_uri": token_uri,
        }
        path.write_text(json.dumps(info), encoding="utf-8")
        return path


@dataclass
class FakeVertexVeo:
    project: str
    video: Path
    tokens: set[str] = field(default_factory=set)
    account: ServiceAccountKey | None = None
    token_lifetime: int = 3599
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    creates: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    fetches: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    assertions: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post(MODEL_PATH + ":predictLongRunning", self.create)
        app.router.add_post(MODEL_PATH + ":fetchPredictOperation", self.fetch)
        app.router.add_post("/token", self.token)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/token":
            return await handler(request)
        self.headers.append(dict(request.headers))
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
            return rpc_error(
                401,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token, "
                "login cookie or other valid authentication credential.",
            )
        if request.match_info.get("project") != self.project:
            return rpc_error(
                403,
                "PERMISSION_DENIED",
                f"Permission denied on resource project {request.match_info.get('project')}.",
            )
        return await handler(request)

    def _model_name(self, request: web.Request) -> str:
        m = request.match_info
        return f"projects/{m['project']}/locations/{m['region']}/publishers/google/models/{m['model']}"

    async def create(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return invalid("Invalid JSON payload received.")
        self.creates.append((request.path, body))
        problem = check_body(
            body, ALLOWED_PARAMETERS, durations=durations_of(request.match_info["model"]), gcs=True
        )
        if problem:
            return invalid(problem)
        prompt = body["instances"][0]["prompt"]
        if "[429]" in prompt:
            quota = {
                "code": 429,
                "message": "Quota exceeded for base model veo.",
                "status": "RESOURCE_EXHAUSTED",
            }
            return web.json_response({"error": quota}, status=429, headers={"Retry-After": "45"})
        name = f"{self._model_name(request)}/operations/{uuid.uuid4()}"
        if "[odd name]" in prompt:  # a name no client could put in a request line as it is
            name += "\n"
        self.operations[name] = {"prompt": prompt, "polls": 0}
        return web.json_response({"name": name})

    async def fetch(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return invalid("Invalid JSON payload received.")
        self.fetches.append(body)
        name = body.get("operationName") if isinstance(body, dict) else None
        if not isinstance(name, str) or set(body) != {"operationName"}:
            return invalid("operationName is required.")
        if not name.startswith(self._model_name(request) + "/operations/"):
            return invalid("The operation does not belong to this model.")
        operation = self.operations.get(name)
        if operation is None:
            return rpc_error(404, "NOT_FOUND", f"Operation {name} not found.")
        operation["polls"] += 1
        if operation["polls"] < 3:
            return web.json_response(
                {"name": name} if operation["polls"] == 1 else {"name": name, "done": False}
            )
        answer: dict[str, Any] = {"name": name, "done": True}
        prompt = operation["prompt"]
        if "[fail]" in prompt:
            answer["error"] = {
                "code": 3,
                "message": "The prompt could not be submitted (support code 58061214).",
            }
            return web.json_response(answer)
        result: dict[str, Any] = {
            "@type": "type.googleapis.com/cloud.ai.large_models.vision.GenerateVideoResponse",
            "raiMediaFilteredCount": 0,
        }
        if "[filter]" in prompt:
            result.update(raiMediaFilteredCount=1, raiMediaFilteredReasons=["Unsafe content was detected."])
        elif "[gcs]" in prompt:
            result["videos"] = [{"gcsUri": "gs://bucket/out/sample_0.mp4", "mimeType": "video/mp4"}]
        else:
            encoded = base64.b64encode(self.video.read_bytes()).decode()
            result["videos"] = [{"bytesBase64Encoded": encoded, "mimeType": "video/mp4"}]
        answer["response"] = result
        return web.json_response(answer)

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        problem = self._check_assertion(form.get("grant_type"), form.get("assertion"), str(request.url))
        if problem:
            return web.json_response({"error": "invalid_grant", "error_description": problem}, status=400)
        token = f"ya29.fake-{uuid.uuid4().hex}"
        self.tokens.add(token)
        return web.json_response(
            {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"}
        )

    def _check_assertion(self, grant_type: Any, assertion: Any, token_uri: str) -> str | None:
        if grant_type != "urn:ietf:params:oauth:grant-type:jwt-bearer" or not isinstance(assertion, str):
            return "Invalid grant_type."
        if self.account is None:
            return "No service account is known."
        try:
            header_b64, claims_b64, signature_b64 = assertion.split(".")
            header, claims = json.loads(_unb64(header_b64)), json.loads(_unb64(claims_b64))
            self.account.private_key.public_key().verify(
                _unb64(signature_b64),
                f"{header_b64}.{claims_b64}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (ValueError, InvalidSignature):
            return "Invalid JWT Signature."
        self.assertions.append({"header": header, "claims": claims})
        if header.get("alg") != "RS256" or header.get("kid") != self.account.key_id:
            return "Invalid JWT header."
        now = time.time()
        if (
            claims.get("iss") != self.account.email
            or claims.get("scope") != SCOPE
            or claims.get("aud") != token_uri
            or not abs(claims.get("iat", 0) - now) < 60
            or claims.get("exp") != claims.get("iat", 0) + 3600
        ):
            return "Invalid JWT: wrong claims."
        return None
