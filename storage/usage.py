"""What a user has used: device time, jobs and stored bytes (quotas at dispatch, storage quotas, /me).

Plain functions over ``Database``, like storage/queries.py. Bytes come from the rows (images.bytes,
artifacts.bytes), so no folder is walked on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage.db import Database


@dataclass(frozen=True, slots=True)
class StorageUsage:
    datasets: int
    images: int
    image_bytes: int
    jobs: int
    result_bytes: int  # artifacts of the user's jobs (LoRAs, checkpoints, samples, grids)

    @property
    def total_bytes(self) -> int:
        return self.image_bytes + self.result_bytes


async def storage_usage(db: Database, owner_id: int) -> StorageUsage:
    row = await db.fetchone(
        "SELECT (SELECT COUNT(*) FROM datasets WHERE owner_id = ?), "
        "(SELECT COUNT(*) FROM images i JOIN datasets d ON d.id = i.dataset_id WHERE d.owner_id = ?), "
        "(SELECT COALESCE(SUM(i.bytes + i.mask_bytes), 0) FROM images i JOIN datasets d ON d.id = i.dataset_id "
        " WHERE d.owner_id = ?), "
        "(SELECT COUNT(*) FROM jobs WHERE owner_id = ?), "
        "(SELECT COALESCE(SUM(a.bytes), 0) FROM artifacts a JOIN jobs j ON j.id = a.job_id WHERE j.owner_id = ?)",
        (owner_id,) * 5,
    )
    assert row is not None
    return StorageUsage(*(int(v or 0) for v in row))


async def recent_runs(db: Database, kind: str, limit: int = 10) -> list[tuple[str, float]]:
    """(spec_json, device seconds) of the last ``limit`` succeeded jobs of ``kind``: what jobs of that
    kind actually cost here, to price a queued one."""
    rows = await db.fetchall(
        "SELECT spec_json, gpu_seconds FROM jobs WHERE kind = ? AND state = 'succeeded' AND gpu_seconds > 0 "
        "ORDER BY finished_at DESC LIMIT ?",
        (kind, limit),
    )
    return [(str(r[0]), float(r[1])) for r in rows]


async def has_event(db: Database, job_id: int, type_: str) -> bool:
    row = await db.fetchone("SELECT 1 FROM job_events WHERE job_id = ? AND type = ? LIMIT 1", (job_id, type_))
    return row is not None
