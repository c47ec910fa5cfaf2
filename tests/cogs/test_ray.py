"""The Ray executor (bot/ray_executor.py) on a real local cluster: a head node and a second node process, each with
one CPU and a custom `vram_gb` standing in for a GPU, started once for this file (the fewest nodes that still show
two jobs in parallel and a job moving to another node). Real tiny trainings (tiny SD1.5 at 64 px) through the fake
Discord.

- two users' jobs run at once, one per node; the fair order holds (a second job of the same user waits while
  another user's job starts); each result is posted exactly once; the daily device-time quota is charged;
- a job that no node can hold is refused at /train time with what is missing (and at dispatch, for a cluster that
  shrank after it was queued);
- kill -9 of the bot mid-job: the restarted bot re-attaches to the job's actor instead of running it again;
- kill -9 of a node mid-job: the job goes back to the queue and resumes on the head from its last state.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cogkit import answer, run_command
from raykit import LocalCluster

from bot.demo import demo_images
from bot.service import Service

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "bot" / "service_runner.py"
_ns = itertools.count(1)

JOB_TOML = b"""
seed = 77
state_every_n_steps = 2
[network]
dim = 4
[optimizer]
name = "AdamW"
lr = 0.002
scheduler = "constant"
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    c = LocalCluster()
    try:
        c.start_head({"vram_gb": 4})
        c.connect()
        c.add_node("node2", {"vram_gb": 8})  # the node test (last) kills it
        c.wait_nodes(2)
        yield c
    finally:
        c.stop()


@pytest.fixture
def executor(cluster: LocalCluster) -> Iterator[dict[str, Any]]:
    """The executor section for one test: its own namespace (job ids restart at 1 in every test's database);
    whatever the test left running on the cluster is killed after it."""
    ns = f"t{os.getpid()}-{next(_ns)}"
    yield {"kind": "ray", "address": cluster.address, "namespace": ns, "gpus_per_job": 0, "cpus_per_job": 1,
           "node_cache_dir": str(cluster.temp / "cache"), "poll_s": 0.5}
    for name in ray.util.list_named_actors(all_namespaces=True):
        if name.get("namespace") == ns:
            try:
                ray.kill(ray.get_actor(name["name"], namespace=ns))
            except ValueError:
                pass


def _head_id() -> str:
    return next(n["NodeID"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n["Resources"])


async def _dataset(fake: Any, b: Any, user: str) -> None:
    opts: dict[str, Any] = {"name": "shapes", "trigger_word": "zqx"}
    for i, (name, data) in enumerate(demo_images(4)):
        opts[f"file{i + 1}"] = fake.add_attachment(name, data)
    rec = await run_command(fake, b, "dataset", opts, user=user, subcommand="create")
    assert "added 4 image(s)" in answer(rec), answer(rec)


async def _train(fake: Any, b: Any, user: str, steps: int, toml: bytes = JOB_TOML) -> int:
    rec = await run_command(fake, b, "train", {
        "dataset": "shapes", "base_model": "tiny-sd15", "steps": steps, "resolution": 64, "output_name": f"r{user}",
        "job_file": fake.add_attachment("job.toml", toml)}, user=user, timeout=30)
    text = answer(rec)
    assert "Queued job **#" in text, text
    return int(text.split("Queued job **#")[1].split("**")[0])


async def _no_check_grids(b: Any) -> None:
    """No strength x seed grid job after each training (bot/autogrid.py): on a two-node cluster they would take the
    nodes the tests' own jobs wait for, and double the CPU these tests need."""
    await b.remove_cog("Preview")
    assert b.get_cog("Preview") is None


def _results(fake: Any, job: Any, user: str) -> list[Any]:
    """The posts in the job's thread that deliver its result (they mention the owner)."""
    return [m for m in fake.channel_messages(job.thread_id) if m.content.startswith(f"<@{fake.users[user]['id']}>")]


async def test_two_jobs_on_two_nodes_fair_order_results_once(fake_discord, bot_factory, executor) -> None:
    fake = fake_discord
    b = bot_factory(real_worker=True, executor=executor, discord={"trainer_role_ids": []},
                    limits={"max_running_per_user": 1})
    async with fake.running(b, gateway=False):
        await asyncio.wait_for(b.service_ready.wait(), 120)
        await _no_check_grids(b)
        assert len(b.scheduler.workers) == len(ray.nodes())  # one slot per node (CPU-only cluster)
        await _dataset(fake, b, "bob")
        await _dataset(fake, b, "carol")
        bob1 = await _train(fake, b, "bob", 6)
        bob2 = await _train(fake, b, "bob", 2)
        carol1 = await _train(fake, b, "carol", 6)

        # /admin status while both run: each node, with its VRAM, says which job it runs
        def placed() -> bool:
            on = {w.job_id: w.node_id for w in b.scheduler.workers}
            return all(on.get(j) for j in (bob1, carol1))

        deadline = time.monotonic() + 240
        while not placed():
            assert time.monotonic() < deadline, "the first two jobs did not both start"
            await asyncio.sleep(0.2)
        text = answer(await run_command(fake, b, "admin", {}, user="alice", subcommand="status"))
        nodes = [line for line in text.splitlines() if line.startswith("- node ")]
        assert len(nodes) == 2 and {line.rsplit(": ", 1)[1] for line in nodes} == {f"#{bob1}", f"#{carol1}"}, text
        assert any("4 GB VRAM" in line for line in nodes) and any("8 GB VRAM" in line for line in nodes), text

        jobs = {j: await b.scheduler.wait_for_job(j, 400) for j in (bob1, bob2, carol1)}
        assert all(j.state == "succeeded" for j in jobs.values()), [(j.id, j.error) for j in jobs.values()]
        for j in (bob1, bob2, carol1):
            await b.progress.wait_idle(j, 60)
        one, two, other = jobs[bob1], jobs[bob2], jobs[carol1]
        # one node each, at the same time (every node has one CPU and each job asks for one) ...
        assert other.started_at < one.finished_at and one.started_at < other.finished_at
        # ... and carol's job went before bob's second although it was queued after it
        assert other.started_at < two.started_at
        for j, user in ((bob1, "bob"), (bob2, "bob"), (carol1, "carol")):
            posts = _results(fake, jobs[j], user)
            assert len(posts) == 1, [m.content[:80] for m in posts]
            assert any(n.endswith(".safetensors") for n in posts[0].file_names)
        # the daily device-time quota is charged for cluster jobs as for local ones (the scheduler keeps it)
        for owner_jobs in ((one, two), (other,)):
            ran = sum(j.finished_at - j.started_at for j in owner_jobs)
            used = await b.scheduler.repo.gpu_seconds_since(owner_jobs[0].owner_id, 0)
            assert 0.5 * ran <= used <= ran + 1, (used, ran)
        # the LoRA came back through Ray into the bot's own store
        lora = (await b.service.artifact_paths(bob1, "lora"))[-1]
        assert lora.is_file() and lora.is_relative_to(b.config.data_dir)

        text = answer(await run_command(fake, b, "admin", {}, user="alice", subcommand="status"))
        nodes = [line for line in text.splitlines() if line.startswith("- node ")]
        assert "**Ray cluster**" in text and [line.endswith(": idle") for line in nodes] == [True, True], text


NO_NODE = ("no node of the Ray cluster can run this job: it needs 10 GB of GPU memory (`vram_gb`) but the largest "
           "node offers 8 (a smaller batch size or resolution lowers the memory it needs)")


async def test_job_no_node_can_hold_is_refused_at_train_time_naming_what_is_missing(
        fake_discord, bot_factory, executor, monkeypatch) -> None:
    fake = fake_discord
    b = bot_factory(real_worker=True, executor=executor)
    big = b"batch_size = 64\n" + JOB_TOML + b"[data]\nresolution = 1024\n"  # its memory plan: 10 GB
    options = {"dataset": "shapes", "base_model": "tiny-sd15", "steps": 4}
    async with fake.running(b, gateway=False):
        await asyncio.wait_for(b.service_ready.wait(), 120)
        await _dataset(fake, b, "bob")
        rec = await run_command(fake, b, "train", {**options, "job_file": fake.add_attachment("j.toml", big)},
                                user="bob", timeout=30)
        assert NO_NODE in answer(rec) and "Queued" not in answer(rec), answer(rec)
        assert await b.repo.get_job(1) is None  # nothing was queued

        # A job admitted while the cluster still had a big node, dispatched after that node left: refused at
        # dispatch with the same words, in the job's thread, instead of waiting for a node forever.
        monkeypatch.setattr(b.scheduler.ray, "refusal_for", lambda spec: None)
        rec = await run_command(fake, b, "train", {**options, "job_file": fake.add_attachment("j.toml", big)},
                                user="bob", timeout=30)
        assert "Queued job **#1**" in answer(rec), answer(rec)
        job = await b.scheduler.wait_for_job(1, 60)
        assert job.state == "failed"
        assert job.error == NO_NODE, job.error
        await b.progress.wait_idle(1, 30)
        assert any("largest node offers 8" in m.content for m in fake.channel_messages(job.thread_id))


def _ray_config(data: Path, executor: dict[str, Any]) -> Any:
    sys.path.insert(0, str(RUNNER.parent))
    from service_runner import make_config

    os.environ["LORAFORGE_TEST_EXECUTOR"] = json.dumps(executor)
    try:
        return make_config(data)
    finally:
        del os.environ["LORAFORGE_TEST_EXECUTOR"]


def _state_steps(job_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (job_dir / "state").glob("step-*") if (p / "state.json").is_file())


async def test_bot_killed_9_reattaches_to_the_running_job(tmp_path: Path, executor) -> None:
    data = tmp_path / "data"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "LORAFORGE_TEST_EXECUTOR": json.dumps(executor)}
    proc = subprocess.Popen([sys.executable, str(RUNNER), "--data-dir", str(data), "--submit", "--steps", "16",
                             "--state-every", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("JOB "), line + proc.stdout.read()  # type: ignore[union-attr]
        job_id = int(line.split()[1])
        deadline = time.monotonic() + 240
        while not _state_steps(data / "jobs" / str(job_id)):  # a state save came back to the bot's store
            assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no training state reached the bot in time"
            await asyncio.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    service = Service(_ray_config(data, executor))
    await service.open()
    try:
        requeued = await service.scheduler.start()
        assert requeued == []  # nothing to run again: the job still runs on the cluster
        final = await service.scheduler.wait_for_job(job_id, 300)
        assert final.state == "succeeded", final.error
        events = await service.repo.list_events(job_id)
        assert [e.type for e in events].count("started") == 1  # the engine ran once, from step 0 to the end
        assert any(e.payload.get("reason") == "re-attached after restart" for e in events if e.type == "state")
        assert final.attempts == 1
        assert (await service.artifact_paths(job_id, "lora"))[-1].is_file()
    finally:
        await service.stop()


async def test_node_killed_9_job_resumes_on_another_node(fake_discord, bot_factory, executor, cluster) -> None:
    """Two jobs run on the two nodes; the one that is not the head dies. Last in the file."""
    fake = fake_discord
    b = bot_factory(real_worker=True, executor=executor, discord={"trainer_role_ids": []})
    head = _head_id()
    async with fake.running(b, gateway=False):
        await asyncio.wait_for(b.service_ready.wait(), 120)
        await _no_check_grids(b)
        await _dataset(fake, b, "bob")
        await _dataset(fake, b, "carol")
        # long enough that the victim is still training when its first state save reaches the bot, even on an idle box
        jobs = [await _train(fake, b, "bob", 30), await _train(fake, b, "carol", 30)]
        starts: list[tuple[int, int]] = []
        b.scheduler.add_listener(lambda job, ev: starts.append((job.id, ev.get("resumed_from", 0)))
                                 if ev.get("type") == "started" else None)
        victim, node = None, None
        deadline = time.monotonic() + 240
        while victim is None:  # a job not on the head, once a saved state of it reached the bot
            for w in b.scheduler.workers:
                j = w.job_id
                if j is not None and w.node_id not in (None, head) and _state_steps(b.service.files.job_dir(j)):
                    victim, node = j, w.node_id
            assert time.monotonic() < deadline, "no job off the head saved a state in time"
            await asyncio.sleep(0.05)
        saved = _state_steps(b.service.files.job_dir(victim))
        cluster.kill_node(str(cluster.name_of(node)))
        final = {j: await b.scheduler.wait_for_job(j, 400) for j in jobs}
        assert all(f.state == "succeeded" for f in final.values()), [(f.id, f.error) for f in final.values()]
        states = [e.payload for e in await b.repo.list_events(victim, types=["state"])]
        assert any(s.get("state") == "queued" and "Ray node died" in str(s.get("reason")) for s in states), states
        resumed = [r for j, r in starts if j == victim]
        assert resumed and resumed[-1] >= saved[0] > 0  # resumed from the state the bot had, not from step 0
        assert final[victim].attempts == 2
        await b.progress.wait_idle(victim, 60)
        assert len(_results(fake, final[victim], "bob" if victim == jobs[0] else "carol")) == 1
