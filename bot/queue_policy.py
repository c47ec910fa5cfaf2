"""Queue policy: the fair order in which queued jobs start, and how long they will take.

Pure functions over job rows and per-owner loads (no database, no Discord), so the scheduler, the
progress messages and the tests share one definition.

Fair order, when a worker is free: admin priority first (jobs.priority), then the user with the
fewest running jobs, then the user whose last job started longest ago, FIFO within a user; users
at ``max_running_per_user`` wait. The same order (simulated forward) gives queue positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from storage.queries import OwnerLoad
from storage.repo import Job

Speed = tuple[float, float] | None  # (steps per second, seconds per job) of a kind, from history


def fair_order(
    queued: Sequence[Job], loads: Mapping[int, OwnerLoad], cap: int, now: float, *, for_dispatch: bool = False
) -> list[Job]:
    """``queued`` (priority DESC, created_at, id) in the order the jobs will start. ``for_dispatch``: only
    jobs that may start now (their owner is under ``cap`` running jobs)."""
    running = {o: ld.running for o, ld in loads.items()}
    last = {o: ld.last_started_at or float("-inf") for o, ld in loads.items()}
    per_user: dict[int, list[Job]] = {}
    for j in queued:
        per_user.setdefault(j.owner_id, []).append(j)
    heads = {o: 0 for o in per_user}
    order: list[Job] = []
    tick = now
    while True:
        best: tuple[Any, ...] | None = None
        for o, jobs in per_user.items():
            i = heads[o]
            if i >= len(jobs) or (for_dispatch and running.get(o, 0) >= cap):
                continue
            j = jobs[i]
            key = (-j.priority, running.get(o, 0), last.get(o, float("-inf")), j.created_at, j.id, o)
            if best is None or key < best:
                best = key
        if best is None:
            return order
        o = best[-1]
        order.append(per_user[o][heads[o]])
        heads[o] += 1
        # Pretend it started now: the next pick prefers everybody else.
        running[o] = running.get(o, 0) + 1
        tick += 1e-3
        last[o] = tick


def remaining_s(job: Job, speed: Speed) -> float | None:
    """Seconds this job still needs, from its own progress or the measured speed of its kind."""
    prog = job.progress or {}
    if job.state == "running" and prog.get("eta_s") is not None:
        return float(prog["eta_s"])
    if speed is None:
        return None
    steps_per_s, secs_per_job = speed
    if job.kind == "train" and steps_per_s > 0:
        total = float(job.spec.get("steps") or 0)
        done = float(prog.get("step") or 0) if job.state == "running" else 0.0
        return max(0.0, total - done) / steps_per_s
    return secs_per_job


def finish_eta(own: float | None, ahead: Sequence[float | None], workers: int) -> float | None:
    """Seconds until a queued job finishes: the work ahead of it shared by ``workers``, then its own."""
    if own is None or any(d is None for d in ahead):
        return None
    return sum(d for d in ahead if d is not None) / max(1, workers) + own
