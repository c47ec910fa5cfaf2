"""What is kept, and for how long: job events are compacted once a job ends.

A running job writes about one ``progress`` row per second into job_events (for listeners that come late
and for restart recovery). Once the job has ended nothing reads them but the last one: the final step,
loss and speed. So at the end only the last progress row of the job is kept; every other event (state
changes, samples, files, warnings, delivery and metadata records) stays as long as the job.
"""

from __future__ import annotations

from storage.db import Database

_TERMINAL = "('succeeded', 'failed', 'cancelled')"


async def compact_job_events(db: Database, job_id: int) -> int:
    """Delete all but the newest ``progress`` event of a finished job. Returns the rows removed
    (0 for a job that is still queued or running: its events may still be needed to resume)."""
    return await db.execute(
        "DELETE FROM job_events WHERE job_id = ? AND type = 'progress' "
        f"AND EXISTS (SELECT 1 FROM jobs WHERE id = ? AND state IN {_TERMINAL}) "
        "AND id < (SELECT MAX(id) FROM job_events WHERE job_id = ? AND type = 'progress')",
        (job_id, job_id, job_id),
    )


async def compact_finished_jobs(db: Database) -> int:
    """``compact_job_events`` for every finished job at once (start-up, and databases from before)."""
    return await db.execute(
        "DELETE FROM job_events WHERE type = 'progress' "
        f"AND job_id IN (SELECT id FROM jobs WHERE state IN {_TERMINAL}) "
        "AND id < (SELECT MAX(e2.id) FROM job_events e2 WHERE e2.job_id = job_events.job_id "
        "AND e2.type = 'progress')"
    )
