"""A stand-in for `python -m trainer.worker` that speaks the same JSON-lines protocol, without torch.

Behaviour per job comes from the spec's output_name:
  "fast..."  (default) started, `steps` progress events, a lora file, done succeeded - instantly
  "slow..."  like fast but sleeps 0.05 s per step (cancellable between steps)
  "stall..." started, then nothing (ignores cancel) - for the stall watchdog
  "crash..." started, then the process segfaults (SIGSEGV)
  "oom..."   started, prints a CUDA OOM to stderr, exits 1
Every job id it starts is appended to $FAKE_WORKER_LOG (one line each), so tests can check that
no job ran twice.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

out_lock = threading.Lock()
cancelled: set[int] = set()
jobs: list[dict] = []
cond = threading.Condition()


def send(msg: dict) -> None:
    with out_lock:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()


def reader() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        with cond:
            if cmd["cmd"] == "run":
                jobs.append(cmd)
            elif cmd["cmd"] == "cancel":
                cancelled.add(int(cmd["job_id"]))
            elif cmd["cmd"] == "shutdown":
                jobs.append({"cmd": "shutdown"})
            cond.notify_all()
    with cond:
        jobs.append({"cmd": "shutdown"})
        cond.notify_all()


def ev(job_id: int, **e: object) -> None:
    send({"type": "event", "job_id": job_id, "event": e})


def run(cmd: dict) -> None:
    job_id = int(cmd["job_id"])
    spec = cmd["spec"]
    name = str(spec.get("output_name", "fast"))
    steps = int(spec.get("steps", 3)) if spec.get("kind") == "train" else 1
    if os.environ.get("FAKE_WORKER_LOG"):
        with open(os.environ["FAKE_WORKER_LOG"], "a") as f:
            f.write(f"{job_id}\n")
    ev(job_id, type="started", total_steps=steps, kind=spec.get("kind"), resumed_from=0)
    if name.startswith("stall"):
        time.sleep(3600)
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("oom"):
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    for s in range(1, steps + 1):
        if job_id in cancelled:
            send({"type": "done", "job_id": job_id, "state": "cancelled", "error": None})
            return
        if name.startswith("slow"):
            time.sleep(0.05)
        ev(job_id, type="progress", step=s, total=steps, loss=1.0 / s, lr=1e-3, steps_per_s=100.0,
           eta_s=(steps - s) / 100.0)
    out = Path(cmd["job_dir"]) / "outputs" / f"{name}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"fake lora " + str(job_id).encode())
    ev(job_id, type="file", kind="lora", path=str(out), step=steps)
    ev(job_id, type="finished", outputs={"lora": str(out)}, summary={})
    send({"type": "done", "job_id": job_id, "state": "succeeded", "error": None})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--models-dir", default=None)
    args = p.parse_args()
    threading.Thread(target=reader, daemon=True).start()
    send({"type": "ready", "pid": os.getpid(), "device": args.device})
    while True:
        with cond:
            while not jobs:
                cond.wait()
            cmd = jobs.pop(0)
        if cmd["cmd"] == "shutdown":
            return
        run(cmd)


if __name__ == "__main__":
    main()
