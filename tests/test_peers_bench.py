"""bench/peers (issue 15) without the peers: the step probe really records a torch optimizer's steps from outside
its code, and the runner's arithmetic (steady steps/s, ratios, goals) is what docs/benchmarks.md reports."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "bench" / "peers"


@pytest.fixture(scope="module")
def stats():  # noqa: ANN201 - a module loaded from its path (bench/ is not a package)
    spec = importlib.util.spec_from_file_location("peers_stats", PEERS / "stats.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_probe_records_every_optimizer_step_of_an_unchanged_script(tmp_path: Path) -> None:
    out = tmp_path / "probe.jsonl"
    script = ("import torch\n"
              "w = torch.nn.Parameter(torch.zeros(3, 4)); frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)\n"
              "opt = torch.optim.AdamW([w, frozen], lr=0.1)\n"
              "for _ in range(4):\n"
              "    (w.sum() ** 2).backward(); opt.step(); opt.zero_grad()\n")
    env = dict(os.environ, PEERS_PROBE_OUT=str(out), PYTHONPATH=str(PEERS / "probe"), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[0]["optimizer"] == "AdamW"
    assert (recs[0]["trained_tensors"], recs[0]["trained_params"]) == (1, 12)  # the frozen one is not counted
    assert all(b["t"] >= a["t"] for a, b in zip(recs, recs[1:], strict=False))


def test_steady_rate_leaves_out_startup_and_the_first_steps(stats) -> None:  # noqa: ANN001
    # step 1 at 10 s after start, step 2 after a slow 5 s warm-up, then steps every 0.5 s (one 0.7 s outlier)
    times = [110.0, 115.0] + [115.0 + 0.5 * i for i in range(1, 29)]
    times[10] += 0.2
    lines = [json.dumps({"step": i + 1, "t": t, "trained_params": 7, "trained_tensors": 2})
             for i, t in enumerate(times)]
    lines.insert(3, lines.pop(5))  # out of order lines are sorted back
    fig = stats.run_figures(stats.parse_probe([*lines, '{"step": 31, "t": 1']), 100.0, 140.0, 2048 * 1024)
    assert fig["steps"] == 30
    assert fig["steps_per_s"] == pytest.approx(2.0)
    assert fig["first_step_s"] == pytest.approx(10.0)
    assert fig["wall_s"] == pytest.approx(40.0)
    assert fig["tail_s"] == pytest.approx(140.0 - times[-1])
    assert fig["rss_mib"] == pytest.approx(2048)
    assert fig["trained_params"] == 7


def test_ratios_goals_and_table(stats) -> None:  # noqa: ANN001
    def run(side: str, sps: float, wall: float, rss: float, ok: bool = True) -> dict:
        return {"side": side, "ok": ok, "steps_per_s": sps, "first_step_s": wall / 2, "tail_s": 1.0, "wall_s": wall,
                "rss_mib": rss, "trained_params": 100, "trained_tensors": 2}

    runs = [run("ours", 1.2, 60, 700), run("ours", 1.0, 50, 800), run("ours", 1.1, 55, 750),
            run("kohya", 1.0, 100, 1000), run("kohya", 0.9, 80, 1000), run("kohya", 0.0, 0, 0, ok=False)]
    summary = stats.summarize(runs)
    assert summary["ours"]["steps_per_s"] == {"min": 1.0, "median": 1.1, "max": 1.2, "n": 3}
    assert (summary["kohya"]["rounds"], summary["kohya"]["failed"]) == (2, 1)
    r = stats.ratios(summary, "ours", "kohya")
    assert r["steps_per_s"] == pytest.approx(1.1 / 0.95)
    assert r["wall_speedup"] == pytest.approx(90 / 55)
    assert r["rss_ratio"] == pytest.approx(0.75)
    assert stats.meets(r) == {"steps_per_s": True, "wall_speedup": True, "rss_ratio": True}
    slow = stats.ratios(summary, "kohya", "ours")
    assert stats.meets(slow) == {"steps_per_s": False, "wall_speedup": False, "rss_ratio": False}
    table = stats.markdown(summary, [("ours", "kohya")])
    assert "| kohya | 2 (+1 failed) |" in table
    assert "| ours vs kohya | 1.16 (goal met) |" in table


def test_each_engine_side_writes_a_job_the_engine_accepts(tmp_path: Path) -> None:
    # the runner's own job files (ours, and ours-attn with the example's module set) must be valid job files with
    # the matched settings, or a benchmark hours long measures the wrong job; kohya at its defaults needs bucketing
    import argparse
    import tomllib

    from trainer.spec import TrainSpec

    spec = importlib.util.spec_from_file_location("peers_run", PEERS / "run.py")
    assert spec is not None and spec.loader is not None
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    a = argparse.Namespace(work=tmp_path, model="sd15", steps=50, dim=16, resolution=256, device="cpu",
                           kohya=tmp_path / "sd-scripts", diffusers=tmp_path / "diffusers", venvs=tmp_path / "venvs")
    jobs = {}
    for side in ("ours", "ours-attn"):
        (tmp_path / side).mkdir()
        argv, _, venv = run.side_command(side, a, tmp_path / side)
        assert venv == "" and argv[1:4] == ["-m", "trainer", "train"]
        jobs[side] = TrainSpec.model_validate(tomllib.loads((tmp_path / side / "job.toml").read_text()))
    assert jobs["ours"].network.unet_modules == "transformer" and jobs["ours-attn"].network.unet_modules == "attention"
    for job in jobs.values():
        assert (job.steps, job.network.dim, job.network.resolved_alpha, job.data.resolution) == (50, 16, 16.0, 256)
        assert job.data.cache_latents and not job.network.train_text_encoder and job.optimizer.name == "AdamW"
    matched, _, _ = run.side_command("kohya", a, tmp_path)
    defaults, _, _ = run.side_command("kohya-defaults", a, tmp_path)
    assert "--cache_latents" in matched and "--enable_bucket" not in matched
    assert "--enable_bucket" in defaults and "--cache_latents" not in defaults and "--network_dim" not in defaults
