"""Routing under failure: weights and tiers, failover, retries, ejection, bulkheads, per-key limits."""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.state import GATEWAY
from gateway.store import Task
from tests.conftest import (
    ALPHA_KEY,
    BETA_KEY,
    ENV,
    UPSTREAM_KEY,
    RunningGateway,
    StartGateway,
    call,
    gateway_yaml,
    load,
)
from tests.fakes.faulty_upstream import FaultyUpstream
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.fakes.veo_gemini import FakeVeoGemini
from tests.test_errors import closed_port

AUTH = {"Authorization": f"Bearer {ALPHA_KEY}"}
TWO_TIERS = """
    resilient:
      - {provider: up, model: primary}
      - {provider: up, model: secondary, priority: 1}
"""
ADMIN = {"Authorization": "Bearer admin-key-0123"}


def config(data_dir: Path, url: str, models: str, *, extra: str = "", beta: str = "") -> str:
    return (
        textwrap.dedent(f"""
        data_dir: {data_dir}
        admin: {{key: admin-key-0123}}
        keys:
          - name: alpha
            key: ${{ALPHA_KEY}}
          - name: beta
            key: ${{BETA_KEY}}
        __BETA__
        providers:
          up:
            kind: openai
            base_url: {url}/v1
            api_key: ${{UPSTREAM_KEY}}
            poll_after_ms: 100
            timeouts: {{connect: 1, read: 1, request: 2}}
          down:
            kind: openai
            base_url: http://127.0.0.1:{closed_port()}/v1
            api_key: ${{UPSTREAM_KEY}}
            timeouts: {{connect: 1, read: 1, request: 2}}
          local:
            kind: local
            options: {{queue_seconds: 0.2, run_seconds: 30}}
        models:
        __MODELS__
        __EXTRA__
    """)
        .replace("__MODELS__", textwrap.indent(textwrap.dedent(models), "  ").strip("\n"))
        .replace("__EXTRA__", textwrap.dedent(extra))
        .replace("__BETA__", textwrap.indent(textwrap.dedent(beta), "    ").strip("\n"))
    )


async def post(gw: RunningGateway, path: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    headers = {**AUTH, **kwargs.pop("headers", {})}
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.url + path, headers=headers, **kwargs) as r,
    ):
        raw = await r.read()
        return r.status, dict(r.headers), json.loads(raw) if raw else None


async def sample(gw: RunningGateway, series: str) -> float:
    """The value of one series (``name{labels}`` as exposed) in a scrape of the gateway; 0 if absent."""
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as response:
        text = await response.text()
    line = next((x for x in text.splitlines() if x.startswith(series + " ")), None)
    return float(line.rpartition(" ")[2]) if line else 0.0


async def get(gw: RunningGateway, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(gw.url + path, headers=headers or AUTH) as r:
        return r.status, await r.json()


def multipart_body(model: str, file_bytes: bytes, boundary: str = "b0undary") -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nfail me over\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n',
        f'--{boundary}\r\nContent-Disposition: form-data; name="input_reference"; filename="r.png"\r\n'
        "Content-Type: image/png\r\n\r\n",
    ]
    return "".join(parts).encode() + file_bytes + f"\r\n--{boundary}--\r\n".encode()


async def test_weighted_split_within_a_tier(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    gw = await start_gateway(
        config(
            tmp_path,
            url,
            """
        split:
          - {provider: up, model: heavy, weight: 3}
          - {provider: up, model: light, weight: 1}
          - {provider: up, model: backup, priority: 1}
    """,
        )
    )
    results = await asyncio.gather(
        *(post(gw, "/v1/videos", json={"prompt": "x", "model": "split"}) for _ in range(400))
    )
    assert all(status == 200 for status, _, _ in results)
    counts = Counter(hit.model for hit in fake.hits if hit.method == "POST")
    assert counts["backup"] == 0
    assert 0.66 <= counts["heavy"] / 400 <= 0.84, counts  # 3 : 1 within 4 sigma (0.022 a sigma)


async def test_failover_sends_the_same_bytes_to_the_next_deployment(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    fake.behaviour["primary"] = "status:503"
    gw = await start_gateway(
        config(
            tmp_path,
            url,
            TWO_TIERS,
        )
    )
    image = bytes(range(256)) * 1200
    body = multipart_body("resilient", image)
    status, _, video = await post(
        gw, "/v1/videos", data=body, headers={"Content-Type": "multipart/form-data; boundary=b0undary"}
    )
    assert status == 200 and video["model"] == "resilient"
    (first,), (second,) = fake.hits_for("primary"), fake.hits_for("secondary")
    assert first.body == body.replace(b"\r\n\r\nresilient\r\n", b"\r\n\r\nprimary\r\n")
    assert second.body == body.replace(b"\r\n\r\nresilient\r\n", b"\r\n\r\nsecondary\r\n")
    assert int(second.headers["Content-Length"]) == len(second.body)

    fake.behaviour["primary"] = "status:429"
    status, _, _ = await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
    assert status == 200 and len(fake.hits_for("secondary")) == 2


async def test_connect_failure_fails_over_and_client_errors_do_not(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    fake.behaviour["strict"] = "status:400"
    gw = await start_gateway(
        config(
            tmp_path,
            url,
            """
        m:
          - {provider: down, model: nowhere}
          - {provider: up, model: fine, priority: 1}
        n:
          - {provider: up, model: strict}
          - {provider: up, model: fine, name: fallback, priority: 1}
    """,
        )
    )
    status, _, _ = await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"})
    assert status == 200 and len(fake.hits_for("fine")) == 1
    status, _, body = await post(gw, "/v1/videos", json={"prompt": "x", "model": "n"})
    assert status == 400 and body["error"]["message"] == "injected 400"
    assert len(fake.hits_for("fine")) == 1


async def test_a_model_the_upstream_lacks_is_the_operators_to_fix_and_fails_over(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """An OpenAI-dialect server (or an Azure resource without that deployment) answers a create
    naming a model it does not have 404: the routing config's fault, not the client's, whose
    model the gateway does serve. The create goes on to the next deployment."""
    fake, url = faulty
    fake.behaviour["retired"] = "no-model"
    fake.behaviour["no-file"] = "status:404"  # a 404 about something else: the file a create names
    models = """
        m:
          - {provider: up, model: retired}
          - {provider: up, model: fine, priority: 1}
        only:
          - {provider: up, model: retired, name: alone}
        files:
          - {provider: up, model: no-file}
          - {provider: up, model: fine, name: spare, priority: 1}
    """
    gw = await start_gateway(config(tmp_path, url, models))
    status, _, body = await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"})
    assert status == 200 and body["model"] == "m" and len(fake.hits_for("fine")) == 1, body
    status, _, body = await post(gw, "/v1/videos", json={"prompt": "x", "model": "only"})
    assert status == 502 and body["error"]["code"] == "upstream_model_not_found", body
    assert "'retired'" in body["error"]["message"] and "routing config" in body["error"]["message"]
    status, _, body = await post(gw, "/v1/videos", json={"prompt": "x", "model": "files"})
    assert status == 404 and body["error"]["message"] == "injected 404", body
    assert len(fake.hits_for("fine")) == 1


async def test_no_failover_once_the_upstream_may_have_the_job(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    fake.behaviour["primary"] = "hang"
    gw = await start_gateway(
        config(
            tmp_path,
            url,
            TWO_TIERS,
        )
    )
    status, headers, _body = await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
    assert status == 504 and headers["x-should-retry"] == "false"
    assert fake.hits_for("secondary") == [] and len(fake.hits_for("primary")) == 1


@pytest.mark.parametrize(
    "answer", ["truncate", "made-html", "made-no-id", "reset", "made-timeout:504", "made-timeout:524"]
)
async def test_a_create_whose_answer_is_lost_is_not_retried_by_the_sdk(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str], answer: str
) -> None:
    """The provider made the job, then its answer broke off or could not be read (an HTML page, JSON
    without an id), or its front gave up waiting on the server that had it (a 504, Cloudflare's
    524: that is no "nothing was made"): a retry would start and bill a second one, so the client is
    told not to retry (the SDK retries a 502 otherwise, twice by default), and no other deployment
    is tried."""
    fake, url = faulty
    fake.behaviour["primary"] = answer
    gw = await start_gateway(config(tmp_path, url, TWO_TIERS))
    sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ALPHA_KEY, max_retries=2)
    gw.clients.append(sdk)
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk.videos.create(prompt="x", model="resilient")  # type: ignore[arg-type]
    assert caught.value.status_code == 502 and caught.value.response.headers["x-should-retry"] == "false"
    assert len(fake.hits_for("primary")) == 1 and fake.hits_for("secondary") == []
    # a reset after the body went out: whether the job was made cannot be known (here it was not)
    assert len(fake.jobs) == (0 if answer == "reset" else 1)
    if answer.startswith("made-timeout:"):
        assert f"HTTP {answer.partition(':')[2]}" in caught.value.message


@pytest.mark.parametrize("status", [500, 503])
async def test_a_create_the_provider_says_not_to_retry_is_sent_once(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str], status: int
) -> None:
    """An OpenAI-dialect provider's 5xx with ``x-should-retry: false`` (a job may exist: this gateway
    answers so itself when it cannot record a job its provider took) keeps its word through the
    gateway: the SDK does not send the create again, nor does a failover to the next deployment."""
    fake, url = faulty
    fake.behaviour["primary"] = f"unsure:{status}"
    gw = await start_gateway(config(tmp_path, url, TWO_TIERS))
    sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ALPHA_KEY, max_retries=2)
    gw.clients.append(sdk)
    with pytest.raises(openai.APIStatusError) as caught:
        await sdk.videos.create(prompt="x", model="resilient")  # type: ignore[arg-type]
    assert caught.value.status_code == (503 if status == 503 else 502)
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(fake.hits_for("primary")) == 1 and fake.hits_for("secondary") == []


async def test_a_providers_conflict_is_not_retried_by_the_sdk(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """The SDK retries a 409 (OpenAI's lock timeout) unless told otherwise; a provider's 409 is a
    conflict with a job's state (a source not finished yet) that the same request meets again, as
    the gateway's own 409s say."""
    fake, url = faulty
    fake.behaviour["primary"] = "status:409"
    gw = await start_gateway(config(tmp_path, url, TWO_TIERS))
    sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ALPHA_KEY, max_retries=2)
    gw.clients.append(sdk)
    with pytest.raises(openai.ConflictError) as caught:
        await sdk.videos.create(prompt="x", model="resilient")  # type: ignore[arg-type]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(fake.hits_for("primary")) == 1 and fake.hits_for("secondary") == []


@pytest.mark.parametrize("form", ["json", "multipart"])
async def test_a_create_answer_that_trickles_in_ends_at_the_request_timeout(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str], form: str
) -> None:
    """An answer whose bytes come one by one, each within the read timeout, held a create (sent
    streaming, for its upload or an event stream) without end: ``timeouts.request`` (2 s here)
    bounds the reading of a create's answer as it bounds a poll's. The job was made: no retry."""
    fake, url = faulty
    fake.behaviour["primary"] = "trickle:0.3"
    gw = await start_gateway(config(tmp_path, url, TWO_TIERS))
    started = time.monotonic()
    if form == "json":
        request = post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
    else:
        boundary = {"Content-Type": "multipart/form-data; boundary=b0undary"}
        request = post(gw, "/v1/videos", data=multipart_body("resilient", b"\x89PNG"), headers=boundary)
    status, headers, body = await asyncio.wait_for(request, 10)
    assert status == 504 and headers["x-should-retry"] == "false", body
    assert time.monotonic() - started < 4
    assert len(fake.hits_for("primary")) == 1 and fake.hits_for("secondary") == []


async def test_a_json_create_waits_for_its_answer_no_longer_than_the_request_timeout(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """A JSON create has no upload to wait for: like a poll, its answer must begin within
    ``timeouts.request`` (1 s here), not the longer read timeout (5 s)."""
    fake, url = faulty
    fake.behaviour["primary"] = "hang"
    text = config(tmp_path, url, TWO_TIERS).replace(
        "timeouts: {connect: 1, read: 1, request: 2}", "timeouts: {connect: 1, read: 5, request: 1}", 1
    )
    gw = await start_gateway(text)
    started = time.monotonic()
    status, headers, body = await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
    assert status == 504 and headers["x-should-retry"] == "false", body
    assert time.monotonic() - started < 3


async def test_a_poll_whose_answer_broke_off_may_be_tried_again(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """A poll is a read: unlike a create's, its lost answer leaves the client free to try again."""
    fake, url = faulty
    gw = await start_gateway(config(tmp_path, url, TWO_TIERS))
    sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ALPHA_KEY)
    gw.clients.append(sdk)
    video = await sdk.videos.create(prompt="y", model="resilient")  # type: ignore[arg-type]
    fake.behaviour["primary"] = "truncate"
    status, headers, body = await call(gw, "GET", f"/v1/videos/{video.id}")
    assert status == 502 and body["error"]["message"] == "Upstream error: the provider's answer was cut off."
    assert "x-should-retry" not in headers


@pytest.mark.parametrize("path", ["create", "poll"])
async def test_no_free_connection_to_the_provider_is_a_busy_503_not_its_failure(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str], path: str
) -> None:
    """Every connection to the provider in use (``max_connections``) for the connect timeout: the
    gateway's own queue was full. It answered 504 "timed out connecting to the provider" and counted
    a failure against the provider's health, so a burst ejected deployments that never failed. It
    is the bulkhead's 503 ``upstream_busy`` now, kept out of health and upstream errors, and out of
    the requests sent: it never left."""
    fake, url = faulty
    text = config(tmp_path, url, "solo:\n  - {provider: up, model: primary}\n").replace(
        "timeouts: {connect: 1, read: 1, request: 2}",
        "max_connections: 1\n    timeouts: {connect: 0.3, read: 5, request: 5}",
        1,
    )
    gw = await start_gateway(text)
    video = None
    if path == "poll":
        status, _, video = await post(gw, "/v1/videos", json={"prompt": "x", "model": "solo"})
        assert status == 200
    fake.behaviour["primary"] = "delay:1.5"  # the first call holds the only connection
    shed = 'gateway_bulkhead_rejections_total{deployment="up/primary",kind="connections"}'
    timeouts = 'gateway_upstream_errors_total{kind="timeout",provider="up"}'
    sent = 'gateway_upstream_requests_total{deployment="up/primary",provider="up"}'
    before = await sample(gw, shed), await sample(gw, timeouts)
    sent_before, hits_before = await sample(gw, sent), len(fake.hits)

    async def one() -> tuple[int, dict[str, str], Any]:
        if video is None:
            return await post(gw, "/v1/videos", json={"prompt": "x", "model": "solo"})
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{gw.url}/v1/videos/{video['id']}", headers=AUTH) as response,
        ):
            return response.status, dict(response.headers), await response.json()

    first = asyncio.create_task(one())
    await asyncio.sleep(0.2)
    status, headers, body = await one()
    assert status == 503 and body["error"]["code"] == "upstream_busy", body
    assert headers["Retry-After"] == "1"
    assert (await first)[0] == 200
    assert (await sample(gw, shed), await sample(gw, timeouts)) == (before[0] + 1, before[1])
    assert await sample(gw, sent) - sent_before == len(fake.hits) - hits_before == 1
    _, state = await get(gw, "/admin/deployments", ADMIN)
    row = state["deployments"][0]
    assert row["consecutive_failures"] == 0 and row["consecutive_read_failures"] == 0, row


async def list_through(
    start_gateway: StartGateway,
    tmp_path: Path,
    faulty: tuple[FaultyUpstream, str],
    *,
    provider: str,
    consecutive_failures: int,
    videos: int,
    behaviour: str,
) -> tuple[list[str], float, dict[str, Any]]:
    """A gateway whose provider ``up`` has ``provider`` settings and a 1 s read deadline; ``videos``
    videos made on its ``primary``, then one list while it behaves as ``behaviour``. The statuses
    listed, the provider timeouts the list counted, and the deployment's row in /admin/deployments."""
    fake, url = faulty
    policy = f"read_deadline_seconds: 1, consecutive_failures: {consecutive_failures}, read_attempts: 1"
    extra = f"resilience: {{{policy}}}"
    text = config(tmp_path, url, TWO_TIERS, extra=extra)
    gw = await start_gateway(text.replace("timeouts: {connect: 1, read: 1, request: 2}", provider, 1))
    for _ in range(videos):
        assert (await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"}))[0] == 200
    fake.behaviour["primary"] = behaviour
    timeouts = 'gateway_upstream_errors_total{kind="timeout",provider="up"}'
    before = await sample(gw, timeouts)
    status, listed = await get(gw, "/v1/videos?limit=20")
    assert status == 200 and len(listed["data"]) == videos
    counted = await sample(gw, timeouts) - before
    _, state = await get(gw, "/admin/deployments", ADMIN)
    row = {r["deployment"]: r for r in state["deployments"]}["up/primary"]
    return sorted(v["status"] for v in listed["data"]), counted, row


async def test_polls_a_lists_deadline_cuts_short_are_no_failure_of_the_provider(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """A list asks about its unfinished videos, 8 at a time, within one deadline; those it has no
    time left for show as last known. The polls that deadline cut short, started late in it, were
    counted as the provider's timeouts, so listing many videos of a provider that answers in 0.7 s
    ejected a deployment that never failed."""
    statuses, counted, row = await list_through(
        start_gateway,
        tmp_path,
        faulty,
        provider="timeouts: {connect: 1, read: 1, request: 2}",
        consecutive_failures=2,
        videos=10,
        behaviour="delay:0.7",
    )
    assert statuses == ["completed"] * 8 + ["queued"] * 2 and counted == 0
    assert row["state"] == "healthy" and row["consecutive_read_failures"] == 0, row


async def test_a_provider_whose_polls_hang_is_still_blamed_through_a_list(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """Only a poll a list's deadline left little time is excused: the first ones, which had the
    whole deadline, count against a provider whose polls hang (its read timeout is longer)."""
    statuses, counted, row = await list_through(
        start_gateway,
        tmp_path,
        faulty,
        provider="timeouts: {connect: 1, read: 5, request: 5}",
        consecutive_failures=3,
        videos=4,
        behaviour="hang",
    )
    assert statuses == ["queued"] * 4 and counted == 4
    assert row["state"] == "ejected" and row["consecutive_read_failures"] == 4, row


async def test_polls_the_gateways_own_queue_kept_from_a_lists_deadline_are_not_blamed(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """Polls of a list that waited for one of the provider's two connections (``max_connections``)
    until little of the list's deadline was left, then were cut short by it, are the gateway's queue,
    not the provider's failure: it answers each poll in 0.4 s."""
    statuses, counted, row = await list_through(
        start_gateway,
        tmp_path,
        faulty,
        provider="max_connections: 2\n    timeouts: {connect: 1, read: 5, request: 5}",
        consecutive_failures=2,
        videos=8,
        behaviour="delay:0.4",
    )
    assert "completed" in statuses and "queued" in statuses, "some polls had no time left"
    assert counted == 0 and row["state"] == "healthy" and row["consecutive_read_failures"] == 0, row


async def test_ejection_then_probe_and_recovery(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    fake.behaviour["primary"] = "status:500"
    gw = await start_gateway(
        config(
            tmp_path,
            url,
            """
        resilient:
          - {provider: up, model: primary}
          - {provider: up, model: secondary, priority: 1}
        lonely:
          - {provider: up, model: primary, name: only-one}
    """,
            extra="resilience: {consecutive_failures: 2, base_ejection_seconds: 0.5}",
        )
    )
    for _ in range(2):
        assert (await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"}))[0] == 200
    assert len(fake.hits_for("primary")) == 2
    _, state = await get(gw, "/admin/deployments", ADMIN)
    rows = {row["deployment"]: row for row in state["deployments"]}
    assert rows["up/primary"]["state"] == "ejected" and rows["up/primary"]["ejections"] == 1

    for _ in range(3):
        assert (await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"}))[0] == 200
    assert len(fake.hits_for("primary")) == 2, "an ejected deployment gets no creates"

    fake.behaviour["primary"] = "ok"
    await asyncio.sleep(0.6)
    assert (await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"}))[0] == 200
    assert len(fake.hits_for("primary")) == 3, "the first create after the ejection probes it"
    _status, state = await get(gw, "/admin/deployments", ADMIN)
    assert {r["deployment"]: r for r in state["deployments"]}["up/primary"]["state"] == "healthy"

    fake.behaviour["primary"] = "status:500"
    for _ in range(4):
        await post(gw, "/v1/videos", json={"prompt": "x", "model": "lonely"})
    _, state = await get(gw, "/admin/deployments", ADMIN)
    assert {r["deployment"]: r for r in state["deployments"]}["only-one"]["state"] != "ejected"

    assert (await get(gw, "/admin/deployments", AUTH))[0] == 401
    assert (await get(gw, "/admin/deployments", {"Authorization": "admin-key-0123"}))[0] == 401
    assert (await get(gw, "/admin/deployments", {"Authorization": "bearer admin-key-0123"}))[0] == 200


async def test_a_deployment_whose_creates_fail_is_ejected_though_its_videos_answer(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """A provider whose creates fail while the calls about its videos go well (an overloaded
    generation backend behind a working status API) was never ejected: each download or poll that
    went well ended the creates' streak, and every create tried it first. Creates and the calls
    about videos now keep streaks of their own."""
    fake, url = faulty
    gw = await start_gateway(
        config(
            tmp_path, url, TWO_TIERS, extra="resilience: {consecutive_failures: 2, base_ejection_seconds: 60}"
        )
    )
    status, _, video = await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
    assert status == 200 and (await get(gw, f"/v1/videos/{video['id']}"))[1]["status"] == "completed"
    fake.behaviour["primary"] = "status:500"  # creates only: its downloads still answer
    for _ in range(5):
        assert (await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"}))[0] == 200
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{gw.url}/v1/videos/{video['id']}/content", headers=AUTH) as response,
        ):
            assert response.status == 200 and await response.read()
    assert len(fake.hits_for("primary")) == 1 + 2, "after two failed creates, no more are sent there"
    _, state = await get(gw, "/admin/deployments", ADMIN)
    row = {r["deployment"]: r for r in state["deployments"]}["up/primary"]
    assert row["state"] == "ejected" and row["consecutive_failures"] == 2, row
    assert row["consecutive_read_failures"] == 0, row


def test_failures_of_creates_and_of_reads_keep_streaks_of_their_own() -> None:
    """A read's success does not end the creates' streak, nor an ejection (only a create, the probe,
    puts a deployment back); reads that keep failing eject as before."""
    from gateway.config import Resilience
    from gateway.health import HealthBoard

    board = HealthBoard(Resilience(consecutive_failures=2, base_ejection_seconds=30), clock=lambda: 0.0)
    siblings = ("flaky", "steady")
    board.record("flaky", "5xx", siblings=siblings)
    board.record("flaky", None, siblings=siblings, create=False)
    board.record("flaky", "5xx", siblings=siblings)
    assert board.is_ejected("flaky")
    board.record("flaky", None, siblings=siblings, create=False)
    assert board.is_ejected("flaky"), "a poll that went well is no probe"
    board.record("other", "timeout", siblings=("other", "steady"), create=False)
    board.record("other", None, siblings=("other", "steady"))
    board.record("other", "timeout", siblings=("other", "steady"), create=False)
    assert not board.is_ejected("other"), "a create that went well ends every streak"
    board.record("other", "timeout", siblings=("other", "steady"), create=False)
    assert board.is_ejected("other")


async def test_a_probe_whose_client_left_mid_upload_does_not_keep_the_deployment_out(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """The first create after an ejection probes the deployment; until the provider answers it, no
    other create is sent there. A probe whose client left mid-upload never reached an answer, and
    the deployment stayed out of rotation for good (healthy or not). Such a probe ends with no
    verdict: the next create probes it instead."""
    fake, url = faulty
    fake.behaviour.update(primary="status:503", secondary="ok")
    extra = "resilience: {consecutive_failures: 1, base_ejection_seconds: 1.0, read_attempts: 1}"
    gw = await start_gateway(config(tmp_path, url, TWO_TIERS, extra=extra))

    async def states() -> dict[str, str]:
        _, board = await get(gw, "/admin/deployments", ADMIN)
        return {row["deployment"]: row["state"] for row in board["deployments"]}

    status, _, video = await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
    assert status == 200 and (await states())["up/primary"] == "ejected"
    await asyncio.sleep(1.1)  # primary's ejection is over: its next create probes it
    fake.behaviour.update(primary="ok", secondary="status:500")
    assert (await call(gw, "GET", f"/v1/videos/{video['id']}"))[0] == 502  # secondary ejected
    host, port = gw.server.host, gw.server.port
    head = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nresilient\r\n'
        b'--b\r\nContent-Disposition: form-data; name="input_reference"; filename="r.png"\r\n\r\n'
    )
    _reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/videos HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
        + ALPHA_KEY.encode()
        + b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 2000000\r\n\r\n"
        + head
        + b"\0" * 300_000
    )
    await writer.drain()
    for _ in range(40):  # until the probe is under way (secondary, ejected for 1 s, is no candidate)
        if (await states())["up/primary"] == "probing":
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"the upload never became the probe: {await states()}")
    writer.transport.abort()  # the client leaves mid-upload
    await asyncio.sleep(1.1)  # secondary's ejection is over too
    fake.behaviour["secondary"] = "ok"
    status, _, made = await post(gw, "/v1/videos", json={"prompt": "y", "model": "resilient"})
    assert status == 200 and made["id"], made
    assert (await states())["up/primary"] == "healthy", "the next create probed it, and it answered"
    assert [hit.body for hit in fake.hits_for("primary")][-1].startswith(b"{"), "the JSON create"


async def test_reads_retry_the_same_deployment(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    gw = await start_gateway(
        config(
            tmp_path,
            url,
            """
        m:
          - {provider: up, model: flaky-one}
          - {provider: up, model: other, weight: 0.0001}
    """,
            extra="resilience: {read_attempts: 3, backoff_seconds: 0.01}",
        )
    )
    fake.behaviour["flaky-one"] = "flaky:2"
    _, _, video = await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"})
    status, body = await get(gw, f"/v1/videos/{video['id']}")
    assert status == 200 and body["status"] == "completed"
    assert len(fake.hits_for("flaky-one", "GET")) == 3 and not fake.hits_for("other", "GET")

    fake.behaviour["flaky-one"] = "flaky:5"
    _, _, video = await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"})
    status, body = await get(gw, f"/v1/videos/{video['id']}")
    assert status == 503 and body["error"]["message"].startswith("Upstream error (HTTP 503)")
    assert fake.retrieves[list(fake.jobs)[-1]] == 3, "three attempts, then the error is passed on"


async def test_a_read_whose_connect_timed_out_is_retried(
    start_gateway: StartGateway, tmp_path: Path, aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads retry connection failures, but a connect that timed out (a SYN dropped on the way, the
    usual case of a lost connection attempt) failed the poll at once, though nothing had been sent."""
    fake = FaultyUpstream()
    server = await aiohttp_server(fake.app(), keepalive_timeout=0.05)  # no idle connection stays
    url = str(server.make_url("")).rstrip("/")
    text = config(
        tmp_path, url, "m:\n  - {provider: up, model: steady}\n", extra="resilience: {backoff_seconds: 0.01}"
    )
    gw = await start_gateway(text)
    status, _, video = await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"})
    assert status == 200, video
    await asyncio.sleep(0.3)  # the provider closed the create's connection: the poll opens one

    loop = asyncio.get_running_loop()
    connect = loop.create_connection
    attempts = []

    async def first_connect_lost(*args: Any, **kwargs: Any) -> Any:
        if server.port in (*args, kwargs.get("port")):  # the gateway's, to the provider
            attempts.append(args)
            if len(attempts) == 1:
                await asyncio.sleep(5)  # its SYN is never answered
        return await connect(*args, **kwargs)

    monkeypatch.setattr(loop, "create_connection", first_connect_lost)
    status, body = await get(gw, f"/v1/videos/{video['id']}")
    assert status == 200 and body["id"] == video["id"], body
    assert len(attempts) == 2 and len(fake.hits_for("steady", "GET")) == 1


async def test_a_hung_provider_holds_a_poll_for_the_read_deadline_and_a_list_shows_what_is_known(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """A read's tries share one deadline, the try under way included: a provider that never answers
    holds a poll or a download for ``read_deadline_seconds``, not for its own read timeout, and a
    list refreshes its unfinished videos within one such deadline, showing the rest as last known."""
    fake, url = faulty
    text = config(
        tmp_path, url, "m: {provider: up, model: stuck}", extra="resilience: {read_deadline_seconds: 0.5}"
    )
    gw = await start_gateway(text.replace("read: 1, request: 2", "read: 30, request: 60", 1))
    videos = [(await post(gw, "/v1/videos", json={"prompt": str(i), "model": "m"}))[2] for i in range(12)]
    assert (await get(gw, f"/v1/videos/{videos[-1]['id']}"))[1]["status"] == "completed"
    fake.behaviour["stuck"] = "hang"

    for path in (f"/v1/videos/{videos[0]['id']}", f"/v1/videos/{videos[-1]['id']}/content"):
        started = time.monotonic()
        status, body = await asyncio.wait_for(get(gw, path), 10)
        assert status == 504 and body["error"]["type"] == "upstream_error", path
        assert time.monotonic() - started < 5, path

    started = time.monotonic()
    status, listed = await asyncio.wait_for(get(gw, "/v1/videos?limit=20"), 10)
    assert status == 200 and time.monotonic() - started < 5
    assert sorted(v["id"] for v in listed["data"]) == sorted(v["id"] for v in videos)
    assert [v["status"] for v in listed["data"]] == ["completed"] + ["queued"] * 11


async def test_bulkhead_sheds_with_retry_after(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    fake, url = faulty
    fake.behaviour["narrow"] = "delay:0.5"
    gw = await start_gateway(
        config(
            tmp_path,
            url,
            """
        m:
          - {provider: up, model: narrow, max_concurrent_uploads: 1}
    """,
        )
    )
    first = asyncio.create_task(post(gw, "/v1/videos", json={"prompt": "x", "model": "m"}))
    await asyncio.sleep(0.2)
    status, headers, body = await post(gw, "/v1/videos", json={"prompt": "y", "model": "m"})
    assert status == 503 and headers["Retry-After"] == "1" and body["error"]["code"] == "upstream_busy"
    assert (await first)[0] == 200


async def test_a_model_of_mixed_kinds_serves_what_any_of_its_deployments_makes(
    start_gateway: StartGateway, tmp_path: Path, aiohttp_server: Any, media: dict[str, Path]
) -> None:
    """Each deployment's adapter checks ``size`` and ``seconds`` against its own provider. Its 400
    was final: of a model served by Veo and by the local renderer, the same create was made or
    refused as the weighted pick fell (half of them refused a size the renderer makes). A refusal now
    hands the create on; the client hears a 400 only when every deployment refused it, and a
    deployment's failure (which may pass) before another's refusal."""
    veo = FakeVeoGemini(api_key=UPSTREAM_KEY, video=media["video"])
    veo_url = str((await aiohttp_server(veo.app())).make_url("")).rstrip("/")
    gw = await start_gateway(
        textwrap.dedent(f"""
        data_dir: {tmp_path}
        keys:
          - name: alpha
            key: ${{ALPHA_KEY}}
        providers:
          veo:
            kind: veo
            base_url: {veo_url}
            api_key: ${{UPSTREAM_KEY}}
          veo-down:
            kind: veo
            base_url: http://127.0.0.1:{closed_port()}
            api_key: ${{UPSTREAM_KEY}}
            timeouts: {{connect: 1, read: 1, request: 2}}
          local:
            kind: local
            options: {{queue_seconds: 0.2, run_seconds: 30}}
        models:
          mixed:
            - {{provider: veo, model: veo-3.1-generate-preview}}
            - {{provider: local}}
          veo-either:
            - {{provider: veo-down, model: veo-3.1-generate-preview}}
            - {{provider: veo, model: veo-2.0-generate-001}}
    """)
    )
    for _ in range(8):  # Veo makes no 1792x1024; the renderer does
        status, _, video = await call(
            gw, "POST", "/v1/videos", json={"model": "mixed", "prompt": "x", "size": "1792x1024"}
        )
        assert status == 200 and video["size"] == "1792x1024", video
    status, _, refused = await call(
        gw, "POST", "/v1/videos", json={"model": "mixed", "prompt": "x", "size": "4000x4000"}
    )
    assert status == 400 and refused["error"]["param"] == "size", refused
    assert veo.creates == []
    # 1080p is Veo 3.1's, which cannot be reached now, and not Veo 2's: the client hears the failure
    for _ in range(4):
        status, _, failed = await call(
            gw,
            "POST",
            "/v1/videos",
            json={"model": "veo-either", "prompt": "x", "size": "1920x1080", "seconds": "8"},
        )
        assert status == 502 and "connect" in failed["error"]["message"], failed
    assert veo.creates == []


async def test_remixes_edits_and_extensions_hold_a_request_slot_of_their_deployment(
    start_gateway: StartGateway, tmp_path: Path, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """``max_concurrent_requests`` caps every call a deployment is sent at once. A remix, edit or
    extension of a video the gateway has held only an upload slot, so every one of them sent at once
    reached a provider capped at one call, to be refused there and counted against it."""
    fake, url = upstream
    text = gateway_yaml(tmp_path, upstream_url=url)
    gw = await start_gateway(
        text.replace("model: upstream-sora", "model: upstream-sora\n    max_concurrent_requests: 1")
    )
    status, _, source = await call(
        gw, "POST", "/v1/videos", json={"model": "sora-remote", "prompt": "source"}
    )
    assert status == 200
    attempts = {
        "remix": (f"/v1/videos/{source['id']}/remix", {"prompt": "again [slow]"}),
        "edits": ("/v1/videos/edits", {"prompt": "edit [slow]", "video": {"id": source["id"]}}),
        "extensions": (
            "/v1/videos/extensions",
            {"prompt": "more [slow]", "seconds": "4", "video": {"id": source["id"]}},
        ),
    }
    for route, (path, body) in attempts.items():
        sent_before = len(fake.requests("POST", "/v1/videos"))
        answers = await asyncio.gather(*(call(gw, "POST", path, json=body) for _ in range(3)))
        statuses = sorted(status for status, _, _ in answers)
        assert statuses == [200, 503, 503], route
        refused = [answer for status, _, answer in answers if status == 503]
        assert all(answer["error"]["code"] == "upstream_busy" for answer in refused), route
        assert len(fake.requests("POST", "/v1/videos")) - sent_before == 1, route
    status, _, _ = await call(gw, "POST", "/v1/videos", json={"model": "sora-remote", "prompt": "after"})
    assert status == 200, "every slot was given back"


async def test_per_key_limits_spare_polls(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    _fake, url = faulty
    text = config(
        tmp_path,
        url,
        """
        fast:
          - {provider: up, model: fast}
        slow:
          - {provider: local}
    """,
        beta="""
        limits: {creates_per_minute: 3, max_in_progress: 2}
    """,
    )
    gw = await start_gateway(text)
    beta = {"Authorization": f"Bearer {BETA_KEY}"}
    created = []
    for _ in range(2):
        status, headers, video = await post(
            gw, "/v1/videos", json={"prompt": "x", "model": "slow", "size": "320x240"}, headers=beta
        )
        assert status == 200
        created.append(video["id"])
    assert headers["x-ratelimit-limit-requests"] == "3" and headers["x-ratelimit-remaining-requests"] == "1"

    status, headers, body = await post(gw, "/v1/videos", json={"prompt": "x", "model": "fast"}, headers=beta)
    assert (
        status == 429 and body["error"]["code"] == "too_many_in_progress" and int(headers["Retry-After"]) >= 1
    )

    for _ in range(10):
        assert (await get(gw, f"/v1/videos/{created[0]}", beta))[0] == 200
        assert (await get(gw, "/v1/videos", beta))[0] == 200

    async with aiohttp.ClientSession() as session:
        await (await session.delete(f"{gw.url}/v1/videos/{created[0]}", headers=beta)).read()
    status, _, _ = await post(gw, "/v1/videos", json={"prompt": "x", "model": "fast"}, headers=beta)
    assert status == 200
    status, headers, body = await post(gw, "/v1/videos", json={"prompt": "x", "model": "fast"}, headers=beta)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert headers["x-ratelimit-remaining-requests"] == "0" and 1 <= int(headers["Retry-After"]) <= 60

    assert (await post(gw, "/v1/videos", json={"prompt": "x", "model": "fast"}))[0] == 200, (
        "alpha is unlimited"
    )


async def test_a_key_at_its_cap_has_its_videos_asked_about_once_in_a_while(
    start_gateway: StartGateway,
    tmp_path: Path,
    faulty: tuple[FaultyUpstream, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before a create is refused for max_in_progress, the key's unfinished videos are asked about
    (some may have finished unseen): each refused create polled every one of them, on the provider
    account all tenants share (2 000 polls a create for a key with 2 000). Once in a while now."""
    from gateway import api

    monkeypatch.setattr(api, "ACTIVE_REFRESH_SECONDS", 1.0, raising=False)
    fake, url = faulty
    text = config(
        tmp_path, url, "m:\n  - {provider: up, model: primary}\n", beta="limits: {max_in_progress: 2}"
    )
    gw = await start_gateway(text)
    beta = {"Authorization": f"Bearer {BETA_KEY}"}
    for _ in range(2):
        assert (await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"}, headers=beta))[0] == 200
    fake.behaviour["primary"] = "status:400"  # the provider keeps them unfinished, as far as we know

    def polls() -> int:
        return len(fake.hits_for("primary", "GET"))

    async def refused() -> None:
        status, _, body = await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"}, headers=beta)
        assert status == 429 and body["error"]["code"] == "too_many_in_progress", body

    await refused()
    assert polls() == 2, "the first refusal asks about both videos"
    for _ in range(4):
        await refused()
    assert polls() == 2, "the next ones within the second do not"
    await asyncio.sleep(1.1)
    await refused()
    assert polls() == 4


async def test_in_progress_cap_survives_a_restart(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    _, url = faulty
    text = config(
        tmp_path,
        url,
        """
        slow:
          - {provider: local}
    """,
        beta="""
        limits: {max_in_progress: 1}
    """,
    )
    beta = {"Authorization": f"Bearer {BETA_KEY}"}
    first = await start_gateway(text)
    assert (
        await post(
            first, "/v1/videos", json={"prompt": "x", "model": "slow", "size": "320x240"}, headers=beta
        )
    )[0] == 200
    await first.server.close()
    second = await start_gateway(text)
    status, _, body = await post(
        second, "/v1/videos", json={"prompt": "x", "model": "slow", "size": "320x240"}, headers=beta
    )
    assert status == 429 and body["error"]["code"] == "too_many_in_progress"


@pytest.mark.parametrize("route", ["remix", "edits", "extensions"])
async def test_a_derived_video_counts_towards_max_in_progress_until_it_is_recorded(
    start_gateway: StartGateway,
    tmp_path: Path,
    upstream: tuple[FakeOpenAIUpstream, str],
    monkeypatch: pytest.MonkeyPatch,
    route: str,
) -> None:
    """A remix, edit or extension gave back its admission before it recorded its video, where a
    create records inside its own: a create admitted meanwhile (the new row's commit waiting on
    the disk) saw neither, and the key ran two videos under max_in_progress: 1."""
    _, url = upstream
    capped = gateway_yaml(tmp_path, upstream_url=url).replace(
        "    key: ${ALPHA_KEY}", "    key: ${ALPHA_KEY}\n    limits: {max_in_progress: 1}"
    )
    gw = await start_gateway(capped)
    status, _, source = await call(gw, "POST", "/v1/videos", json={"model": "sora-remote", "prompt": "src"})
    while source["status"] != "completed":  # the fake moves a job a step per retrieve
        _, _, source = await call(gw, "GET", f"/v1/videos/{source['id']}")
    store = gw.app[GATEWAY].store
    add = store.add
    committing, committed = asyncio.Event(), asyncio.Event()

    async def slow_commit(task: Task) -> None:
        if task.video.get("prompt") == "derived":
            committing.set()
            await committed.wait()
        await add(task)

    monkeypatch.setattr(store, "add", slow_commit)
    path, body = {
        "remix": (f"/v1/videos/{source['id']}/remix", {"prompt": "derived"}),
        "edits": ("/v1/videos/edits", {"prompt": "derived", "video": {"id": source["id"]}}),
        "extensions": (
            "/v1/videos/extensions",
            {"prompt": "derived", "seconds": "4", "video": {"id": source["id"]}},
        ),
    }[route]
    derived = asyncio.create_task(call(gw, "POST", path, json=body))
    await asyncio.wait_for(committing.wait(), 15)
    status, _, other = await call(gw, "POST", "/v1/videos", json={"model": "sora-remote", "prompt": "more"})
    committed.set()
    assert (await derived)[0] == 200
    assert status == 429 and other["error"]["code"] == "too_many_in_progress", other


@pytest.mark.parametrize("provider", ["local", "dialect"])
async def test_two_deletes_of_one_video_at_once_answer_200_and_404(
    local_gateway: RunningGateway, dialect_gateway: RunningGateway, provider: str
) -> None:
    """One after the other, the second DELETE is a 404; sent at once (an SDK's retry after a timeout,
    two tabs), both were answered 200 ``deleted: true``: the second deleted nothing."""
    gw = local_gateway if provider == "local" else dialect_gateway
    model = {"size": "320x240"} if provider == "local" else {"model": "sora-remote"}
    status, _, video = await call(gw, "POST", "/v1/videos", json={"prompt": "x", **model})
    assert status == 200
    answers = await asyncio.gather(*(call(gw, "DELETE", f"/v1/videos/{video['id']}") for _ in range(2)))
    assert sorted(status for status, _, _ in answers) == [200, 404], answers
    gone = next(body for status, _, body in answers if status == 404)
    assert gone["error"]["code"] == "video_not_found"


async def test_a_streamed_create_holds_its_bulkhead_slot_while_it_streams(
    start_gateway: StartGateway, tmp_path: Path, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """A streamed create gave its slots back as soon as its events began, though its provider call
    stays open until the video ends: under max_concurrent_requests: 1, a second create was sent.
    Its upload slot it gives back: the upload is over (max_concurrent_uploads: 1 here)."""
    fake, url = upstream
    text = gateway_yaml(tmp_path, upstream_url=url)
    caps = "\n    max_concurrent_requests: 1\n    max_concurrent_uploads: 1"
    gw = await start_gateway(text.replace("model: upstream-sora", "model: upstream-sora" + caps))
    body = {"prompt": "streamed [held stream]", "model": "sora-remote", "stream": True}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {ALPHA_KEY}"}) as session,
        session.post(gw.url + "/v1/videos", json=body) as response,
    ):
        assert response.status == 200
        await response.content.readuntil(b"\n\n")  # the first event: the provider call is open
        status, _, other = await call(gw, "POST", "/v1/videos", json={"model": "sora-remote", "prompt": "x"})
        bulkheads = gw.app[GATEWAY].bulkheads
        held = [bulkheads.open("dialect/upstream-sora", kind) for kind in ("requests", "uploads")]
        fake.stream_gate.set()
        await response.read()
    assert status == 503 and other["error"]["code"] == "upstream_busy", other
    assert held == [1, 0], "the stream holds its call's slot, not its upload's"
    status, _, after = await call(gw, "POST", "/v1/videos", json={"model": "sora-remote", "prompt": "y"})
    assert status == 200, f"the slot is given back when the stream ends: {after}"


def test_which_refusals_fail_over() -> None:
    """Refusals that say nothing was created, and another deployment may succeed, fail over; a
    provider's refusal of the request (400) does not."""
    from gateway.api import _may_fail_over
    from gateway.errors import ApiError, UpstreamError

    def refusal(
        status: int, kind: str, code: str | None = None, sent: bool = False, answered: int | None = None
    ) -> UpstreamError:
        return UpstreamError(status, "no", kind=kind, code=code, sent=sent, upstream_status=answered)

    assert _may_fail_over(refusal(402, "4xx", "insufficient_quota"))
    assert _may_fail_over(refusal(401, "4xx", "upstream_auth_failed"))
    assert _may_fail_over(refusal(429, "4xx", "rate_limited"))
    assert _may_fail_over(refusal(502, "connect"))
    assert not _may_fail_over(refusal(400, "4xx", "invalid_value"))
    assert not _may_fail_over(refusal(401, "4xx"))
    assert not _may_fail_over(refusal(504, "timeout", sent=True))
    assert _may_fail_over(refusal(502, "5xx", answered=500))
    assert _may_fail_over(refusal(502, "5xx", answered=502))
    assert not _may_fail_over(refusal(502, "5xx", answered=504))  # its front timed out: made, perhaps
    # the deployment's own adapter refused the request: a deployment of another kind may take it
    assert _may_fail_over(ApiError(400, "bad", code="unsupported_value"))
    assert not _may_fail_over(ApiError(409, "not yet", code="video_not_ready"))


async def test_the_overhead_header_counts_no_time_spent_waiting_on_providers(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """``x-gateway-overhead-ms`` is the gateway's own time: waiting on a slow provider, on one that
    never answers (until the read timeout), or on a first deployment before failing over to the next
    is the provider's, whether its call ended in an answer or a failure."""
    fake, url = faulty
    gw = await start_gateway(config(tmp_path, url, TWO_TIERS))

    def overhead(headers: dict[str, str]) -> float:
        return float(headers["x-gateway-overhead-ms"])

    fake.behaviour["primary"] = "ok"
    status, _, video = await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
    assert status == 200, video
    fake.behaviour["primary"] = "delay:0.6"
    status, headers, _ = await call(gw, "GET", f"/v1/videos/{video['id']}")
    assert status == 200 and overhead(headers) < 300, headers

    fake.behaviour["primary"] = "hang"  # the read timeout (1 s) passes, then a 504
    status, headers, _ = await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
    assert status == 504 and overhead(headers) < 300, headers

    fake.behaviour["primary"] = "delay:0.6+status:503"  # refused after a while: the next one takes it
    status, headers, body = await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
    assert status == 200 and len(fake.hits_for("secondary")) == 1, body
    assert overhead(headers) < 300, headers


def test_an_ejection_lasts_at_most_max_ejection_seconds() -> None:
    """Each ejection of a deployment lasts longer (30 s × n), up to a cap (Envoy's max_ejection_time,
    300 s by default): without one, a deployment that failed for a day would stay out for hours
    after it recovered."""
    from gateway.config import Resilience
    from gateway.health import HealthBoard

    now = [0.0]
    board = HealthBoard(
        Resilience(consecutive_failures=1, base_ejection_seconds=30, max_ejection_seconds=300),
        clock=lambda: now[0],
    )
    lengths = []
    for _ in range(20):
        board.record("flaky", "5xx", siblings=("flaky", "steady"))
        lengths.append(board.state("flaky").ejected_until - now[0])
        now[0] = board.state("flaky").ejected_until
        assert board.claim("flaky")  # the probe, which fails again
    assert lengths[:3] == [30, 60, 90] and max(lengths) == 300


def test_failures_while_ejected_do_not_eject_again() -> None:
    """Polls and downloads of a deployment's videos go on while it is ejected (only creates avoid
    it), and during an outage they fail too. Each such failure ejected it again: 30 s, 60 s, ...
    300 s within a second, and the ejection count left the next outage starting at 300 s. As in
    Envoy, a host already ejected is not ejected again; its next ejection is its probe's failure."""
    from gateway.config import Resilience
    from gateway.health import HealthBoard

    now = [0.0]
    board = HealthBoard(
        Resilience(consecutive_failures=2, base_ejection_seconds=30, max_ejection_seconds=300),
        clock=lambda: now[0],
    )
    siblings = ("flaky", "steady")
    for _ in range(10):  # creates, then the polls and downloads that go on during the ejection
        board.record("flaky", "connect", siblings=siblings)
        now[0] += 0.1
    assert board.state("flaky").ejections == 1
    assert board.state("flaky").ejected_until == 0.1 + 30
    now[0] = 31.0
    assert board.claim("flaky")  # the probe fails: the second ejection, twice as long
    board.record("flaky", "connect", siblings=siblings)
    assert board.state("flaky").ejections == 2 and board.state("flaky").ejected_until == 31.0 + 60


async def test_the_ejected_gauge_falls_when_the_ejection_ends_and_a_fixed_provider_starts_afresh(
    start_gateway: StartGateway,
    tmp_path: Path,
    faulty: tuple[FaultyUpstream, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gateway_deployment_ejected said 1 until a later call succeeded: a deployment no create was
    sent to after its ejection ended (or one removed from the config) kept an alert firing for
    good. It falls when the ejection ends. And a reload that changes a deployment's provider (its
    URL fixed, say) clears its record: it is not left ejected for what the old settings did."""
    fake, url = faulty
    fake.behaviour["primary"] = "status:500"
    text = config(
        tmp_path, url, TWO_TIERS, extra="resilience: {consecutive_failures: 2, base_ejection_seconds: 0.5}"
    )
    for name, value in ENV.items():  # a reload reads ${ENV} from the real environment
        monkeypatch.setenv(name, value)
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    gw = await start_gateway(load(text), config_path=path)

    async def ejected() -> float:
        return await sample(gw, 'gateway_deployment_ejected{deployment="up/primary"}')

    for _ in range(2):
        await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
    assert await ejected() == 1
    await asyncio.sleep(0.7)
    assert await ejected() == 0, "the ejection ended, with no create sent since"

    for _ in range(2):  # the probe fails: ejected again, now for 1 s
        await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
    assert await ejected() == 1
    path.write_text(text.replace("poll_after_ms: 100", "poll_after_ms: 200", 1))  # provider "up" changed
    status, _, answer = await post(gw, "/admin/reload", headers=ADMIN)
    assert status == 200 and answer["reloaded"] is True, answer
    assert await ejected() == 0
    _, state = await get(gw, "/admin/deployments", ADMIN)
    assert {r["deployment"]: r for r in state["deployments"]}["up/primary"]["state"] == "healthy"


async def test_a_deployment_a_reload_points_elsewhere_or_removes_starts_afresh(
    start_gateway: StartGateway,
    tmp_path: Path,
    faulty: tuple[FaultyUpstream, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a change to a provider's own settings cleared a deployment's record: "main" pointed from
    a dead provider to a healthy one (or to another upstream model) kept the old target's ejection,
    so its creates went elsewhere for up to max_ejection_seconds, and a removed deployment's gauge
    read 1 until its ejection ran out. The old target's videos poll under "main@down", not "main"."""
    fake, url = faulty
    extra = "resilience: {consecutive_failures: 1, base_ejection_seconds: 60}"
    for name, value in ENV.items():  # a reload reads ${ENV} from the real environment
        monkeypatch.setenv(name, value)
    path = tmp_path / "gateway.yaml"

    def routing(main: str) -> str:
        return config(
            tmp_path,
            url,
            f"resilient:\n  {main}\n  - {{provider: up, model: secondary, priority: 1}}\n",
            extra=extra,
        )

    async def reload(main: str) -> None:
        path.write_text(routing(main))
        status, _, answer = await post(gw, "/admin/reload", headers=ADMIN)
        assert status == 200 and answer["reloaded"] is True, answer

    async def ejected() -> float:
        return await sample(gw, 'gateway_deployment_ejected{deployment="main"}')

    async def create() -> None:
        status, _, answer = await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
        assert status == 200, answer

    path.write_text(routing("- {provider: down, model: primary, name: main}"))
    gw = await start_gateway(load(path.read_text()), config_path=path)
    await create()  # refused by "down": main is ejected for 60 s, the create fails over
    assert await ejected() == 1 and len(fake.hits_for("secondary")) == 1

    await reload("- {provider: up, model: primary, name: main}")  # "up" itself is unchanged
    assert await ejected() == 0
    await create()
    assert len(fake.hits_for("primary")) == 1, "main, now on a healthy provider, takes the create"

    fake.behaviour["primary"] = "status:500"
    await create()
    assert await ejected() == 1 and len(fake.hits_for("secondary")) == 2
    await reload("- {provider: up, model: tertiary, name: main}")  # another upstream model
    await create()
    assert len(fake.hits_for("tertiary")) == 1 and await ejected() == 0

    fake.behaviour["tertiary"] = "status:500"
    await create()
    assert await ejected() == 1
    await reload("")  # main removed
    assert await ejected() == 0, "no deployment of that name is left to be ejected"


async def test_a_reload_that_leaves_a_model_only_ejected_deployments_puts_them_back(
    start_gateway: StartGateway,
    tmp_path: Path,
    faulty: tuple[FaultyUpstream, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model's last available deployment is never ejected, but a reload that removed the healthy
    one left the ejected one alone in its model: every create was refused (503
    no_deployment_available) until its ejection ran out, though its provider had recovered."""
    fake, url = faulty
    for name, value in ENV.items():  # a reload reads ${ENV} from the real environment
        monkeypatch.setenv(name, value)
    extra = "resilience: {consecutive_failures: 1, base_ejection_seconds: 60}"
    path = tmp_path / "gateway.yaml"
    lone = "- {provider: up, model: primary, name: lone}"
    gauge = 'gateway_deployment_ejected{deployment="lone"}'
    path.write_text(
        config(tmp_path, url, f"m:\n  {lone}\n  - {{provider: up, model: secondary}}\n", extra=extra)
    )
    gw = await start_gateway(load(path.read_text()), config_path=path)
    fake.behaviour["primary"] = "status:500"
    for _ in range(40):  # each create picks "lone" first half the time
        status, _, answer = await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"})
        assert status == 200, answer  # from secondary, at once or after failing over
        if fake.hits_for("primary"):
            break
    assert await sample(gw, gauge) == 1
    fake.behaviour["primary"] = "ok"  # the provider recovered

    path.write_text(config(tmp_path, url, f"m:\n  {lone}\n", extra=extra))
    status, _, answer = await post(gw, "/admin/reload", headers=ADMIN)
    assert status == 200 and answer["reloaded"] is True, answer
    status, _, answer = await post(gw, "/v1/videos", json={"prompt": "x", "model": "m"})
    assert status == 200, answer
    assert len(fake.hits_for("primary")) == 2 and await sample(gw, gauge) == 0


async def test_an_answer_the_gateway_cannot_use_counts_as_an_upstream_error(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """A 200 without the job's ID is as much the provider's failure as a 500: the client gets a 502,
    and gateway_upstream_errors_total{kind="payload"} says so (once), as the access log does."""
    fake, url = faulty
    gw = await start_gateway(config(tmp_path, url, TWO_TIERS))

    async def payload_errors() -> float:
        return await sample(gw, 'gateway_upstream_errors_total{kind="payload",provider="up"}')

    before = await payload_errors()
    for behaviour in ("made-no-id", "made-html"):
        fake.behaviour["primary"] = behaviour
        status, _, _ = await post(gw, "/v1/videos", json={"prompt": "x", "model": "resilient"})
        assert status == 502
    assert await payload_errors() - before == 2


async def test_a_remix_404_is_not_called_a_lost_video_when_the_provider_cannot_be_asked(
    start_gateway: StartGateway, tmp_path: Path, faulty: tuple[FaultyUpstream, str]
) -> None:
    """The fault fake has no remix route: its remix answer is aiohttp's 404. The gateway then asks
    for the video to tell a purged job from a missing route; when that check itself fails (a 503,
    a provider too slow), the client was told its video did not exist. It now gets the check's own
    failure, which it may retry."""
    fake, url = faulty
    gw = await start_gateway(config(tmp_path, url, "only:\n  - {provider: up, model: primary}\n"))
    status, _, video = await post(gw, "/v1/videos", json={"model": "only", "prompt": "p"})
    assert status == 200, video
    remix = f"/v1/videos/{video['id']}/remix"
    fake.behaviour["primary"] = "status:503"
    status, headers, answer = await post(gw, remix, json={"prompt": "again"})
    assert status == 503 and answer["error"]["code"] != "video_not_found", answer
    assert headers.get("x-should-retry") != "false"
    fake.behaviour["primary"] = "ok"
    status, _, answer = await post(gw, remix, json={"prompt": "again"})
    assert status == 404 and "still has it" in answer["error"]["message"], answer
