"""A real Ray cluster on loopback for the Ray executor tests: a head and worker nodes, each a `ray start --block`
process in its own session (so a test can kill -9 one node and nothing else), custom resources standing in for
GPUs (`vram_gb`), CPU-only. Node death is noticed within a few seconds (health checks every 0.5 s)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cogkit import free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


class LocalCluster:
    def __init__(self) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path(tempfile.mkdtemp(prefix="lfray", dir="/tmp"))  # short: Ray's socket paths are limited
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env.update(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="4",
                   RAY_health_check_initial_delay_ms="0", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                   OMP_NUM_THREADS="1")
        return env

    def _start(self, name: str, args: list[str], resources: dict[str, float]) -> None:
        log = open(self.temp / f"{name}.log", "wb")  # noqa: SIM115 - the node process keeps it
        self.procs[name] = subprocess.Popen(
            [RAY, "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
             f"--resources={json.dumps(resources)}", "--object-store-memory=80000000", "--disable-usage-stats",
             "--block"],
            stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
        log.close()

    def start_head(self, resources: dict[str, float]) -> None:
        self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false",
                             f"--temp-dir={self.temp}"], resources)

    def add_node(self, name: str, resources: dict[str, float]) -> None:
        self._start(name, [f"--address={self.address}"], resources)

    def connect(self, namespace: str = "loraforge") -> None:
        import ray

        deadline = time.monotonic() + 120
        while True:
            try:
                ray.init(address=self.address, namespace=namespace, log_to_driver=False)
                return
            except Exception:  # the head is still coming up
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def wait_nodes(self, n: int, timeout: float = 120.0) -> list[dict[str, Any]]:
        import ray

        deadline = time.monotonic() + timeout
        while True:
            alive = [x for x in ray.nodes() if x.get("Alive")]
            if len(alive) == n:
                return alive
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} live Ray node(s), wanted {n}; logs in {self.temp}")
            time.sleep(0.5)

    def kill_node(self, name: str) -> None:
        """kill -9 a node: its `ray start` process and the raylet and agents in its session."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        import ray

        ray.shutdown()
        for name in list(self.procs):
            proc = self.procs.pop(name)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.temp, ignore_errors=True)
