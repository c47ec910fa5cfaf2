"""Run the bot's service (no Discord) in its own process, for restart tests.

    python tests/bot/service_runner.py --data-dir D [--submit --steps N --state-every K]

With --submit it creates a dataset from the demo images and queues one train job, printing
``JOB <id>``; then it starts the scheduler and runs until the job is finished (``DONE <state>``)
or the process is killed. Worker command: $LORAFORGE_TEST_WORKER_CMD (a JSON list) or the real one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bot.config import Config, config_from_dict  # noqa: E402
from bot.demo import demo_images  # noqa: E402
from bot.service import Service  # noqa: E402


def make_config(data_dir: Path) -> Config:
    cmd = json.loads(os.environ.get("LORAFORGE_TEST_WORKER_CMD") or "[]")
    return config_from_dict({
        "paths": {"data_dir": str(data_dir), "models_dir": str(data_dir / "models")},
        "limits": {"max_queued_per_user": 50, "daily_gpu_minutes_per_user": 0, "stall_timeout_s": 300},
        "workers": {"devices": ["cpu"], "restart_backoff_s": 0.2, "worker_cmd": cmd,
                    "env_pass": ["STUB_STEP_S"]},
        # the Ray executor tests (tests/cogs/test_ray.py) run this bot against their cluster
        "executor": json.loads(os.environ.get("LORAFORGE_TEST_EXECUTOR") or "{}"),
    })


def train_overrides(steps: int, state_every: int, name: str = "restart") -> dict[str, Any]:
    return {
        "base_model": "tiny-sd15", "output_name": name, "steps": steps, "seed": 77,
        "state_every_n_steps": state_every, "network": {"dim": 4},
        "optimizer": {"name": "AdamW", "lr": 2e-3, "scheduler": "constant"},
        "data": {"resolution": 64},
    }


async def amain(args: argparse.Namespace) -> int:
    service = Service(make_config(Path(args.data_dir)))
    await service.open()
    try:
        job_id = None
        if args.submit:
            up = await service.create_dataset_from_files(1, "shapes", demo_images(4), trigger_word="zqx")
            job = await service.submit_train(1, up.dataset.id, train_overrides(args.steps, args.state_every,
                                                                                   args.name))
            job_id = job.id
            print(f"JOB {job_id}", flush=True)
        await service.scheduler.start()
        if job_id is not None:
            final = await service.scheduler.wait_for_job(job_id, 600)
            print(f"DONE {final.state} {final.error or ''}", flush=True)
        return 0
    finally:
        await service.stop()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", required=True)
    p.add_argument("--submit", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--state-every", type=int, default=5)
    p.add_argument("--name", default="restart", help="output name (the stub worker reads its mode from it)")
    return asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
