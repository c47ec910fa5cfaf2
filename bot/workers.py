"""One long-lived worker process per device, spoken to over JSON lines (see trainer/jobs/worker.py).

The bot never imports torch: all engine work happens in these child processes, so a crash, an
out-of-memory error or a hung CUDA call there cannot take the bot down. A ``WorkerHandle`` starts
the process, waits for its ``ready`` line, sends ``run``/``cancel``/``shutdown`` commands and
forwards every other message to the scheduler. When the process dies it works out a reason a user
can read (signal, segfault, GPU out of memory from the stderr log) and reports it.

Run as ``python -m bot.workers CMD...`` this module is a tiny launcher: on Linux it asks the kernel
to SIGKILL the child when the bot dies (PR_SET_PDEATHSIG survives exec), then execs CMD. So a bot
killed with -9 never leaves an orphan worker writing into a job directory that a restarted bot
hands to a new worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from bot.worker_env import worker_environment

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
_LINE_LIMIT = 16 * 1024 * 1024  # one protocol line (a dataset report can be long)
_OOM_MARKERS = ("CUDA out of memory", "OutOfMemoryError", "out of memory on device", "CUBLAS_STATUS_ALLOC_FAILED")
LOG_MAX_BYTES = 8 * 1024 * 1024  # a worker log is rotated at start past this size (one old copy kept)
OOM_MESSAGE = "ran out of GPU memory; try a smaller batch/resolution or gradient checkpointing"

MessageHandler = Callable[["WorkerHandle", dict[str, Any]], Awaitable[None]]
ExitHandler = Callable[["WorkerHandle", str], Awaitable[None]]


class WorkerStartError(RuntimeError):
    """The worker process did not come up (exited or never said ready)."""


def rotate_log(path: Path, max_bytes: int = LOG_MAX_BYTES) -> None:
    """Keep a worker log bounded: over ``max_bytes`` at a (re)start it becomes ``<name>.1`` (the one kept
    before it is dropped). So logs/ holds at most about 2 x LOG_MAX_BYTES per worker, however long it runs."""
    try:
        if path.stat().st_size > max_bytes:
            os.replace(path, path.with_name(path.name + ".1"))
    except OSError:
        pass


def looks_like_oom(text: str | None) -> bool:
    return bool(text) and any(m in text for m in _OOM_MARKERS)  # type: ignore[operator]


def describe_exit(returncode: int | None, log_tail: str = "") -> str:
    """A sentence for the user saying why the worker process went away."""
    if looks_like_oom(log_tail):
        return OOM_MESSAGE
    if returncode is None:
        return "the worker process stopped answering"
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGSEGV:
            return "the worker process crashed (segfault)"
        if sig == signal.SIGABRT:
            return "the worker process crashed (abort)"
        if sig == signal.SIGKILL:
            return "the worker process was killed (signal 9)"
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"the worker process was killed by {name} (signal {sig})"
    last = next((ln.strip() for ln in reversed(log_tail.splitlines()) if ln.strip()), "")
    detail = f": {last[:300]}" if last else ""
    return f"the worker process exited unexpectedly (exit code {returncode}){detail}"


def pinned_gpu(device: str, env: Mapping[str, str]) -> str | None:
    """The CUDA_VISIBLE_DEVICES entry a worker for `device` ("cuda", "cuda:k") gets; None for other devices.

    Index k counts the cards the bot itself sees, so an existing CUDA_VISIBLE_DEVICES ("4,5") is honoured.
    """
    if device != "cuda" and not device.startswith("cuda:"):
        return None
    index = int(device.partition(":")[2] or 0)
    visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if not visible:
        return str(index)
    if index >= len(visible):
        raise ValueError(f"worker device {device} does not exist: CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} "
                         f"shows {len(visible)} GPU(s); fix the worker devices in the bot's config")
    return visible[index]


class WorkerHandle:
    """One worker subprocess. Not thread-safe; use from the bot's event loop only."""

    def __init__(
        self,
        index: int,
        device: str,
        command: list[str],
        models_dir: Path,
        log_dir: Path,
        on_message: MessageHandler,
        on_exit: ExitHandler,
        *,
        ready_timeout_s: float = 300.0,
        env: dict[str, str] | None = None,
        env_pass: Sequence[str] = (),
        env_deny: Sequence[str] = (),
    ) -> None:
        self.index = index
        self.id = f"worker-{index}"
        self.device = device
        self.command = command
        self.models_dir = models_dir
        self.log_path = log_dir / f"worker-{index}.log"
        self.on_message = on_message
        self.on_exit = on_exit
        self.ready_timeout_s = ready_timeout_s
        self.env = env
        self.env_pass = tuple(env_pass)  # extra variable names the operator lets through
        self.env_deny = tuple(env_deny)  # the configured token / link-secret variable names
        self.proc: asyncio.subprocess.Process | None = None
        self.job_id: int | None = None  # the job it is running, if any
        self.ready = False
        self.memory_bytes: int | None = None
        self._closing = False  # shutdown()/kill() on purpose: do not report the exit as a death
        self._reader: asyncio.Task[None] | None = None
        self._ready_fut: asyncio.Future[dict[str, Any]] | None = None
        self._log_offset = 0
        self._exited = asyncio.Event()
        self.exit_reason: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and not self._exited.is_set()

    @property
    def idle(self) -> bool:
        return self.ready and self.alive and self.job_id is None and not self._closing

    def _argv(self) -> list[str]:
        device = "cuda:0" if pinned_gpu(self.device, self._parent_env()) is not None else self.device
        argv = [*self.command, "--device", device, "--models-dir", str(self.models_dir)]
        if sys.platform.startswith("linux"):
            argv = [sys.executable, "-m", "bot.workers", *argv]
        return argv

    def _parent_env(self) -> dict[str, str]:
        return dict(os.environ if self.env is None else self.env)

    def _child_env(self) -> dict[str, str]:
        # An allow-list, not a copy: the bot's token and link secret must never reach engine code.
        parent = self._parent_env()
        env = worker_environment(parent, extra=self.env_pass, deny=self.env_deny)
        gpu = pinned_gpu(self.device, parent)
        if gpu is not None:
            # The worker sees only its own card (as cuda:0): no CUDA context on GPU 0 from every worker, and
            # whatever it asks of "the device" (bf16 support, memory) is asked of the card it runs on.
            env["CUDA_VISIBLE_DEVICES"] = gpu
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["PYTHONUNBUFFERED"] = "1"
        # `-m trainer.jobs.worker` / `-m bot.workers` must import from this checkout whatever the CWD.
        pp = env.get("PYTHONPATH", "")
        if str(REPO_ROOT) not in pp.split(os.pathsep):
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), pp) if p)
        return env

    async def start(self) -> dict[str, Any]:
        """Start the process and wait for its ``ready`` line; raises WorkerStartError."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        rotate_log(self.log_path)
        self._closing = False
        self._exited = asyncio.Event()
        self.exit_reason = None
        self.ready = False
        self.job_id = None
        with open(self.log_path, "ab") as logf:
            self._log_offset = logf.tell()
            self.proc = await asyncio.create_subprocess_exec(
                *self._argv(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=logf,  # the child holds its own copy of the descriptor
                env=self._child_env(),
                limit=_LINE_LIMIT,
            )
        loop = asyncio.get_running_loop()
        self._ready_fut = loop.create_future()
        self._reader = asyncio.create_task(self._read_loop(), name=f"{self.id}-reader")
        try:
            hello = await asyncio.wait_for(asyncio.shield(self._ready_fut), self.ready_timeout_s)
        except TimeoutError:
            await self.kill()
            raise WorkerStartError(
                f"{self.id} ({self.device}) did not become ready in {self.ready_timeout_s:.0f} s; "
                f"see {self.log_path}"
            ) from None
        self.ready = True
        mem = hello.get("memory_bytes") if isinstance(hello, dict) else None
        self.memory_bytes = int(mem) if isinstance(mem, int) and mem > 0 else None  # the GPU's, for memory plans
        log.info("%s ready on %s (pid %s)", self.id, self.device, self.pid)
        return hello

    def log_tail(self, max_bytes: int = 16384) -> str:
        """The end of what this process wrote to stderr (only this run, not earlier ones)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                end = f.tell()
                f.seek(max(self._log_offset, end - max_bytes))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    async def _read_loop(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        stdout = self.proc.stdout
        try:
            while True:
                try:
                    line = await stdout.readline()
                except ValueError:  # a line over the limit: skip it rather than die
                    log.warning("%s: dropped an over-long protocol line", self.id)
                    continue
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("%s: not a protocol line: %r", self.id, line[:200])
                    continue
                if not isinstance(msg, dict):
                    continue
                if msg.get("type") == "ready":
                    if self._ready_fut and not self._ready_fut.done():
                        self._ready_fut.set_result(msg)
                    continue
                if msg.get("type") == "done" and msg.get("job_id") == self.job_id:
                    self.job_id = None
                try:
                    await self.on_message(self, msg)
                except Exception:  # noqa: BLE001 - one bad message must not kill the reader
                    log.exception("%s: handling %s failed", self.id, msg.get("type"))
        except asyncio.CancelledError:
            # The event loop is going away with the worker still running (no shutdown() came): take the
            # process down with it, or the wait below would hang the loop's shutdown for good.
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            raise
        finally:
            rc = await self.proc.wait()
            self.exit_reason = describe_exit(rc, self.log_tail())
            self.ready = False
            self._exited.set()
            if self._ready_fut and not self._ready_fut.done():
                self._ready_fut.set_exception(
                    WorkerStartError(f"{self.id} exited before it was ready: {self.exit_reason}; see {self.log_path}")
                )
                self._ready_fut.exception()  # retrieved: no "never retrieved" warning if nobody waits
            if not self._closing:
                log.warning("%s (pid %s) died: %s", self.id, self.proc.pid, self.exit_reason)
                try:
                    await self.on_exit(self, self.exit_reason)
                except Exception:  # noqa: BLE001
                    log.exception("%s: exit handler failed", self.id)

    async def _send(self, msg: dict[str, Any]) -> bool:
        if self.proc is None or self.proc.stdin is None or self.proc.stdin.is_closing():
            return False
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            await self.proc.stdin.drain()
            return True
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            return False

    async def run(self, job_id: int, spec: dict[str, Any], job_dir: Path | str) -> bool:
        """Hand one job to the worker. False if the process is gone (the caller requeues)."""
        if not self.idle:
            raise RuntimeError(f"{self.id} is not idle")
        self.job_id = job_id
        ok = await self._send({"cmd": "run", "job_id": job_id, "spec": spec, "job_dir": str(job_dir)})
        if not ok:
            self.job_id = None
        return ok

    async def cancel(self, job_id: int) -> bool:
        return await self._send({"cmd": "cancel", "job_id": job_id})

    async def wait_exit(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def kill(self, *, report: bool = False) -> None:
        """SIGKILL the process. ``report``: still call on_exit (the scheduler wants to handle it)."""
        self._closing = not report
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        if self._reader is not None:
            await self.wait_exit(10)

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit; SIGKILL it if it has not after ``timeout`` seconds."""
        self._closing = True
        if self.proc is None:
            return
        if self.proc.returncode is None:
            await self._send({"cmd": "shutdown"})
            if self.proc.stdin is not None:
                with contextlib.suppress(Exception):
                    self.proc.stdin.close()
            if self.job_id is not None:
                # Mid-job: the engine only stops at its next step; the saved state makes a restart
                # resume, so do not wait for it.
                timeout = min(timeout, 2.0)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
        if self._reader is not None:
            await self.wait_exit(10)
            self._reader = None


# ---- launcher: python -m bot.workers CMD... ----------------------------------------------------


def _set_parent_death_signal() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _launch(argv: list[str], stderr: IO[str] = sys.stderr) -> None:
    if not argv:
        print("usage: python -m bot.workers CMD [ARGS...]", file=stderr)
        raise SystemExit(2)
    if sys.platform.startswith("linux"):
        _set_parent_death_signal()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    _launch(sys.argv[1:])
