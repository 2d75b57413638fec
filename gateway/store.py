"""The task store: who owns which video, and where it lives upstream.

A row is written, and committed to disk, before the client learns the video's ID, so an accepted
video can always be found again after a restart. :class:`TaskStore` is the seam for a shared store
(Redis) serving many replicas; :class:`SQLiteTaskStore` is the embedded default.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

ACTIVE_STATUSES = ("queued", "in_progress")


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

    async def get(self, task_id: str, owner: str, kind: str = "video") -> Task | None:
        """The owner's live task, or None (unknown, foreign and deleted IDs alike)."""

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

    async def count_active(self, owner: str) -> int: ...

    async def active(self, owner: str) -> list[Task]:
        """The owner's videos last seen queued or in progress."""

    async def close(self) -> None: ...


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
CREATE INDEX IF NOT EXISTS tasks_owner ON tasks (owner, kind, seq);
CREATE INDEX IF NOT EXISTS tasks_upstream ON tasks (deployment, upstream_id);
"""

_COLUMNS = (
    "id, owner, model, deployment, provider, upstream_id, created_at, status, kind, video, state, updated_at"
)


class SQLiteTaskStore:
    """SQLite in WAL mode with full fsync on commit, driven from one worker thread.

    This process is the file's only writer, so a write-through cache of recent tasks is exact: a
    poll of a known video needs no database round trip. Callers get copies, never the cached object.
    """

    def __init__(self, path: Path, cache_size: int = 10_000) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-store")
        self._db: sqlite3.Connection | None = None
        self._cache: OrderedDict[str, Task] = OrderedDict()
        self._cache_size = cache_size

    def _remember(self, task: Task) -> None:
        self._cache[task.id] = _copy(task)
        self._cache.move_to_end(task.id)
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        self._db = db

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        assert self._db is not None, "store is not open"
        return self._db.execute(sql, params).fetchall()

    @staticmethod
    def _task(row: tuple[Any, ...]) -> Task:
        *head, video, state, updated_at = row
        return Task(*head, video=json.loads(video), state=json.loads(state), updated_at=updated_at)

    async def add(self, task: Task) -> None:
        await self._run(
            self._query,
            f"INSERT INTO tasks ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
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
            ),
        )
        self._remember(task)

    async def get(self, task_id: str, owner: str, kind: str = "video") -> Task | None:
        cached = self._cache.get(task_id)
        if cached is not None:
            return _copy(cached) if cached.owner == owner and cached.kind == kind else None
        rows = await self._run(
            self._query,
            f"SELECT {_COLUMNS} FROM tasks WHERE id=? AND owner=? AND kind=? AND deleted_at IS NULL",
            (task_id, owner, kind),
        )
        if not rows:
            return None
        task = self._task(rows[0])
        self._remember(task)
        return _copy(task)

    async def find_upstream(self, owner: str, deployment: str, upstream_id: str) -> Task | None:
        rows = await self._run(
            self._query,
            f"SELECT {_COLUMNS} FROM tasks WHERE deployment=? AND upstream_id=? AND owner=? "
            "AND deleted_at IS NULL",
            (deployment, upstream_id, owner),
        )
        return self._task(rows[0]) if rows else None

    async def update(self, task: Task) -> bool:
        task.updated_at = time.time()

        def run() -> bool:
            assert self._db is not None
            cursor = self._db.execute(
                "UPDATE tasks SET status=?, video=?, state=?, updated_at=? "
                f"WHERE id=? AND status IN ({','.join('?' * len(ACTIVE_STATUSES))})",
                (
                    task.status,
                    json.dumps(task.video),
                    json.dumps(task.state),
                    task.updated_at,
                    task.id,
                    *ACTIVE_STATUSES,
                ),
            )
            return cursor.rowcount == 1 and task.status not in ACTIVE_STATUSES

        finished = bool(await self._run(run))
        cached = self._cache.get(task.id)
        if cached is not None and cached.status in ACTIVE_STATUSES:
            self._remember(task)
        return finished

    async def delete(self, task_id: str, owner: str) -> bool:
        def run() -> bool:
            assert self._db is not None
            cursor = self._db.execute(
                "UPDATE tasks SET deleted_at=? WHERE id=? AND owner=? AND deleted_at IS NULL",
                (time.time(), task_id, owner),
            )
            return cursor.rowcount == 1

        deleted = bool(await self._run(run))
        self._cache.pop(task_id, None)
        return deleted

    async def list(
        self, owner: str, *, after: str | None, limit: int, order: str, kind: str = "video"
    ) -> tuple[list[Task], bool]:
        def run() -> tuple[list[Task], bool]:
            where, params = "owner=? AND kind=? AND deleted_at IS NULL", [owner, kind]
            if after is not None:
                cursor = self._query(
                    "SELECT seq FROM tasks WHERE id=? AND owner=? AND kind=?", (after, owner, kind)
                )
                if not cursor:
                    raise KeyError(after)
                where += " AND seq < ?" if order == "desc" else " AND seq > ?"
                params.append(cursor[0][0])
            direction = "DESC" if order == "desc" else "ASC"
            rows = self._query(
                f"SELECT {_COLUMNS} FROM tasks WHERE {where} ORDER BY seq {direction} LIMIT ?",
                (*params, limit + 1),
            )
            return [self._task(r) for r in rows[:limit]], len(rows) > limit

        result: tuple[list[Task], bool] = await self._run(run)
        return result

    async def count_active(self, owner: str) -> int:
        rows = await self._run(
            self._query,
            "SELECT COUNT(*) FROM tasks WHERE owner=? AND kind='video' AND deleted_at IS NULL "
            f"AND status IN ({','.join('?' * len(ACTIVE_STATUSES))})",
            (owner, *ACTIVE_STATUSES),
        )
        return int(rows[0][0])

    async def active(self, owner: str) -> list[Task]:
        rows = await self._run(
            self._query,
            f"SELECT {_COLUMNS} FROM tasks WHERE owner=? AND kind='video' AND deleted_at IS NULL "
            f"AND status IN ({','.join('?' * len(ACTIVE_STATUSES))}) ORDER BY seq",
            (owner, *ACTIVE_STATUSES),
        )
        return [self._task(r) for r in rows]

    async def close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)


def _copy(task: Task) -> Task:
    return replace(task, video=dict(task.video), state=dict(task.state))
