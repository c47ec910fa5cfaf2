"""The SQLite connection and its versioned migrations.

One aiosqlite connection per process, in autocommit mode (``isolation_level=None``) so that
transactions are explicit: ``Database.transaction()`` issues ``BEGIN IMMEDIATE`` (take the write
lock up front, so two writers never deadlock on a lock upgrade) and COMMIT or ROLLBACK.

An asyncio.Lock serialises use of the shared connection: without it two coroutines could
interleave statements inside one another's transaction.

Migrations: ``MIGRATIONS[i]`` brings the schema from version ``i`` to ``i + 1``; ``PRAGMA
user_version`` records the version reached. Each step runs in its own transaction together with
the user_version bump, so a failed step leaves the database at the previous version. Migrations
are lists of single statements (not scripts) because ``sqlite3.executescript`` commits any open
transaction first, which would break that atomicity. Never edit a released migration: append one.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

BUSY_TIMEOUT_MS = 10_000

# v1: the first schema (users, datasets, images, jobs, artifacts).
_V1: tuple[str, ...] = (
    """CREATE TABLE users (
        id          INTEGER PRIMARY KEY,              -- Discord user id (snowflake)
        name        TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL
    )""",
    """CREATE TABLE datasets (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        owner_id      INTEGER NOT NULL REFERENCES users(id),
        name          TEXT NOT NULL COLLATE NOCASE,
        trigger_word  TEXT NOT NULL DEFAULT '',
        class_prompt  TEXT NOT NULL DEFAULT '',
        created_at    REAL NOT NULL,
        UNIQUE (owner_id, name)
    )""",
    """CREATE TABLE images (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        dataset_id     INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
        sha256         TEXT NOT NULL,
        original_name  TEXT NOT NULL,
        ext            TEXT NOT NULL,
        bytes          INTEGER NOT NULL,
        width          INTEGER NOT NULL,
        height         INTEGER NOT NULL,
        caption        TEXT,
        created_at     REAL NOT NULL,
        UNIQUE (dataset_id, sha256)
    )""",
    """CREATE TABLE jobs (
        id             INTEGER PRIMARY KEY AUTOINCREMENT,
        kind           TEXT NOT NULL CHECK (kind IN ('train', 'merge', 'preview')),
        owner_id       INTEGER NOT NULL REFERENCES users(id),
        guild_id       INTEGER,
        channel_id     INTEGER,
        thread_id      INTEGER,
        message_id     INTEGER,
        spec_json      TEXT NOT NULL,
        state          TEXT NOT NULL DEFAULT 'queued'
                       CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
        progress_json  TEXT,
        error          TEXT,
        attempts       INTEGER NOT NULL DEFAULT 0,
        worker_id      TEXT,
        created_at     REAL NOT NULL,
        started_at     REAL,
        finished_at    REAL
    )""",
    """CREATE TABLE artifacts (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id      INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        kind        TEXT NOT NULL,
        path        TEXT NOT NULL,
        bytes       INTEGER NOT NULL DEFAULT 0,
        sha256      TEXT,
        created_at  REAL NOT NULL,
        meta_json   TEXT
    )""",
    "CREATE INDEX images_dataset ON images(dataset_id, id)",
    "CREATE INDEX jobs_owner ON jobs(owner_id, state)",
    "CREATE INDEX artifacts_job ON artifacts(job_id)",
)

# v2: admin flag, shared datasets, scheduling columns, persisted worker events.
_V2: tuple[str, ...] = (
    "ALTER TABLE users ADD COLUMN is_admin INTEGER NOT NULL DEFAULT 0",
    """ALTER TABLE datasets ADD COLUMN visibility TEXT NOT NULL DEFAULT 'private'
        CHECK (visibility IN ('private', 'shared'))""",
    "ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE jobs ADD COLUMN heartbeat_at REAL",
    "ALTER TABLE jobs ADD COLUMN gpu_seconds REAL NOT NULL DEFAULT 0",
    """CREATE TABLE job_events (
        id            INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id        INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        ts            REAL NOT NULL,
        type          TEXT NOT NULL,
        payload_json  TEXT NOT NULL DEFAULT '{}'
    )""",
    "CREATE INDEX job_events_job ON job_events(job_id, id)",
    "CREATE INDEX jobs_queue ON jobs(state, priority DESC, created_at, id)",
    "CREATE INDEX datasets_shared ON datasets(visibility)",
)

# v3: a loss mask per image (masked loss; storage.masks), stored content-addressed beside the images.
_V3: tuple[str, ...] = (
    "ALTER TABLE images ADD COLUMN mask_sha256 TEXT",
    "ALTER TABLE images ADD COLUMN mask_ext TEXT",
    "ALTER TABLE images ADD COLUMN mask_bytes INTEGER NOT NULL DEFAULT 0",
)

MIGRATIONS: list[tuple[str, ...]] = [_V1, _V2, _V3]
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNewError(RuntimeError):
    """The database was written by a newer loraforge; refusing to touch it."""


class Database:
    """One aiosqlite connection with migrations applied. Use ``open_db`` or ``connect()``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("Database is not connected; call connect() first")
        return self._conn

    async def connect(self, migrations: Sequence[Sequence[str]] = MIGRATIONS) -> Database:
        """Open the file, set the pragmas, and migrate up to ``len(migrations)``."""
        if self._conn is not None:
            return self
        if str(self.path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Owner-only: it holds users' ids, captions and prompts. SQLite gives its -wal/-shm files
            # the database file's mode, so creating it 600 (before SQLite does) covers all three.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            os.chmod(self.path, 0o600)
        conn = await aiosqlite.connect(str(self.path), isolation_level=None)
        conn.row_factory = sqlite3.Row
        try:
            # busy_timeout first, so the WAL switch itself waits for another opener.
            await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = NORMAL")  # durable enough with WAL
            await conn.execute("PRAGMA foreign_keys = ON")  # per connection, outside transactions
            self._conn = conn
            await self._migrate(migrations)
        except BaseException:
            self._conn = None
            await conn.close()
            raise
        return self

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    async def __aenter__(self) -> Database:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _migrate(self, migrations: Sequence[Sequence[str]]) -> None:
        target = len(migrations)
        async with self._lock:
            current = await self._user_version()
            if current > target:
                raise SchemaTooNewError(
                    f"{self.path} has schema version {current}, this code knows up to {target}; "
                    "upgrade loraforge instead of opening it with an older version"
                )
            while current < target:
                await self.conn.execute("BEGIN IMMEDIATE")
                try:
                    # Re-read under the write lock: another process may have migrated meanwhile.
                    current = await self._user_version()
                    if current < target:
                        for stmt in migrations[current]:
                            await self.conn.execute(stmt)
                        current += 1
                        await self.conn.execute(f"PRAGMA user_version = {current}")
                    await self.conn.execute("COMMIT")
                except BaseException:
                    await self.conn.execute("ROLLBACK")
                    raise

    async def _user_version(self) -> int:
        async with self.conn.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def schema_version(self) -> int:
        async with self._lock:
            return await self._user_version()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """Exclusive use of the connection inside BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error).

        Do not call the other Database helpers inside: the lock is not re-entrant.
        """
        async with self._lock:
            conn = self.conn
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            else:
                await conn.execute("COMMIT")

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> sqlite3.Row | None:
        async with self._lock, self.conn.execute(sql, tuple(params)) as cur:
            return await cur.fetchone()

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        async with self._lock, self.conn.execute(sql, tuple(params)) as cur:
            return list(await cur.fetchall())

    async def execute(self, sql: str, params: Iterable[Any] = ()) -> int:
        """Run one statement on its own (autocommit); returns the number of rows changed."""
        async with self._lock, self.conn.execute(sql, tuple(params)) as cur:
            return cur.rowcount


async def open_db(path: str | Path) -> Database:
    """Open (creating if needed) and migrate the database at ``path``."""
    return await Database(path).connect()
