"""Read/write helpers the scheduler needs beyond ``Repo`` (kept apart so repo.py stays its owner's).

Plain functions over ``Database``; same conventions as repo.py (Unix-seconds floats, JSON text).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from storage.db import Database


@dataclass(frozen=True, slots=True)
class OwnerLoad:
    owner_id: int
    running: int
    last_started_at: float | None  # most recent start of any of the owner's jobs


async def owner_loads(db: Database) -> dict[int, OwnerLoad]:
    """Per owner with any job: running count and the last time one of their jobs started."""
    rows = await db.fetchall(
        "SELECT owner_id, SUM(state = 'running') AS running, MAX(started_at) AS last_started "
        "FROM jobs GROUP BY owner_id"
    )
    return {
        int(r["owner_id"]): OwnerLoad(int(r["owner_id"]), int(r["running"] or 0), r["last_started"])
        for r in rows
    }


async def set_progress_and_heartbeat(db: Database, job_id: int, progress: dict[str, Any]) -> bool:
    """One UPDATE for the hot path (every progress event). False if the job is not running."""
    n = await db.execute(
        "UPDATE jobs SET progress_json = ?, heartbeat_at = ? WHERE id = ? AND state = 'running'",
        (json.dumps(progress, separators=(",", ":")), time.time(), job_id),
    )
    return n == 1


async def quota_window_start(db: Database, owner_id: int, since_ts: float) -> float | None:
    """The oldest timestamp (as counted by ``Repo.gpu_seconds_since``) of the owner's jobs still in
    the quota window: when it leaves the window, usage starts going down."""
    row = await db.fetchone(
        "SELECT MIN(COALESCE(finished_at, started_at, created_at)) FROM jobs "
        "WHERE owner_id = ? AND COALESCE(finished_at, started_at, created_at) >= ? "
        "AND (gpu_seconds > 0 OR state = 'running')",
        (owner_id, since_ts),
    )
    return float(row[0]) if row and row[0] is not None else None


async def recent_runs(db: Database, kind: str, limit: int = 10) -> list[tuple[float, float, float]]:
    """(steps, device seconds, measured steps per second) of the last ``limit`` succeeded jobs of ``kind`` with
    charged time, from their final progress (0 where a kind has no steps or the rate is unknown)."""
    rows = await db.fetchall(
        "SELECT progress_json, gpu_seconds FROM jobs WHERE kind = ? AND state = 'succeeded' "
        "AND gpu_seconds > 0 ORDER BY finished_at DESC LIMIT ?",
        (kind, limit),
    )
    out = []
    for r in rows:
        try:
            prog = json.loads(r["progress_json"] or "{}")
        except ValueError:
            prog = {}
        if not isinstance(prog, dict):
            prog = {}
        try:
            total = float(prog.get("total") or prog.get("total_steps") or 0)
            out.append((total, float(r["gpu_seconds"]), float(prog.get("steps_per_s") or 0)))
        except (TypeError, ValueError):
            continue
    return out
