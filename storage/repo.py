"""Rows in and out: typed async methods over ``Database`` that return dataclasses.

Timestamps are Unix seconds (float, ``time.time()``). Discord ids are stored as INTEGER.
Job state changes go through ``update_job_state`` / ``try_start_job`` / ``request_cancel``, which
enforce the lifecycle with conditional UPDATEs (``WHERE state = ...``), so two callers racing on
the same job (even from two processes) cannot both win.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from storage.db import Database

JobKind = Literal["train", "merge", "preview"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Visibility = Literal["private", "shared"]
ArtifactKind = Literal["lora", "checkpoint", "sample", "grid", "plot", "state", "image"]

JOB_KINDS: frozenset[str] = frozenset({"train", "merge", "preview"})
JOB_STATES: frozenset[str] = frozenset({"queued", "running", "succeeded", "failed", "cancelled"})
TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
ARTIFACT_KINDS: frozenset[str] = frozenset({"lora", "checkpoint", "sample", "grid", "plot", "state", "image"})
VISIBILITIES: frozenset[str] = frozenset({"private", "shared"})

# Legal lifecycle moves. running -> queued is restart recovery (the job resumes from its saved state).
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled"}),
    "running": frozenset({"succeeded", "failed", "cancelled", "queued"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}


class NotFoundError(LookupError):
    """No row with that id."""


class IllegalTransitionError(ValueError):
    """A job state change the lifecycle does not allow (e.g. succeeded -> running)."""

    def __init__(self, job_id: int, current: str, wanted: str) -> None:
        super().__init__(f"job {job_id}: cannot go from {current!r} to {wanted!r}")
        self.job_id, self.current, self.wanted = job_id, current, wanted


class DuplicateNameError(ValueError):
    """The owner already has a dataset with that name (names are case-insensitive)."""


@dataclass(frozen=True, slots=True)
class User:
    id: int
    name: str
    is_admin: bool
    created_at: float


@dataclass(frozen=True, slots=True)
class Dataset:
    id: int
    owner_id: int
    name: str
    trigger_word: str
    class_prompt: str
    visibility: str
    created_at: float


@dataclass(frozen=True, slots=True)
class DatasetImage:
    id: int
    dataset_id: int
    sha256: str
    original_name: str
    ext: str
    bytes: int
    width: int
    height: int
    caption: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    kind: str
    owner_id: int
    guild_id: int | None
    channel_id: int | None
    thread_id: int | None
    message_id: int | None
    spec_json: str
    state: str
    progress_json: str | None
    error: str | None
    priority: int
    attempts: int
    worker_id: str | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    gpu_seconds: float

    @property
    def spec(self) -> dict[str, Any]:
        return json.loads(self.spec_json)

    @property
    def progress(self) -> dict[str, Any] | None:
        return json.loads(self.progress_json) if self.progress_json else None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True, slots=True)
class Artifact:
    id: int
    job_id: int
    kind: str
    path: str
    bytes: int
    sha256: str | None
    created_at: float
    meta_json: str | None

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads(self.meta_json) if self.meta_json else {}


@dataclass(frozen=True, slots=True)
class JobEvent:
    id: int
    job_id: int
    ts: float
    type: str
    payload_json: str

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.payload_json)


class NewImage(Protocol):
    """What ``add_images`` needs; ``storage.intake.AcceptedImage`` fits."""

    name: str
    sha256: str
    ext: str
    bytes: int
    width: int
    height: int
    caption: str | None


def _is_rowid(value: Any) -> bool:
    """A value SQLite can look up as a rowid (64-bit signed int)."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _row_to(cls: type, row: sqlite3.Row) -> Any:
    kwargs = {f: row[f] for f in cls.__dataclass_fields__}
    return cls(**kwargs)


def _user(row: sqlite3.Row) -> User:
    return User(id=row["id"], name=row["name"], is_admin=bool(row["is_admin"]), created_at=row["created_at"])


def _job(row: sqlite3.Row) -> Job:
    kwargs = {f: row[f] for f in Job.__dataclass_fields__}
    kwargs["cancel_requested"] = bool(kwargs["cancel_requested"])
    return Job(**kwargs)


def _select_all(table: str, where: Sequence[str]) -> str:
    """``SELECT *`` from ``table`` with the conditions in ``where`` joined by AND (none: every row)."""
    return f"SELECT * FROM {table}" + (" WHERE " + " AND ".join(where) if where else "")


def _placeholders(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


def _check_states(states: Iterable[str]) -> list[str]:
    out = list(states)
    bad = [s for s in out if s not in JOB_STATES]
    if bad:
        raise ValueError(f"unknown job state(s) {bad}; allowed: {sorted(JOB_STATES)}")
    return out


_UNSET: Any = object()


class Repo:
    """All reads and writes of the bot's rows. Cheap to construct; share one per process."""

    def __init__(self, db: Database, clock: Any = time.time) -> None:
        self.db = db
        self._now = clock  # injectable for tests of quotas and ordering

    # ---- users -----------------------------------------------------------------------------

    async def ensure_user(self, user_id: int, name: str = "", *, is_admin: bool | None = None) -> User:
        """Create the user if missing; refresh the display name when one is given."""
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT INTO users (id, name, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET name = excluded.name WHERE excluded.name != ''",
                (user_id, name, self._now()),
            )
            if is_admin is not None:
                await conn.execute("UPDATE users SET is_admin = ? WHERE id = ?", (int(is_admin), user_id))
            async with conn.execute("SELECT * FROM users WHERE id = ?", (user_id,)) as cur:
                row = await cur.fetchone()
        assert row is not None
        return _user(row)

    async def get_user(self, user_id: int) -> User | None:
        row = await self.db.fetchone("SELECT * FROM users WHERE id = ?", (user_id,))
        return _user(row) if row else None

    # ---- datasets --------------------------------------------------------------------------

    async def create_dataset(
        self,
        owner_id: int,
        name: str,
        trigger_word: str = "",
        class_prompt: str = "",
        visibility: Visibility = "private",
    ) -> Dataset:
        if visibility not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {sorted(VISIBILITIES)}, not {visibility!r}")
        async with self.db.transaction() as conn:
            # The owner row may not exist yet (first command of a new user): create it here so
            # callers cannot trip over the foreign key.
            await conn.execute(
                "INSERT OR IGNORE INTO users (id, name, created_at) VALUES (?, '', ?)",
                (owner_id, self._now()),
            )
            try:
                cur = await conn.execute(
                    "INSERT INTO datasets (owner_id, name, trigger_word, class_prompt, visibility, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (owner_id, name, trigger_word, class_prompt, visibility, self._now()),
                )
            except sqlite3.IntegrityError as e:
                if "UNIQUE" in str(e):
                    raise DuplicateNameError(f"you already have a dataset named {name!r}") from e
                raise
            async with conn.execute("SELECT * FROM datasets WHERE id = ?", (cur.lastrowid,)) as c:
                row = await c.fetchone()
        assert row is not None
        return _row_to(Dataset, row)

    async def get_dataset(self, dataset_id: int) -> Dataset | None:
        if not _is_rowid(dataset_id):
            return None  # "#99999999999999999999" typed by hand: no such dataset (SQLite would overflow)
        row = await self.db.fetchone("SELECT * FROM datasets WHERE id = ?", (dataset_id,))
        return _row_to(Dataset, row) if row else None

    async def find_dataset_by_name(self, owner_id: int, name: str) -> Dataset | None:
        """Case-insensitive lookup among the owner's datasets."""
        row = await self.db.fetchone(
            "SELECT * FROM datasets WHERE owner_id = ? AND name = ?", (owner_id, name)
        )
        return _row_to(Dataset, row) if row else None

    async def list_datasets(
        self, *, visible_to: int | None = None, owner_id: int | None = None
    ) -> list[Dataset]:
        """``visible_to``: the user's own datasets plus everyone's shared ones. ``owner_id``: only
        that owner's. Neither: all (admin views)."""
        where, params = [], []
        if visible_to is not None:
            where.append("(owner_id = ? OR visibility = 'shared')")
            params.append(visible_to)
        if owner_id is not None:
            where.append("owner_id = ?")
            params.append(owner_id)
        sql = _select_all("datasets", where)
        rows = await self.db.fetchall(sql + " ORDER BY name COLLATE NOCASE, id", params)
        return [_row_to(Dataset, r) for r in rows]

    async def update_dataset(
        self,
        dataset_id: int,
        *,
        trigger_word: str = _UNSET,
        class_prompt: str = _UNSET,
        visibility: Visibility = _UNSET,
        name: str = _UNSET,
    ) -> Dataset:
        changes: dict[str, Any] = {
            k: v
            for k, v in (
                ("trigger_word", trigger_word),
                ("class_prompt", class_prompt),
                ("visibility", visibility),
                ("name", name),
            )
            if v is not _UNSET
        }
        if "visibility" in changes and changes["visibility"] not in VISIBILITIES:
            raise ValueError(f"visibility must be one of {sorted(VISIBILITIES)}, not {visibility!r}")
        async with self.db.transaction() as conn:
            if changes:
                sets = ", ".join(f"{k} = ?" for k in changes)
                try:
                    await conn.execute(
                        f"UPDATE datasets SET {sets} WHERE id = ?", (*changes.values(), dataset_id)
                    )
                except sqlite3.IntegrityError as e:
                    raise DuplicateNameError(f"you already have a dataset named {name!r}") from e
            async with conn.execute("SELECT * FROM datasets WHERE id = ?", (dataset_id,)) as cur:
                row = await cur.fetchone()
        if row is None:
            raise NotFoundError(f"dataset {dataset_id} does not exist")
        return _row_to(Dataset, row)

    async def delete_dataset(self, dataset_id: int) -> bool:
        """Delete the row (images cascade). Remove the files afterwards with
        ``FileStore.remove_dataset_files``: orphaned files are harmless, rows without files are not."""
        return await self.db.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,)) > 0

    # ---- images ----------------------------------------------------------------------------

    async def add_image(
        self,
        dataset_id: int,
        sha256: str,
        original_name: str,
        ext: str,
        bytes: int,  # noqa: A002 - matches the column name
        width: int,
        height: int,
        caption: str | None = None,
    ) -> DatasetImage | None:
        """Insert one image; returns None when the dataset already holds these bytes."""
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO images (dataset_id, sha256, original_name, ext, bytes, width, height, caption, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(dataset_id, sha256) DO NOTHING",
                (dataset_id, sha256, original_name, ext, bytes, width, height, caption, self._now()),
            )
            if cur.rowcount == 0:
                return None
            async with conn.execute("SELECT * FROM images WHERE id = ?", (cur.lastrowid,)) as c:
                row = await c.fetchone()
        assert row is not None
        return _row_to(DatasetImage, row)

    async def add_images(self, dataset_id: int, images: Iterable[NewImage]) -> list[DatasetImage]:
        """Insert many in one transaction (an upload is all-or-nothing in the database).
        Images already in the dataset are skipped; returns the rows inserted."""
        now = self._now()
        ids: list[int] = []
        async with self.db.transaction() as conn:
            for im in images:
                cur = await conn.execute(
                    "INSERT INTO images (dataset_id, sha256, original_name, ext, bytes, width, height, "
                    "caption, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(dataset_id, sha256) DO NOTHING",
                    (dataset_id, im.sha256, im.name, im.ext, im.bytes, im.width, im.height, im.caption, now),
                )
                if cur.rowcount:
                    ids.append(int(cur.lastrowid or 0))
            rows: list[sqlite3.Row] = []
            if ids:
                async with conn.execute(
                    f"SELECT * FROM images WHERE id IN ({_placeholders(ids)}) ORDER BY id", ids
                ) as c:
                    rows = list(await c.fetchall())
        return [_row_to(DatasetImage, r) for r in rows]

    async def get_image(self, image_id: int) -> DatasetImage | None:
        row = await self.db.fetchone("SELECT * FROM images WHERE id = ?", (image_id,))
        return _row_to(DatasetImage, row) if row else None

    async def list_images(
        self, dataset_id: int, *, limit: int | None = None, offset: int = 0
    ) -> list[DatasetImage]:
        rows = await self.db.fetchall(
            "SELECT * FROM images WHERE dataset_id = ? ORDER BY id LIMIT ? OFFSET ?",
            (dataset_id, -1 if limit is None else limit, offset),
        )
        return [_row_to(DatasetImage, r) for r in rows]

    async def image_hashes(self, dataset_id: int) -> set[str]:
        """The sha256 set to pass to ``intake.ingest_uploads(existing_hashes=...)``."""
        rows = await self.db.fetchall("SELECT sha256 FROM images WHERE dataset_id = ?", (dataset_id,))
        return {r[0] for r in rows}

    async def count_images(self, dataset_id: int) -> int:
        row = await self.db.fetchone("SELECT COUNT(*) FROM images WHERE dataset_id = ?", (dataset_id,))
        return int(row[0]) if row else 0

    async def set_caption(self, image_id: int, caption: str | None) -> bool:
        return await self.db.execute("UPDATE images SET caption = ? WHERE id = ?", (caption, image_id)) > 0

    async def delete_image(self, image_id: int) -> bool:
        return await self.db.execute("DELETE FROM images WHERE id = ?", (image_id,)) > 0

    # ---- jobs ------------------------------------------------------------------------------

    async def create_job(
        self,
        kind: JobKind,
        owner_id: int,
        spec_json: str,
        guild_id: int | None = None,
        channel_id: int | None = None,
        priority: int = 0,
        *,
        thread_id: int | None = None,
        message_id: int | None = None,
    ) -> Job:
        """Store a new job as ``queued``. ``spec_json`` is the fully resolved spec (for /retrain)."""
        if kind not in JOB_KINDS:
            raise ValueError(f"job kind must be one of {sorted(JOB_KINDS)}, not {kind!r}")
        json.loads(spec_json)  # refuse garbage early: every reader json-decodes it
        now = self._now()
        async with self.db.transaction() as conn:
            await conn.execute(
                "INSERT OR IGNORE INTO users (id, name, created_at) VALUES (?, '', ?)", (owner_id, now)
            )
            cur = await conn.execute(
                "INSERT INTO jobs (kind, owner_id, guild_id, channel_id, thread_id, message_id, spec_json, "
                "state, priority, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
                (kind, owner_id, guild_id, channel_id, thread_id, message_id, spec_json, priority, now),
            )
            async with conn.execute("SELECT * FROM jobs WHERE id = ?", (cur.lastrowid,)) as c:
                row = await c.fetchone()
        assert row is not None
        return _job(row)

    async def get_job(self, job_id: int) -> Job | None:
        if not _is_rowid(job_id):
            return None  # an id past SQLite's 64 bits: no such job (SQLite would raise OverflowError)
        row = await self.db.fetchone("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(row) if row else None

    async def _require_job(self, job_id: int) -> Job:
        job = await self.get_job(job_id)
        if job is None:
            raise NotFoundError(f"job {job_id} does not exist")
        return job

    async def list_jobs(
        self,
        owner_id: int | None = None,
        states: Iterable[str] | None = None,
        *,
        kind: str | None = None,
        newest_first: bool = False,
        limit: int | None = None,
    ) -> list[Job]:
        """Default order is queue order: priority DESC, created_at, id. ``newest_first`` for /jobs."""
        where, params = [], []
        if owner_id is not None:
            where.append("owner_id = ?")
            params.append(owner_id)
        if states is not None:
            st = _check_states(states)
            if not st:
                return []
            where.append(f"state IN ({_placeholders(st)})")
            params.extend(st)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        sql = _select_all("jobs", where)
        sql += (
            " ORDER BY created_at DESC, id DESC"
            if newest_first
            else " ORDER BY priority DESC, created_at, id"
        )
        sql += " LIMIT ?"
        params.append(-1 if limit is None else limit)
        return [_job(r) for r in await self.db.fetchall(sql, params)]

    async def count_jobs(self, owner_id: int | None = None, states: Iterable[str] | None = None) -> int:
        where, params = [], []
        if owner_id is not None:
            where.append("owner_id = ?")
            params.append(owner_id)
        if states is not None:
            st = _check_states(states)
            if not st:
                return 0
            where.append(f"state IN ({_placeholders(st)})")
            params.extend(st)
        sql = "SELECT COUNT(*) FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        row = await self.db.fetchone(sql, params)
        return int(row[0]) if row else 0

    async def try_start_job(self, job_id: int, worker_id: str) -> bool:
        """queued -> running, atomically, only if still queued. False means someone else started it
        (or it was cancelled): the caller must not run it."""
        now = self._now()
        n = await self.db.execute(
            "UPDATE jobs SET state = 'running', worker_id = ?, started_at = ?, heartbeat_at = ?, "
            "attempts = attempts + 1 WHERE id = ? AND state = 'queued' AND cancel_requested = 0",
            (worker_id, now, now, job_id),
        )
        return n == 1

    async def update_job_state(
        self,
        job_id: int,
        new_state: JobState,
        *,
        error: str | None = None,
        worker_id: str | None = None,
        expected: str | None = None,
    ) -> Job:
        """Move a job along the lifecycle; raises IllegalTransitionError for any other move.

        ``expected``: also require the current state to be this one (compare-and-set).
        Entering a terminal state stamps finished_at; running -> queued clears the worker so the
        scheduler can hand the job out again (it resumes from its saved training state).
        """
        if new_state not in JOB_STATES:
            raise ValueError(f"unknown job state {new_state!r}; allowed: {sorted(JOB_STATES)}")
        now = self._now()
        async with self.db.transaction() as conn:
            async with conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise NotFoundError(f"job {job_id} does not exist")
            current = row[0]
            if (expected is not None and current != expected) or new_state not in TRANSITIONS[current]:
                raise IllegalTransitionError(job_id, current, new_state)
            if new_state == "running":
                sql = (
                    "UPDATE jobs SET state = 'running', worker_id = ?, started_at = ?, heartbeat_at = ?, "
                    "attempts = attempts + 1 WHERE id = ?"
                )
                params: tuple[Any, ...] = (worker_id, now, now, job_id)
            elif new_state == "queued":
                sql = "UPDATE jobs SET state = 'queued', worker_id = NULL, heartbeat_at = NULL WHERE id = ?"
                params = (job_id,)
            else:
                sql = "UPDATE jobs SET state = ?, error = ?, finished_at = ? WHERE id = ?"
                params = (new_state, error, now, job_id)
            await conn.execute(sql, params)
            async with conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)) as cur:
                out = await cur.fetchone()
        assert out is not None
        return _job(out)

    async def request_cancel(self, job_id: int) -> Job:
        """Queued jobs are cancelled at once; running ones get cancel_requested = 1 and the scheduler
        tells the worker to stop (and then moves the job to cancelled). Finished jobs are unchanged."""
        now = self._now()
        async with self.db.transaction() as conn:
            await conn.execute(
                "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = ? "
                "WHERE id = ? AND state = 'queued'",
                (now, job_id),
            )
            await conn.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'", (job_id,)
            )
            async with conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)) as cur:
                row = await cur.fetchone()
        if row is None:
            raise NotFoundError(f"job {job_id} does not exist")
        return _job(row)

    async def set_progress(self, job_id: int, progress: dict[str, Any]) -> None:
        await self.db.execute(
            "UPDATE jobs SET progress_json = ? WHERE id = ?",
            (json.dumps(progress, separators=(",", ":")), job_id),
        )

    async def set_job_message(
        self, job_id: int, *, thread_id: int | None = _UNSET, message_id: int | None = _UNSET
    ) -> None:
        """Remember where the job's progress lives in Discord (a thread and one message in it)."""
        changes = {k: v for k, v in (("thread_id", thread_id), ("message_id", message_id)) if v is not _UNSET}
        if changes:
            sets = ", ".join(f"{k} = ?" for k in changes)
            await self.db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*changes.values(), job_id))

    async def heartbeat(self, job_id: int) -> bool:
        """Stamp a running job as alive. False if the job is no longer running."""
        n = await self.db.execute(
            "UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND state = 'running'", (self._now(), job_id)
        )
        return n == 1

    async def add_gpu_seconds(self, job_id: int, seconds: float) -> None:
        """Accumulate device time (a resumed job adds each attempt's share)."""
        await self.db.execute(
            "UPDATE jobs SET gpu_seconds = gpu_seconds + ? WHERE id = ?", (max(0.0, float(seconds)), job_id)
        )

    async def gpu_seconds_since(self, owner_id: int, since_ts: float) -> float:
        """Device time charged to the owner by jobs that started or finished at/after ``since_ts``,
        counting the elapsed time of still-running attempts (for daily quotas)."""
        now = self._now()
        row = await self.db.fetchone(
            "SELECT COALESCE(SUM(gpu_seconds + CASE WHEN state = 'running' AND started_at IS NOT NULL "
            "THEN MAX(0, ? - started_at) ELSE 0 END), 0) FROM jobs "
            "WHERE owner_id = ? AND COALESCE(finished_at, started_at, created_at) >= ?",
            (now, owner_id, since_ts),
        )
        return float(row[0]) if row else 0.0

    async def requeue_running_jobs(self) -> list[int]:
        """Restart recovery: every ``running`` job goes back to ``queued`` (it resumes from its saved
        state). Running jobs with a pending cancel are cancelled instead. Returns the requeued ids."""
        now = self._now()
        async with self.db.transaction() as conn:
            async with conn.execute(
                "SELECT id FROM jobs WHERE state = 'running' AND cancel_requested = 0 ORDER BY id"
            ) as cur:
                ids = [int(r[0]) for r in await cur.fetchall()]
            await conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE state = 'running' AND cancel_requested = 1",
                (now,),
            )
            await conn.execute(
                "UPDATE jobs SET state = 'queued', worker_id = NULL, heartbeat_at = NULL WHERE state = 'running'"
            )
        return ids

    async def delete_job(self, job_id: int) -> bool:
        """Delete a finished job's rows (artifacts and events cascade). Running/queued jobs raise."""
        async with self.db.transaction() as conn:
            async with conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)) as cur:
                row = await cur.fetchone()
            if row is None:
                return False
            if row[0] not in TERMINAL_STATES:
                raise IllegalTransitionError(job_id, row[0], "deleted")
            await conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return True

    # ---- artifacts and events --------------------------------------------------------------

    async def add_artifact(
        self,
        job_id: int,
        kind: ArtifactKind,
        path: str,
        bytes: int = 0,  # noqa: A002 - matches the column name
        sha256: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Artifact:
        """``path`` should be relative to the data directory, so the data dir can move."""
        if kind not in ARTIFACT_KINDS:
            raise ValueError(f"artifact kind must be one of {sorted(ARTIFACT_KINDS)}, not {kind!r}")
        meta_json = json.dumps(meta) if meta is not None else None
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO artifacts (job_id, kind, path, bytes, sha256, created_at, meta_json) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, kind, str(path), bytes, sha256, self._now(), meta_json),
            )
            async with conn.execute("SELECT * FROM artifacts WHERE id = ?", (cur.lastrowid,)) as c:
                row = await c.fetchone()
        assert row is not None
        return _row_to(Artifact, row)

    async def list_artifacts(self, job_id: int, kind: str | None = None) -> list[Artifact]:
        if kind is None:
            rows = await self.db.fetchall("SELECT * FROM artifacts WHERE job_id = ? ORDER BY id", (job_id,))
        else:
            rows = await self.db.fetchall(
                "SELECT * FROM artifacts WHERE job_id = ? AND kind = ? ORDER BY id", (job_id, kind)
            )
        return [_row_to(Artifact, r) for r in rows]

    async def add_event(self, job_id: int, type: str, payload: dict[str, Any] | None = None) -> JobEvent:  # noqa: A002
        payload_json = json.dumps(payload or {}, separators=(",", ":"))
        async with self.db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO job_events (job_id, ts, type, payload_json) VALUES (?, ?, ?, ?)",
                (job_id, self._now(), type, payload_json),
            )
            async with conn.execute("SELECT * FROM job_events WHERE id = ?", (cur.lastrowid,)) as c:
                row = await c.fetchone()
        assert row is not None
        return _row_to(JobEvent, row)

    async def add_events(self, job_id: int, events: Iterable[tuple[str, dict[str, Any]]]) -> int:
        """Persist a batch of (type, payload) in one transaction (cheaper than one per step event)."""
        now = self._now()
        rows = [(job_id, now, t, json.dumps(p or {}, separators=(",", ":"))) for t, p in events]
        if not rows:
            return 0
        async with self.db.transaction() as conn:
            await conn.executemany(
                "INSERT INTO job_events (job_id, ts, type, payload_json) VALUES (?, ?, ?, ?)", rows
            )
        return len(rows)

    async def list_events(
        self, job_id: int, *, after_id: int = 0, types: Iterable[str] | None = None, limit: int | None = None
    ) -> list[JobEvent]:
        sql, params = "SELECT * FROM job_events WHERE job_id = ? AND id > ?", [job_id, after_id]
        if types is not None:
            tl = list(types)
            sql += f" AND type IN ({_placeholders(tl)})"
            params.extend(tl)
        sql += " ORDER BY id LIMIT ?"
        params.append(-1 if limit is None else limit)
        return [_row_to(JobEvent, r) for r in await self.db.fetchall(sql, params)]
