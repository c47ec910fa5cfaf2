"""The worker process the scheduler talks to: `python -m trainer.jobs.worker --device cpu`.

Protocol: JSON lines. The scheduler writes commands on stdin, the worker writes messages on stdout.
  in:  {"cmd": "run", "job_id": 7, "spec": {...resolved job spec...}, "job_dir": "/data/jobs/7"}
       {"cmd": "cancel", "job_id": 7}
       {"cmd": "shutdown"}
  out: {"type": "ready", "pid": 123, "device": "cpu"}
       {"type": "event", "job_id": 7, "event": {...trainer.events event...}}
       {"type": "done", "job_id": 7, "state": "succeeded" | "failed" | "cancelled", "error": str | None}
       {"type": "heartbeat", "job_id": 7 | None}
One job at a time; the process lives on between jobs so a base pipeline stays loaded for previews.
Anything libraries print goes to stderr, so stdout carries only protocol lines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import IO, Any

from trainer import bnb_gate

HEARTBEAT_S = 5.0


class Channel:
    """Thread-safe writer of protocol lines to the real stdout."""

    def __init__(self, stream: IO[str]):
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, msg: dict[str, Any]) -> None:
        line = json.dumps(msg, default=str)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def card_memory(device: str | None) -> int | None:
    """Total memory of the CUDA device this worker trains on; None on CPU or without CUDA."""
    if device is not None and not device.startswith("cuda"):
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        index = torch.device(device or "cuda").index
        return int(torch.cuda.get_device_properties(index if index is not None else 0).total_memory)
    except Exception:  # noqa: BLE001 - a query that fails only means the bot does not check memory plans
        return None


class Worker:
    def __init__(self, channel: Channel, device: str | None, models_dir: Path | None):
        self.channel = channel
        self.device = device
        self.models_dir = models_dir
        self.current: int | None = None
        self.cancelled: set[int] = set()
        self.jobs: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.shutting_down = False
        self.context: dict[str, Any] = {}  # survives between jobs (cached pipelines)

    # stdin reader thread: cancel must be seen while a job runs in the main thread
    def read_commands(self, stream: IO[str]) -> None:
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                cmd = json.loads(line)
            except json.JSONDecodeError:
                print(f"worker: ignoring a line that is not JSON: {line[:200]}", file=sys.stderr)
                continue
            with self.cond:
                if cmd.get("cmd") == "run":
                    self.jobs.append(cmd)
                elif cmd.get("cmd") == "cancel":
                    self.cancelled.add(int(cmd["job_id"]))
                elif cmd.get("cmd") == "shutdown":
                    self.shutting_down = True
                self.cond.notify_all()
        with self.cond:  # stdin closed: the scheduler is gone, stop after the current job
            self.shutting_down = True
            if self.current is not None:
                self.cancelled.add(self.current)
            self.cond.notify_all()

    def heartbeat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            self.channel.send({"type": "heartbeat", "job_id": self.current})

    def serve(self) -> None:
        from trainer.events import JobCancelled, JobFailed
        from trainer.jobs.runner import run_job
        from trainer.spec import parse_job

        hello: dict[str, Any] = {"type": "ready", "pid": os.getpid(), "device": self.device or "auto"}
        memory = card_memory(self.device)
        if memory:  # the bot checks each job's memory plan against it at submit time
            hello["memory_bytes"] = memory
        self.channel.send(hello)
        while True:
            with self.cond:
                while not self.jobs and not self.shutting_down:
                    self.cond.wait()
                if not self.jobs:
                    return
                cmd = self.jobs.pop(0)
            job_id = int(cmd["job_id"])
            self.current = job_id

            def sink(ev: dict[str, Any], job_id: int = job_id) -> None:
                self.channel.send({"type": "event", "job_id": job_id, "event": ev})

            def should_stop(job_id: int = job_id) -> bool:
                return job_id in self.cancelled

            state, error = "succeeded", None
            try:
                spec = parse_job(cmd["spec"])
                run_job(spec, Path(cmd["job_dir"]), on_event=sink, should_stop=should_stop,
                        models_dir=self.models_dir, device=self.device, context=self.context)
            except JobCancelled:
                state = "cancelled"
            except JobFailed as e:
                state, error = "failed", str(e)
            except Exception as e:  # noqa: BLE001 - reported to the scheduler, the worker lives on
                traceback.print_exc(file=sys.stderr)
                state, error = "failed", f"{type(e).__name__}: {e}"
            finally:
                self.current = None
            self.channel.send({"type": "done", "job_id": job_id, "state": state, "error": error})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m trainer.jobs.worker")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--models-dir", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bnb_gate.defer()  # before any job imports peft / diffusers
    # Keep the protocol stream to ourselves: everything else printed goes to stderr.
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    worker = Worker(Channel(proto), args.device, args.models_dir)
    threading.Thread(target=worker.read_commands, args=(sys.stdin,), daemon=True).start()
    threading.Thread(target=worker.heartbeat, daemon=True).start()
    worker.serve()


if __name__ == "__main__":
    main()
