"""Queue policy: the fair order in which queued jobs start, and how long they will take.

Pure functions over job rows and per-owner loads (no database, no Discord), so the scheduler, the
progress messages and the tests share one definition.

Estimates: a running job needs what its own progress says (its measured rate and remaining steps); a
queued job needs its own steps at the rate the running jobs of its kind measure now (else the recent
history's), plus the per-job overhead learnt from history. A queued job starts when the work ahead of it
(running jobs first) frees a worker.

Fair order, when a worker is free: admin priority first (jobs.priority), then the user with the
fewest running jobs, then the user whose last job started longest ago, FIFO within a user; users
at ``max_running_per_user`` wait. The same order (simulated forward) gives queue positions.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from storage.queries import OwnerLoad
from storage.repo import Job


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


@dataclass(frozen=True, slots=True)
class Speed:
    """How fast jobs of one kind go on this server. A job takes ``overhead_s`` (loading the base, caching,
    saving, sampling) plus its steps at ``steps_per_s``; a kind without steps takes ``secs_per_job``."""

    steps_per_s: float
    overhead_s: float
    secs_per_job: float


def measure_speed(history: Sequence[tuple[float, float, float]], live_rates: Sequence[float]) -> Speed | None:
    """``history``: (steps, device seconds, measured steps per second) of recently finished jobs of a kind;
    ``live_rates``: the steps per second its running jobs measure now (the best figure: same machine, same
    load). A finished job's device time also holds loading, caching and sampling, so its steps/time is not a
    rate: that part is the overhead. None when there is nothing to go on."""
    runs = [(n, t, r) for n, t, r in history if t > 0]
    good = [r for r in live_rates if r > 0 and math.isfinite(r)]
    rate = statistics.fmean(good) if good else 0.0
    if not rate and (measured := [r for _, _, r in runs if r > 0 and math.isfinite(r)]):
        rate = statistics.median(measured)
    if not rate and sum(n for n, _, _ in runs) > 0:
        rate = sum(n for n, _, _ in runs) / sum(t for _, t, _ in runs)  # no measured rate: overhead unknown
    if not rate and not runs:
        return None
    overhead = statistics.median(max(0.0, t - n / rate) for n, t, _ in runs) if runs and rate else 0.0
    return Speed(rate, overhead, statistics.fmean(t for _, t, _ in runs) if runs else 0.0)


def remaining_s(job: Job, speed: Speed | None) -> float | None:
    """Seconds this job still needs: a running job's own estimate (its measured rate and remaining steps),
    else its remaining steps at the kind's speed. A re-queued job resumes from its saved step."""
    prog = job.progress or {}
    if job.state == "running" and prog.get("eta_s") is not None:
        return max(0.0, float(prog["eta_s"]))
    if speed is None:
        return None
    if job.kind == "train" and speed.steps_per_s > 0:
        total = float(prog.get("total") or job.spec.get("steps") or 0)
        done = float(prog.get("step") or 0)
        left = max(0.0, total - done) / speed.steps_per_s
        # Still loading/caching before the first step (running), or not started yet (queued): the overhead.
        return left + (speed.overhead_s if not done or job.state == "queued" else 0.0)
    return speed.secs_per_job or None


def start_and_finish(
    own: float | None, ahead: Sequence[float | None], running: Sequence[float | None], workers: int
) -> tuple[float | None, float | None]:
    """(seconds until a queued job starts, until it finishes): the running jobs hold their workers for their
    remaining time, each job ahead takes the first worker to get free, then this one does."""
    if any(d is None for d in (*ahead, *running)):
        return None, None
    free = [float(d) for d in running if d is not None]
    free += [0.0] * max(0, max(1, workers) - len(free))  # idle workers are free now
    heapq.heapify(free)
    for d in ahead:
        heapq.heappush(free, heapq.heappop(free) + float(d or 0.0))
    start = heapq.heappop(free)
    return start, (start + own if own is not None else None)
