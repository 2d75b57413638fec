"""The task store failing under a running gateway: another process holds SQLite's write lock.

The gateway's connection is given a short busy timeout (the default is 30 s) so that each case
takes a fraction of a second; the failure itself is real: SQLite reports "database is locked".
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway import api
from gateway.state import GATEWAY
from gateway.store import StoreUnavailable
from tests.conftest import ALPHA_KEY, RunningGateway, StartGateway, call
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.test_upstream_answers import JOB, RandomAnswers, one_key_config
from tests.test_upstream_failures import log_lines, wait_for_event


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


async def test_a_stuck_write_holds_up_no_read_and_takes_the_replica_out_of_rotation(
    dialect_gateway: RunningGateway,
    upstream: tuple[FakeOpenAIUpstream, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A delete waits on another process's lock: lists and uncached reads still answer, polls with
    news after a short wait for their own save rather than the store's busy timeout, and /readyz says
    503 (store_unavailable) once the write has waited too long, then ready again."""
    monkeypatch.setattr(api, "SAVE_WAIT_SECONDS", 0.2)
    store = dialect_gateway.app[GATEWAY].store
    kept, video = [
        (await call(dialect_gateway, "POST", "/v1/videos", json={"prompt": p, "model": "sora-remote"}))[2]
        for p in ("kept", "deleted")
    ]
    store._cache.clear()  # the next read goes to the database
    store.stuck_write_seconds = 0.3
    store._db.execute("PRAGMA busy_timeout=3000")
    other = sqlite3.connect(tmp_path / "gateway.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        deleting = asyncio.create_task(call(dialect_gateway, "DELETE", f"/v1/videos/{video['id']}"))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        status, _, body = await call(dialect_gateway, "GET", "/v1/videos")
        assert status == 200 and [v["id"] for v in body["data"]] == [video["id"], kept["id"]]
        status, _, body = await call(dialect_gateway, "GET", f"/v1/videos/{kept['id']}")
        assert status == 200, body
        assert time.monotonic() - started < 1.5, "reads waited for the stuck write (3 s)"
        status, _, body = await call(dialect_gateway, "GET", "/readyz")
        assert status == 503 and body["status"] == "store_unavailable" and "write" in body["detail"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    status, _, body = await deleting
    assert status == 200 and body["deleted"] is True
    deadline = time.monotonic() + 5
    while (await call(dialect_gateway, "GET", "/readyz"))[0] != 200:  # the saves queued meanwhile
        assert time.monotonic() < deadline, "the store never became ready again"
        await asyncio.sleep(0.05)


def stored(data_dir: Path, video_id: str) -> tuple[str, int]:
    """What the database holds for a video, read past every process's cache."""
    db = sqlite3.connect(data_dir / "gateway.sqlite3")
    try:
        status, video = db.execute("SELECT status, video FROM tasks WHERE id=?", (video_id,)).fetchone()
    finally:
        db.close()
    return status, json.loads(video)["progress"]


async def test_news_a_poll_could_not_save_is_saved_by_the_next_poll_that_learns_it(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], tmp_path: Path
) -> None:
    """The client hears the news at once; the task stays as saved until a later poll saves it, so a
    video the store never saw progress on is not taken for saved (nor lost across a restart)."""
    fake, _ = upstream
    status, _, video = await call(
        dialect_gateway, "POST", "/v1/videos", json={"prompt": "p", "model": "sora-remote"}
    )
    assert status == 200
    (job,) = fake.jobs.values()
    path = f"/v1/videos/{video['id']}"
    with store_locked(dialect_gateway, tmp_path):
        status, _, body = await call(dialect_gateway, "GET", path)
    assert status == 200 and (body["status"], body["progress"]) == ("in_progress", 40)
    assert stored(tmp_path, video["id"]) == ("queued", 0), "the save could not happen"

    job.update(status="queued", progress=0)  # so the provider tells the next poll the same news
    status, _, body = await call(dialect_gateway, "GET", path)
    assert status == 200 and (body["status"], body["progress"]) == ("in_progress", 40)
    assert stored(tmp_path, video["id"]) == ("in_progress", 40)


async def test_a_delete_whose_client_left_and_the_store_failed_is_logged_as_the_stores_failure(
    dialect_gateway: RunningGateway, tmp_path: Path, session_log: Path
) -> None:
    """A delete finished without its client (api.shielded) that the store could not record is logged
    as the envelope logs such a failure, not as a gateway bug."""
    client = dialect_gateway.sdk()
    video = await client.videos.create(model="sora-remote", prompt="to delete [slow]")  # type: ignore[arg-type]
    with store_locked(dialect_gateway, tmp_path):
        with pytest.raises(openai.APITimeoutError):
            await client.videos.delete(video.id, extra_headers={"X-Request-ID": "left-locked-1"}, timeout=0.3)
        await wait_for_event(session_log, "left-locked-1", "store_unavailable")
    errors = [line["event"] for line in log_lines(session_log, "left-locked-1") if line["level"] == "error"]
    assert errors == ["store_unavailable"]


async def test_a_limited_keys_create_the_store_cannot_record_is_not_retried_either(
    start_gateway: Any, upstream: tuple[FakeOpenAIUpstream, str], tmp_path: Path
) -> None:
    """With limits, the create's admission is settled after the handler, a store write too: failing
    as well, its error replaced the answer that said not to retry (a plain 503), and the SDK's retry
    started and billed a second job."""
    from tests.conftest import gateway_yaml

    fake, url = upstream
    text = gateway_yaml(tmp_path, upstream_url=url).replace(
        "key: ${ALPHA_KEY}",
        "key: ${ALPHA_KEY}\n    limits: {creates_per_minute: 100, max_in_progress: 10}",
        1,
    )
    assert "creates_per_minute" in text
    gw = await start_gateway(text)
    adapter = gw.app[GATEWAY].table.adapter("dialect")
    accepted = adapter.create
    locks: list[Any] = []

    async def accepted_then_locked(call: Any, body: Any) -> Any:
        answer = await accepted(call, body)  # the provider took the job; now the store is stuck
        locks.append(store_locked(gw, tmp_path))
        locks[-1].__enter__()
        return answer

    adapter.create = accepted_then_locked  # type: ignore[method-assign]
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=ALPHA_KEY, max_retries=2)
    gw.clients.append(client)
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.videos.create(prompt="x", model="sora-remote")
    finally:
        for lock in locks:
            lock.__exit__(None, None, None)
    response = caught.value.response
    assert response.status_code == 503 and response.headers.get("x-should-retry") == "false", response.text
    assert len(fake.requests("POST", "/v1/videos")) == 1, "the SDK did not retry into a second job"


async def test_a_streamed_create_the_store_cannot_record_ends_with_an_error_event(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], tmp_path: Path
) -> None:
    """The stream's 200 has gone out when its first video is to be recorded: a store that fails then
    left the client waiting on an open stream (until its own timeout, then a retry and a second
    job). It now gets an error event in the OpenAI envelope, and the stream ends."""
    import aiohttp

    fake, _ = upstream
    with store_locked(dialect_gateway, tmp_path):
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
            session.post(
                dialect_gateway.url + "/v1/videos",
                json={"prompt": "x", "model": "sora-remote", "stream": True},
                headers={"Authorization": f"Bearer {ALPHA_KEY}"},
            ) as response,
        ):
            assert response.status == 200
            raw = (await response.read()).decode()
    event, _, data = raw.strip().partition("\n")
    assert event == "event: error", raw
    error = json.loads(data.removeprefix("data: "))["error"]
    assert error["code"] == "store_unavailable" and "retry" in error["message"]
    assert len(fake.requests("DELETE")) == 1, "the job was cancelled upstream"


async def test_a_store_file_removed_under_the_gateway_takes_no_more_creates(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], tmp_path: Path
) -> None:
    """The data directory wiped (or a volume remounted) under a running gateway: SQLite writes on
    into the open, unlinked file, so creates answered 200 with IDs that the next restart no longer
    knew. The store now sees its file gone: creates are refused (the job cancelled upstream) and
    /readyz takes the replica out of rotation."""
    fake, _ = upstream
    client = dialect_gateway.sdk()
    await client.videos.create(prompt="before", model="sora-remote")
    for path in tmp_path.glob("gateway.sqlite3*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(openai.InternalServerError) as caught:
        await client.videos.create(prompt="after", model="sora-remote")
    assert_store_unavailable(caught.value.status_code, caught.value.response.json())
    assert len(fake.jobs) == 1, "the second job was cancelled upstream"
    status, _, body = await call(dialect_gateway, "GET", "/readyz")
    assert status == 503 and body["status"] == "store_unavailable", body


class FullDisk:
    """The store's writing connection on a full disk: SQLite fails every write at once ("database
    or disk is full") while reads, served from pages already written, go on."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.full = True

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if self.full and not sql.lstrip().upper().startswith(("SELECT", "PRAGMA", "ROLLBACK")):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


async def test_a_full_disk_takes_the_replica_out_of_rotation_until_writes_go_through(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str]
) -> None:
    """Writes that fail at once (a full disk) said nothing to /readyz, which asked only for reads
    and for a write stuck waiting: a load balancer kept sending creates, each a job started upstream,
    then cancelled. /readyz now tries a write of its own (here at every call), so a worker that had
    no create to fail knows too, and answers 503 until one goes through: with no traffic to write,
    the replica comes back once the disk has room."""
    fake, _ = upstream
    store = dialect_gateway.app[GATEWAY].store
    store.probe_seconds = 0.0
    disk = store._db = FullDisk(store._db)
    try:
        status, _, body = await call(dialect_gateway, "GET", "/readyz")
        assert status == 503 and "disk is full" in body["detail"], "before any create failed here"
        with pytest.raises(openai.InternalServerError) as caught:
            await dialect_gateway.sdk().videos.create(prompt="x", model="sora-remote")
        assert_store_unavailable(caught.value.status_code, caught.value.response.json())
        assert fake.jobs == {}, "the job was cancelled upstream"
        for _ in range(2):  # and not only at the first look
            status, _, body = await call(dialect_gateway, "GET", "/readyz")
            assert status == 503 and body["status"] == "store_unavailable", body
            assert "disk is full" in body["detail"]
        disk.full = False
        status, _, body = await call(dialect_gateway, "GET", "/readyz")
        assert status == 200 and body == {"status": "ready"}
        video = await dialect_gateway.sdk().videos.create(prompt="y", model="sora-remote")
        assert (await dialect_gateway.sdk().videos.retrieve(video.id)).prompt == "y"
    finally:
        store._db = disk.db


async def test_polls_while_the_store_is_stuck_queue_one_save_per_video(
    start_gateway: StartGateway, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The store writes one thing at a time. Stuck (another process holding its lock), it gathered
    a save for every poll that learnt something, each to wait out the lock in turn, and a create's
    insert waited behind them all (72 s in the review, for a lock held 75 s). A video's saves now
    queue no deeper than one: news that comes meanwhile replaces the save waiting, and the latest
    is what gets written."""
    fake = RandomAnswers()
    server = await aiohttp_server(fake.app())
    url = str(server.make_url("")).rstrip("/")
    providers = {"up": {"kind": "openai", "base_url": f"{url}/v1"}}
    gw = await start_gateway(one_key_config(tmp_path, providers, {"remote": {"provider": "up"}}))
    status, _, video = await call(gw, "POST", "/v1/videos", json={"prompt": "p", "model": "remote"})
    assert status == 200
    store = gw.app[GATEWAY].store
    writes: list[int] = []
    real_update = store.update

    async def counted(task: Any) -> bool:
        writes.append(task.video["progress"])
        return await real_update(task)

    store.update = counted  # type: ignore[method-assign]

    def news(progress: int) -> bytes:
        return json.dumps({**JOB, "status": "in_progress", "progress": progress}).encode()

    with store_locked(gw, tmp_path):
        store._db.execute("PRAGMA busy_timeout=1000")  # each try waits out 1 s: the polls fit in one
        polls = []
        asked = len(fake.polled)
        for progress in range(1, 21):
            fake.next = news(progress)
            polls.append(asyncio.ensure_future(call(gw, "GET", f"/v1/videos/{video['id']}")))
            async with asyncio.timeout(10):  # this poll has had its news before the next is set
                while len(fake.polled) < asked + progress:
                    await asyncio.sleep(0.005)
        answers = await asyncio.gather(*polls)
    assert [a[2]["progress"] for a in answers] == list(range(1, 21)), "each poll answers its news"
    assert len(writes) <= 3, writes
    fake.next = news(21)  # the store is free again: the latest news is saved, the wait behind or not
    assert (await call(gw, "GET", f"/v1/videos/{video['id']}"))[2]["progress"] == 21
    for _ in range(100):
        saved = await store.get(video["id"], "alpha")
        if saved is not None and saved.video["progress"] == 21:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"the latest news was not saved: {writes}")


async def test_a_failed_replay_lookup_does_not_fail_a_started_job(
    dialect_gateway: RunningGateway, upstream: tuple[FakeOpenAIUpstream, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an Idempotency-Key, the gateway asks the store whether the job the provider answered is
    one the caller has already. That read failing, once the provider has started the job, was a
    plain retryable 503: the client, told to try again, would start a second job. The job is
    recorded as any other (and, were the store down for that too, answered for as such)."""
    fake, _ = upstream

    async def unreadable(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("task store: disk I/O error")

    monkeypatch.setattr(dialect_gateway.app[GATEWAY].store, "find_upstream", unreadable)
    video = await dialect_gateway.sdk().videos.create(
        prompt="keyed", model="sora-remote", extra_headers={"Idempotency-Key": "k-1"}
    )
    assert len(fake.jobs) == 1
    assert (await dialect_gateway.sdk().videos.retrieve(video.id)).prompt == "keyed"
