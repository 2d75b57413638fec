"""The task store failing under a running gateway: another process holds SQLite's write lock.

The gateway's connection is given a short busy timeout (the default is 30 s) so that each case
takes a fraction of a second; the failure itself is real: SQLite reports "database is locked".
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from gateway.state import GATEWAY
from tests.conftest import ALPHA_KEY, RunningGateway
from tests.fakes.openai_upstream import FakeOpenAIUpstream

AUTH = {"Authorization": f"Bearer {ALPHA_KEY}"}


@contextmanager
def store_locked(gw: RunningGateway, data_dir: Path) -> Iterator[None]:
    """Hold the store's write lock from another connection, as a stuck process would."""
    gw.app[GATEWAY].store._db.execute("PRAGMA busy_timeout=200")
    other = sqlite3.connect(data_dir / "gateway.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


async def call(gw: RunningGateway, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, gw.url + path, headers=AUTH, **kwargs) as r,
    ):
        return r.status, dict(r.headers), await r.json()


def assert_store_unavailable(status: int, body: Any) -> None:
    assert status == 503, body
    assert body["error"]["code"] == "store_unavailable" and body["error"]["type"] == "server_error"
    assert "locked" not in body["error"]["message"], "SQLite's own words stay in the log"


async def test_a_create_the_store_cannot_record_is_cancelled_upstream_and_not_retried(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], tmp_path: Path
) -> None:
    fake, _ = upstream
    client = openai.AsyncOpenAI(base_url=dialect_gateway.url + "/v1", api_key=ALPHA_KEY, max_retries=2)
    dialect_gateway.clients.append(client)
    with store_locked(dialect_gateway, tmp_path), pytest.raises(openai.InternalServerError) as caught:
        await client.videos.create(prompt="x", model="sora-remote")
    response = caught.value.response
    assert response.status_code == 503 and response.headers["x-should-retry"] == "false"
    assert_store_unavailable(response.status_code, response.json())
    assert len(fake.requests("POST", "/v1/videos")) == 1, "the SDK did not retry into a second job"
    assert len(fake.requests("DELETE")) == 1 and fake.jobs == {}, "the job was cancelled upstream"
    assert (await client.videos.list()).data == []


async def test_while_the_store_is_locked_reads_go_on_and_a_delete_is_a_503_that_a_retry_completes(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], tmp_path: Path
) -> None:
    fake, _ = upstream
    status, _, video = await call(
        dialect_gateway, "POST", "/v1/videos", json={"prompt": "x", "model": "sora-remote"}
    )
    assert status == 200
    path = f"/v1/videos/{video['id']}"
    with store_locked(dialect_gateway, tmp_path):
        status, _, body = await call(dialect_gateway, "GET", path)
        assert status == 200 and body["status"] == "in_progress", "a poll answers the provider's news"
        status, _, body = await call(dialect_gateway, "GET", "/v1/videos")
        assert status == 200 and [v["id"] for v in body["data"]] == [video["id"]], "reads go on (WAL)"
        status, headers, body = await call(dialect_gateway, "DELETE", path)
        assert_store_unavailable(status, body)
        assert headers["Retry-After"] == "1" and "x-should-retry" not in headers, "safe to retry"
    assert fake.jobs == {}, "the delete reached the provider before the store failed"

    status, _, body = await call(dialect_gateway, "GET", path)
    assert status == 404 and body["error"]["code"] == "video_not_found", "gone at the provider"
    assert video["id"] in body["error"]["message"] and "up_" not in body["error"]["message"]
    status, _, body = await call(dialect_gateway, "DELETE", path)
    assert status == 200 and body == {"id": video["id"], "object": "video.deleted", "deleted": True}
    status, _, body = await call(dialect_gateway, "GET", path)
    assert status == 404 and body["error"]["code"] == "video_not_found"
    status, _, body = await call(dialect_gateway, "GET", "/v1/videos")
    assert body["data"] == []
