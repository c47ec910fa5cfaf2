"""The engine alone from its CLI: a job file in, a checked kohya LoRA out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=300)


def test_run_then_inspect(tmp_path: Path) -> None:
    job = tmp_path / "job"
    r = _cli("run", "examples/tiny-sd15.toml", "--set", "steps=4", "--set", "network.conv_dim=2",
             "--job-dir", str(job), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    lora = job / "outputs" / "tiny-demo.safetensors"
    assert lora.is_file()
    assert "step 4/4" in r.stdout
    assert (job / "spec.toml").read_text().count("conv_dim = 2") == 1  # the resolved spec is kept with the job

    r = _cli("inspect", str(lora))
    assert r.returncode == 0, r.stderr
    assert "kohya-format LoRA for sd1" in r.stdout
    assert "conv3x3 r2 a2" in r.stdout and "linear r8 a4" in r.stdout  # dim/alpha from the job file
    assert "matches the file" in r.stdout


def test_inspect_refuses_a_pickle(tmp_path: Path) -> None:
    import pickle

    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps({"lora_unet_x.alpha": 1.0}))
    r = _cli("inspect", str(bad))
    assert r.returncode == 2
    assert "pickle" in r.stderr.lower()
