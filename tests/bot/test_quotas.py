"""The daily GPU quota holds at dispatch, not only at submit (issue 17): jobs priced from what jobs of their
kind actually cost here wait, or are refused, instead of running past the quota."""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import config_from_dict
from bot.quotas import WAIT_EVENT, cost_units
from bot.scheduler import QuotaError
from bot.service import Service
from storage.repo import Job

STUB = str(Path(__file__).resolve().parents[1] / "cogs" / "worker_stub.py")


def config(tmp: Path, workers: int = 1, **limits: Any) -> Any:
    return config_from_dict({
        "paths": {"data_dir": str(tmp / "data"), "models_dir": str(tmp / "models")},
        "limits": {"max_queued_per_user": 10, "max_running_per_user": 3, "daily_gpu_minutes_per_user": 1,
                   **limits},
        "workers": {"devices": ["cpu"] * workers, "worker_cmd": [sys.executable, STUB], "ready_timeout_s": 30,
                    "restart_backoff_s": 0.05, "env_pass": ["STUB_STEP_S"]},
    })


async def history(svc: Service, owner: int, steps: int, gpu_s: float, *, age_s: float = 0.0) -> Job:
    """A finished train job: what `steps` steps at 512 px cost here (sets the price of later jobs)."""
    repo = svc.repo
    job = await repo.create_job("train", owner, json.dumps({"kind": "train", "steps": steps, "output_name": "h"}))
    assert await repo.try_start_job(job.id, "w")
    await repo.update_job_state(job.id, "succeeded", expected="running")
    await repo.add_gpu_seconds(job.id, gpu_s)
    if age_s:
        await svc.db.execute("UPDATE jobs SET created_at = created_at - ?, started_at = started_at - ?, "
                             "finished_at = finished_at - ? WHERE id = ?", (age_s, age_s, age_s, job.id))
    return job


def train(name: str, steps: int) -> dict[str, Any]:
    return {"kind": "train", "output_name": name, "steps": steps}


@pytest.fixture
async def svc(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Service]:
    service = Service(config(tmp_path, **getattr(request, "param", {})))
    await service.open()
    try:
        yield service
    finally:
        await service.stop()


def test_cost_counts_steps_batch_and_resolution() -> None:
    assert cost_units("train", {"steps": 100}) == 100
    assert cost_units("train", {"steps": 100, "batch_size": 2, "data": {"resolution": 1024}}) == 800
    assert cost_units("merge", {}) == 1


@pytest.mark.parametrize("svc", [{"workers": 3}], indirect=True)
async def test_queued_jobs_cannot_run_past_the_quota_together(svc: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three jobs pass submit (nothing used yet) but together would cost 75 of 60 GPU seconds: with three
    free workers the third still waits until the first two are done, then runs on what they really used."""
    monkeypatch.setenv("STUB_STEP_S", "0.02")
    await history(svc, 99, steps=100, gpu_s=50.0)  # 2 units/s here: 50 steps cost 25 s
    sched = svc.scheduler
    events: list[tuple[int, str, Any]] = []
    svc.add_listener(lambda job, ev: events.append((job.id, ev.get("type"), ev.get("state") or ev.get("message"))))
    jobs = [await sched.submit(1, "train", train("slow", 50)) for _ in range(3)]
    await sched.start()
    for j in jobs:
        assert (await sched.wait_for_job(j.id, 60)).state == "succeeded"
    started = [jid for jid, t, s in events if t == "state" and s == "running"]
    finished = [jid for jid, t, s in events if t == "state" and s == "succeeded"]
    third = jobs[2].id
    assert started.index(third) > max(started.index(jobs[0].id), started.index(jobs[1].id))
    order = [(jid, s) for jid, t, s in events if t == "state"]
    assert order.index((third, "running")) > min(order.index((j.id, "succeeded")) for j in jobs[:2])
    waits = [s for jid, t, s in events if t == WAIT_EVENT]
    assert [jid for jid, t, _ in events if t == WAIT_EVENT] == [third]
    assert "Waiting for GPU quota" in waits[0] and "of your 60 s of GPU time" in waits[0]
    assert finished


async def test_over_quota_owner_waits_until_usage_leaves_the_window(svc: Service) -> None:
    await history(svc, 99, steps=100, gpu_s=50.0)
    old = await history(svc, 2, steps=100, gpu_s=50.0)  # user 2 used 50 of 60 s today
    sched = svc.scheduler
    job = await sched.submit(2, "train", train("fast", 40))  # 20 s: passes submit (50 < 60), not dispatch
    other = await sched.submit(3, "train", train("fast", 40))
    await sched.start()
    assert (await sched.wait_for_job(other.id, 30)).state == "succeeded"  # others are not held up
    await sched._dispatch_once()
    assert (await svc.repo.get_job(job.id)).state == "queued"
    [wait] = [e for e in await svc.repo.list_events(job.id) if e.type == WAIT_EVENT]
    assert "used 50 s of your 60 s" in wait.payload["message"] and "this job needs about 1" in wait.payload["message"]
    from bot.progress import render  # the job's progress message says why it waits

    assert wait.payload["message"] in render(await svc.repo.get_job(job.id), {"quota_wait": wait.payload["message"]})
    # a day later the old usage is out of the 24 h window: the job starts by itself
    await svc.db.execute("UPDATE jobs SET finished_at = finished_at - 90000, started_at = started_at - 90000, "
                         "created_at = created_at - 90000 WHERE id = ?", (old.id,))
    sched.kick()
    assert (await sched.wait_for_job(job.id, 30)).state == "succeeded"


async def test_a_job_bigger_than_the_whole_quota_is_refused_clearly(svc: Service) -> None:
    sched = svc.scheduler
    early = await sched.submit(4, "train", train("fast", 200))  # no history yet: cannot be priced at submit
    await history(svc, 99, steps=100, gpu_s=50.0)
    with pytest.raises(QuotaError, match="about 100 s of GPU time, more than your whole daily quota of 60 s"):
        await sched.submit(4, "train", train("fast", 200))
    admin = await sched.submit(5, "train", train("fast", 200), is_admin=True)  # admins are exempt
    await sched.start()
    done = await sched.wait_for_job(early.id, 30)
    assert done.state == "cancelled" and "more than your whole daily quota" in (done.error or "")
    assert (await sched.wait_for_job(admin.id, 30)).state == "succeeded"


@pytest.mark.parametrize("svc", [{"max_storage_mib_per_user": 1}], indirect=True)
async def test_a_user_over_their_storage_quota_cannot_queue_more_results(svc: Service) -> None:
    done = await history(svc, 6, steps=3, gpu_s=1.0)
    await svc.repo.add_artifact(done.id, "lora", f"jobs/{done.id}/outputs/h.safetensors", 1024 * 1024)
    with pytest.raises(QuotaError, match="You use 1 MiB of your 1 MiB of storage.*/job delete"):
        await svc.scheduler.submit(6, "train", train("fast", 3))
    assert (await svc.scheduler.submit(7, "train", train("fast", 3))).state == "queued"  # others are fine
    assert (await svc.scheduler.submit(6, "train", train("fast", 3), is_admin=True)).state == "queued"
    await svc.repo.delete_job(done.id)  # room again
    assert (await svc.scheduler.submit(6, "train", train("fast", 3))).state == "queued"
