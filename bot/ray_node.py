"""What runs on a Ray node for one job: ``JobActor`` (see bot/ray_executor.py for the bot's side).

The actor runs the same engine entry point as a local worker (``python -m trainer.jobs.worker``, spoken to over
its JSON-lines protocol), so a crash or an out-of-memory error in the engine takes down a child process, not the
actor, and cancel / cancel-and-save mean exactly what they mean locally. Around it the actor:

- unpacks the job's inputs (dataset snapshot, uploaded files, a base model from the bot's models folder) into a
  content-addressed cache on the node (``node_cache_dir/blobs/<sha256>``): fetched from the object store once per
  node, then reused by every job that names the same content;
- unpacks the bot's copy of the job's newest saved state into the job folder, so a job that lost its node
  resumes on another one;
- keeps every protocol message in a list with a sequence number until the bot acknowledges it (``poll``), with the
  bytes of each file an event names attached, so the bot's store gets every state save, sample and LoRA. A bot
  that restarts re-attaches to the actor by name and loses nothing.

This module is torch-free and imports Ray lazily: the bot imports it only when ``executor.kind = "ray"``.
Payloads are plain dicts, strings and bytes; archives are unpacked with tarfile's ``data`` filter (no links out,
no absolute paths).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any

from bot.workers import describe_exit

POLL_BATCH_BYTES = 64 * 1024 * 1024  # one poll answer carries at most about this much file data


# ---- archives (both sides) ---------------------------------------------------------------------


def pack(path: Path) -> bytes:
    """A file's bytes, or a folder as an uncompressed tar (sorted, no owners or times: the same folder packs the
    same). The caller knows which it is."""
    if not path.is_dir():
        return path.read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(path.rglob("*")):
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                continue
            info = tar.gettarinfo(str(p), arcname=p.relative_to(path).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if p.is_file():
                with open(p, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return buf.getvalue()


def unpack(data: bytes, dest: Path, *, is_dir: bool) -> Path:
    """Write a packed file or folder to ``dest`` atomically (a temp name, then a rename over it)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if is_dir:
        tmp.mkdir()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            tar.extractall(tmp, filter="data")
    else:
        tmp.write_bytes(data)
    if dest.is_dir() and not dest.is_symlink():
        old = dest.with_name(f".{dest.name}.old{os.getpid()}-{threading.get_ident()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


def rewrite_paths(value: Any, old: str, new: str) -> Any:
    """Every string in a JSON-like value that starts with the folder ``old`` now starts with ``new``."""
    if isinstance(value, str):
        if value == old or value.startswith(old.rstrip("/") + "/"):
            return new.rstrip("/") + value[len(old.rstrip("/")):]
        return value
    if isinstance(value, dict):
        return {k: rewrite_paths(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [rewrite_paths(v, old, new) for v in value]
    return value


# ---- the actor ---------------------------------------------------------------------------------


class JobActor:
    """One job on one node. Created detached and named by job id (``loraforge-job-<id>``) by the bot; threaded
    (``max_concurrency``), so ``poll`` and ``cancel`` are answered while the engine runs."""

    def __init__(self, job_id: int, cache_dir: str) -> None:
        self.job_id = job_id
        self.cache = Path(os.path.expanduser(cache_dir))
        self.job_dir = self.cache / "jobs" / str(job_id)
        self.proc: subprocess.Popen[str] | None = None
        self.msgs: list[dict[str, Any]] = []
        self.seq = 0
        self.done = False
        self.cond = threading.Condition()
        self.started = False
        self.start_lock = threading.Lock()

    # -- what the bot calls --

    def info(self) -> dict[str, Any]:
        import ray

        ctx = ray.get_runtime_context()
        return {"job_id": self.job_id, "node_id": ctx.get_node_id(), "pid": os.getpid(),
                "started": self.started, "done": self.done, "job_dir": str(self.job_dir)}

    def start(self, spec: dict[str, Any], inputs: dict[str, dict[str, Any]], state: dict[str, Any] | None,
              device: str, models_dir: str) -> dict[str, Any]:
        """Fetch what is missing, then run the engine. Called again (a bot that re-attached), it does nothing."""
        with self.start_lock:
            if self.started:
                return self.info()
            for digest, item in inputs.items():
                self._ensure_blob(digest, item)
            if state is not None:
                import ray

                root = self.job_dir / "state"
                shutil.rmtree(root, ignore_errors=True)  # the bot's copy is the truth
                unpack(ray.get(state["ref"][0]), root / state["name"], is_dir=True)
            self.job_dir.mkdir(parents=True, exist_ok=True)
            self._spawn(spec, device, models_dir)
            self.started = True
        return self.info()

    def poll(self, ack: int, wait_s: float = 1.0) -> list[dict[str, Any]]:
        """Messages after ``ack`` (those up to it are dropped: the bot has stored them); waits up to ``wait_s``
        for one to arrive."""
        with self.cond:
            self.msgs = [m for m in self.msgs if m["seq"] > ack]
            if not self.msgs and not self.done:
                self.cond.wait(wait_s)
            out, size = [], 0
            for m in self.msgs:
                out.append(m)
                size += len((m.get("blob") or {}).get("data") or b"")
                if size >= POLL_BATCH_BYTES:
                    break
            return out

    def cancel(self) -> bool:
        """Stop the job; the engine saves what it has (a LoRA at this step, its state) and reports ``cancelled``."""
        return self._send({"cmd": "cancel", "job_id": self.job_id})

    def stop(self) -> None:
        """Kill the engine process (the bot gave up on the job); the actor is killed after this."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    # -- inside --

    def _ensure_blob(self, digest: str, item: dict[str, Any]) -> None:
        dest = self.cache / "blobs" / digest
        if not item["dir"]:
            dest = dest / str(item["name"])  # a file keeps its name (a checkpoint's suffix tells its format)
        if dest.exists():
            return  # shipped here before: once per node
        import ray

        unpack(ray.get(item["ref"][0]), dest, is_dir=bool(item["dir"]))

    def _send(self, msg: dict[str, Any]) -> bool:
        if self.proc is None or self.proc.stdin is None or self.proc.poll() is not None:
            return False
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def _spawn(self, spec: dict[str, Any], device: str, models_dir: str) -> None:
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["PYTHONUNBUFFERED"] = "1"
        log = open(self.job_dir / "worker.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainer.jobs.worker", "--device", device, "--models-dir", models_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env, bufsize=1)
        log.close()
        threading.Thread(target=self._read, daemon=True).start()
        self._send({"cmd": "run", "job_id": self.job_id, "spec": spec, "job_dir": str(self.job_dir)})

    def _push(self, msg: dict[str, Any]) -> None:
        with self.cond:
            self.seq += 1
            msg["seq"] = self.seq
            self.msgs.append(msg)
            if msg.get("type") == "done":
                self.done = True
            self.cond.notify_all()

    def _attach(self, msg: dict[str, Any]) -> None:
        """The bytes of the file an event names, so the bot stores it (a state save too: resume elsewhere)."""
        ev = msg.get("event") or {}
        raw = ev.get("path")
        if ev.get("type") not in ("file", "sample") or not isinstance(raw, str):
            return
        path = Path(raw)
        try:
            rel = path.resolve().relative_to(self.job_dir.resolve())
        except ValueError:
            return
        try:
            msg["blob"] = {"rel": rel.as_posix(), "dir": path.is_dir(), "data": pack(path)}
        except OSError as e:
            print(f"ray node: could not read {path}: {e}", file=sys.stderr)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        got_done = False
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if not isinstance(msg, dict) or msg.get("type") == "ready":
                continue
            if msg.get("type") == "event":
                self._attach(msg)
            if msg.get("type") == "done":
                got_done = True
                self._push(msg)
                self._send({"cmd": "shutdown"})
                continue
            self._push(msg)
        rc = self.proc.wait()
        if not got_done:
            self._push({"type": "done", "job_id": self.job_id, "state": "failed",
                        "error": describe_exit(rc, self._log_tail())})

    def _log_tail(self, max_bytes: int = 16384) -> str:
        try:
            with open(self.job_dir / "worker.log", "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

