"""Queue estimates (issue 18): from the running job's measured rate and remaining steps and each queued job's
own steps, with the per-job overhead learnt from history; "starts in" is the wait, not the job's own length.

Real SQLite (the scheduler's own queries); no worker starts, the jobs' progress is written as the engine would."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import config_from_dict
from bot.humanize import format_duration
from bot.service import Service

STUB = str(Path(__file__).resolve().parents[1] / "cogs" / "worker_stub.py")


@pytest.fixture
async def svc(tmp_path: Path) -> AsyncIterator[Service]:
    service = Service(config_from_dict({
        "paths": {"data_dir": str(tmp_path / "data"), "models_dir": str(tmp_path / "models")},
        "limits": {"max_queued_per_user": 10, "daily_gpu_minutes_per_user": 0},
        "workers": {"devices": ["cpu"], "worker_cmd": [sys.executable, STUB]},
    }))
    await service.open()  # scheduler built, no worker started: nothing is dispatched
    try:
        yield service
    finally:
        await service.stop()


def spec(steps: int) -> str:
    return json.dumps({"kind": "train", "output_name": f"s{steps}", "steps": steps})


async def job(svc: Service, owner: int, steps: int, state: str, progress: dict[str, Any] | None = None,
              gpu_s: float = 0.0) -> int:
    repo = svc.repo
    j = await repo.create_job("train", owner, spec(steps))
    if state == "queued":
        if progress:  # a job that ran before a restart and was put back
            await repo.try_start_job(j.id, "w0")
            await repo.set_progress(j.id, progress)
            await repo.update_job_state(j.id, "queued", expected="running")
        return j.id
    assert await repo.try_start_job(j.id, "w0")
    if progress:
        await repo.set_progress(j.id, progress)
    if state == "succeeded":
        await repo.add_gpu_seconds(j.id, gpu_s)
        await repo.update_job_state(j.id, "succeeded", expected="running")
    return j.id


async def history(svc: Service) -> None:
    """Three finished 8-step jobs, 30 s each: mostly loading and sampling; the steps ran at 1.8/s."""
    for _ in range(3):
        await job(svc, 9, 8, "succeeded", {"step": 8, "total": 8, "steps_per_s": 1.8}, gpu_s=30.0)


async def test_short_job_behind_a_long_running_one_waits_for_its_remaining_time(svc: Service) -> None:
    await history(svc)
    await job(svc, 1, 3000, "running", {"step": 1000, "total": 3000, "steps_per_s": 1.83, "eta_s": 1095.0})
    short = await job(svc, 2, 8, "queued")
    starts, done = await svc.scheduler.estimate(short)
    assert starts == pytest.approx(1095.0)  # what the running job's own message says: ETA 18m15s
    assert format_duration(starts) == "18m15s"
    assert done is not None and 1095 + 8 / 1.83 < done < 1095 + 40, done  # + its 8 steps + load/save
    assert await svc.scheduler.eta(short) == done


async def test_a_long_job_that_just_started_is_not_timed_by_short_jobs_overhead(svc: Service) -> None:
    # The old estimate divided steps by history's steps/device-time (8 steps in 30 s): 3000 steps "3h05m".
    await history(svc)
    await job(svc, 1, 3000, "running", {"total": 3000, "step": 0, "phase": "caching latents"})
    short = await job(svc, 2, 8, "queued")
    starts, done = await svc.scheduler.estimate(short)
    assert starts is not None and done is not None
    assert 3000 / 1.8 < starts < 3000 / 1.8 + 60, format_duration(starts)  # 27m47s + loading
    assert done - starts < 40
    assert format_duration(done).startswith("28m"), format_duration(done)


async def test_a_requeued_job_first_in_line_starts_now_and_needs_only_its_remaining_steps(svc: Service) -> None:
    await history(svc)
    back = await job(svc, 1, 3000, "queued", {"step": 2900, "total": 3000, "steps_per_s": 2.0})
    starts, done = await svc.scheduler.estimate(back)
    assert starts == 0  # no "starts in ~8m27s" for a job that starts at once
    assert done is not None and 100 / 1.8 <= done < 100 / 1.8 + 30, done


async def test_queued_jobs_each_count_their_own_steps(svc: Service) -> None:
    await history(svc)
    await job(svc, 1, 1000, "running", {"step": 900, "total": 1000, "steps_per_s": 2.0, "eta_s": 50.0})
    big = await job(svc, 2, 2000, "queued")
    small = await job(svc, 3, 10, "queued")
    s_big, d_big = await svc.scheduler.estimate(big)
    s_small, d_small = await svc.scheduler.estimate(small)
    assert s_big == pytest.approx(50.0)
    assert d_big is not None and s_small == pytest.approx(d_big)  # behind the 2000-step job, not beside it
    assert d_small is not None and d_small - s_small < 40  # its own 10 steps at the live rate + overhead
    assert 2000 / 2.0 < d_big - s_big < 2000 / 2.0 + 40


async def test_no_history_and_nothing_running_says_unknown(svc: Service) -> None:
    q = await job(svc, 1, 100, "queued")
    assert await svc.scheduler.estimate(q) == (0.0, None)
