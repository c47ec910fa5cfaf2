"""Repo over a real SQLite file: datasets, images, job lifecycle, artifacts, events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from storage.db import Database, open_db
from storage.repo import DuplicateNameError, IllegalTransitionError, NotFoundError, Repo

SHA = [f"{i:064x}" for i in range(10)]


async def _job(repo: Repo, owner: int = 1, priority: int = 0, kind: str = "train") -> int:
    job = await repo.create_job(
        kind, owner, json.dumps({"steps": 10}), guild_id=5, channel_id=6, priority=priority
    )
    return job.id


async def test_users_and_datasets(repo: Repo) -> None:
    u = await repo.ensure_user(1, "ann")
    assert (u.id, u.name, u.is_admin) == (1, "ann", False)
    assert (await repo.ensure_user(1)).name == "ann"  # no name given keeps the old one
    assert (await repo.ensure_user(1, "anna", is_admin=True)).is_admin is True

    cats = await repo.create_dataset(1, "Cats", trigger_word="scs", class_prompt="cat")
    assert cats.visibility == "private" and cats.trigger_word == "scs"
    with pytest.raises(DuplicateNameError):
        await repo.create_dataset(1, "cats")  # names are unique per owner, case-insensitively
    other = await repo.create_dataset(2, "cats", visibility="shared")  # other owner: fine; creates user 2
    await repo.create_dataset(3, "hidden")

    assert (await repo.find_dataset_by_name(1, "CATS")).id == cats.id
    assert await repo.find_dataset_by_name(1, "dogs") is None
    assert {d.id for d in await repo.list_datasets(visible_to=1)} == {cats.id, other.id}
    assert [d.id for d in await repo.list_datasets(owner_id=2)] == [other.id]
    updated = await repo.update_dataset(cats.id, visibility="shared", trigger_word="ohwx")
    assert (updated.visibility, updated.trigger_word, updated.class_prompt) == ("shared", "ohwx", "cat")
    with pytest.raises(ValueError):
        await repo.update_dataset(cats.id, visibility="public")  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        await repo.update_dataset(999, trigger_word="x")


async def test_images_and_cascade(repo: Repo, db: Database) -> None:
    ds = await repo.create_dataset(1, "cats")
    a = await repo.add_image(ds.id, SHA[0], "a.png", "png", 100, 64, 64, caption="a cat")
    assert a is not None and a.caption == "a cat"
    assert await repo.add_image(ds.id, SHA[0], "again.png", "png", 100, 64, 64) is None  # same bytes
    from storage.intake import AcceptedImage

    batch = [AcceptedImage(f"{i}.jpg", SHA[i], "jpg", 80, 90, 10, None, b"") for i in (0, 1, 2)]
    added = await repo.add_images(ds.id, batch)
    assert [i.sha256 for i in added] == [SHA[1], SHA[2]]
    assert await repo.count_images(ds.id) == 3
    assert await repo.image_hashes(ds.id) == set(SHA[:3])
    assert await repo.set_caption(added[0].id, "two cats")
    assert [i.caption for i in await repo.list_images(ds.id, limit=2, offset=1)] == ["two cats", None]

    assert await repo.delete_dataset(ds.id)
    assert await repo.get_dataset(ds.id) is None
    assert (await db.fetchone("SELECT COUNT(*) FROM images"))[0] == 0  # FK cascade


async def test_artifacts_and_events_cascade_with_job(repo: Repo, db: Database) -> None:
    jid = await _job(repo)
    art = await repo.add_artifact(jid, "lora", "jobs/1/outputs/x.safetensors", 1234, SHA[3], {"rank": 8})
    assert art.meta == {"rank": 8}
    await repo.add_artifact(jid, "sample", "jobs/1/samples/0.png", 10)
    assert [a.kind for a in await repo.list_artifacts(jid)] == ["lora", "sample"]
    assert [a.kind for a in await repo.list_artifacts(jid, kind="sample")] == ["sample"]
    with pytest.raises(ValueError):
        await repo.add_artifact(jid, "weird", "x")  # type: ignore[arg-type]
    e1 = await repo.add_event(jid, "step", {"step": 1, "loss": 0.5})
    await repo.add_event(jid, "step", {"step": 2})
    assert [e.payload["step"] for e in await repo.list_events(jid, after_id=e1.id)] == [2]
    assert await repo.add_events(jid, [("step", {"step": 3}), ("sample", {"path": "s.png"})]) == 2
    assert [e.type for e in await repo.list_events(jid, types=["sample"])] == ["sample"]

    with pytest.raises(IllegalTransitionError):
        await repo.delete_job(jid)  # still queued
    await repo.update_job_state(jid, "cancelled")
    assert await repo.delete_job(jid)
    assert (await db.fetchone("SELECT COUNT(*) FROM artifacts"))[0] == 0
    assert (await db.fetchone("SELECT COUNT(*) FROM job_events"))[0] == 0


async def test_job_lifecycle_and_illegal_transitions(repo: Repo) -> None:
    jid = await _job(repo)
    job = await repo.get_job(jid)
    assert job is not None and job.state == "queued" and job.spec == {"steps": 10} and job.guild_id == 5
    with pytest.raises(IllegalTransitionError):
        await repo.update_job_state(jid, "succeeded")  # queued -> succeeded skips running
    job = await repo.update_job_state(jid, "running", worker_id="w0")
    assert (job.state, job.worker_id, job.attempts) == ("running", "w0", 1) and job.started_at is not None
    await repo.set_progress(jid, {"step": 5, "of": 10})
    assert (await repo.get_job(jid)).progress == {"step": 5, "of": 10}
    assert await repo.heartbeat(jid)
    job = await repo.update_job_state(jid, "failed", error="CUDA out of memory")
    assert job.error == "CUDA out of memory" and job.finished_at is not None and job.is_terminal
    for target in ("running", "queued", "succeeded", "cancelled"):
        with pytest.raises(IllegalTransitionError):
            await repo.update_job_state(jid, target)  # type: ignore[arg-type]
    assert not await repo.heartbeat(jid)
    with pytest.raises(NotFoundError):
        await repo.update_job_state(999, "running")
    with pytest.raises(ValueError):
        await repo.update_job_state(jid, "paused")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await repo.create_job("dance", 1, "{}")  # type: ignore[arg-type]


async def test_queue_order_and_counts(repo: Repo) -> None:
    low = await _job(repo, owner=1)
    high = await _job(repo, owner=2, priority=5)
    low2 = await _job(repo, owner=1)
    queued = await repo.list_jobs(states=["queued"])
    assert [j.id for j in queued] == [high, low, low2]
    assert [j.id for j in await repo.list_jobs(owner_id=1, newest_first=True)] == [low2, low]
    assert await repo.count_jobs(1, ["queued"]) == 2
    assert await repo.count_jobs(states=["running"]) == 0
    assert await repo.list_jobs(states=[]) == []
    with pytest.raises(ValueError):
        await repo.list_jobs(states=["nope"])


async def test_try_start_job_only_once(repo: Repo) -> None:
    jid = await _job(repo)
    assert await repo.try_start_job(jid, "w0")
    assert not await repo.try_start_job(jid, "w1")
    assert (await repo.get_job(jid)).worker_id == "w0"

    # Many concurrent claimers on one connection: exactly one wins.
    jid2 = await _job(repo)
    wins = await asyncio.gather(*(repo.try_start_job(jid2, f"w{i}") for i in range(20)))
    assert sum(wins) == 1


async def test_try_start_job_across_two_connections(tmp_path: Path) -> None:
    """Two processes' worth of connections on one file: still exactly one winner per job."""
    path = tmp_path / "shared.db"
    d1, d2 = await open_db(path), await open_db(path)
    try:
        r1, r2 = Repo(d1), Repo(d2)
        ids = [await _job(r1) for _ in range(10)]
        results = await asyncio.gather(
            *(r.try_start_job(j, name) for j in ids for r, name in ((r1, "a"), (r2, "b")))
        )
        assert sum(results) == len(ids)
        assert [(await r1.get_job(j)).attempts for j in ids] == [1] * len(ids)
    finally:
        await d1.close()
        await d2.close()


async def test_cancel(repo: Repo) -> None:
    queued = await _job(repo)
    job = await repo.request_cancel(queued)
    assert job.state == "cancelled" and job.finished_at is not None
    assert not await repo.try_start_job(queued, "w")

    running = await _job(repo)
    assert await repo.try_start_job(running, "w")
    job = await repo.request_cancel(running)
    assert job.state == "running" and job.cancel_requested  # the worker must stop first
    assert (await repo.update_job_state(running, "cancelled")).state == "cancelled"
    done = await repo.request_cancel(running)  # no-op on a finished job
    assert done.state == "cancelled"
    with pytest.raises(NotFoundError):
        await repo.request_cancel(12345)


async def test_requeue_running_jobs(repo: Repo) -> None:
    a, b, c, d = [await _job(repo) for _ in range(4)]
    for j in (a, b, c):
        assert await repo.try_start_job(j, "w")
    await repo.request_cancel(c)  # running with a cancel pending: cancelled, not resumed
    assert await repo.requeue_running_jobs() == [a, b]
    ja = await repo.get_job(a)
    assert ja.state == "queued" and ja.worker_id is None and ja.attempts == 1
    assert (await repo.get_job(c)).state == "cancelled"
    assert (await repo.get_job(d)).state == "queued"
    # Resumed: it can be started again exactly once, and attempts count the restart.
    assert await repo.try_start_job(a, "w2")
    assert (await repo.get_job(a)).attempts == 2
    assert await repo.requeue_running_jobs() == [a]


async def test_gpu_seconds_since(db: Database) -> None:
    now = [1000.0]
    repo = Repo(db, clock=lambda: now[0])
    old = await _job(repo)
    await repo.try_start_job(old, "w")
    await repo.add_gpu_seconds(old, 50)
    await repo.update_job_state(old, "succeeded")
    now[0] = 5000.0
    recent = await _job(repo)
    await repo.try_start_job(recent, "w")
    await repo.add_gpu_seconds(recent, 30)
    await repo.update_job_state(recent, "succeeded")
    running = await _job(repo)
    await repo.try_start_job(running, "w")
    now[0] = 5100.0  # the running job has been going for 100 s
    assert await repo.gpu_seconds_since(1, 4000.0) == pytest.approx(130.0)
    assert await repo.gpu_seconds_since(1, 0.0) == pytest.approx(180.0)
    assert await repo.gpu_seconds_since(2, 0.0) == 0.0


async def test_set_job_message(repo: Repo) -> None:
    jid = await _job(repo)
    await repo.set_job_message(jid, thread_id=11, message_id=22)
    await repo.set_job_message(jid, message_id=33)
    job = await repo.get_job(jid)
    assert (job.thread_id, job.message_id) == (11, 33)
