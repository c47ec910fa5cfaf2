"""Rows in and out: typed async methods over ``Database`` that return dataclasses.

Timestamps are Unix seconds (float, ``time.time()``). Discord ids are stored as INTEGER.
Job state changes go through ``update_job_state`` / ``try_start_job`` / ``request_cancel``, which
enforce the lifecycle with conditional UPDATEs (``WHERE state = ...``), so two callers racing on
the same job (even from two processes) cannot both win.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from storage.dataset_rows import DatasetRows
from storage.db import Database
from storage.records import (  # the rows are re-exported: callers import them from storage.repo
    _UNSET,
    ARTIFACT_KINDS,
    JOB_KINDS,
    JOB_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    VISIBILITIES,
    Artifact,
    ArtifactKind,
    Dataset,
    DatasetImage,
    DuplicateNameError,
    IllegalTransitionError,
    Job,
    JobEvent,
    JobKind,
    JobState,
    NewImage,
    NotFoundError,
    User,
    Visibility,
    _is_rowid,
    _job,
    _placeholders,
    _row_to,
    _select_all,
)

__all__ = [
    "Repo", "ARTIFACT_KINDS", "Artifact", "ArtifactKind", "Dataset", "DatasetImage", "DuplicateNameError",
    "IllegalTransitionError", "JOB_KINDS", "JOB_STATES", "Job", "JobEvent", "JobKind", "JobState", "NewImage",
    "NotFoundError", "TERMINAL_STATES", "TRANSITIONS", "User", "VISIBILITIES", "Visibility",
]


def _check_states(states: Iterable[str]) -> list[str]:
    out = list(states)
    bad = [s for s in out if s not in JOB_STATES]
    if bad:
        raise ValueError(f"unknown job state(s) {bad}; allowed: {sorted(JOB_STATES)}")
    return out


def _job_filter(owner_id: int | None, states: Iterable[str] | None,
                kind: str | None = None) -> tuple[list[str], list[Any]] | None:
    """(conditions, parameters) selecting jobs by owner, states and kind; None when ``states`` is empty (no job)."""
    where: list[str] = []
    params: list[Any] = []
    if owner_id is not None:
        where.append("owner_id = ?")
        params.append(owner_id)
    if states is not None:
        st = _check_states(states)
        if not st:
            return None
        where.append(f"state IN ({_placeholders(st)})")
        params.extend(st)
    if kind is not None:
        where.append("kind = ?")
        params.append(kind)
    return where, params


class Repo(DatasetRows):
    """All reads and writes of the bot's rows. Cheap to construct; share one per process."""

    def __init__(self, db: Database, clock: Any = time.time) -> None:
        self.db = db
        self._now = clock  # injectable for tests of quotas and ordering

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
        filt = _job_filter(owner_id, states, kind)
        if filt is None:
            return []
        where, params = filt
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
        filt = _job_filter(owner_id, states)
        if filt is None:
            return 0
        where, params = filt
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

    async def requeue_running_jobs(self, keep: Sequence[int] = ()) -> list[int]:
        """Restart recovery: every ``running`` job goes back to ``queued`` (it resumes from its saved
        state). Running jobs with a pending cancel are cancelled instead. Returns the requeued ids.
        ``keep``: jobs left ``running`` (re-attached where they still run, e.g. on a Ray cluster)."""
        now = self._now()
        kept = [int(k) for k in keep]
        skip = f" AND id NOT IN ({', '.join('?' * len(kept))})" if kept else ""
        async with self.db.transaction() as conn:
            async with conn.execute(
                "SELECT id FROM jobs WHERE state = 'running' AND cancel_requested = 0" + skip + " ORDER BY id", kept
            ) as cur:
                ids = [int(r[0]) for r in await cur.fetchall()]
            await conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE state = 'running' AND cancel_requested = 1"
                + skip, (now, *kept),
            )
            await conn.execute(
                "UPDATE jobs SET state = 'queued', worker_id = NULL, heartbeat_at = NULL WHERE state = 'running'" + skip,
                kept,
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

    async def drop_artifacts(self, job_id: int, path: str) -> int:
        """Forget a job's rows for a file that was written over (its old content is gone)."""
        return await self.db.execute("DELETE FROM artifacts WHERE job_id = ? AND path = ?", (job_id, str(path)))

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
