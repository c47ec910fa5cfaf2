"""Retention (issue 17): a finished job keeps its last progress row and every other event; uploads no job
names are swept by the periodic maintenance pass."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from bot.config import config_from_dict
from bot.service import Service
from storage import retention

STUB = str(Path(__file__).resolve().parents[1] / "cogs" / "worker_stub.py")


def make_service(tmp: Path) -> Service:
    return Service(config_from_dict({
        "paths": {"data_dir": str(tmp / "data"), "models_dir": str(tmp / "models")},
        "limits": {"daily_gpu_minutes_per_user": 0},
        "workers": {"devices": ["cpu"], "worker_cmd": [sys.executable, STUB], "ready_timeout_s": 30,
                    "env_pass": ["STUB_STEP_S"]},
    }))


async def test_finished_job_keeps_only_its_last_progress_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    svc = make_service(tmp_path)
    await svc.start()
    try:
        seen: list[int] = []
        job = await svc.scheduler.submit(1, "train", {"kind": "train", "output_name": "slow", "steps": 50})

        async def progress_rows() -> int:
            return len(await svc.repo.list_events(job.id, types=["progress"]))

        while (j := await svc.repo.get_job(job.id)) and not j.is_terminal:
            seen.append(await progress_rows())
            await asyncio.sleep(0.2)
        assert j.state == "succeeded"
        assert max(seen) >= 2  # while running, progress rows pile up (about one a second)
        events = await svc.repo.list_events(job.id)
        progress = [e for e in events if e.type == "progress"]
        assert len(progress) == 1 and progress[0].payload["step"] == 50  # the last one
        types = {e.type for e in events}
        assert {"started", "sample", "file", "finished", "state"} <= types  # everything else is kept
    finally:
        await svc.stop()


async def test_compaction_of_older_databases_and_unfinished_jobs(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    await svc.open()
    try:
        repo = svc.repo
        done = await repo.create_job("train", 1, "{}")
        live = await repo.create_job("train", 1, "{}")
        for j in (done, live):
            assert await repo.try_start_job(j.id, "w")
            await repo.add_event(j.id, "started", {})
            for step in range(1, 6):
                await repo.add_event(j.id, "progress", {"step": step})
            await repo.add_event(j.id, "warning", {"text": "kept"})
        await repo.update_job_state(done.id, "succeeded", expected="running")
        assert await retention.compact_job_events(svc.db, live.id) == 0  # still running: untouched
        assert await retention.compact_finished_jobs(svc.db) == 4
        assert [e.payload.get("step") for e in await repo.list_events(done.id, types=["progress"])] == [5]
        assert len(await repo.list_events(done.id)) == 3  # started, last progress, warning
        assert len(await repo.list_events(live.id, types=["progress"])) == 5
    finally:
        await svc.stop()


async def test_maintenance_sweeps_uploads_no_job_names(tmp_path: Path) -> None:
    svc = make_service(tmp_path)
    await svc.open()
    try:
        orphan = svc.files.inputs_dir / "loras" / ("a" * 64) / "left.safetensors"
        used = svc.files.inputs_dir / "loras" / ("b" * 64) / "used.safetensors"
        for p in (orphan, used):
            p.parent.mkdir(parents=True)
            p.write_bytes(b"x")
            old = time.time() - 7200
            os.utime(p, (old, old))
        await svc.repo.create_job("merge", 1, f'{{"kind": "merge", "inputs": [{{"path": "{used}"}}]}}')
        await svc.maintain_once()
        assert not orphan.exists() and used.exists()
    finally:
        await svc.stop()


def test_worker_logs_are_rotated_at_start_and_stay_bounded(tmp_path: Path) -> None:
    from bot.workers import rotate_log

    log = tmp_path / "worker-0.log"
    log.write_bytes(b"old " * 100)
    rotate_log(log, max_bytes=1000)
    assert log.exists() and not log.with_name("worker-0.log.1").exists()  # small: left alone
    log.write_bytes(b"x" * 2000)
    rotate_log(log, max_bytes=1000)
    assert not log.exists() and log.with_name("worker-0.log.1").read_bytes() == b"x" * 2000
    log.write_bytes(b"y" * 3000)
    rotate_log(log, max_bytes=1000)  # the older copy is replaced: at most two files per worker
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker-0.log.1"]
    assert log.with_name("worker-0.log.1").read_bytes() == b"y" * 3000
