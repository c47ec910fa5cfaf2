"""The scheduler: feeds queued jobs from the database to worker processes, fairly.

The queue *is* the database (jobs in state ``queued``); nothing lives only in memory, so a restart
loses nothing: ``start()`` puts every ``running`` job back to ``queued`` and the engine resumes it
from ``job_dir/state``. ``Repo.try_start_job`` (a conditional UPDATE) makes sure no job runs twice.

The fair order and the time estimates are bot/queue_policy.py's.

Worker messages are persisted (job_events, progress_json, artifacts, state, gpu_seconds) before
they are fanned out to listeners, so a listener always sees what the database already holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bot import admission, queue_policy, resume
from bot.admission import QuotaError as QuotaError  # re-exported: callers catch it from here
from bot.artifacts import record_artifact
from bot.config import Config
from bot.diskguard import DiskGuard
from bot.listeners import Event, Listener, Listeners
from bot.quotas import EXEMPT_EVENT, WAIT_EVENT, QuotaGate
from bot.workers import OOM_MESSAGE, WorkerHandle, WorkerStartError, looks_like_oom
from storage import queries, retention
from storage.files import FileStore, write_bytes_atomic
from storage.repo import IllegalTransitionError, Job, NotFoundError, Repo
from trainer.spec import SpecError, from_json, to_toml

log = logging.getLogger(__name__)

PROGRESS_PERSIST_S = 1.0  # progress rows in job_events at most this often per job (listeners get all)


@dataclass
class _Run:
    """A job this process has handed to a worker (memory only; the database has the truth)."""

    job_id: int
    worker: WorkerHandle
    started: float = field(default_factory=time.monotonic)
    last_event: float = field(default_factory=time.monotonic)
    last_persisted_progress: float = 0.0
    progress: dict[str, Any] = field(default_factory=dict)
    stalled: str | None = None  # set by the watchdog: the job fails with this message
    killer: asyncio.Task[None] | None = None


class Scheduler:
    def __init__(
        self,
        repo: Repo,
        files: FileStore,
        config: Config,
        workers: list[WorkerHandle] | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.repo = repo
        self.files = files
        self.config = config
        self._clock = clock
        self.ray: Any = None  # the Ray cluster (bot/ray_executor.py) when executor.kind = "ray"
        self._ray_slots = workers is None and config.executor.kind == "ray"  # made at start(): they ask the cluster
        if self._ray_slots:
            workers = []
        elif workers is None:
            workers = [
                WorkerHandle(
                    i, dev, config.worker_command(), Path(config.models_dir), files.root / "logs",
                    self._on_message, self._on_exit, ready_timeout_s=config.workers.ready_timeout_s,
                    env_pass=config.workers.env_pass,
                    env_deny=(config.discord.token_env, config.discord.link_secret_env),
                )
                for i, dev in enumerate(config.worker_devices())
            ]
        for w in workers:  # handles built elsewhere report to us
            w.on_message, w.on_exit = self._on_message, self._on_exit
        self.workers = workers
        self._runs: dict[int, _Run] = {}
        self._user_locks: dict[int, asyncio.Lock] = {}
        self.listeners = Listeners()
        self._waiters: dict[int, list[asyncio.Future[Job]]] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._restart_failures: dict[str, int] = {}
        self._started = False
        self._stopping = False
        self.worker_errors: list[str] = []  # start failures, newest last (for the console/admin)
        self.quotas = QuotaGate(repo, config, clock)
        self.disk = DiskGuard(files.root, config.limits.min_free_disk_mib)
        self._quota_noted: set[int] = set()  # jobs whose quota wait was announced

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> list[int]:
        """Recover from a previous run, start the workers, and begin dispatching. Returns the ids
        of jobs that were running when the last process died (now queued again, to resume)."""
        self._stopping = False
        await retention.compact_finished_jobs(self.repo.db)
        adopted: list[int] = []
        if self._ray_slots:
            from bot.ray_executor import make_slots

            self.ray, self.workers = await make_slots(self.config, self.files, self._on_message, self._on_exit)
            await asyncio.gather(*(self._start_worker(w) for w in self.workers))
            adopted = await self._adopt_running()
        requeued = await self.repo.requeue_running_jobs(keep=adopted)
        for job_id in requeued:
            await self._record(job_id, {"type": "state", "state": "queued", "reason": "restart recovery"})
        self._started = True
        if not self._ray_slots:
            await asyncio.gather(*(self._start_worker(w) for w in self.workers))
        self._spawn(self._dispatch_loop(), "dispatcher")
        self._spawn(self._watchdog_loop(), "stall-watchdog")
        self.kick()
        return requeued

    async def stop(self) -> None:
        """Stop dispatching and shut the workers down. Jobs still running go back to ``queued``
        (their saved state lets the next start resume them), exactly as after a crash."""
        self._stopping = True
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for run in list(self._runs.values()):
            with contextlib.suppress(IllegalTransitionError, NotFoundError):
                await self.repo.add_gpu_seconds(run.job_id, time.monotonic() - run.started)
                if not getattr(run.worker, "detaches", False):  # a Ray job runs on; the next start re-attaches
                    await self.repo.update_job_state(run.job_id, "queued", expected="running")
        self._runs.clear()
        await asyncio.gather(
            *(w.kill() if w.job_id is not None and not getattr(w, "detaches", False) else w.shutdown()
              for w in self.workers),
            return_exceptions=True,
        )
        await self.listeners.close()
        self._started = False

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _start_worker(self, w: WorkerHandle) -> None:
        try:
            await w.start()
            self._restart_failures[w.id] = 0
            self.kick()
        except WorkerStartError as e:
            self.worker_errors.append(str(e))
            log.error("%s", e)
            if not self._stopping:
                self._spawn(self._restart_worker(w), f"restart-{w.id}")

    async def _adopt_running(self) -> list[int]:
        """Ray: re-attach to the jobs still running on the cluster (a bot restart, even after kill -9), instead of
        running them again. Returns their ids; the other ``running`` jobs are queued again by the caller."""
        adopted: list[int] = []
        free = [w for w in self.workers if w.idle]
        for job in await self.repo.list_jobs(states=["running"]):
            if not free:
                break
            w = free[0]
            if await w.adopt(job.id, self.files.job_dir(job.id).resolve()):  # type: ignore[attr-defined]
                free.pop(0)
                self._runs[job.id] = _Run(job.id, w)
                adopted.append(job.id)
                await self._record(job.id, {"type": "state", "state": "running", "worker": w.id,
                                            "device": w.device, "reason": "re-attached after restart"})
                if job.cancel_requested:
                    await w.cancel(job.id)
        return adopted

    async def _restart_worker(self, w: WorkerHandle) -> None:
        n = self._restart_failures.get(w.id, 0)
        self._restart_failures[w.id] = n + 1
        delay = min(self.config.workers.restart_backoff_s * (2**n), 300.0)
        await asyncio.sleep(delay)
        if not self._stopping:
            await self._start_worker(w)

    # ---- listeners ----------------------------------------------------------------------------

    def add_listener(self, fn: Listener) -> Callable[[], None]:
        """Call ``fn(job, event)`` for every event (engine events and ``{"type": "state", ...}``).
        ``job`` is the row after the event was persisted. Returns a function that removes it."""
        return self.listeners.add(fn)

    def _fan_out(self, job: Job, ev: Event) -> None:
        self.listeners.fan_out(job, ev)
        if job.is_terminal:
            for fut in self._waiters.pop(job.id, []):
                if not fut.done():
                    fut.set_result(job)

    async def _record(self, job_id: int, ev: Event, *, persist: bool = True) -> Job | None:
        """Persist one event row (optional) and fan it out with the fresh job row."""
        if persist:
            payload = {k: v for k, v in ev.items() if k != "type"}
            await self.repo.add_event(job_id, str(ev.get("type", "?")), payload)
        job = await self.repo.get_job(job_id)
        if job is not None:
            self._fan_out(job, ev)
        return job

    async def wait_for_job(self, job_id: int, timeout: float | None = None) -> Job:
        """Wait until the job reaches a terminal state; returns the final row."""
        job = await self.repo.get_job(job_id)
        if job is None:
            raise NotFoundError(f"job {job_id} does not exist")
        if job.is_terminal:
            return job
        fut: asyncio.Future[Job] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(fut)

        async def poll() -> Job:
            # Belt and braces for changes made by another process (the CLI, an admin tool).
            while True:
                done, _ = await asyncio.wait({fut}, timeout=2.0)
                if done:
                    return fut.result()
                j = await self.repo.get_job(job_id)
                if j is not None and j.is_terminal:
                    return j

        return await asyncio.wait_for(poll(), timeout)

    # ---- submission ---------------------------------------------------------------------------

    def _user_lock(self, owner_id: int) -> asyncio.Lock:
        return self._user_locks.setdefault(owner_id, asyncio.Lock())

    async def submit(
        self,
        owner_id: int,
        kind: str,
        spec: BaseModel | dict[str, Any] | str,
        guild_id: int | None = None,
        channel_id: int | None = None,
        priority: int = 0,
        is_admin: bool = False,
        events: list[tuple[str, dict[str, Any]]] | None = None,
        thread_id: int | None = None,
    ) -> Job:
        """Queue a job. Raises QuotaError (message for the user) or trainer.spec.SpecError.
        Only admins may set ``priority`` (others get 0); admins are exempt from quotas.
        ``events`` (type, payload) and ``thread_id`` are recorded before the job can be dispatched, so
        whatever reads them at delivery (upload limits, destinations) can never be outrun by a fast job."""
        spec_json = admission.validate_spec(self.config, kind, spec, is_admin)
        if self.ray is not None:
            await self._cluster_admits(spec_json)
        # Count-then-insert must not interleave for one user, or 200 concurrent /train calls
        # could all see "2 queued" and all get in.
        async with self._user_lock(owner_id):
            if not is_admin:
                await admission.check_limits(self.repo, self.config, self.quotas, owner_id, kind, spec_json,
                                             self._clock())
            job = await self.repo.create_job(
                kind, owner_id, spec_json, guild_id, channel_id, priority if is_admin else 0  # type: ignore[arg-type]
            )
        if is_admin:  # no quota at dispatch either (bot/quotas.py)
            events = [(EXEMPT_EVENT, {}), *(events or [])]
        if thread_id is not None:
            await self.repo.set_job_message(job.id, thread_id=thread_id)
        for type_, payload in events or []:
            await self.repo.add_event(job.id, type_, payload)
        await self._record(job.id, {"type": "state", "state": "queued"})
        self.kick()
        return await self.repo.get_job(job.id) if thread_id is not None else job

    async def _cluster_admits(self, spec_json: str) -> None:
        """Raise QuotaError, naming what is missing, when no node of the Ray cluster could ever hold the job: refused
        at submit, not queued forever. A cluster that does not answer now does not refuse (dispatch checks again)."""
        try:
            why = await asyncio.to_thread(self.ray.refusal_for, json.loads(spec_json))
        except Exception:  # noqa: BLE001 - unreachable for a moment: the job queues and waits for it
            log.warning("could not ask the Ray cluster about a new job", exc_info=True)
            return
        if why is not None:
            raise QuotaError(why)

    async def retrain(self, job_id: int, by_user: int, is_admin: bool = False, **where: Any) -> Job:
        """Queue a new job with exactly the stored spec of ``job_id`` (owner or admin only)."""
        job = await self._job_or_raise(job_id)
        if job.owner_id != by_user and not is_admin:
            raise PermissionError(f"job {job_id} belongs to someone else; only its owner or an admin can retrain it")
        return await self.submit(
            by_user, job.kind, job.spec_json,
            where.get("guild_id", job.guild_id), where.get("channel_id", job.channel_id),
            is_admin=is_admin,
        )

    async def _job_or_raise(self, job_id: int) -> Job:
        job = await self.repo.get_job(job_id)
        if job is None:
            raise NotFoundError(f"job {job_id} does not exist")
        return job

    # ---- cancel -------------------------------------------------------------------------------

    async def cancel(self, job_id: int, by_user: int, is_admin: bool = False) -> Job:
        """Queued: cancelled at once. Running: the worker is told to stop (the engine saves what
        it has and reports ``cancelled``); if it has not stopped after ``cancel_grace_s`` it is
        killed. Only the owner or an admin; others get PermissionError."""
        job = await self._job_or_raise(job_id)
        if job.owner_id != by_user and not is_admin:
            raise PermissionError(f"job {job_id} belongs to someone else; only its owner or an admin can cancel it")
        if job.is_terminal:
            return job
        job = await self.repo.request_cancel(job_id)
        if job.state == "cancelled":
            await self._record(job_id, {"type": "state", "state": "cancelled", "by": by_user})
            self.kick()
            return job
        run = self._runs.get(job_id)
        if run is not None:
            await run.worker.cancel(job_id)
            if run.killer is None:
                run.killer = self._spawn(self._kill_after(run, self.config.limits.cancel_grace_s), f"kill-{job_id}")
        return job

    async def _kill_after(self, run: _Run, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._runs.get(run.job_id) is run:
            log.warning("job %s did not stop within %.0f s; killing %s", run.job_id, delay, run.worker.id)
            await run.worker.kill(report=True)

    # ---- dispatch -----------------------------------------------------------------------------

    def kick(self) -> None:
        """Wake the dispatcher (a job was queued, a worker got free...)."""
        self._wake.set()

    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                # The timeout picks up jobs queued by another process (the CLI).
                await asyncio.wait_for(self._wake.wait(), 5.0)
            self._wake.clear()
            try:
                await self._dispatch_once()
            except Exception:  # noqa: BLE001 - the dispatcher must survive anything
                log.exception("dispatch failed")
                await asyncio.sleep(1.0)

    async def _dispatch_once(self) -> None:
        if self.disk.check() is not None:
            return  # nothing new starts on a nearly full disk (bot/diskguard.py); the 5 s tick re-checks
        for w in self.workers:
            if not w.idle or self._stopping:
                continue
            for job in await self.fair_order(for_dispatch=True):
                if not await self._quota_admits(job):
                    continue
                if await self._start_on(w, job):
                    break

    async def _quota_admits(self, job: Job) -> bool:
        """The daily quota again, at start (bot/quotas.py): go, wait in the queue (said once), or refuse."""
        verdict = await self.quotas.verdict(job)
        if verdict.action == "go":
            return True
        if verdict.action == "refuse":
            with contextlib.suppress(IllegalTransitionError, NotFoundError):
                await self.repo.update_job_state(job.id, "cancelled", error=verdict.message, expected="queued")
                await self._record(job.id, {"type": "state", "state": "cancelled", "error": verdict.message})
            return False
        if job.id not in self._quota_noted:
            self._quota_noted.add(job.id)
            await self._record(job.id, {"type": WAIT_EVENT, "message": verdict.message})
        return False

    async def fair_order(self, *, for_dispatch: bool = False) -> list[Job]:
        """Queued jobs in the order they will start (bot/queue_policy.py). ``for_dispatch``: only jobs
        that may start now (their owner is under max_running_per_user)."""
        queued = await self.repo.list_jobs(states=["queued"])  # priority DESC, created_at, id
        if not queued:
            return []
        loads = await queries.owner_loads(self.repo.db)
        return queue_policy.fair_order(queued, loads, self.config.limits.max_running_per_user, self._clock(),
                                       for_dispatch=for_dispatch)

    async def _start_on(self, w: WorkerHandle, job: Job) -> bool:
        if not await self.repo.try_start_job(job.id, w.id):
            return False  # cancelled or started elsewhere meanwhile
        run = _Run(job.id, w)
        self._runs[job.id] = run
        w.job_id = job.id  # reserve the worker while the job folder is prepared
        try:
            source = await resume.continues_from(self.repo, job.id)  # /resume: the job whose state it continues
            job_dir = await asyncio.to_thread(self._prepare_job_dir, job, source)
        except Exception as e:  # noqa: BLE001 - a broken job must not wedge the queue
            w.job_id = None
            self._runs.pop(job.id, None)
            await self._finish(job.id, "failed", f"could not prepare the job folder: {e}")
            return True
        await self._record(job.id, {"type": "state", "state": "running", "worker": w.id, "device": w.device})
        w.job_id = None
        sent = False
        with contextlib.suppress(RuntimeError):
            sent = await w.run(job.id, json.loads(job.spec_json), job_dir)
        if not sent:
            # The worker died in between; its exit handler restarts it. The job goes back.
            self._runs.pop(job.id, None)
            with contextlib.suppress(IllegalTransitionError):
                await self.repo.update_job_state(job.id, "queued", expected="running")
                await self._record(job.id, {"type": "state", "state": "queued", "reason": "worker unavailable"})
            return False
        return True

    def _prepare_job_dir(self, job: Job, source: int | None = None) -> Path:
        job_dir = self.files.make_job_dirs(job.id)
        if source is not None:
            resume.seed_state(self.files, source, job.id)
        spec_path = self.files.job_spec_path(job.id)
        if not spec_path.exists():  # a resumed job keeps its first copy
            try:
                write_bytes_atomic(spec_path, to_toml(from_json(job.spec_json)).encode())
            except (SpecError, ValueError) as e:
                log.warning("job %s: could not write spec.toml: %s", job.id, e)
        return job_dir.resolve()

    # ---- worker messages ----------------------------------------------------------------------

    async def _on_message(self, w: WorkerHandle, msg: dict[str, Any]) -> None:
        t = msg.get("type")
        job_id = msg.get("job_id")
        if t == "event" and isinstance(job_id, int):
            await self._on_event(job_id, msg.get("event") or {})
        elif t == "done" and isinstance(job_id, int):
            run = self._runs.get(job_id)
            if run is None or run.worker is not w:
                return
            self._runs.pop(job_id, None)
            if run.killer is not None:
                run.killer.cancel()
            await self.repo.add_gpu_seconds(job_id, time.monotonic() - run.started)
            state = str(msg.get("state") or "failed")
            error = msg.get("error")
            if state not in ("succeeded", "failed", "cancelled"):
                state, error = "failed", f"the worker reported an unknown state {state!r}"
            if state == "failed" and looks_like_oom(error):
                error = OOM_MESSAGE
            await self._finish(job_id, state, error)
            self.kick()
        elif t == "heartbeat" and isinstance(job_id, int):
            await self.repo.heartbeat(job_id)

    async def _on_event(self, job_id: int, ev: Event) -> None:
        run = self._runs.get(job_id)
        if run is None:
            return  # a late event of a job we no longer run (killed, requeued at stop)
        run.last_event = time.monotonic()
        t = ev.get("type")
        prog = run.progress
        persist = True
        if t == "started":
            prog.update(total=ev.get("total_steps"), resumed_from=ev.get("resumed_from", 0),
                        step=ev.get("resumed_from", 0), kind=ev.get("kind"))
        elif t == "phase":
            prog.update(phase=ev.get("name"), phase_current=ev.get("current"), phase_total=ev.get("total"))
        elif t == "progress":
            prog.update({k: ev.get(k) for k in ("step", "total", "loss", "lr", "steps_per_s", "eta_s")})
            prog["phase"] = "training"
            now = time.monotonic()
            last_step = ev.get("step") is not None and ev.get("step") == ev.get("total")
            persist = last_step or now - run.last_persisted_progress >= PROGRESS_PERSIST_S
            if persist:
                run.last_persisted_progress = now
        elif t in ("sample", "file"):
            await record_artifact(self.repo, self.files, job_id, ev)
        elif t == "failed":
            prog["error"] = ev.get("error")
        prog["updated_at"] = self._clock()
        await queries.set_progress_and_heartbeat(self.repo.db, job_id, prog)
        await self._record(job_id, ev, persist=persist)

    async def _finish(self, job_id: int, state: str, error: str | None) -> None:
        try:
            await self.repo.update_job_state(job_id, state, error=error, expected="running")  # type: ignore[arg-type]
        except (IllegalTransitionError, NotFoundError) as e:
            log.info("job %s: not moved to %s (%s)", job_id, state, e)
            return
        ev: Event = {"type": "state", "state": state}
        if error:
            ev["error"] = error
        await self._record(job_id, ev)
        await retention.compact_job_events(self.repo.db, job_id)  # ended: its last progress row is enough

    async def _on_exit(self, w: WorkerHandle, reason: str) -> None:
        for run in [r for r in self._runs.values() if r.worker is w]:
            self._runs.pop(run.job_id, None)
            if run.killer is not None and run.killer is not asyncio.current_task():
                run.killer.cancel()
            await self.repo.add_gpu_seconds(run.job_id, time.monotonic() - run.started)
            job = await self.repo.get_job(run.job_id)
            if job is None or job.state != "running":
                continue
            if run.stalled:
                await self._finish(run.job_id, "failed", run.stalled)
            elif job.cancel_requested:
                await self._finish(run.job_id, "cancelled", None)
            elif getattr(w, "lost", None):  # its Ray node died: again to the queue, to resume from its saved state
                with contextlib.suppress(IllegalTransitionError, NotFoundError):
                    await self.repo.update_job_state(run.job_id, "queued", expected="running")
                    await self._record(run.job_id, {"type": "state", "state": "queued", "reason": w.lost})
            else:
                await self._finish(run.job_id, "failed", reason)
        w.job_id = None
        if not self._stopping:
            self._spawn(self._restart_worker(w), f"restart-{w.id}")
        self.kick()

    # ---- stall watchdog -----------------------------------------------------------------------

    async def _watchdog_loop(self) -> None:
        limit = self.config.limits.stall_timeout_s
        period = max(0.05, min(limit / 4, 5.0))
        while not self._stopping:
            await asyncio.sleep(period)
            now = time.monotonic()
            for run in list(self._runs.values()):
                if run.stalled is None and now - run.last_event > limit:
                    run.stalled = f"no progress for {limit:.0f} s; the job was stopped"
                    log.warning("job %s: %s; killing %s", run.job_id, run.stalled, run.worker.id)
                    self._spawn(run.worker.kill(report=True), f"stall-kill-{run.job_id}")

    # ---- queue information --------------------------------------------------------------------

    async def queue_position(self, job_id: int) -> int | None:
        """1-based place among queued jobs in the fair order; None if the job is not queued."""
        for i, j in enumerate(await self.fair_order(), 1):
            if j.id == job_id:
                return i
        return None

    async def _speed(self, kind: str, speeds: dict[str, queue_policy.Speed | None]) -> queue_policy.Speed | None:
        if kind not in speeds:
            live = [float((j.progress or {}).get("steps_per_s") or 0)
                    for j in await self.repo.list_jobs(states=["running"]) if j.kind == kind]
            speeds[kind] = queue_policy.measure_speed(await queries.recent_runs(self.repo.db, kind), live)
        return speeds[kind]

    async def _remaining(self, job: Job, speeds: dict[str, queue_policy.Speed | None]) -> float | None:
        return queue_policy.remaining_s(job, await self._speed(job.kind, speeds))

    async def estimate(self, job_id: int) -> tuple[float | None, float | None]:
        """(seconds until the job starts, until it finishes); None where there is nothing to go on.
        A running job starts at 0; a finished one has (None, None)."""
        job = await self._job_or_raise(job_id)
        if job.is_terminal:
            return None, None
        speeds: dict[str, queue_policy.Speed | None] = {}
        own = await self._remaining(job, speeds)
        if job.state == "running":
            return 0.0, own
        ahead: list[Job] = []
        for j in await self.fair_order():
            if j.id == job_id:
                break
            ahead.append(j)
        running = await self.repo.list_jobs(states=["running"])
        return queue_policy.start_and_finish(
            own, [await self._remaining(j, speeds) for j in ahead],
            [await self._remaining(j, speeds) for j in running], len(self.workers))

    async def eta(self, job_id: int) -> float | None:
        """Estimated seconds until the job finishes (None: no measurements yet, or finished)."""
        return (await self.estimate(job_id))[1]

    # ---- introspection ------------------------------------------------------------------------

    def running_jobs(self) -> dict[int, str]:
        """job id -> worker id, for jobs this process is running."""
        return {jid: r.worker.id for jid, r in self._runs.items()}

    def worker_status(self) -> list[dict[str, Any]]:
        return [
            {"id": w.id, "device": w.device, "pid": w.pid, "alive": w.alive, "ready": w.ready,
             "job_id": w.job_id, "log": str(w.log_path), "last_exit": w.exit_reason,
             "node": getattr(w, "node", None)}
            for w in self.workers
        ]

    async def cluster_lines(self) -> list[str]:
        """/admin status: the Ray cluster's nodes, GPUs, VRAM and jobs ([] with local workers)."""
        if self.ray is None:
            return []
        from bot.ray_executor import cluster_lines

        return await asyncio.to_thread(cluster_lines, self.ray, self.workers)  # type: ignore[arg-type]
