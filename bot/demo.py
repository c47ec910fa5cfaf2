"""``python -m bot demo``: the whole pipeline on one machine, without Discord.

Generated images -> intake -> a dataset in SQLite -> a queued train job -> a worker process
training a LoRA of a concept the built-in toy SD1.5 base never saw (a checkered background) -> events and
artifacts recorded -> a before/after grid job (strength 0 = the base, 0.5, 1 x 3 seeds) -> paths printed.
A checkout without the toy base's file trains the random-weight tiny-sd15 instead (its pictures are noise).
Runs in a couple of minutes on two CPU cores, offline. Run it again and it reuses the data dir
(the images dedupe, a new job is queued); ``--fresh`` starts over.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bot.config import Config, ConfigError, load_config
from bot.service import Service
from storage.repo import DuplicateNameError, Job
from trainer.format.checkpoint import toy_base_path
from trainer.spec import GridSpec, LoraRef, PreviewSpec
from trainer.toy.recipe import CONCEPT, N_IMAGES, SCENE_SEED, STEPS, TRIGGER, concept_lora_overrides

DEMO_USER = 1
DATASET = "demo-checkered"
GRID_PROMPT = f"large yellow square on black with {TRIGGER}"
GRID_STRENGTHS = [0.0, 0.5, 1.0]
GRID_SEEDS = [1, 2, 3]


def demo_base() -> str:
    """toy-sd15 (pretrained on the toy world) when its file is there, else the random-weight tiny-sd15."""
    return "toy-sd15" if toy_base_path("toy-sd15").is_file() else "tiny-sd15"


def demo_images(n: int = N_IMAGES) -> list[tuple[str, bytes]]:
    """Toy-world pictures of the concept (which the toy base never saw), each with a caption file that names it by
    the trigger word (what /dataset upload receives)."""
    from trainer.toy.world import concept_scenes, render

    files: list[tuple[str, bytes]] = []
    for i, scene in enumerate(concept_scenes(CONCEPT, n, seed=SCENE_SEED)):
        buf = io.BytesIO()
        render(scene).save(buf, format="PNG")
        files.append((f"{CONCEPT}{i}.png", buf.getvalue()))
        files.append((f"{CONCEPT}{i}.txt", scene.caption(TRIGGER).encode()))
    return files


def demo_overrides(steps: int, base: str) -> dict[str, Any]:
    """The learning tests' recipe (trainer/toy/recipe.py): visibly learns on the toy base in a few minutes on CPU."""
    return {
        **concept_lora_overrides(steps),
        "base_model": base,
        "output_name": "toy-demo",
        "state_every_n_steps": max(10, steps // 4),
        "data": {"resolution": 64, "cache_latents": True},
        "sample": {"prompts": [{"prompt": f"large red circle on blue with {TRIGGER}", "steps": 12, "width": 64,
                                "height": 64, "seed": 42, "cfg": 5.0, "sampler": "euler"}], "at_end": True},
    }


def demo_config(data_dir: Path, config_path: Path | None) -> Config:
    cfg = load_config(config_path)
    cfg.paths.data_dir = data_dir.resolve()
    if config_path is None:
        cfg.paths.models_dir = (data_dir / "models").resolve()
    cfg.limits.max_queued_per_user = 100
    cfg.limits.daily_gpu_minutes_per_user = 0
    cfg.limits.max_resolution = max(cfg.limits.max_resolution, 64)
    return cfg


class _Printer:
    """Prints one line per phase and a progress line at most every 2 s."""

    def __init__(self) -> None:
        self.last = 0.0

    def __call__(self, job: Job, ev: dict[str, Any]) -> None:
        t = ev.get("type")
        tag = f"[job {job.id}]"
        if t == "state":
            extra = f": {ev['error']}" if ev.get("error") else ""
            print(f"{tag} {ev.get('state')}{extra}", flush=True)
        elif t == "started":
            resumed = f", resuming from step {ev['resumed_from']}" if ev.get("resumed_from") else ""
            print(f"{tag} started: {ev.get('total_steps')} steps{resumed}", flush=True)
        elif t == "phase" and ev.get("current") in (None, 0):
            print(f"{tag} {ev.get('name')}", flush=True)
        elif t == "progress":
            now = time.monotonic()
            if now - self.last >= 2.0 or ev.get("step") == ev.get("total"):
                self.last = now
                sps = ev.get("steps_per_s") or 0
                eta = ev.get("eta_s")
                print(f"{tag} step {ev.get('step')}/{ev.get('total')}  loss {ev.get('loss', 0):.4f}  "
                      f"{sps:.1f} steps/s" + (f"  eta {eta:.0f}s" if eta is not None else ""), flush=True)
        elif t in ("sample", "file") and ev.get("kind") != "state":
            print(f"{tag} wrote {ev.get('kind', 'sample')}: {ev.get('path')}", flush=True)
        elif t == "log" and ev.get("level") in ("warning", "error"):
            print(f"{tag} {ev.get('level')}: {ev.get('message')}", flush=True)
        elif t == "failed":
            print(f"{tag} failed: {ev.get('error')}", flush=True)


async def _watch_workers(service: Service) -> str:
    """Returns a message once no worker can start (so the demo fails instead of waiting forever)."""
    while True:
        await asyncio.sleep(1.0)
        ws = service.scheduler.workers
        if service.scheduler.worker_errors and not any(w.alive for w in ws):
            tail = ws[0].log_tail(3000) if ws else ""
            return f"{service.scheduler.worker_errors[-1]}\n--- worker log tail ---\n{tail}"


async def run_demo(data_dir: Path, steps: int, config_path: Path | None = None, timeout_s: float = 1800) -> int:
    cfg = demo_config(data_dir, config_path)
    service = Service(cfg)
    print(f"loraforge demo: data in {cfg.data_dir}, device(s) {', '.join(cfg.worker_devices())}", flush=True)
    await service.open()
    try:
        repo = service.repo
        ds = await repo.find_dataset_by_name(DEMO_USER, DATASET)
        if ds is not None and await repo.count_images(ds.id):
            print(f"reusing dataset {ds.name!r} (id {ds.id}) from an earlier run", flush=True)
        else:
            files = demo_images()
            try:
                if ds is None:
                    # No dataset trigger word or class prompt: each caption already names the concept by the
                    # trigger, and an instance prompt in front of every caption would bind the concept to that
                    # prefix, which the grid's prompt does not say (trainer/toy/recipe.py trains captions only).
                    up = await service.create_dataset_from_files(DEMO_USER, DATASET, files)
                else:
                    up = await service.add_files(ds.id, files)
            except DuplicateNameError:  # another run created it meanwhile
                ds = await repo.find_dataset_by_name(DEMO_USER, DATASET)
                assert ds is not None
                up = await service.add_files(ds.id, files)
            ds = up.dataset
            print(f"dataset {ds.name!r} (id {ds.id}): {up.summary().replace(chr(10), ' ')}", flush=True)
            if up.rejected:
                print("some demo images were refused; that should not happen", file=sys.stderr)
                return 1

        service.add_listener(_Printer())
        base = demo_base()
        if base != "toy-sd15":
            print("the toy base toy-sd15 is not in this checkout (tools/pretrain_toy_bases.py re-creates it): "
                  "training the random-weight tiny-sd15, whose pictures are noise", flush=True)
        job = await service.submit_train(DEMO_USER, ds.id, demo_overrides(steps, base))
        print(f"queued job {job.id}: {steps} steps on {base}, "
              f"position {await service.scheduler.queue_position(job.id)}", flush=True)
        t0 = time.monotonic()
        await service.scheduler.start()
        waiter = asyncio.ensure_future(service.scheduler.wait_for_job(job.id, timeout_s))
        watcher = asyncio.ensure_future(_watch_workers(service))
        done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        if waiter not in done:
            waiter.cancel()
            print(f"error: the worker could not start: {watcher.result()}", file=sys.stderr)
            return 1
        try:
            final = waiter.result()
        except TimeoutError:
            print(f"error: job {job.id} did not finish within {timeout_s:.0f} s", file=sys.stderr)
            return 1
        if final.state != "succeeded":
            print(f"error: job {job.id} {final.state}: {final.error}", file=sys.stderr)
            print(f"(worker log: {service.scheduler.workers[0].log_path})", file=sys.stderr)
            return 1
        loras = await service.artifact_paths(job.id, "lora")
        samples = await service.artifact_paths(job.id, "sample")
        plots = await service.artifact_paths(job.id, "plot")
        if not loras or not loras[-1].is_file():
            print(f"error: job {job.id} succeeded but recorded no LoRA file", file=sys.stderr)
            return 1
        prog = final.progress or {}
        print(f"\njob {job.id} succeeded in {time.monotonic() - t0:.0f} s "
              f"(final loss {prog.get('loss', float('nan')):.4f})")
        print(f"LoRA:       {loras[-1]}")
        for s in samples:
            print(f"sample:     {s}")
        for p in plots:
            print(f"loss curve: {p}")
        grid = await _before_after_grid(service, base, loras[-1], timeout_s)
        if grid is None:
            return 1
        print(f"grid:       {grid}  (before/after: strength 0 = the base alone, 0.5, 1; rows: seeds)")
        print(f"database:   {service.files.db_path}")
        return 0
    finally:
        await service.stop()


async def _before_after_grid(service: Service, base: str, lora: Path, timeout_s: float) -> Path | None:
    """Queue the before/after grid of the trained LoRA as a preview job (what /preview runs) and wait for it."""
    grid = GridSpec(prompt=GRID_PROMPT, strengths=GRID_STRENGTHS, seeds=GRID_SEEDS, sampler="euler", steps=12,
                    cfg=5.0, width=64, height=64)
    spec = PreviewSpec(base_model=base, loras=[LoraRef(path=str(lora), strength=1.0)], grid=grid,
                       output_name="demo-before-after")
    job = await service.scheduler.submit(DEMO_USER, "preview", spec, is_admin=True)
    print(f"queued job {job.id}: the before/after grid of {GRID_PROMPT!r}", flush=True)
    try:
        final = await service.scheduler.wait_for_job(job.id, timeout_s)
    except TimeoutError:
        print(f"error: grid job {job.id} did not finish within {timeout_s:.0f} s", file=sys.stderr)
        return None
    grids = await service.artifact_paths(job.id, "grid")
    if final.state != "succeeded" or not grids:
        print(f"error: grid job {job.id} {final.state}: {final.error or 'no grid recorded'}", file=sys.stderr)
        return None
    return grids[-1]


def main(data_dir: Path = Path("demo-data"), steps: int = STEPS, fresh: bool = False,
         config_path: Path | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if steps < 1:
        print("error: --steps must be at least 1", file=sys.stderr)
        return 2
    if fresh:
        shutil.rmtree(data_dir, ignore_errors=True)
    try:
        return asyncio.run(run_demo(data_dir, steps, config_path))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the demo again to resume the job", file=sys.stderr)
        return 130
