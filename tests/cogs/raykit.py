"""A real Ray cluster on loopback for the Ray executor tests: a head and worker nodes, each a `ray start --block`
process in its own session (so a test can kill -9 one node and nothing else), custom resources standing in for
GPUs (`vram_gb`), CPU-only. Node death is noticed within a few seconds (health checks every 0.5 s)."""

from __future__ import annotations

import contextlib
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
        self.args: dict[str, tuple[list[str], dict[str, float]]] = {}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env.update(RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="4",
                   RAY_health_check_initial_delay_ms="0", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
                   OMP_NUM_THREADS="1")
        return env

    def _start(self, name: str, args: list[str], resources: dict[str, float]) -> None:
        self.args[name] = (args, resources)
        log = open(self.temp / f"{name}.log", "wb")  # noqa: SIM115 - the node process keeps it
        self.procs[name] = subprocess.Popen(
            [RAY, "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
             f"--resources={json.dumps({**resources, f'lf_{name}': 1.0})}",  # the marker tells which node is which
             "--object-store-memory=80000000",  # near Ray's floor (75 MB): our inputs are a few MB; /dev/shm is small
             "--disable-usage-stats", "--block"],
            stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True)
        log.close()

    def start_head(self, resources: dict[str, float]) -> None:
        self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false",
                             f"--temp-dir={self.temp}"], resources)

    def add_node(self, name: str, resources: dict[str, float]) -> None:
        """Start it after connect(): a node gives up when the head's GCS does not answer within a minute."""
        self._start(name, [f"--address={self.address}"], resources)

    def connect(self, namespace: str = "loraforge") -> None:
        import ray

        deadline = time.monotonic() + 180
        while True:
            head = self.procs["head"]
            if head.poll() is not None:  # Ray gives a starting node 30 s, which a busy 2-core box can miss: again
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(head.pid, signal.SIGKILL)  # what the failed start left (GCS...) holds the port
                self._start("head", *self.args["head"])
            try:
                ray.init(address=self.address, namespace=namespace, log_to_driver=False)
                return
            except Exception:  # the head is still coming up
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def wait_nodes(self, n: int, timeout: float = 300.0) -> list[dict[str, Any]]:
        import ray

        deadline = time.monotonic() + timeout
        while True:
            alive = [x for x in ray.nodes() if x.get("Alive")]
            if len(alive) == n:
                return alive
            for name, proc in list(self.procs.items()):
                if proc.poll() is not None and name != "head":  # gave up on a slow head (a busy box): again
                    self._start(name, *self.args[name])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} live Ray node(s), wanted {n}; logs in {self.temp}")
            time.sleep(0.5)

    def name_of(self, node_id: str) -> str | None:
        import ray

        for n in ray.nodes():
            if n["NodeID"] == node_id:
                return next((k[3:] for k in n["Resources"] if k.startswith("lf_")), None)
        return None

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
