"""Whatever a provider refuses a create with, the client gets the error envelope with its fields as
the OpenAI SDKs read them (``message`` text; ``type``, ``param`` and ``code`` text or null) and a
4xx or 5xx status that is not the gateway's own 500.

One upstream here stands in for every provider: whatever the path, it answers the status and body
the test draws at random (seeded, so a failure replays). The bodies are each provider's error
shapes (``providers.md``: OpenAI's ``{"error": {...}}``, FastAPI's ``{"detail": [{"loc", "msg"}]}``
for Luma and fal, ``google.rpc.Status`` with ``details`` for Veo, Kling's and MiniMax's codes) with
values of any JSON type in any field.
"""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.providers import ADAPTERS
from tests.conftest import ALPHA_KEY, UPSTREAM_KEY, RunningGateway, StartGateway, call
from tests.test_upstream_answers import value

# Each provider kind with what its config needs besides base_url and api_key.
KINDS = {
    "openai": "",
    "azure": "",
    "runway": "",
    "luma": "",
    "kling": "options: {access_key: ak-refusals}",
    "minimax": "",
    "replicate": "",
    "fal": "",
    "dashscope": "",
    "seedance": "",
    "veo": "",
    "vertex_veo": "options: {project: refusals}",
}
FIELDS = ["message", "type", "param", "code", "status", "details", "reason", "detail", "loc", "msg"]


class Refusing:
    """Any method, any path: ``self.status`` with ``self.body``."""

    def __init__(self) -> None:
        self.status = 400
        self.body = b"{}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.refuse)
        return app

    async def refuse(self, request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=self.status, body=self.body, content_type="application/json")


def refusal(rng: random.Random) -> bytes:
    """One error body in one of the providers' shapes, with values of any type."""
    fields = {name: value(rng) for name in rng.sample(FIELDS, rng.randint(0, 5))}
    shape = rng.random()
    if shape < 0.05:
        return rng.choice([b"", b"<html>502 Bad Gateway</html>", b"null", b"[]", b'"busy"'])
    if shape < 0.4:
        return json.dumps({"error": fields}).encode()
    if shape < 0.6:
        items = [{"loc": value(rng), "msg": value(rng), "type": value(rng)} for _ in range(rng.randint(0, 3))]
        return json.dumps({"detail": rng.choice([items, value(rng)])}).encode()
    if shape < 0.75:
        details = rng.choice([[{"reason": value(rng), "retryDelay": value(rng)}], value(rng)])
        return json.dumps({"error": {**fields, "details": details}}).encode()
    if shape < 0.85:
        return json.dumps({"code": value(rng), "message": value(rng), "base_resp": value(rng)}).encode()
    return json.dumps(fields).encode()


@pytest.fixture
async def gateway(
    start_gateway: StartGateway, aiohttp_server: Any, tmp_path: Path
) -> tuple[RunningGateway, Refusing]:
    fake = Refusing()
    upstream = await aiohttp_server(fake.app())
    base = str(upstream.make_url("")).rstrip("/")
    providers, models = "", ""
    for kind, extra in KINDS.items():
        known = getattr(ADAPTERS[kind], "models", None) or {}
        upstream_model = next(iter(known), "upstream-model")
        providers += f"""
          p-{kind}:
            kind: {kind}
            base_url: {base}/v1
            api_key: {UPSTREAM_KEY}
            {extra}"""
        models += f"\n  m-{kind}: {{provider: p-{kind}, model: {upstream_model}}}"
    config = (
        textwrap.dedent(f"""
        data_dir: {tmp_path}
        keys: [{{name: alpha, key: "{ALPHA_KEY}"}}]
        resilience: {{backoff_seconds: 0.01}}
        providers:""")
        + textwrap.indent(textwrap.dedent(providers), "  ")
        + "\nmodels:"
        + models
        + "\n"
    )
    return await start_gateway(config), fake


@pytest.mark.parametrize("kind", list(KINDS))
async def test_any_refusal_becomes_the_envelope(gateway: tuple[RunningGateway, Refusing], kind: str) -> None:
    gw, fake = gateway
    rng = random.Random(f"refusals-{kind}")
    statuses: dict[int, int] = {}
    for _ in range(40):
        fake.status = rng.choice([400, 401, 402, 403, 404, 409, 413, 422, 429, 451, 500, 502, 503, 504])
        fake.body = refusal(rng)
        status, headers, body = await call(
            gw, "POST", "/v1/videos", json={"prompt": "p", "model": f"m-{kind}"}
        )
        statuses[status] = statuses.get(status, 0) + 1
        sent = (fake.status, fake.body)
        assert 400 <= status <= 599 and status != 500, (status, body, sent)
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, (body, sent)
        assert type(error["message"]) is str and error["message"], (body, sent)
        for name in ("type", "param", "code"):
            assert error[name] is None or type(error[name]) is str, (name, body, sent)
        assert headers.get("Retry-After", "1").isdigit() or status != 429, (headers, sent)
    assert len(statuses) > 2, statuses
