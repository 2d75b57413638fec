"""The task store: who owns which video, and where it lives upstream.

A row is written, and committed to disk, before the client learns the video's ID, so an accepted
video can always be found again after a restart. :class:`TaskStore` is the seam for a shared store
(Redis) serving many replicas; :class:`SQLiteTaskStore` is the embedded default.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import mmap
import os
import secrets
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

ACTIVE_STATUSES = ("queued", "in_progress")
# A key's unfinished videos, counted at each create it makes under max_in_progress and listed to be
# refreshed, are found through the partial index tasks_unfinished, whatever the key's history: a scan
# of its 1 000 000 finished videos took 180 ms, inside the write lock every create takes. SQLite uses
# a partial index only for a query whose WHERE has the index's own terms, so they are written out,
# not bound, and the queries name it (INDEXED BY): by itself the planner takes tasks_live for an
# ORDER BY seq. Lists read tasks_live, the index of live rows, so a key's deleted videos (rows kept,
# marked deleted) are never read past: with a million of them a page took 400 ms, not 0.1 ms.
_UNFINISHED = "deleted_at IS NULL AND status IN ({})".format(", ".join(f"'{s}'" for s in ACTIVE_STATUSES))


class StoreUnavailable(Exception):
    """The store could not be read or written (locked past its busy timeout, disk full, I/O error).

    Every :class:`TaskStore` method may raise it; the app answers 503 rather than a generic 500.
    """


@dataclass
class Task:
    """One video (or character) the gateway handed out an ID for.

    ``video`` is the last normalised object the client was shown; ``state`` holds whatever the
    adapter needs to find the job again (operation name, task type, region...).
    """

    id: str
    owner: str
    model: str
    deployment: str
    provider: str
    upstream_id: str
    created_at: int
    status: str
    kind: str = "video"
    video: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    updated_at: float = field(default_factory=time.time)


class TaskStore(Protocol):
    async def add(self, task: Task) -> None: ...

    async def get(self, task_id: str, owner: str, kind: str = "video", *, cached: bool = True) -> Task | None:
        """The owner's live task, or None (unknown, foreign and deleted IDs alike).

        It may be the store's cached copy, shared by every request: change it with
        ``dataclasses.replace``, never in place (a poll whose news is not saved yet must not be
        taken for saved by the next one). ``cached=False`` reads what the store holds, for a
        decision that must not rest on this process's copy (another process may have saved since).
        """

    async def add_once(self, task: Task) -> Task | None:
        """Add ``task`` unless its owner has a live task for the same upstream job (deployment and
        upstream ID): then that task, and nothing is added. One step for every process on the store:
        a provider that answers concurrent creates with one job (an Idempotency-Key sent twice) gives
        the owner one video."""

    async def find_upstream(self, owner: str, deployment: str, upstream_id: str) -> Task | None: ...

    async def update(self, task: Task) -> bool:
        """Save news about an unfinished task; a finished task is never changed again.

        True when this very call moved the task to a terminal status (count it once).
        """

    async def delete(self, task_id: str, owner: str) -> bool: ...

    async def list(
        self, owner: str, *, after: str | None, limit: int, order: str, kind: str = "video"
    ) -> tuple[list[Task], bool]:
        """A page of the owner's tasks and whether more follow; raises KeyError for a bad cursor."""

    async def active(self, owner: str) -> list[Task]:
        """The owner's videos last seen queued or in progress."""

    async def admit(self, owner: str, *, per_minute: int | None, max_active: int | None) -> Admission:
        """Atomically check an owner's create limits and, when they allow it, count one more create
        (pending until :meth:`settle`). Every process and replica on the store sees the same counts."""

    async def settle(self, admission: Admission) -> None:
        """The admitted create has ended (its video, if any, is in the store by now)."""

    async def health(self) -> str | None:
        """None while the store serves reads and writes; else what is wrong, for ``/readyz``."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Admission:
    """The outcome of :meth:`TaskStore.admit`: refused (``limit`` names which) or admitted as ``id``.

    ``window`` is the number of creates in the last minute, this one included when admitted, and
    ``reset_seconds`` how long until the oldest of them leaves the window.
    """

    id: int | None
    limit: str | None
    window: int
    reset_seconds: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    model TEXT NOT NULL,
    deployment TEXT NOT NULL,
    provider TEXT NOT NULL,
    upstream_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    video TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_at REAL NOT NULL,
    deleted_at REAL
);
CREATE INDEX IF NOT EXISTS tasks_live ON tasks (owner, kind, seq) WHERE deleted_at IS NULL;
DROP INDEX IF EXISTS tasks_owner;
CREATE INDEX IF NOT EXISTS tasks_upstream ON tasks (deployment, upstream_id);
CREATE INDEX IF NOT EXISTS tasks_unfinished ON tasks (owner, kind, status) WHERE __UNFINISHED__;
CREATE TABLE IF NOT EXISTS admissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    at REAL NOT NULL,
    pending INTEGER NOT NULL,
    boot TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS admissions_owner ON admissions (owner, at);
CREATE TABLE IF NOT EXISTS write_probe (id INTEGER PRIMARY KEY, at REAL NOT NULL);
""".replace("__UNFINISHED__", _UNFINISHED)

WINDOW_SECONDS = 60.0
# A backstop: a create still pending after this long no longer counts, even when its process seems
# alive. A process that died is noticed at once (see :class:`BootLease`).
PENDING_SECONDS = 900.0

_COLUMNS = (
    "id, owner, model, deployment, provider, upstream_id, created_at, status, kind, video, state, updated_at"
)


class DeleteEpoch:
    """A counter, in a small file beside the database, that every process using it bumps on delete.

    Each process caches tasks it wrote or read. Another process can change such an entry behind its
    back in two ways: a delete, which bumps this counter so that every process drops its cache when
    the counter moved (reading it is one load from shared memory); and an update of a video still in
    progress, which is harmless: a cached unfinished video is always asked about again, and an
    update that then loses the race adopts the stored row.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        with self._locked():
            # Written, not merely sized, on every open (a file an older gateway sized is a hole): a
            # write through the map into a hole needs a disk block, and on a full disk the kernel
            # answers that with SIGBUS, which kills the process. A full disk fails the start instead.
            os.pwrite(self._fd, os.pread(self._fd, 8, 0).ljust(8, b"\0"), 0)
        self._map = mmap.mmap(self._fd, 8)
        self._counter = memoryview(self._map).cast("Q")  # the host's byte order: only its processes share it

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def read(self) -> int:
        value: int = self._counter[0]
        return value

    def bump(self) -> None:
        with self._locked():
            self._counter[0] = self.read() + 1

    def close(self) -> None:
        self._counter.release()
        self._map.close()
        os.close(self._fd)


class BootLease:
    """Proof that a process using the store is alive: a file named after its boot ID, in a directory
    beside the database, that it holds a lock on for as long as it runs.

    Each pending admission carries the boot ID of the process that made it. When a process dies
    (kill -9, a crash, a power cut) the kernel drops its lock, and whoever next finds the file
    unlocked settles that process's pending admissions, which would otherwise hold a key at its
    ``max_in_progress`` cap for :data:`PENDING_SECONDS`. The file is locked before it is given its
    name, so a named file that can be locked belongs to a dead process.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.boot = secrets.token_hex(8)
        directory.mkdir(mode=0o700, exist_ok=True)
        staging = directory / f".{self.boot}"
        self._fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(staging, directory / self.boot)

    def dead(self) -> Iterator[str]:
        """Boot IDs of processes that died; each file is removed as its boot ID is handed out."""
        for name in os.listdir(self.directory):
            if name.startswith(".") or name == self.boot:
                continue
            try:
                fd = os.open(self.directory / name, os.O_RDWR)
            except FileNotFoundError:
                continue  # another process swept it first
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive
            finally:
                os.close(fd)  # closing drops the lock we may have taken
            yield name
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / name)

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / self.boot)
        os.close(self._fd)


class SQLiteTaskStore:
    """SQLite in WAL mode with full fsync on commit, off the event loop: writes on one thread and
    connection, reads on another, so that a write stuck on a lock (another process's long
    transaction, a slow disk) holds up other writes but not the reads WAL lets through.

    Several processes (the workers of one gateway, or a gateway and its restarted self) may share
    the file. Each keeps a cache of recent tasks so that a poll of a known video needs no database
    round trip; :class:`DeleteEpoch` keeps those caches from outliving a delete made elsewhere, and
    an update that lost a race adopts what the database holds. Callers share the cached object:
    they change a task only through the store.
    """

    # A write waiting longer than this (for another process's lock, a stalled disk) makes /readyz 503.
    stuck_write_seconds = 10.0
    # /readyz has a one-row write tried at most this often, to learn whether writes go through.
    probe_seconds = 5.0

    def __init__(self, path: Path, cache_size: int = 10_000, cache_chars: int = 32 * 2**20) -> None:
        self._path = path
        self._writes: dict[object, float] = {}  # writes submitted and not yet done: when each was
        self._write_failed: str | None = None  # why the last write failed, until one goes through
        self._probe: asyncio.Future[Any] | None = None  # the latest write health() tried
        self._probed_at = -math.inf
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-store")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-store-reads")
        self._db: sqlite3.Connection | None = None
        self._read_db: sqlite3.Connection | None = None
        self._cache: OrderedDict[str, Task] = OrderedDict()
        self._cache_size = cache_size
        # Tasks are small but for their prompts (up to 32 000 characters each, the tenant's choice):
        # 10 000 of the longest would hold 320 MB to 1.3 GB. The cache keeps this much prompt text.
        self._cache_chars = cache_chars
        self._cached_chars = 0
        self._epoch: DeleteEpoch | None = None
        self._seen = 0
        self._lease: BootLease | None = None
        self._file: tuple[int, int] | None = None  # the database file opened: (device, inode)

    def _current_epoch(self) -> int:
        """The delete epoch; the cache is emptied when another process deleted since last look."""
        assert self._epoch is not None, "store is not open"
        epoch = self._epoch.read()
        if epoch != self._seen:
            self._cache.clear()
            self._cached_chars = 0
            self._seen = epoch
        return epoch

    def _remember(self, task: Task, epoch: int) -> None:
        """Cache ``task`` as read or written while the delete epoch was ``epoch``."""
        if self._current_epoch() != epoch:
            return  # a delete happened meanwhile: this copy may already be gone
        self._forget(task.id)
        self._cache[task.id] = _copy(task)
        self._cached_chars += _prompt_chars(task)
        while len(self._cache) > self._cache_size or self._cached_chars > self._cache_chars:
            self._cached_chars -= _prompt_chars(self._cache.popitem(last=False)[1])

    def _forget(self, task_id: str) -> None:
        """Drop a task from the cache, and its prompt from the cache's count."""
        if (cached := self._cache.pop(task_id, None)) is not None:
            self._cached_chars -= _prompt_chars(cached)

    async def open(self) -> None:
        await self._run(self._open)
        self._epoch = DeleteEpoch(self._path.with_name(self._path.name + "-epoch"))
        self._seen = self._epoch.read()

    def _open(self) -> None:
        """Open, one process at a time: workers starting together on a new file would otherwise
        race to switch it to WAL, and the loser gets "database is locked" at once (no busy wait)."""
        # Prompts, keys' names and hosted images' URLs are the tenants' own: readable by this user
        # alone (SQLite gives its -wal and -shm files the database file's mode).
        self._path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(self._path, os.O_CREAT | os.O_WRONLY, 0o600))
        lock_path = self._path.with_name(self._path.name + "-open-lock")
        with open(os.open(lock_path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600), "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            if "boot" not in {row[1] for row in db.execute("PRAGMA table_info(admissions)")}:
                db.execute("ALTER TABLE admissions ADD COLUMN boot TEXT NOT NULL DEFAULT ''")
                db.execute("UPDATE admissions SET pending=0")  # made before boot IDs: nobody to ask
            self._db = db
            self._file = _identity(self._path)
            self._read_db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            self._lease = BootLease(self._path.with_name(self._path.name + "-boots"))
            self._settle_dead()

    def _settle_dead(self) -> int:
        """Settle the pending admissions of processes that died; how many there were."""
        assert self._db is not None and self._lease is not None
        settled = 0
        for boot in self._lease.dead():
            cursor = self._db.execute("UPDATE admissions SET pending=0 WHERE boot=? AND pending=1", (boot,))
            settled += cursor.rowcount
        return settled

    async def _run(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on the writing thread, timed for :meth:`health`, once the file is checked."""
        token = object()
        self._writes[token] = time.monotonic()
        try:
            result = await self._on(self._executor, self._checked, fn, *args)
        except StoreUnavailable as exc:
            self._write_failed = str(exc)
            raise
        finally:
            del self._writes[token]
        self._write_failed = None
        return result

    def _checked(self, fn: Any, *args: Any) -> Any:
        self._check_file()
        return fn(*args)

    def _check_file(self) -> None:
        """Refuse to go on when the database file is no longer the one open: SQLite would write on
        into a file removed from its directory (a data directory wiped, a volume remounted), and
        what it took would be gone at the next start. A stat a write: microseconds."""
        if self._file is not None and _identity(self._path) != self._file:
            raise sqlite3.OperationalError(f"the database file {self._path} was removed or replaced")

    @staticmethod
    async def _on(executor: ThreadPoolExecutor, fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise  # our mistake, not the store's
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(f"task store: {exc}") from exc

    async def health(self) -> str | None:
        """Besides reads: a write stuck, or the last write failed (a full disk fails writes at once
        and reads not at all). Each worker learns how writes go from a one-row write of its own,
        tried at most every :attr:`probe_seconds`, whether or not traffic writes: a worker that had
        no create to fail would answer ready, and a replica out of rotation gets none to succeed."""
        await self._probe_write()
        if self._writes:
            waited = time.monotonic() - min(self._writes.values())
            if waited > self.stuck_write_seconds:
                return f"a write has waited {waited:.1f} s"
        if self._write_failed is not None:
            return f"writes fail: {self._write_failed}"
        try:
            await asyncio.wait_for(self._on(self._reader, self._check_file), 2.0)
            await asyncio.wait_for(self._read("SELECT 1 FROM tasks LIMIT 1"), 2.0)
        except StoreUnavailable as exc:
            return str(exc)
        except TimeoutError:
            return "a read did not answer within 2 s"
        return None

    async def _probe_write(self) -> None:
        """Try a one-row write when the last try is :attr:`probe_seconds` old (one at a time), and
        give it half a second: its outcome is the last write's (:meth:`_run`). One slower than that
        goes on, and shows as a stuck write once it has waited too long."""
        if (self._probe is None or self._probe.done()) and (
            time.monotonic() - self._probed_at >= self.probe_seconds
        ):
            self._probed_at = time.monotonic()
            sql = "INSERT OR REPLACE INTO write_probe (id, at) VALUES (1, ?)"
            self._probe = asyncio.ensure_future(self._run(self._query, sql, (time.time(),)))
            self._probe.add_done_callback(lambda done: done.cancelled() or done.exception())
        if self._probe is not None and not self._probe.done():
            await asyncio.wait((self._probe,), timeout=0.5)

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one query, on the reading thread and connection."""
        rows: list[tuple[Any, ...]] = await self._on(self._reader, self._select, sql, params)
        return rows

    def _select(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        assert self._read_db is not None, "store is not open"
        return self._read_db.execute(sql, params).fetchall()

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        assert self._db is not None, "store is not open"
        return self._db.execute(sql, params).fetchall()

    @staticmethod
    def _task(row: tuple[Any, ...]) -> Task:
        *head, video, state, updated_at = row
        return Task(*head, video=json.loads(video), state=json.loads(state), updated_at=updated_at)

    async def add(self, task: Task) -> None:
        epoch = self._current_epoch()
        await self._run(self._query, _INSERT, _row(task))
        self._remember(task, epoch)

    async def add_once(self, task: Task) -> Task | None:
        epoch = self._current_epoch()

        def run() -> Task | None:
            assert self._db is not None
            self._db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes
            try:
                rows = self._query(_FIND_UPSTREAM, (task.deployment, task.upstream_id, task.owner))
                if not rows:
                    self._db.execute(_INSERT, _row(task))
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite ends it itself on some errors (a full disk)
                    self._db.execute("ROLLBACK")
                raise
            return self._task(rows[0]) if rows else None

        known: Task | None = await self._run(run)
        if known is None:
            self._remember(task, epoch)
        return known

    async def get(self, task_id: str, owner: str, kind: str = "video", *, cached: bool = True) -> Task | None:
        epoch = self._current_epoch()
        copy = self._cache.get(task_id) if cached else None
        if copy is not None and copy.owner == owner and copy.kind == kind:
            return copy
        # Another key's (or kind's) is looked up as an unknown ID is: answered from the cache at once,
        # its 404 would come faster, telling a prober by timing alone that the ID is someone's.
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM tasks WHERE id=? AND owner=? AND kind=? AND deleted_at IS NULL",
            (task_id, owner, kind),
        )
        if not rows:
            return None
        task = self._task(rows[0])
        self._remember(task, epoch)
        return task

    async def find_upstream(self, owner: str, deployment: str, upstream_id: str) -> Task | None:
        rows = await self._read(_FIND_UPSTREAM, (deployment, upstream_id, owner))
        return self._task(rows[0]) if rows else None

    async def update(self, task: Task) -> bool:
        """As the protocol says; when the task had already finished (another process or poll got
        there first), ``task`` takes what the database holds, so every answer shows the same video.
        So it does when the database holds news further on: in progress where ``task`` says queued,
        or more progress. Another worker's copy of a task (each caches its own) may be behind what
        a sibling wrote; written over it, the video would go backwards. A task deleted while its
        poll was in flight stays deleted: it is neither written nor cached."""
        task.updated_at = time.time()
        epoch = self._current_epoch()
        progress = task.video.get("progress")

        def run() -> tuple[bool, Task | None]:
            """Whether the write went through, else the task as stored (None once deleted)."""
            assert self._db is not None
            active = ",".join("?" * len(ACTIVE_STATUSES))
            cursor = self._db.execute(
                "UPDATE tasks SET status=?, video=?, state=?, updated_at=? "
                f"WHERE id=? AND deleted_at IS NULL AND status IN ({active}) "
                "AND NOT (status='in_progress' AND ?='queued') "
                "AND NOT (status=? AND COALESCE(json_extract(video, '$.progress'), 0) > ?)",
                (
                    task.status,
                    json.dumps(task.video),
                    json.dumps(task.state),
                    task.updated_at,
                    task.id,
                    *ACTIVE_STATUSES,
                    task.status,
                    task.status,
                    progress if type(progress) is int else 0,
                ),
            )
            if cursor.rowcount == 1:
                return True, None
            rows = self._query(f"SELECT {_COLUMNS} FROM tasks WHERE id=? AND deleted_at IS NULL", (task.id,))
            return False, self._task(rows[0]) if rows else None

        written, stored = await self._run(run)
        if not written:
            if stored is None:
                return False
            task.status, task.video, task.state = stored.status, stored.video, stored.state
            task.updated_at = stored.updated_at
        self._remember(task, epoch)
        return written and task.status not in ACTIVE_STATUSES

    async def delete(self, task_id: str, owner: str) -> bool:
        def run() -> bool:
            assert self._db is not None
            cursor = self._db.execute(
                "UPDATE tasks SET deleted_at=? WHERE id=? AND owner=? AND deleted_at IS NULL",
                (time.time(), task_id, owner),
            )
            return cursor.rowcount == 1

        deleted = bool(await self._run(run))
        self._forget(task_id)
        if deleted:
            assert self._epoch is not None
            self._epoch.bump()
        return deleted

    async def list(
        self, owner: str, *, after: str | None, limit: int, order: str, kind: str = "video"
    ) -> tuple[list[Task], bool]:
        def run() -> tuple[list[Task], bool]:
            where, params = "owner=? AND kind=? AND deleted_at IS NULL", [owner, kind]
            if after is not None:
                cursor = self._select(
                    "SELECT seq FROM tasks WHERE id=? AND owner=? AND kind=?", (after, owner, kind)
                )
                if not cursor:
                    raise KeyError(after)
                where += " AND seq < ?" if order == "desc" else " AND seq > ?"
                params.append(cursor[0][0])
            direction = "DESC" if order == "desc" else "ASC"
            rows = self._select(
                f"SELECT {_COLUMNS} FROM tasks INDEXED BY tasks_live WHERE {where} "
                f"ORDER BY seq {direction} LIMIT ?",
                (*params, limit + 1),
            )
            return [self._task(r) for r in rows[:limit]], len(rows) > limit

        result: tuple[list[Task], bool] = await self._on(self._reader, run)
        return result

    async def active(self, owner: str) -> list[Task]:
        rows = await self._read(
            f"SELECT {_COLUMNS} FROM tasks INDEXED BY tasks_unfinished "
            f"WHERE owner=? AND kind='video' AND {_UNFINISHED} ORDER BY seq",
            (owner,),
        )
        return [self._task(r) for r in rows]

    async def admit(self, owner: str, *, per_minute: int | None, max_active: int | None) -> Admission:
        """As the protocol says. A caller cancelled meanwhile (the client went away) cannot settle
        what it never received, so the admission is settled for it as soon as it is made."""
        future = asyncio.ensure_future(self._run(self._admit_checked, owner, per_minute, max_active))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(self._settle_abandoned)
            raise

    def _admit_checked(self, owner: str, per_minute: int | None, max_active: int | None) -> Admission:
        """Admit; a refusal for the in-progress cap is checked once more after settling the pending
        admissions of processes that died, so a crash never holds a key at its cap."""
        admission = self._admit(owner, per_minute, max_active)
        if admission.limit == "max_in_progress" and self._settle_dead():
            admission = self._admit(owner, per_minute, max_active)
        return admission

    def _admit(self, owner: str, per_minute: int | None, max_active: int | None) -> Admission:
        assert self._db is not None and self._lease is not None
        now = time.time()
        horizon = now - WINDOW_SECONDS
        self._db.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes
        try:
            self._db.execute(
                "DELETE FROM admissions WHERE owner=? AND at<=? AND (pending=0 OR at<=?)",
                (owner, horizon, now - PENDING_SECONDS),
            )
            count, oldest = self._db.execute(
                "SELECT COUNT(*), MIN(at) FROM admissions WHERE owner=? AND at>?", (owner, horizon)
            ).fetchone()
            reset = oldest + WINDOW_SECONDS - now if oldest is not None else 0.0
            if per_minute is not None and count >= per_minute:
                self._db.execute("COMMIT")
                return Admission(None, "creates_per_minute", count, reset)
            if max_active is not None:
                (pending,) = self._db.execute(
                    "SELECT COUNT(*) FROM admissions WHERE owner=? AND pending=1 AND at>?",
                    (owner, now - PENDING_SECONDS),
                ).fetchone()
                (active,) = self._db.execute(
                    "SELECT COUNT(*) FROM tasks INDEXED BY tasks_unfinished "
                    f"WHERE owner=? AND kind='video' AND {_UNFINISHED}",
                    (owner,),
                ).fetchone()
                if active + pending >= max_active:
                    self._db.execute("COMMIT")
                    return Admission(None, "max_in_progress", count, reset)
            cursor = self._db.execute(
                "INSERT INTO admissions (owner, at, pending, boot) VALUES (?,?,1,?)",
                (owner, now, self._lease.boot),
            )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return Admission(cursor.lastrowid, None, count + 1, reset if count else WINDOW_SECONDS)

    def _settle_abandoned(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None and future.result().id is not None:
            with contextlib.suppress(RuntimeError):  # the store closed meanwhile, settling it all
                self._executor.submit(self._settle, future.result())

    def _settle(self, admission: Admission) -> None:
        if self._db is not None:
            self._db.execute("UPDATE admissions SET pending=0 WHERE id=?", (admission.id,))

    async def settle(self, admission: Admission) -> None:
        """Shielded: a handler cancelled while this runs must not leave the create counted."""
        if admission.id is not None:
            await asyncio.shield(self._run(self._settle, admission))

    async def close(self) -> None:
        if self._read_db is not None:
            await self._on(self._reader, self._read_db.close)
            self._read_db = None
        if self._db is not None:
            await self._on(self._executor, self._close)  # whatever became of the file
        if self._epoch is not None:
            self._epoch.close()
            self._epoch = None
        self._executor.shutdown(wait=True)
        self._reader.shutdown(wait=True)

    def _close(self) -> None:
        """Creates still pending now were cut off by the stop: they no longer count."""
        assert self._db is not None and self._lease is not None
        self._db.execute("UPDATE admissions SET pending=0 WHERE boot=? AND pending=1", (self._lease.boot,))
        self._db.close()
        self._db = None
        self._lease.close()
        self._lease = None


_INSERT = f"INSERT INTO tasks ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
_FIND_UPSTREAM = (
    f"SELECT {_COLUMNS} FROM tasks WHERE deployment=? AND upstream_id=? AND owner=? AND deleted_at IS NULL"
)


def _row(task: Task) -> tuple[Any, ...]:
    """``task`` as the values of :data:`_INSERT`."""
    return (
        task.id,
        task.owner,
        task.model,
        task.deployment,
        task.provider,
        task.upstream_id,
        task.created_at,
        task.status,
        task.kind,
        json.dumps(task.video),
        json.dumps(task.state),
        task.updated_at,
    )


def _prompt_chars(task: Task) -> int:
    prompt = task.video.get("prompt")
    return len(prompt) if type(prompt) is str else 0


def _copy(task: Task) -> Task:
    """The cache's own copy of a task added or saved, which the caller's later changes do not reach
    (``dataclasses.replace`` is slower)."""
    copy = Task.__new__(Task)
    copy.__dict__.update(task.__dict__)
    copy.video, copy.state = dict(task.video), dict(task.state)
    return copy


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a file; None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
