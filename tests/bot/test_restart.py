"""Crash safety with the real worker and the tiny SD1.5 model.

- kill -9 the whole bot (process group, worker included) mid-training; a new service on the same
  data dir requeues the job, the engine resumes from its saved state, and the LoRA equals an
  uninterrupted run's tensor for tensor.
- SIGKILL only the worker mid-job: that job fails with a clear reason and the next one succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bot.service import Service

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from service_runner import make_config, train_overrides  # noqa: E402

STEPS, STATE_EVERY = 24, 4


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _state_steps(job_dir: Path) -> list[int]:
    root = job_dir / "state"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.glob("step-*") if (p / "state.json").is_file())


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


async def test_kill_9_whole_bot_then_resume_gives_same_lora(tmp_path: Path) -> None:
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "service_runner.py"), "--data-dir", str(data), "--submit",
         "--steps", str(STEPS), "--state-every", str(STATE_EVERY)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), start_new_session=True,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("JOB "), line
        job_id = int(line.split()[1])
        job_dir = data / "jobs" / str(job_id)
        deadline = time.monotonic() + 240
        while not _state_steps(job_dir):
            assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no training state was saved in time"
            await asyncio.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the bot and its worker, no clean-up at all
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    saved = _state_steps(job_dir)
    assert saved and saved[-1] < STEPS, saved

    service = Service(make_config(data))
    await service.open()
    starts: list[int] = []
    service.add_listener(lambda job, ev: starts.append(ev.get("resumed_from", 0)) if ev["type"] == "started" else None)
    try:
        requeued = await service.scheduler.start()
        assert requeued == [job_id]
        final = await service.scheduler.wait_for_job(job_id, 300)
        assert final.state == "succeeded", final.error
        assert starts and starts[0] >= saved[0] > 0  # resumed, not started over
        assert final.attempts == 2
        states = [e.payload.get("state") for e in await service.repo.list_events(job_id, types=["state"])]
        assert states.count("succeeded") == 1 and states.count("running") == 2, states
        resumed_lora = (await service.artifact_paths(job_id, "lora"))[-1]

        # The same stored spec, never interrupted.
        again = await service.scheduler.retrain(job_id, by_user=1)
        ref = await service.scheduler.wait_for_job(again.id, 300)
        assert ref.state == "succeeded", ref.error
        ref_lora = (await service.artifact_paths(again.id, "lora"))[-1]
    finally:
        await service.stop()
    a, b = _load(resumed_lora), _load(ref_lora)
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()), k


async def test_sigkill_real_worker_fails_job_and_next_runs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    service = Service(make_config(data))
    await service.open()
    try:
        from bot.demo import demo_images

        up = await service.create_dataset_from_files(1, "shapes", demo_images(3), trigger_word="zqx")
        await service.repo.update_dataset(up.dataset.id, visibility="shared")  # user 2 trains on it too
        long = await service.submit_train(1, up.dataset.id, train_overrides(2000, 1000))
        short = await service.submit_train(2, up.dataset.id, train_overrides(3, 100))
        progressed = asyncio.Event()
        service.add_listener(
            lambda job, ev: progressed.set() if job.id == long.id and ev["type"] == "progress" else None
        )
        await service.scheduler.start()
        await asyncio.wait_for(progressed.wait(), 240)
        pid = service.scheduler.workers[0].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        j = await service.scheduler.wait_for_job(long.id, 60)
        assert j.state == "failed" and j.error == "the worker process was killed (signal 9)"
        j2 = await service.scheduler.wait_for_job(short.id, 300)
        assert j2.state == "succeeded", j2.error
        assert (await service.artifact_paths(short.id, "lora"))[-1].is_file()
        events = [e.type for e in await service.repo.list_events(long.id)]
        assert "started" in events and events[-1] == "state"
        assert json.loads((await service.repo.get_job(long.id)).progress_json or "{}")["step"] >= 1  # type: ignore[union-attr]
    finally:
        await service.stop()


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with open(task / "children") as f:
            out += [int(x) for x in f.read().split()]
    return out


def _job_state(db: Path, job_id: int) -> str | None:
    import sqlite3

    if not db.exists():
        return None
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
        row = con.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return row[0] if row else None


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited already


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
async def test_worker_dies_with_the_bot(tmp_path: Path) -> None:
    """kill -9 of the bot alone (not its process group): the kernel kills its worker too, so no orphan
    keeps writing into a job folder that the restarted bot hands to a new worker."""
    stub = [sys.executable, str(ROOT / "tests" / "cogs" / "worker_stub.py")]
    env = {**_env(), "LORAFORGE_TEST_WORKER_CMD": json.dumps(stub), "STUB_STEP_S": "0.05"}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "service_runner.py"), "--data-dir", str(tmp_path / "data"), "--submit",
         "--steps", "50", "--name", "stall-orphan"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    try:
        assert proc.stdout.readline().startswith("JOB ")  # type: ignore[union-attr]
        # "stall": the stub works on the job and writes nothing, so only the kernel can stop it
        db = tmp_path / "data" / "loraforge.db"
        deadline = time.monotonic() + 60
        while _job_state(db, 1) != "running":
            assert proc.poll() is None and time.monotonic() < deadline
            await asyncio.sleep(0.05)
        [worker] = _children(proc.pid)
        assert _alive(worker)
        os.kill(proc.pid, signal.SIGKILL)  # the bot only
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not _alive(worker), "the worker outlived the bot"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
