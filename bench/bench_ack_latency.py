"""How fast does the bot acknowledge slash commands, idle vs while a job trains?

Runs the real LoraforgeBot against the local fake Discord (tests/fakediscord) over the fake GATEWAY
websocket, fires bursts of N concurrent slash commands (INTERACTION_CREATE frames), and measures,
per command, the time from just before its frame is sent to the moment the fake Discord receives
its deferral callback (POST /interactions/{id}/{token}/callback). Discord's limit is 3 s.

Two phases: idle (no job), then busy (a real training job on the built-in tiny SD1.5 model running in
the worker process, progress messages being edited). Usage:

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/bench_ack_latency.py [--n 50] [--rounds 3]
        [--worker real|stub] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fakediscord import FakeDiscord  # noqa: E402

from bot.app import LoraforgeBot  # noqa: E402
from bot.config import config_from_dict  # noqa: E402
from bot.demo import demo_images  # noqa: E402

COMMANDS = [("jobs", None, None), ("dataset", None, "list"), ("models", None, None)]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def make_config(tmp: Path, fake: FakeDiscord, worker: str) -> Any:
    stub = [sys.executable, str(ROOT / "tests" / "cogs" / "worker_stub.py")]
    return config_from_dict({
        "paths": {"data_dir": str(tmp / "data"), "models_dir": str(tmp / "models")},
        "discord": {"admin_role_ids": [fake.role_ids["admin"]], "trainer_role_ids": [fake.role_ids["trainer"]],
                    "progress_interval_s": 1.0, "http_port": 0},
        "limits": {"max_queued_per_user": 1000, "daily_gpu_minutes_per_user": 0, "max_steps": 100000},
        "workers": {"devices": ["cpu"], "worker_cmd": [] if worker == "real" else stub, "ready_timeout_s": 300},
    })


async def burst(fake: FakeDiscord, n: int, cpu: list[float] | None = None) -> list[float]:
    """Latencies (ms) of one burst; appends to ``cpu`` the CPU seconds this process (bot + fake Discord,
    not the worker) spent on the burst, acknowledgements and answers: a figure that other programs on a
    busy machine disturb far less than the latencies."""
    users = ["alice", "bob", "carol"]
    payloads = []
    for i in range(n):
        name, opts, sub = COMMANDS[i % len(COMMANDS)]
        payloads.append(fake.slash_command(name, opts, user=users[i % 3], subcommand=sub))
    sent: dict[str, float] = {}

    async def send(p: dict) -> None:
        sent[p["token"]] = time.monotonic()
        await fake.dispatch("INTERACTION_CREATE", p)

    cpu0 = time.process_time()
    await asyncio.gather(*(send(p) for p in payloads))
    tokens = {p["token"] for p in payloads}

    def cb_calls() -> dict[str, float]:
        out = {}
        for c in fake.calls("POST", "/callback"):
            tok = c.path.split("/")[3]
            if tok in tokens and c.status:
                out[tok] = c.ts
        return out

    await fake.wait_for(lambda: len(cb_calls()) == n, 30)
    acks = cb_calls()
    # let the followups finish so the next burst starts from quiet
    await fake.wait_for(lambda: all(fake.interaction(p).followups or fake.interaction(p).callback_type == 4
                                    for p in payloads), 60)
    if cpu is not None:
        cpu.append(time.process_time() - cpu0)
    return [(acks[t] - sent[t]) * 1000 for t in tokens]


async def start_training(fake: FakeDiscord, bot: LoraforgeBot, steps: int) -> int:
    opts: dict[str, Any] = {"name": "bench", "trigger_word": "zqx"}
    for i, (name, data) in enumerate(demo_images(4)[:8]):
        opts[f"file{i + 1}"] = fake.add_attachment(name, data)
    p = fake.slash_command("dataset", opts, user="bob", subcommand="create")
    await fake.dispatch("INTERACTION_CREATE", p)
    await fake.wait_for(lambda: bool(fake.interaction(p).followups), 30)
    p = fake.slash_command("train", {"dataset": "bench", "base_model": "tiny-sd15", "steps": steps,
                                     "resolution": 64, "dim": 4, "output_name": "slow-bench"}, user="bob")
    await fake.dispatch("INTERACTION_CREATE", p)
    await fake.wait_for(lambda: bool(fake.interaction(p).followups), 30)
    job = (await bot.repo.list_jobs(newest_first=True, limit=1))[0]
    # wait until it really trains (progress events arriving), not just "running"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        j = await bot.repo.get_job(job.id)
        if j.state == "running" and (j.progress or {}).get("step"):
            return job.id
        if j.is_terminal:
            raise RuntimeError(f"training job ended early: {j.state} {j.error}")
        await asyncio.sleep(0.2)
    raise RuntimeError("training did not start within 300 s")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    with tempfile.TemporaryDirectory() as td:
        async with FakeDiscord() as fake:
            bot = LoraforgeBot(make_config(Path(td), fake, args.worker))
            async with fake.running(bot, timeout=60):
                await asyncio.wait_for(bot.service_ready.wait(), 300)
                idle: list[float] = []
                cpu: list[float] = []
                for _ in range(args.rounds):
                    idle += await burst(fake, args.n, cpu)
                results["idle"] = idle
                results["idle_cpu_ms_per_command"] = 1000 * sum(cpu) / (args.n * args.rounds)
                if args.worker == "stub":
                    os.environ["STUB_STEP_S"] = "0.05"
                job_id = await start_training(fake, bot, args.steps)
                busy: list[float] = []
                cpu = []
                for _ in range(args.rounds):
                    busy += await burst(fake, args.n, cpu)
                    j = await bot.repo.get_job(job_id)
                    if j.state != "running":
                        print(f"warning: the job is {j.state} during the busy phase", file=sys.stderr)
                results["busy"] = busy
                results["busy_cpu_ms_per_command"] = 1000 * sum(cpu) / (args.n * args.rounds)
                results["busy_job_step"] = (await bot.repo.get_job(job_id)).progress
                await bot.scheduler.cancel(job_id, 0, is_admin=True)
                await bot.scheduler.wait_for_job(job_id, 120)
    return results


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"{args.rounds} bursts of {args.n} concurrent slash commands per phase "
             f"(worker: {args.worker}; {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})",
             f"load average before the run: {results.get('load', '?')}",
             "", "| phase | commands | p50 ms | p90 ms | p99 ms | max ms | mean ms | CPU ms/command |",
             "|---|---|---|---|---|---|---|---|"]
    for phase in ("idle", "busy"):
        v = results[phase]
        lines.append(f"| {phase} | {len(v)} | {pct(v, .5):.1f} | {pct(v, .9):.1f} | {pct(v, .99):.1f} | "
                     f"{max(v):.1f} | {statistics.fmean(v):.1f} | {results[phase + '_cpu_ms_per_command']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="concurrent commands per burst")
    ap.add_argument("--rounds", type=int, default=3, help="bursts per phase")
    ap.add_argument("--worker", choices=["real", "stub"], default="real")
    ap.add_argument("--steps", type=int, default=5000, help="steps of the background training job")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = asyncio.run(main_async(args))
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **results}, indent=1))


if __name__ == "__main__":
    main()
