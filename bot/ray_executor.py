"""Jobs on a Ray cluster (``[executor] kind = "ray"``): the bot's side. The node's side is bot/ray_node.py.

The scheduler stays the one source of truth (fair order, quotas, SQLite); Ray only places and runs. Each of the
scheduler's ``RaySlot`` handles behaves like a local ``WorkerHandle`` (``run``, ``cancel``, ``kill``, messages in
the worker protocol), so the scheduler's code for events, results and cancel is the same for both executors. Per
job the slot:

1. works out what the job needs (``executor.cpus_per_job`` / ``gpus_per_job``; for a train job the memory plan's
   peak as the custom resource ``vram_gb`` when the cluster's nodes advertise it) and refuses at once, naming what
   is missing, a job no live node could ever place, instead of leaving it pending forever;
2. ships the inputs the spec names under the bot's data or models folder by content hash (``ray.put`` once per
   content per bot process; each node fetches a content once and keeps it in its cache), and the bot's copy of the
   job's newest saved state, so a job resumes on any node;
3. creates a detached actor named ``loraforge-job-<id>`` that runs the engine, and polls it for protocol messages,
   writing the files they carry (every state save, sample and LoRA) into the bot's own job folder before the
   scheduler sees them.

A bot that restarts re-attaches to the named actors of its ``running`` jobs (``adopt``). A node that dies takes its
actor with it; the slot reports the job ``lost`` and the scheduler queues it again, to resume from its last state.

Ray's own transport pickles between cluster members: the cluster is trusted infrastructure (docs/scale-out.md);
never expose its ports. Our payloads are plain dicts, strings and bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bot.config import Config
from bot.ray_node import JobActor, pack, rewrite_paths, unpack
from storage.files import FileStore

log = logging.getLogger(__name__)

ACTOR_PREFIX = "loraforge-job-"
STATE_KEEP = 2  # newest state folders kept in the bot's copy of a job
WAITING_NOTE_S = 30.0  # while an actor waits for a node, a "waiting" phase event this often
REPO_ROOT = Path(__file__).resolve().parents[1]

MessageHandler = Callable[[Any, dict[str, Any]], Awaitable[None]]
ExitHandler = Callable[[Any, str], Awaitable[None]]


def actor_name(job_id: int) -> str:
    return f"{ACTOR_PREFIX}{job_id}"


def fmt(n: float) -> str:
    return f"{n:g}"


def vram_needed_gb(spec: dict[str, Any], models_dir: Path | None) -> int | None:
    """Whole GiB of GPU memory a train job needs (the memory plan; with gradient checkpointing when the spec leaves
    it to the engine, which turns it on when the card needs it). None when there is no plan (other kinds, an
    architecture the plan cannot tell)."""
    if spec.get("kind", "train") != "train":
        return None
    from trainer.plan import GiB, PlanError, plan_job
    from trainer.spec import SpecError, TrainSpec, parse_job

    try:
        parsed = parse_job(spec)
        if not isinstance(parsed, TrainSpec):
            return None
        gc = True if parsed.gradient_checkpointing is None else parsed.gradient_checkpointing
        plan = plan_job(parsed, models_dir=models_dir, gradient_checkpointing=gc)
    except (PlanError, SpecError, ValueError):
        return None
    return max(1, math.ceil(plan.total / GiB))


def refusal(need: dict[str, float], nodes: list[dict[str, Any]]) -> str | None:
    """Why no live node can ever run a job needing ``need`` (None: some node can). Names what is missing."""
    if any(all(n["resources"].get(k, 0.0) >= v for k, v in need.items()) for n in nodes):
        return None
    if not nodes:
        return "the Ray cluster has no live node; start one (`ray start --address=...`) and run the job again"
    names = {"GPU": "GPU(s)", "CPU": "CPU(s)", "vram_gb": "GB of GPU memory (`vram_gb`)"}
    short = []
    for k, v in need.items():
        best = max(n["resources"].get(k, 0.0) for n in nodes)
        if best < v:
            short.append(f"{fmt(v)} {names.get(k, k)} but the largest node offers {fmt(best)}")
    if not short:
        wants = ", ".join(f"{fmt(v)} {names.get(k, k)}" for k, v in need.items())
        return f"no single node of the Ray cluster has all it needs at once ({wants})"
    hint = " (a smaller batch size or resolution lowers the memory it needs)" if "vram_gb" in need else ""
    return "no node of the Ray cluster can run this job: it needs " + "; ".join(short) + hint


class RayCluster:
    """The bot's connection to the cluster (one per process) and the inputs it has shipped."""

    def __init__(self, config: Config, files: FileStore) -> None:
        self.cfg = config.executor
        self.files = files
        self.models_dir = Path(config.models_dir)
        self._refs: dict[str, Any] = {}  # content digest -> ObjectRef (kept alive: the bot owns the objects)
        self._digests: dict[tuple[str, int, int], str] = {}

    # -- cluster --

    def connect(self) -> None:
        import ray

        if ray.is_initialized():
            return
        kw: dict[str, Any] = {"namespace": self.cfg.namespace, "log_to_driver": False,
                              "ignore_reinit_error": True}
        if self.cfg.address == "local":  # a cluster in this process: its actors import this checkout
            kw["runtime_env"] = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
        else:
            kw["address"] = self.cfg.address
        ray.init(**kw)

    def nodes(self) -> list[dict[str, Any]]:
        import ray

        return [{"id": n["NodeID"], "address": n.get("NodeManagerAddress", "?"),
                 "resources": {k: float(v) for k, v in (n.get("Resources") or {}).items()}}
                for n in ray.nodes() if n.get("Alive")]

    def slot_count(self) -> int:
        if self.cfg.slots:
            return self.cfg.slots
        nodes = self.nodes()
        if self.cfg.gpus_per_job > 0:
            gpus = sum(n["resources"].get("GPU", 0.0) for n in nodes)
            return max(1, int(gpus // self.cfg.gpus_per_job))
        return max(1, len(nodes))

    def requirements(self, spec: dict[str, Any], nodes: list[dict[str, Any]]) -> dict[str, float]:
        need: dict[str, float] = {}
        if self.cfg.cpus_per_job:
            need["CPU"] = self.cfg.cpus_per_job
        if self.cfg.gpus_per_job:
            need["GPU"] = self.cfg.gpus_per_job
        if any("vram_gb" in n["resources"] for n in nodes):  # only a cluster that advertises it is asked for it
            vram = vram_needed_gb(spec, self.models_dir)
            if vram is not None:
                need["vram_gb"] = float(vram)
        return need

    def refusal_for(self, spec: dict[str, Any]) -> str | None:
        """Why no live node can run this job now (None: some node can). Asked at /train time and again at
        dispatch: the cluster may have lost its big node since."""
        nodes = self.nodes()
        return refusal(self.requirements(spec, nodes), nodes)

    # -- inputs by content --

    def _digest(self, path: Path) -> str:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        h = hashlib.sha256(b"dir\0" if path.is_dir() else b"file\0")
        for f in files:
            st = f.stat()
            key = (str(f), st.st_size, st.st_mtime_ns)
            d = self._digests.get(key)
            if d is None:
                fh = hashlib.sha256()
                with open(f, "rb") as fp:
                    while chunk := fp.read(1 << 20):
                        fh.update(chunk)
                d = self._digests[key] = fh.hexdigest()
            h.update(f"{f.relative_to(path).as_posix() if f != path else ''}\0{d}\n".encode())
        return h.hexdigest()

    def _ship_path(self, path: Path, inputs: dict[str, dict[str, Any]]) -> str:
        import ray

        digest = self._digest(path)
        if digest not in self._refs:
            self._refs[digest] = ray.put(pack(path))
        is_dir = path.is_dir()
        # Wrapped in a list: Ray passes nested refs as refs, so a node that has the content never fetches it.
        inputs[digest] = {"ref": [self._refs[digest]], "dir": is_dir, "name": path.name}
        node_path = f"{self.cfg.node_cache_dir.rstrip('/')}/blobs/{digest}"
        return node_path if is_dir else f"{node_path}/{path.name}"

    def ship(self, spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """The spec as the node must read it (paths into its cache) and the contents to ship (digest -> item)."""
        roots = [self.files.root.resolve(), self.models_dir.resolve()]
        inputs: dict[str, dict[str, Any]] = {}

        def visit(v: Any) -> Any:
            if isinstance(v, dict):
                return {k: visit(x) for k, x in v.items()}
            if isinstance(v, list):
                return [visit(x) for x in v]
            if isinstance(v, str) and v.startswith("/"):
                p = Path(v)
                with contextlib.suppress(OSError):
                    if p.exists() and any(p.resolve().is_relative_to(r) for r in roots):
                        return self._ship_path(p.resolve(), inputs)
            return v

        out = visit(spec)
        base = out.get("base_model")
        if isinstance(base, str) and not base.startswith("/"):
            from trainer.models.refs import find_model

            found = find_model(base, self.models_dir)  # a base in the bot's models folder: the nodes get it too
            if found is not None and found.resolve().is_relative_to(self.models_dir.resolve()):
                out["base_model"] = self._ship_path(found.resolve(), inputs)
        return out, inputs

    def newest_state(self, job_dir: Path) -> dict[str, Any] | None:
        import ray

        root = job_dir / "state"
        steps = sorted(p for p in root.glob("step-*") if (p / "state.json").is_file()) if root.is_dir() else []
        if not steps:
            return None
        return {"name": steps[-1].name, "ref": [ray.put(pack(steps[-1]))]}

    def node_job_dir(self, job_id: int) -> str:
        return f"{self.cfg.node_cache_dir.rstrip('/')}/jobs/{self.cfg.namespace}/{job_id}"


class RaySlot:
    """One job at a time on the cluster, with the WorkerHandle interface the scheduler uses."""

    detaches = True  # the scheduler's stop() leaves its job running on the cluster, to re-attach to

    def __init__(self, index: int, cluster: RayCluster, on_message: MessageHandler, on_exit: ExitHandler) -> None:
        self.index = index
        self.id = f"ray-{index}"
        self.device = "ray"
        self.cluster = cluster
        self.on_message = on_message
        self.on_exit = on_exit
        self.log_path = cluster.files.root / "logs" / "ray.log"
        self.memory_bytes: int | None = None
        self.job_id: int | None = None
        self.ready = False
        self.exit_reason: str | None = None
        self.lost: str | None = None  # set when the job's node died: the scheduler queues the job again
        self.node: str | None = None  # "address (id)" of the node the current job runs on
        self.node_id: str | None = None
        self._actor: Any = None
        self._poller: asyncio.Task[None] | None = None

    pid = None

    @property
    def alive(self) -> bool:
        return self.ready

    @property
    def idle(self) -> bool:
        return self.ready and self.job_id is None

    async def start(self) -> dict[str, Any]:
        await asyncio.to_thread(self.cluster.connect)
        self.ready = True
        return {"type": "ready", "device": "ray"}

    # -- a job --

    async def run(self, job_id: int, spec: dict[str, Any], job_dir: Path | str) -> bool:
        if not self.idle:
            raise RuntimeError(f"{self.id} is not idle")
        self.job_id = job_id
        try:
            nodes = await asyncio.to_thread(self.cluster.nodes)
            need = self.cluster.requirements(spec, nodes)
            if (why := refusal(need, nodes)) is not None:  # admitted, but the cluster has shrunk since
                asyncio.ensure_future(self._refuse(job_id, why))
                return True
            actor, started = await asyncio.to_thread(self._launch, job_id, spec, Path(job_dir), need)
        except Exception as e:  # noqa: BLE001 - the cluster is unreachable: the scheduler queues the job again
            log.warning("%s: could not start job %s on the cluster: %s", self.id, job_id, e)
            self.job_id = None
            return False
        self._follow(job_id, actor, Path(job_dir), started)
        return True

    async def _refuse(self, job_id: int, why: str) -> None:
        self.job_id = None
        await self.on_message(self, {"type": "done", "job_id": job_id, "state": "failed", "error": why})

    def _launch(self, job_id: int, spec: dict[str, Any], job_dir: Path, need: dict[str, float]) -> tuple[Any, Any]:
        """Ship the inputs and create the actor; returns it and the ref of its ``start`` (awaited by the poller:
        an actor waiting for a node to free up must not hold up the dispatcher)."""
        import ray

        node_spec, inputs = self.cluster.ship(spec)
        state = self.cluster.newest_state(job_dir)
        resources = {k: v for k, v in need.items() if k not in ("CPU", "GPU")}
        ns = self.cluster.cfg.namespace
        with contextlib.suppress(ValueError):
            # An actor of this job left from an earlier run that could not be re-attached (the job was queued
            # again, and the bot's copy of its state is the truth): it must not run on beside the new one.
            _kill(ray.get_actor(actor_name(job_id), namespace=ns))
        actor = ray.remote(JobActor).options(
            name=actor_name(job_id), namespace=ns, lifetime="detached", max_concurrency=4, max_restarts=0,
            num_cpus=need.get("CPU", 0.0), num_gpus=need.get("GPU", 0.0), resources=resources or None,
        ).remote(job_id, self.cluster.cfg.node_cache_dir, ns)
        device = "cuda" if need.get("GPU") else "cpu"
        models = f"{self.cluster.cfg.node_cache_dir.rstrip('/')}/models"
        return actor, actor.start.remote(node_spec, inputs, state, device, models)

    def _node_address(self, node_id: str | None) -> str | None:
        self.node_id = node_id
        for n in self.cluster.nodes():
            if n["id"] == node_id:
                return f"{n['address']} ({node_id[:8]})"
        return node_id[:8] if node_id else None

    async def adopt(self, job_id: int, job_dir: Path) -> bool:
        """Re-attach to a job still running on the cluster (after a bot restart). False: no such actor."""
        import ray

        def find() -> Any:
            try:
                actor = ray.get_actor(actor_name(job_id), namespace=self.cluster.cfg.namespace)
                info = ray.get(actor.info.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - gone, dead or unreachable: the job is queued again
                return None
            if not info.get("started"):
                with contextlib.suppress(Exception):
                    ray.kill(actor)
                return None
            self.node = self._node_address(info.get("node_id"))
            return actor

        actor = await asyncio.to_thread(find)
        if actor is None:
            return False
        self.job_id = job_id
        self._follow(job_id, actor, job_dir)
        log.info("%s: re-attached to job %s on %s", self.id, job_id, self.node)
        return True

    def _follow(self, job_id: int, actor: Any, job_dir: Path, started: Any = None) -> None:
        self._actor = actor
        self.lost = None
        self._poller = asyncio.ensure_future(self._poll_loop(job_id, actor, job_dir, started))
        self._poller.set_name(f"{self.id}-poll-{job_id}")

    async def _poll_loop(self, job_id: int, actor: Any, job_dir: Path, started: Any) -> None:
        import ray

        ack, unavailable = 0, 0
        node_dir = self.cluster.node_job_dir(job_id)
        if started is not None:
            pending = asyncio.ensure_future(started)
            while not (await asyncio.wait({pending}, timeout=WAITING_NOTE_S))[0]:
                # No node is free yet (Ray holds the actor until one is): say so, which also tells the stall
                # watchdog the job is alive.
                await self.on_message(self, {"type": "event", "job_id": job_id, "event": {
                    "type": "phase", "name": "waiting for a free Ray node"}})
            try:
                info = pending.result()
            except ray.exceptions.RayActorError as e:
                return await self._lost(job_id, f"its Ray node died before the job began: {_first(e)}")
            except Exception as e:  # noqa: BLE001 - e.g. an input that would not unpack on the node
                await asyncio.to_thread(_kill, actor)
                self._actor, self.job_id = None, None
                await self.on_message(self, {"type": "done", "job_id": job_id, "state": "failed",
                                             "error": f"the job could not start on its Ray node: {_first(e)}"})
                return None
            self.node = await asyncio.to_thread(self._node_address, info.get("node_id"))
        while True:
            try:
                msgs = await actor.poll.remote(ack, self.cluster.cfg.poll_s)
                unavailable = 0
            except ray.exceptions.ActorUnavailableError:
                unavailable += 1  # restarting or a network blip; a dead node ends in ActorDiedError
                if unavailable < 60:
                    await asyncio.sleep(1.0)
                    continue
                return await self._lost(job_id, "its Ray node stopped answering")
            except ray.exceptions.RayActorError as e:
                return await self._lost(job_id, f"its Ray node died ({self.node or 'unknown node'}): {_first(e)}")
            for m in msgs:
                seq = int(m.pop("seq"))
                blob = m.pop("blob", None)
                if blob is not None:
                    await asyncio.to_thread(_store, job_dir, blob)
                m = rewrite_paths(m, node_dir, str(job_dir))
                if m.get("type") == "done":
                    self.job_id = None
                try:
                    await self.on_message(self, m)
                except Exception:  # noqa: BLE001 - one bad message must not stop the job's stream
                    log.exception("%s: handling %s failed", self.id, m.get("type"))
                ack = seq
                if m.get("type") == "done":
                    await asyncio.to_thread(_kill, actor)
                    self._actor = None
                    return None
            if not msgs:
                await asyncio.sleep(0)  # poll() itself waited

    async def _lost(self, job_id: int, reason: str) -> None:
        log.warning("%s: job %s lost: %s", self.id, job_id, reason)
        self.lost = self.exit_reason = reason
        self._actor = None
        self._poller = None
        try:
            await self.on_exit(self, reason)
        finally:
            self.job_id = None

    async def cancel(self, job_id: int) -> bool:
        if self._actor is None or self.job_id != job_id:
            return False
        try:
            return bool(await self._actor.cancel.remote())
        except Exception:  # noqa: BLE001 - the poller sees a dead actor and reports it
            return False

    async def kill(self, *, report: bool = False) -> None:
        """Kill the job's actor (the stall watchdog, a cancel past its grace). ``report``: the scheduler's
        on_exit handles the job as a local worker's death."""
        actor, self._actor = self._actor, None
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        if actor is not None:
            await asyncio.to_thread(_kill, actor)
        self.exit_reason = "the job's Ray actor was killed"
        if report:
            await self.on_exit(self, self.exit_reason)
        self.job_id = None

    async def detach(self) -> None:
        """Stop following the job and leave it running on the cluster (a bot restart re-attaches)."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._poller
            self._poller = None
        self._actor = None
        self.job_id = None
        self.ready = False

    async def shutdown(self, timeout: float = 10.0) -> None:
        await self.detach()

    async def wait_exit(self, timeout: float | None = None) -> bool:
        return True


def _first(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _kill(actor: Any) -> None:
    import ray

    with contextlib.suppress(Exception):
        ray.get(actor.stop.remote(), timeout=10)
    with contextlib.suppress(Exception):
        ray.kill(actor)


def _store(job_dir: Path, blob: dict[str, Any]) -> None:
    """A file an event named, written into the bot's job folder (state saves pruned to the newest few)."""
    rel = Path(blob["rel"])
    if rel.is_absolute() or ".." in rel.parts:
        log.warning("ray: refused a file outside the job folder: %s", rel)
        return
    unpack(blob["data"], job_dir / rel, is_dir=bool(blob["dir"]))
    if rel.parts and rel.parts[0] == "state":
        steps = sorted(p for p in (job_dir / "state").glob("step-*") if p.is_dir())
        for old in steps[:-STATE_KEEP]:
            shutil.rmtree(old, ignore_errors=True)


async def make_slots(config: Config, files: FileStore, on_message: MessageHandler,
                     on_exit: ExitHandler) -> tuple[RayCluster, list[RaySlot]]:
    cluster = RayCluster(config, files)
    await asyncio.to_thread(cluster.connect)
    n = await asyncio.to_thread(cluster.slot_count)
    return cluster, [RaySlot(i, cluster, on_message, on_exit) for i in range(n)]


def cluster_lines(cluster: RayCluster, slots: list[RaySlot]) -> list[str]:
    """/admin status: each live node with its GPUs and VRAM, and what runs where."""
    lines = []
    running: dict[str, list[str]] = {}
    for s in slots:
        if s.job_id is not None:
            running.setdefault(s.node_id or "?", []).append(f"#{s.job_id}")
    for n in cluster.nodes():
        r = n["resources"]
        vram = f", {fmt(r['vram_gb'])} GB VRAM" if "vram_gb" in r else ""
        jobs = running.get(n["id"], [])
        lines.append(f"- node `{n['address']}` ({n['id'][:8]}): {fmt(r.get('GPU', 0))} GPU{vram}, "
                     f"{fmt(r.get('CPU', 0))} CPU: " + (", ".join(jobs) if jobs else "idle"))
    return lines or ["- no live node"]


