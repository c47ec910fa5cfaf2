"""How fast does the bot acknowledge slash commands, idle vs while a job trains?

Runs the real LoraforgeBot against the local fake Discord (tests/fakediscord) over the fake GATEWAY
websocket, fires bursts of N concurrent slash commands (INTERACTION_CREATE frames), and measures,
per command, the time from just before its frame is sent to the moment the fake Discord receives
its deferral callback (POST /interactions/{id}/{token}/callback). Discord's limit is 3 s.

Two phases: idle (no job), then busy (a real training job on the built-in tiny SD1.5 model running in
the worker process, progress messages being edited).

``--bot process`` (the default) runs the bot as it runs in production, ``python -m bot run`` in its own process,
so the fake Discord's own work (parsing 500 callbacks, sending 500 frames) is not charged to the bot's CPU, as
Discord's servers are not. ``--bot inproc`` runs bot and fake in one event loop (the first version of this
benchmark). Usage:

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/bench_ack_latency.py [--n 50] [--rounds 3]
        [--worker real|stub] [--bot process|inproc] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from configfile import write_toml  # noqa: E402
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


def config_dict(tmp: Path, fake: FakeDiscord, worker: str) -> dict[str, Any]:
    stub = [sys.executable, str(ROOT / "tests" / "cogs" / "worker_stub.py")]
    return {
        "paths": {"data_dir": str(tmp / "data"), "models_dir": str(tmp / "models")},
        "discord": {"admin_role_ids": [fake.role_ids["admin"]], "trainer_role_ids": [fake.role_ids["trainer"]],
                    "progress_interval_s": 1.0, "http_port": 0},
        "limits": {"max_queued_per_user": 1000, "daily_gpu_minutes_per_user": 0, "max_steps": 100000},
        "workers": {"devices": ["cpu"], "worker_cmd": [] if worker == "real" else stub, "ready_timeout_s": 300,
                    "env_pass": ["STUB_STEP_S"]},
    }


def make_config(tmp: Path, fake: FakeDiscord, worker: str) -> Any:
    return config_from_dict(config_dict(tmp, fake, worker))


class ProcessCPU:
    """CPU seconds of one process (the bot), read from /proc: the bench's process_time() would count the fake."""

    def __init__(self, pid: int):
        self.path = Path(f"/proc/{pid}/stat")

    def __call__(self) -> float:
        fields = self.path.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def burst(fake: FakeDiscord, n: int, cpu: list[float] | None = None,
                clock: Any = time.process_time) -> list[float]:
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

    cpu0 = clock()
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
        cpu.append(clock() - cpu0)
    return [(acks[t] - sent[t]) * 1000 for t in tokens]


async def queue_training(fake: FakeDiscord, steps: int) -> None:
    opts: dict[str, Any] = {"name": "bench", "trigger_word": "zqx"}
    for i, (name, data) in enumerate(demo_images(4)[:8]):
        opts[f"file{i + 1}"] = fake.add_attachment(name, data)
    p = fake.slash_command("dataset", opts, user="bob", subcommand="create")
    await fake.dispatch("INTERACTION_CREATE", p)
    await fake.wait_for(lambda: bool(fake.interaction(p).followups), 60)
    p = fake.slash_command("train", {"dataset": "bench", "base_model": "tiny-sd15", "steps": steps,
                                     "resolution": 64, "dim": 4, "output_name": "slow-bench"}, user="bob")
    await fake.dispatch("INTERACTION_CREATE", p)
    await fake.wait_for(lambda: bool(fake.interaction(p).followups), 30)


async def start_training(fake: FakeDiscord, bot: LoraforgeBot, steps: int) -> int:
    await queue_training(fake, steps)
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


def job_row(db: Path) -> tuple[str, dict] | None:
    """(state, progress) of the newest job, read from the bot's SQLite file without disturbing it."""
    if not db.exists():
        return None
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        row = conn.execute("SELECT state, progress_json FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
    return None if row is None else (row[0], json.loads(row[1] or "{}"))


async def wait_trains(db: Path) -> dict:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        row = await asyncio.to_thread(job_row, db)
        if row and row[0] == "running" and row[1].get("step"):
            return row[1]
        if row and row[0] in ("succeeded", "failed", "cancelled"):
            raise RuntimeError(f"training job ended early: {row[0]}")
        await asyncio.sleep(0.5)
    raise RuntimeError("training did not start within 300 s")


async def main_process(args: argparse.Namespace) -> dict[str, Any]:
    """The bot as ``python -m bot run`` in its own process; everything measured from the fake's side."""
    results: dict[str, Any] = {"load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        async with FakeDiscord() as fake:
            data = config_dict(tmp, fake, args.worker)
            data["discord"]["api_url"] = fake.api_base
            cfg = write_toml(tmp / "config.toml", data)
            env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAFORGE_TOKEN": fake.token, "HF_HUB_OFFLINE": "1"}
            if args.worker == "stub":
                env["STUB_STEP_S"] = "0.05"
            bot = subprocess.Popen([sys.executable, "-m", "bot", "run", "--config", str(cfg)], cwd=ROOT, env=env,
                                   stdout=subprocess.DEVNULL)
            try:
                await fake.wait_for_gateway(120)
                clock = ProcessCPU(bot.pid)
                await burst(fake, 3)  # the first commands of a fresh process pay for imports and warm-up
                for phase in ("idle", "busy"):
                    if phase == "busy":
                        await queue_training(fake, args.steps)
                        await wait_trains(tmp / "data" / "loraforge.db")
                    lat: list[float] = []
                    cpu: list[float] = []
                    for _ in range(args.rounds):
                        lat += await burst(fake, args.n, cpu, clock)
                    results[phase] = lat
                    results[phase + "_cpu_ms_per_command"] = 1000 * sum(cpu) / (args.n * args.rounds)
                row = await asyncio.to_thread(job_row, tmp / "data" / "loraforge.db")
                results["busy_job_step"] = row[1] if row else None
                if not row or row[0] != "running":
                    print(f"warning: the job is {row and row[0]} after the busy phase", file=sys.stderr)
            finally:
                bot.send_signal(signal.SIGINT)
                try:
                    await asyncio.to_thread(bot.wait, 60)
                except subprocess.TimeoutExpired:
                    bot.kill()
    return results


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
             f"(bot: {args.bot}, worker: {args.worker}; {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})",
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
    ap.add_argument("--bot", choices=["process", "inproc"], default="process",
                    help="the bot in its own process (as deployed) or in the fake Discord's event loop")
    ap.add_argument("--steps", type=int, default=5000, help="steps of the background training job")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = asyncio.run(main_process(args) if args.bot == "process" else main_async(args))
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **results}, indent=1))


if __name__ == "__main__":
    main()
