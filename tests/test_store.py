"""The SQLite task store shared by several processes: two store objects on one file stand in for
two workers (each has its own connection, cache and thread, as a worker process does)."""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.store import DeleteEpoch, SQLiteTaskStore, Task


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[SQLiteTaskStore, SQLiteTaskStore]]:
    a, b = SQLiteTaskStore(tmp_path / "gw.sqlite3"), SQLiteTaskStore(tmp_path / "gw.sqlite3")
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


def task(task_id: str = "video_1", owner: str = "alpha", status: str = "in_progress") -> Task:
    return Task(
        id=task_id,
        owner=owner,
        model="sora-2",
        deployment="up/sora",
        provider="up",
        upstream_id="job_1",
        created_at=int(time.time()),
        status=status,
        video={"id": task_id, "status": status, "progress": 10},
    )


async def test_a_delete_elsewhere_empties_every_cache(pair) -> None:
    a, b = pair
    await a.add(task())
    assert (await b.get("video_1", "alpha")) is not None  # now cached in b
    assert (await b.get("video_1", "beta")) is None
    assert await a.delete("video_1", "alpha")
    assert (await b.get("video_1", "alpha")) is None
    assert (await a.get("video_1", "alpha")) is None
    assert not await b.delete("video_1", "alpha")


async def test_the_cache_holds_a_bounded_amount_of_prompt_text(tmp_path: Path) -> None:
    """The cache kept its last 10 000 tasks whatever their size: one key's videos with the longest
    prompts the API allows (32 000 characters) would have held 320 MB or more in every worker.
    Evicted tasks are still read from the file."""
    store = SQLiteTaskStore(tmp_path / "gw.sqlite3", cache_chars=200_000)
    await store.open()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(100):
            long = task(f"video_{n}")
            long.video["prompt"] = f"{n} " + "a long prompt " * 2_285  # 32 000 characters
            await store.add(long)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 1_000_000, f"{held} bytes held for 3.2 MB of prompts"
    first = await store.get("video_0", "alpha")
    assert first is not None and first.video["prompt"].startswith("0 a long prompt")
    await store.close()


async def test_one_upstream_job_is_added_once_per_owner_across_processes(pair) -> None:
    """Two processes recording one provider job at once (concurrent creates under one
    Idempotency-Key): the second gets the first's task; another owner's, or a deleted one, is no
    match."""
    a, b = pair
    results = await asyncio.gather(a.add_once(task("video_a")), b.add_once(task("video_b")))
    first, second = ("video_a", "video_b") if results[0] is None else ("video_b", "video_a")
    known = results[1] if results[0] is None else results[0]
    assert known is not None and known.id == first, results
    assert await a.get(first, "alpha") is not None and await a.get(second, "alpha") is None
    assert await a.add_once(task("video_c", owner="beta")) is None, "another owner's job of that ID"
    assert await a.delete(first, "alpha")
    assert await b.add_once(task("video_d")) is None, "a deleted video is no match"


async def test_a_keys_deleted_videos_are_not_read_past_by_its_lists(tmp_path: Path) -> None:
    """Deleted videos keep their rows (marked deleted), and a list read past every one of them to
    fill a page: 400 ms with a million, on the one thread every read of the process waits for. A
    list's work (SQLite's own instruction count) no longer grows with the key's deleted videos."""
    from gateway.store import _INSERT, _row

    store = SQLiteTaskStore(tmp_path / "gw.sqlite3")
    await store.open()
    try:

        def seed(first: int, count: int, deleted: bool) -> None:
            store._db.execute("BEGIN")
            (before,) = store._db.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()
            for n in range(first, first + count):
                row = task(f"video_{n}")
                row.upstream_id = f"job_{n}"
                store._db.execute(_INSERT, _row(row))
            if deleted:
                store._db.execute("UPDATE tasks SET deleted_at=1 WHERE seq > ?", (before,))
            store._db.execute("COMMIT")

        async def work_of_a_list() -> int:
            steps = [0]

            def count() -> int:
                steps[0] += 1
                return 0

            store._read_db.set_progress_handler(count, 100)
            try:
                page, more = await store.list("alpha", after=None, limit=5, order="desc")
            finally:
                store._read_db.set_progress_handler(None, 100)
            assert len(page) == 5 and not more
            return steps[0]

        seed(0, 200, deleted=True)
        seed(1_000_000, 5, deleted=False)
        few = await work_of_a_list()
        seed(200, 20_000, deleted=True)
        assert await work_of_a_list() <= few + 2, "the list read the deleted rows"
    finally:
        await store.close()


async def test_a_full_disk_is_reported_as_such_by_a_write_transaction(tmp_path: Path) -> None:
    """SQLite ends a transaction itself when the disk is full; rolling it back again raised "cannot
    rollback - no transaction is active", which hid the real reason from the log and /readyz. The
    file may not grow here (max_page_count), as on a full disk."""
    from gateway.store import StoreUnavailable

    store = SQLiteTaskStore(tmp_path / "gw.sqlite3")
    await store.open()
    try:
        (pages,) = store._db.execute("PRAGMA page_count").fetchone()
        store._db.execute(f"PRAGMA max_page_count={pages}")
        big = task("video_big")
        big.video = {"prompt": "x" * 100_000}
        with pytest.raises(StoreUnavailable, match="full"):
            await store.add_once(big)
    finally:
        await store.close()


async def test_the_update_that_lost_the_race_adopts_the_stored_video(pair) -> None:
    a, b = pair
    await a.add(task())
    first, second = await a.get("video_1", "alpha"), await b.get("video_1", "alpha")
    assert first is not None and second is not None
    first = replace(
        first, status="completed", video={"id": "video_1", "status": "completed", "completed_at": 111}
    )
    second = replace(
        second, status="completed", video={"id": "video_1", "status": "completed", "completed_at": 222}
    )
    assert await a.update(first) is True, "the first to finish it counts it"
    assert await b.update(second) is False
    assert second.video["completed_at"] == 111
    again = await b.get("video_1", "alpha")
    assert again is not None and again.video["completed_at"] == 111


async def test_a_workers_stale_copy_never_takes_the_video_backwards(pair) -> None:
    """Each worker caches its own copy of a task; one whose copy is behind what a sibling wrote (a
    poll of its own saying less: queued, or less progress) takes the stored video and state rather
    than writing over them, so every answer from then on shows the further one."""
    a, b = pair
    await a.add(task(status="queued"))
    stale = await b.get("video_1", "alpha")  # b's copy: queued, 10 %
    ahead = await a.get("video_1", "alpha")
    assert stale is not None and ahead is not None
    ahead = replace(
        ahead, status="in_progress", video={**ahead.video, "status": "in_progress", "progress": 60}
    )
    ahead.state = {"processing_since": 1000.0}
    await a.update(ahead)
    for status, progress in (("queued", 30), ("in_progress", 40)):
        behind = replace(stale, status=status, video={**stale.video, "status": status, "progress": progress})
        behind.state = {"processing_since": 2000.0}
        assert await b.update(behind) is False
        assert (behind.status, behind.video["progress"], behind.state) == (
            "in_progress",
            60,
            {"processing_since": 1000.0},
        )
        assert (await b.get("video_1", "alpha")).video["progress"] == 60  # type: ignore[union-attr]
    further = replace(
        stale, status="in_progress", video={**stale.video, "status": "in_progress", "progress": 70}
    )
    await b.update(further)  # further on than what is stored: written
    fresh = SQLiteTaskStore(a._path)
    await fresh.open()
    try:
        assert (await fresh.get("video_1", "alpha")).video["progress"] == 70  # type: ignore[union-attr]
    finally:
        await fresh.close()


async def test_a_poll_in_flight_during_a_delete_does_not_bring_the_video_back(pair) -> None:
    """The poll read the task, the client deleted it, then the poll's news arrived and was saved."""
    a, b = pair
    await a.add(task())
    polled = await a.get("video_1", "alpha")
    assert polled is not None
    assert await a.delete("video_1", "alpha")
    polled.status, polled.video = "completed", {"id": "video_1", "status": "completed"}
    assert await a.update(polled) is False, "a deleted video is not counted as finished"
    for store in (a, b):
        assert await store.get("video_1", "alpha") is None
    assert not await a.delete("video_1", "alpha"), "nothing left to delete a second time"


async def test_create_limits_are_counted_once_for_all_processes(pair) -> None:
    a, b = pair
    admitted = [await s.admit("alpha", per_minute=3, max_active=None) for s in (a, b, a, b)]
    assert [x.limit for x in admitted] == [None, None, None, "creates_per_minute"]
    assert [x.window for x in admitted] == [1, 2, 3, 3]
    assert 59 <= admitted[-1].reset_seconds <= 60
    other = await b.admit("beta", per_minute=3, max_active=None)
    assert other.limit is None and other.window == 1


async def test_in_progress_counts_pending_creates_and_stored_videos(pair) -> None:
    a, b = pair
    first = await a.admit("alpha", per_minute=None, max_active=2)
    second = await b.admit("alpha", per_minute=None, max_active=2)
    assert first.id is not None and second.id is not None
    assert (await a.admit("alpha", per_minute=None, max_active=2)).limit == "max_in_progress"
    await a.add(task())  # the first create's video, then its admission settles
    await a.settle(first)
    assert (await b.admit("alpha", per_minute=None, max_active=2)).limit == "max_in_progress"
    await b.settle(second)  # the second create failed upstream: no video
    assert (await b.admit("alpha", per_minute=None, max_active=2)).limit is None


async def test_concurrent_admissions_never_overshoot(pair) -> None:
    a, b = pair
    results = await asyncio.gather(*(s.admit("alpha", per_minute=5, max_active=None) for s in (a, b) * 10))
    assert sum(r.limit is None for r in results) == 5


async def test_workers_opening_a_new_store_together_all_succeed(tmp_path: Path) -> None:
    """Workers start at once on a fresh data_dir; switching the new file to WAL must not make one of
    them fail with "database is locked" (which stops the whole gateway at start-up)."""
    for attempt in range(40):
        path = tmp_path / str(attempt) / "gw.sqlite3"
        stores = [SQLiteTaskStore(path) for _ in range(6)]
        opened = await asyncio.gather(*(store.open() for store in stores), return_exceptions=True)
        for store, result in zip(stores, opened, strict=True):
            if not isinstance(result, BaseException):
                await store.close()
        assert [r for r in opened if isinstance(r, BaseException)] == []


def admit_and_die(path: Path) -> None:
    """Another process admits a create for alpha and dies with it pending (no close, no settle)."""
    code = textwrap.dedent(f"""
        import asyncio, os
        from pathlib import Path
        from gateway.store import SQLiteTaskStore

        async def main():
            store = SQLiteTaskStore(Path({str(path)!r}))
            await store.open()
            assert (await store.admit("alpha", per_minute=None, max_active=1)).id is not None
            os._exit(0)

        asyncio.run(main())
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


async def test_a_dead_process_does_not_hold_a_key_at_its_in_progress_cap(pair, tmp_path: Path) -> None:
    a, _ = pair
    admit_and_die(tmp_path / "gw.sqlite3")
    admitted = await a.admit("alpha", per_minute=None, max_active=1)
    assert admitted.limit is None, "the dead process's pending create was settled"
    assert (await a.admit("alpha", per_minute=None, max_active=1)).limit == "max_in_progress"
    assert sorted(p.name for p in (tmp_path / "gw.sqlite3-boots").iterdir()) == sorted(
        [a._lease.boot, pair[1]._lease.boot]
    ), "the dead process's lease is gone, the live ones stay"


async def test_a_live_process_keeps_its_pending_creates(pair) -> None:
    a, b = pair
    assert (await b.admit("alpha", per_minute=None, max_active=1)).id is not None
    assert (await a.admit("alpha", per_minute=None, max_active=1)).limit == "max_in_progress"


async def test_a_store_from_before_boot_ids_opens_and_forgets_its_pending_creates(tmp_path: Path) -> None:
    path = tmp_path / "gw.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE admissions (id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL,
                                 at REAL NOT NULL, pending INTEGER NOT NULL);
    """)
    old.execute("INSERT INTO admissions (owner, at, pending) VALUES ('alpha', ?, 1)", (time.time(),))
    old.commit()
    old.close()
    store = SQLiteTaskStore(path)
    await store.open()
    try:
        first = await store.admit("alpha", per_minute=2, max_active=1)
        assert first.limit is None and first.window == 2, "the old row still counts in the rate window"
        assert (await store.admit("alpha", per_minute=5, max_active=1)).limit == "max_in_progress"
    finally:
        await store.close()


async def test_counting_a_keys_unfinished_videos_does_not_grow_with_its_history(tmp_path: Path) -> None:
    """Each create under max_in_progress counts the key's unfinished videos inside the store's write
    lock, and a list refreshes them: work that must not grow with the key's finished videos (a scan
    of a million took 180 ms, so a busy gateway's creates queued behind it). Counted in SQLite's own
    VM steps, not in time."""
    path = tmp_path / "gw.sqlite3"
    store = SQLiteTaskStore(path)
    await store.open()
    try:
        await store.add(task("video_unfinished", status="in_progress"))
        history = sqlite3.connect(path, isolation_level=None)
        history.execute("BEGIN")
        history.executemany(
            "INSERT INTO tasks (id, owner, kind, model, deployment, provider, upstream_id, created_at, "
            "status, video, state, updated_at) VALUES (?, 'alpha', 'video', 'm', 'd', 'p', ?, 0, "
            "'completed', '{}', '{}', 0)",
            ((f"video_done_{i}", f"job_{i}") for i in range(20_000)),
        )
        history.execute("COMMIT")
        history.close()

        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        assert store._db is not None and store._read_db is not None
        for connection in (store._db, store._read_db):
            connection.set_progress_handler(count, 100)
        admission = await store.admit("alpha", per_minute=None, max_active=2)
        assert admission.id is not None
        assert [t.id for t in await store.active("alpha")] == ["video_unfinished"]
        assert steps * 100 < 20_000, f"{steps * 100} VM steps for one unfinished video among 20 000"
    finally:
        await store.close()


async def test_another_tenants_video_is_looked_up_as_an_unknown_one_is(
    pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 404 for another key's video must not come faster than one for an ID that does not exist:
    answered from the cache at once, it would tell a prober (by timing alone; the bodies are one)
    that the ID is someone's. Both take the same path, a read of the store."""
    a, _ = pair
    await a.add(task("video_mine", owner="alpha"))
    assert await a.get("video_mine", "alpha") is not None  # cached
    reads: list[str] = []
    real = a._read

    async def counted(sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        reads.append(sql)
        return await real(sql, params)

    monkeypatch.setattr(a, "_read", counted)
    assert await a.get("video_nobodys", "beta") is None
    assert await a.get("video_mine", "beta") is None
    assert await a.get("video_mine", "alpha", kind="character") is None
    assert len(reads) == 3 and len(set(reads)) == 1
    assert await a.get("video_mine", "alpha") is not None and len(reads) == 3, "the owner's stays cached"


async def test_the_store_is_readable_by_the_gateways_user_alone(tmp_path: Path) -> None:
    """Prompts and the names of keys: other local users must not read them, whatever the umask."""
    old = os.umask(0o022)
    try:
        store = SQLiteTaskStore(tmp_path / "data" / "gw.sqlite3")
        await store.open()
        await store.add(task())
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
        for path in (tmp_path / "data").iterdir():
            assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path.name
        assert {p.name for p in (tmp_path / "data").iterdir()} >= {"gw.sqlite3", "gw.sqlite3-wal"}
    finally:
        await store.close()


def test_the_delete_counter_owns_its_disk_block_before_the_first_delete(tmp_path: Path) -> None:
    """The counter is written through a memory map: a write into a hole needs a disk block, which a
    full disk answers with SIGBUS (the process dies mid-delete). Its file is written when opened,
    so a full disk fails the start instead: a new file, and one an older gateway left a hole."""
    path = tmp_path / "epoch"
    epoch = DeleteEpoch(path)
    assert os.stat(path).st_blocks > 0
    epoch.bump()
    epoch.close()
    epoch = DeleteEpoch(path)
    assert epoch.read() == 1, "opening keeps the count"
    epoch.close()
    os.truncate(path, 0)
    os.truncate(path, 8)  # a hole, as the older gateway's ftruncate left it
    assert os.stat(path).st_blocks == 0
    epoch = DeleteEpoch(path)
    assert os.stat(path).st_blocks > 0
    epoch.bump()
    assert epoch.read() == 1
    epoch.close()
