"""Scheduler behaviour against the protocol-speaking fake worker (tests/cogs/worker_stub.py).

The real engine is exercised in test_restart.py and test_demo.py; here the worker finishes
instantly so queue logic (fairness, quotas, cancel, watchdog, crashes, listeners) runs in seconds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import config_from_dict
from bot.scheduler import QuotaError
from bot.service import Service
from bot.workers import OOM_MESSAGE
from storage.repo import Job

FAKE = str(Path(__file__).resolve().parents[1] / "cogs" / "worker_stub.py")


def make_config(tmp: Path, **limits: Any) -> Any:
    workers = limits.pop("workers", {})
    return config_from_dict(
        {
            "paths": {"data_dir": str(tmp / "data"), "models_dir": str(tmp / "models")},
            "limits": {"max_queued_per_user": 10, "max_running_per_user": 1, "stall_timeout_s": 60,
                       "daily_gpu_minutes_per_user": 0, "cancel_grace_s": 5, **limits},
            "workers": {"devices": ["cpu"], "restart_backoff_s": 0.05, "ready_timeout_s": 30,
                        "worker_cmd": [sys.executable, FAKE],
                        "env_pass": ["STUB_STEP_S", "FAKE_WORKER_LOG"], **workers},
        }
    )


@pytest.fixture
async def svc(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Service]:
    limits = getattr(request, "param", {})  # @pytest.mark.parametrize("svc", [{...}], indirect=True)
    service = Service(make_config(tmp_path, **limits))
    await service.open()
    try:
        yield service
    finally:
        await service.stop()


def train(name: str = "fast", steps: int = 3, **kw: Any) -> dict[str, Any]:
    return {"kind": "train", "output_name": name, "steps": steps, **kw}


def start_order(service: Service) -> list[int]:
    order: list[int] = []

    def on(job: Job, ev: dict[str, Any]) -> None:
        if ev.get("type") == "state" and ev.get("state") == "running":
            order.append(job.id)

    service.add_listener(on)
    return order


async def test_fair_order_b_runs_second(svc: Service) -> None:
    sched = svc.scheduler
    order = start_order(svc)
    await sched.start()
    a = [await sched.submit(1, "train", train("slow", 6)) for _ in range(5)]
    b = await sched.submit(2, "train", train("slow", 6))
    assert await sched.queue_position(b.id) == 1  # A's first job is already running
    for j in [*a, b]:
        assert (await sched.wait_for_job(j.id, 30)).state == "succeeded"
    assert order[0] == a[0].id and order[1] == b.id, order
    assert order[2:] == [j.id for j in a[1:]]


async def test_admin_priority_jumps_queue(svc: Service) -> None:
    sched = svc.scheduler
    order = start_order(svc)
    jobs = [await sched.submit(u, "train", train()) for u in (1, 2, 3)]
    admin = await sched.submit(9, "train", train(), priority=10, is_admin=True)
    not_admin = await sched.submit(4, "train", train(), priority=10)  # priority ignored for users
    assert (await svc.repo.get_job(not_admin.id)).priority == 0  # type: ignore[union-attr]
    assert await sched.queue_position(admin.id) == 1
    await sched.start()
    for j in [*jobs, admin, not_admin]:
        await sched.wait_for_job(j.id, 30)
    assert order[0] == admin.id


@pytest.mark.parametrize("svc", [dict(max_queued_per_user=2, max_steps=100, max_resolution=512, daily_gpu_minutes_per_user=1)], indirect=True)
async def test_quota_errors_say_limit_and_count(svc: Service) -> None:
    sched = svc.scheduler
    await sched.submit(1, "train", train())
    await sched.submit(1, "train", train())
    with pytest.raises(QuotaError, match=r"You already have 2 job\(s\).*limit is 2"):
        await sched.submit(1, "train", train())
    await sched.submit(1, "train", train(), is_admin=True)  # admins are exempt
    with pytest.raises(QuotaError, match="500 steps is over.*100"):
        await sched.submit(2, "train", train(steps=500))
    with pytest.raises(QuotaError, match="resolution 1024 is over.*512"):
        await sched.submit(2, "train", train(data={"resolution": 1024}))
    # a finished job that used 2 GPU minutes today
    job = await svc.repo.create_job("train", 3, '{"kind": "train"}')
    await svc.repo.try_start_job(job.id, "w")
    await svc.repo.add_gpu_seconds(job.id, 120)
    await svc.repo.update_job_state(job.id, "succeeded")
    with pytest.raises(QuotaError, match=r"used 2 of your 1 GPU minutes.*freeing up at \d\d:\d\d UTC"):
        await sched.submit(3, "train", train())


@pytest.mark.parametrize("svc", [dict(max_queued_per_user=7)], indirect=True)
async def test_200_concurrent_submissions(svc: Service, tmp_path: Path) -> None:
    sched = svc.scheduler
    log_file = tmp_path / "ran.txt"
    os.environ["FAKE_WORKER_LOG"] = str(log_file)
    try:
        async def one(i: int) -> Job | None:
            try:
                return await sched.submit(i % 10, "train", train())
            except QuotaError:
                return None

        results = await asyncio.gather(*(one(i) for i in range(200)))
        accepted = [j for j in results if j is not None]
        assert len(accepted) == 70  # 10 users x max_queued_per_user
        for u in range(10):
            assert await svc.repo.count_jobs(u, ["queued"]) == 7
        assert await svc.repo.count_jobs() == len(accepted)
        await sched.start()
        for j in accepted:
            assert (await sched.wait_for_job(j.id, 60)).state == "succeeded"
        ran = log_file.read_text().split()
        assert sorted(map(int, ran)) == sorted(j.id for j in accepted)  # each exactly once
        assert all(j.attempts == 1 for j in await svc.repo.list_jobs())
        assert await sched.eta(accepted[-1].id) is None  # finished
    finally:
        os.environ.pop("FAKE_WORKER_LOG", None)


async def test_cancel_queued_and_running_permissions(svc: Service) -> None:
    sched = svc.scheduler
    await sched.start()
    running = await sched.submit(1, "train", train("slow", 400))
    queued = await sched.submit(1, "train", train())
    other = await sched.submit(2, "train", train())
    with pytest.raises(PermissionError, match="only its owner or an admin"):
        await sched.cancel(queued.id, by_user=2)
    assert (await sched.cancel(queued.id, by_user=1)).state == "cancelled"
    for _ in range(100):
        if (await svc.repo.get_job(running.id)).state == "running":  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.05)
    with pytest.raises(PermissionError):
        await sched.cancel(running.id, by_user=3)
    await sched.cancel(running.id, by_user=99, is_admin=True)
    done = await sched.wait_for_job(running.id, 30)
    assert done.state == "cancelled"
    assert (await sched.wait_for_job(other.id, 30)).state == "succeeded"
    # an owner cancelling their own running job works too
    third = await sched.submit(2, "train", train("slow", 400))
    while (await svc.repo.get_job(third.id)).state != "running":  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
    await sched.cancel(third.id, by_user=2)
    assert (await sched.wait_for_job(third.id, 30)).state == "cancelled"


@pytest.mark.parametrize("svc", [dict(cancel_grace_s=0.5)], indirect=True)
async def test_cancel_kills_a_worker_that_does_not_stop(svc: Service) -> None:
    sched = svc.scheduler
    await sched.start()
    stuck = await sched.submit(1, "train", train("stall"))  # never looks at the cancel request
    after = await sched.submit(2, "train", train())
    while (await svc.repo.get_job(stuck.id)).state != "running":  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
    pid = sched.workers[0].pid
    t0 = time.monotonic()
    await sched.cancel(stuck.id, by_user=1)
    job = await sched.wait_for_job(stuck.id, 30)
    assert job.state == "cancelled", (job.state, job.error)
    assert time.monotonic() - t0 >= 0.5  # it had its grace period
    assert (await sched.wait_for_job(after.id, 30)).state == "succeeded"
    assert sched.workers[0].pid != pid  # a fresh worker took over


@pytest.mark.parametrize("svc", [dict(stall_timeout_s=0.6)], indirect=True)
async def test_stall_watchdog_fails_job_and_queue_goes_on(svc: Service) -> None:
    sched = svc.scheduler
    await sched.start()
    stuck = await sched.submit(1, "train", train("stall"))
    after = await sched.submit(2, "train", train())
    job = await sched.wait_for_job(stuck.id, 30)
    assert job.state == "failed" and job.error is not None and "no progress for" in job.error
    assert (await sched.wait_for_job(after.id, 30)).state == "succeeded"


async def test_worker_crash_and_oom_give_readable_reasons(svc: Service) -> None:
    sched = svc.scheduler
    await sched.start()
    crash = await sched.submit(1, "train", train("crash"))
    oom = await sched.submit(2, "train", train("oom"))
    ok = await sched.submit(3, "train", train())
    j = await sched.wait_for_job(crash.id, 30)
    assert j.state == "failed" and j.error == "the worker process crashed (segfault)"
    j = await sched.wait_for_job(oom.id, 30)
    assert j.state == "failed" and j.error == OOM_MESSAGE
    assert (await sched.wait_for_job(ok.id, 30)).state == "succeeded"


async def test_sigkill_worker_mid_job(svc: Service) -> None:
    sched = svc.scheduler
    await sched.start()
    victim = await sched.submit(1, "train", train("slow", 400))
    nxt = await sched.submit(2, "train", train())
    while (await svc.repo.get_job(victim.id)).state != "running":  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    pid = sched.workers[0].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    j = await sched.wait_for_job(victim.id, 30)
    assert j.state == "failed" and j.error == "the worker process was killed (signal 9)"
    assert (await sched.wait_for_job(nxt.id, 30)).state == "succeeded"
    assert sched.workers[0].pid != pid


async def test_listener_exceptions_are_isolated(svc: Service) -> None:
    sched = svc.scheduler
    seen_sync: list[str] = []
    seen_async: list[str] = []

    def bad_sync(job: Job, ev: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    async def bad_async(job: Job, ev: dict[str, Any]) -> None:
        raise RuntimeError("boom")

    def good_sync(job: Job, ev: dict[str, Any]) -> None:
        seen_sync.append(ev["type"])

    async def good_async(job: Job, ev: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        seen_async.append(ev["type"])

    for fn in (bad_sync, bad_async, good_sync, good_async):
        sched.add_listener(fn)
    await sched.start()
    job = await sched.submit(1, "train", train(steps=3))
    final = await sched.wait_for_job(job.id, 30)
    assert final.state == "succeeded"
    await asyncio.sleep(0.2)
    expected = ["state", "state", "started", "phase", "progress", "progress", "progress", "sample",
                "file", "file", "file", "finished", "state"]
    assert seen_sync == expected
    assert seen_async == expected
    # persisted too: events, progress, the artifact with size and hash
    types = [e.type for e in await svc.repo.list_events(job.id)]
    assert types[0] == "state" and "finished" in types and types[-1] == "state"
    assert final.progress and final.progress["step"] == 3
    (lora,) = await svc.repo.list_artifacts(job.id, "lora")
    assert lora.bytes > 0 and lora.sha256 and lora.path.startswith("jobs/")
    assert (svc.files.job_dir(job.id) / "spec.toml").exists()


async def test_retrain_copies_spec_exactly_and_eta(svc: Service) -> None:
    sched = svc.scheduler
    await sched.start()
    first = await sched.submit(1, "train", train(steps=20, seed=7))
    await sched.wait_for_job(first.id, 30)
    with pytest.raises(PermissionError):
        await sched.retrain(first.id, by_user=2)
    again = await sched.retrain(first.id, by_user=1)
    assert again.spec_json == first.spec_json and again.id != first.id
    assert (await sched.wait_for_job(again.id, 30)).state == "succeeded"
    # with history, a queued job has an ETA; stopping leaves it queued
    await sched.stop()
    q = await sched.submit(1, "train", train(steps=20))
    eta = await sched.eta(q.id)
    assert eta is not None and eta >= 0
    t0 = time.monotonic()
    assert await sched.queue_position(q.id) == 1
    assert time.monotonic() - t0 < 1


async def test_users_may_only_name_the_servers_base_models(svc: Service, tmp_path: Path) -> None:
    """A /train option or job file naming a path must not make a worker open any file on the machine."""
    from trainer.spec import SpecError

    sched = svc.scheduler
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Stable-diffusion" / "anime.safetensors").write_bytes(b"x")
    for bad in ("/etc/passwd", "../data/loraforge.db", "Stable-diffusion/missing.safetensors"):
        with pytest.raises(SpecError, match="base_model.*not a base model of this server.*tiny-sd15"):
            await sched.submit(1, "train", train(base_model=bad))
    for ok in ("tiny-sdxl", "Stable-diffusion/anime.safetensors", "Stable-diffusion/anime"):
        assert (await sched.submit(1, "train", train(base_model=ok))).spec["base_model"] == ok
    admin = await sched.submit(9, "train", train(base_model="/srv/models/private"), is_admin=True)
    assert admin.spec["base_model"] == "/srv/models/private"  # admins may point anywhere the worker reads
    with pytest.raises(SpecError, match="base_model"):
        await sched.retrain(admin.id, by_user=9)  # the same rule for a non-admin replay


@pytest.mark.parametrize("svc", [dict(max_running_per_user=2, workers={"devices": ["cpu", "cpu", "cpu"]})],
                         indirect=True)
async def test_running_limit_holds_with_free_workers(svc: Service) -> None:
    """Three workers, user 1 queues five jobs, user 2 one: user 1 never runs more than two at once,
    so the third worker goes to user 2 rather than to user 1's third job."""
    sched = svc.scheduler
    running: set[int] = set()
    owners: dict[int, int] = {}
    peak: dict[int, int] = {1: 0, 2: 0}

    def on(job: Job, ev: dict[str, Any]) -> None:
        if ev.get("type") != "state":
            return
        if ev.get("state") == "running":
            running.add(job.id)
        elif ev.get("state") in ("succeeded", "failed", "cancelled", "queued"):
            running.discard(job.id)
        for u in peak:
            peak[u] = max(peak[u], sum(1 for j in running if owners.get(j) == u))

    svc.add_listener(on)
    a = [await sched.submit(1, "train", train("slow", 8)) for _ in range(5)]
    b = await sched.submit(2, "train", train("slow", 8))
    owners.update({j.id: 1 for j in a} | {b.id: 2})
    await sched.start()
    for j in [*a, b]:
        assert (await sched.wait_for_job(j.id, 60)).state == "succeeded"
    assert peak == {1: 2, 2: 1}, peak
