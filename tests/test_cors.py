"""Browser applications: the OpenAI SDKs run in a page (openai-node with dangerouslyAllowBrowser)
send a preflight OPTIONS, without a credential, before each cross-origin request, and read an
answer only if it names their origin (the Fetch standard's CORS protocol). The preflight here is
the one openai-node 7.60 makes a browser send for a create (captured by an audit of that SDK)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from gateway.config import ConfigError
from tests.conftest import RunningGateway, StartGateway, call, gateway_yaml, load

APP = "https://studio.example.com"
ASKED_HEADERS = (
    "authorization,content-type,x-stainless-arch,x-stainless-lang,x-stainless-os,"
    "x-stainless-package-version,x-stainless-retry-count,x-stainless-runtime,x-stainless-runtime-version"
)


def allowing(tmp_path: Path, origin: str) -> str:
    return gateway_yaml(tmp_path, extra=f"cors: {{allow_origins: ['{origin}']}}")


async def preflight(
    gw: RunningGateway, path: str, origin: str, method: str = "POST"
) -> tuple[int, dict[str, str]]:
    """A browser's preflight: no Authorization (``call`` sends one; a preflight has none)."""
    asked = {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": ASKED_HEADERS,
    }
    async with aiohttp.ClientSession() as session, session.options(gw.url + path, headers=asked) as response:
        await response.read()
        return response.status, dict(response.headers)


@pytest.mark.parametrize("prefix", ["/v1", "/v1/openai"])
async def test_an_allowed_origins_page_may_call_the_api(
    start_gateway: StartGateway, tmp_path: Path, prefix: str
) -> None:
    gw = await start_gateway(allowing(tmp_path, APP))
    for path, method in ((f"{prefix}/videos", "POST"), (f"{prefix}/videos/video_1/content", "GET")):
        status, headers = await preflight(gw, path, APP, method)
        assert status == 204, headers
        assert headers["Access-Control-Allow-Origin"] == APP and headers["Vary"] == "Origin"
        assert method in headers["Access-Control-Allow-Methods"].split(", ")
        assert headers["Access-Control-Allow-Headers"] == ASKED_HEADERS
        assert int(headers["Access-Control-Max-Age"]) > 0

    page = {"Origin": APP}
    created = {"prompt": "from a page", "size": "320x240"}
    status, headers, video = await call(gw, "POST", f"{prefix}/videos", json=created, headers=page)
    assert status == 200 and video["object"] == "video" and headers["Access-Control-Allow-Origin"] == APP
    exposed = headers["Access-Control-Expose-Headers"].split(", ")
    assert {"x-request-id", "openai-poll-after-ms", "retry-after"} <= set(exposed)
    status, headers, error = await call(gw, "GET", f"{prefix}/videos/video_{'0' * 32}", headers=page)
    assert status == 404 and headers["Access-Control-Allow-Origin"] == APP, "a page reads errors too"
    assert error["error"]["code"] == "video_not_found"
    status, headers, _ = await call(gw, "GET", f"{prefix}/videos", key="sk-wrong-key", headers=page)
    assert status == 401 and headers["Access-Control-Allow-Origin"] == APP


async def test_other_origins_and_clients_outside_a_browser_get_no_cors_answer(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gw = await start_gateway(allowing(tmp_path, APP))
    elsewhere = "https://elsewhere.example"
    status, headers = await preflight(gw, "/v1/videos", elsewhere)
    assert status == 401 and "Access-Control-Allow-Origin" not in headers, "needs an allowed origin"
    for page in ({"Origin": elsewhere}, {}):
        status, headers, _ = await call(gw, "GET", "/v1/videos", headers=page)
        assert status == 200 and "Access-Control-Allow-Origin" not in headers
        assert headers["Vary"] == "Origin", "a cache must not give this answer to an allowed page"
    for path in ("/metrics", "/healthz"):  # not the API: no page may read these
        status, headers, _ = await call(gw, "GET", path, headers={"Origin": APP})
        assert status == 200 and "Access-Control-Allow-Origin" not in headers, path
    status, _, _ = await call(gw, "OPTIONS", "/v1/videos", headers={"Origin": APP})
    assert status == 405, "an OPTIONS that is no preflight is answered as before"


async def test_no_origin_is_allowed_unless_the_config_says_so(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    gw = await start_gateway(gateway_yaml(tmp_path))
    status, headers = await preflight(gw, "/v1/videos", APP)
    assert status == 401 and "Access-Control-Allow-Origin" not in headers
    status, headers, _ = await call(gw, "GET", "/v1/videos", headers={"Origin": APP})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


async def test_any_origin_when_the_config_says_star(start_gateway: StartGateway, tmp_path: Path) -> None:
    gw = await start_gateway(allowing(tmp_path, "*"))
    status, headers = await preflight(gw, "/v1/videos", "http://localhost:5173")
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "*" and "Vary" not in headers
    for page in ({"Origin": "http://localhost:5173"}, {}):
        status, headers, _ = await call(gw, "GET", "/v1/videos", headers=page)
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*" and "Vary" not in headers
    status, headers, _ = await call(gw, "GET", "/metrics", headers={"Origin": "https://any.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers, "the metrics are no API"


async def test_an_origin_is_matched_as_a_browser_writes_it(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """A browser's Origin is lower case and leaves out its scheme's own port."""
    gw = await start_gateway(allowing(tmp_path, "https://Studio.Example.com:443"))
    status, headers = await preflight(gw, "/v1/videos", APP)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == APP


@pytest.mark.parametrize(
    "wrong", ["studio.example.com", "https://studio.example.com/", "https://*.example.com", "null"]
)
def test_an_origin_is_a_scheme_and_a_host(wrong: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(allowing(Path("/tmp/unused"), wrong))
    (problem,) = [p for p in refused.value.problems if "cors.allow_origins" in p]
    assert "must be an origin" in problem, problem
