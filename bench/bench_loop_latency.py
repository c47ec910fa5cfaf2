"""Latency of a database read on the bot's event loop, idle vs. while a worker trains.

The bot process must stay responsive while the GPU (or CPU) is busy: training runs in a worker
process, and the bot only persists its events. This measures, in one run:
  idle:      N reads (Repo.get_job + the queue listing a /jobs command does) at a fixed rate
  training:  the same while the real worker trains the tiny SD1.5 model and its progress events
             are persisted and fanned out on the same loop
Latency is measured from the read's scheduled time (so event-loop delays count), p50/p99.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/bench_loop_latency.py [--reads 2000] [--rate 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bot.config import config_from_dict  # noqa: E402
from bot.demo import demo_images  # noqa: E402
from bot.service import Service  # noqa: E402


async def measure(service: Service, job_id: int, reads: int, rate: float) -> list[float]:
    lat: list[float] = []
    period = 1.0 / rate
    t0 = time.perf_counter()
    for i in range(reads):
        due = t0 + i * period
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await service.repo.get_job(job_id)
        await service.repo.list_jobs(states=["queued", "running"], limit=25)
        lat.append((time.perf_counter() - max(due, t0)) * 1000.0)
    return lat


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def main(reads: int, rate: float, steps: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict({
            "paths": {"data_dir": f"{tmp}/data", "models_dir": f"{tmp}/models"},
            "limits": {"max_steps": 100000, "daily_gpu_minutes_per_user": 0},
            "workers": {"devices": ["cpu"] if not os.environ.get("BENCH_DEVICE") else [os.environ["BENCH_DEVICE"]]},
        })
        service = Service(cfg)
        await service.open()
        try:
            up = await service.create_dataset_from_files(1, "bench", demo_images(6), trigger_word="zqx")
            spec = {"base_model": "tiny-sd15", "steps": steps, "network": {"dim": 8},
                    "optimizer": {"lr": 1e-3}, "data": {"resolution": 64}, "state_every_n_steps": 1000}
            # A finished job row to read in the idle phase (same table, same query).
            idle_job = await service.repo.create_job("train", 1, '{"kind": "train"}')
            await service.scheduler.start()
            idle = await measure(service, idle_job.id, reads, rate)

            events = 0
            progressed = asyncio.Event()

            def count(job, ev) -> None:  # noqa: ANN001
                nonlocal events
                events += 1
                if ev.get("type") == "progress":
                    progressed.set()

            service.add_listener(count)
            job = await service.submit_train(1, up.dataset.id, spec)
            await asyncio.wait_for(progressed.wait(), 300)
            events = 0
            t0 = time.monotonic()
            busy = await measure(service, job.id, reads, rate)
            span = time.monotonic() - t0
            still = (await service.repo.get_job(job.id)).state  # type: ignore[union-attr]
            prog = (await service.repo.get_job(job.id)).progress or {}  # type: ignore[union-attr]
            await service.scheduler.cancel(job.id, by_user=1)
        finally:
            await service.stop()

    rows = [("idle", idle), ("worker training", busy)]
    print(f"\n{reads} reads at {rate:.0f}/s per phase; Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}; job state during the busy phase: {still}, "
          f"{events} worker events persisted in {span:.1f} s, "
          f"training at {prog.get('steps_per_s') or 0:.1f} steps/s\n")
    print("| phase | p50 (ms) | p99 (ms) | max (ms) | mean (ms) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, v in rows:
        print(f"| {name} | {pct(v, 50):.2f} | {pct(v, 99):.2f} | {max(v):.2f} | {statistics.fmean(v):.2f} |")
    print(f"\nratio training/idle: p50 {pct(busy, 50) / pct(idle, 50):.2f}x, "
          f"p99 {pct(busy, 99) / pct(idle, 99):.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--reads", type=int, default=2000)
    p.add_argument("--rate", type=float, default=200.0, help="reads per second")
    p.add_argument("--steps", type=int, default=20000, help="training steps (the job is cancelled after)")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    asyncio.run(main(a.reads, a.rate, a.steps))
