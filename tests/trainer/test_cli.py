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


def test_train_from_options_alone(tmp_path: Path) -> None:
    """No job file: --images/--prompt/--base/--steps/--dim/--alpha/--lr/--optimizer map onto the spec."""
    out = tmp_path / "job"
    r = _cli("train", "--images", "examples/images", "--prompt", "chibi scs girl", "--base", "tiny-sd15",
             "--steps", "3", "--dim", "4", "--alpha", "2", "--lr", "5e-3", "--optimizer", "lion", "--resolution", "64",
             "--name", "opts", "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    lora = out / "outputs" / "opts.safetensors"
    assert lora.is_file() and f"LoRA: {lora}" in r.stdout
    assert "step 3/3" in r.stdout and "smoothed" in r.stdout and "steps/s" in r.stdout and "eta" in r.stdout
    assert "\r" not in r.stdout  # not a terminal: plain lines, no redrawn bar
    assert "precision fp32 (auto on cpu)" in r.stdout  # what the auto defaults resolved to
    assert "gemm_4bit" not in r.stderr and "torchvision" not in r.stderr  # library notices nobody can act on
    spec = (out / "spec.toml").read_text()
    assert 'name = "Lion"' in spec and "dim = 4" in spec and "alpha = 2.0" in spec and 'instance_prompt = "chibi' in spec
    from trainer.format.kohya import read_kohya

    md = read_kohya(lora).metadata
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "2" and md["ss_optimizer"] == "Lion"
    assert md["ss_mixed_precision"] == "no" and md["ss_gradient_checkpointing"] == "False"


def test_bad_option_values_exit_2_naming_the_field(tmp_path: Path) -> None:
    r = _cli("train", "--images", "examples/images", "--dim", "0", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "network.dim (--dim)" in r.stderr and "greater than or equal to 1" in r.stderr
    r = _cli("train", "--images", "examples/images", "--optimizer", "sgd", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and "optimizer.name (--optimizer)" in r.stderr and "AdamW8bit" in r.stderr
    r = _cli("train", "--images", "examples/images", "--steps", "many")
    assert r.returncode == 2 and "--steps" in r.stderr
    r = _cli("train")  # nothing to train on
    assert r.returncode == 2 and "--images" in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_demo_trains_and_prints_its_files(tmp_path: Path) -> None:
    r = _cli("demo", "--out", str(tmp_path / "demo"), "--steps", "20")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    loras = [Path(x.split(": ", 1)[1]) for x in lines if x.startswith("LoRA: ")]
    samples = [Path(x.split(": ", 1)[1]) for x in lines if x.startswith("sample: ")]
    assert len(loras) == 1 and loras[0].is_file() and loras[0].suffix == ".safetensors"
    assert len(samples) == 2 and all(p.is_file() and p.suffix == ".png" for p in samples)
    assert any(x.startswith("denoising loss at fixed noise:") and "lower after 20 steps" in x for x in lines)


def test_progress_bar_redraws_on_a_terminal() -> None:
    import io

    from trainer.jobs.cli import ProgressPrinter

    buf = io.StringIO()
    pr = ProgressPrinter(buf, tty=True)
    for step in (1, 2):
        pr({"type": "progress", "step": step, "total": 2, "loss": 0.5, "loss_raw": 0.4, "lr": 1e-3,
            "steps_per_s": 2.0, "eta_s": 0.5 * (2 - step)})
    pr({"type": "log", "level": "info", "message": "done"})
    text = buf.getvalue()
    assert text.count("\r[") == 2 and "[" + "#" * 24 + "] step 2/2" in text
    assert "loss 0.4000  smoothed 0.5000  lr 1.00e-03  2.00 steps/s  eta 0:00" in text
    assert text.endswith("\n[info] done\n")  # the bar's line is closed before other output


def test_ctrl_c_saves_the_state_and_a_rerun_resumes_from_that_step(tmp_path: Path) -> None:
    """SIGINT mid-run: the step reached is saved (not the last periodic state); rerunning with more steps
    resumes from exactly there and reports this run's steps and the total."""
    import json
    import signal
    import time

    out = tmp_path / "job"
    args = ["train", "--images", "examples/images", "--prompt", "chibi scs girl", "--base", "tiny-sd15",
            "--resolution", "64", "--dim", "4", "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args, "--steps", "5000"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events = out / "events.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        lines = events.read_text().splitlines() if events.is_file() else []
        if any(json.loads(x)["type"] == "progress" and json.loads(x)["step"] >= 2 for x in lines if x.strip()):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    cancelled = [json.loads(x) for x in events.read_text().splitlines() if '"cancelled"' in x][-1]
    step = cancelled["step"]
    assert step >= 2 and f"stopped at step {step} of 5000" in stderr and f"--out {out} to resume" in stderr
    assert (out / "state" / f"step-{step:08d}" / "state.json").is_file()  # no step lost (states are every 50)

    r = _cli(*args, "--steps", str(step + 2))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from step {step}" in r.stdout
    assert f"finished: 2 steps in this run (resumed at step {step}; {step + 2} in total)" in r.stdout
    assert f"re-planned at step {step}: 5000 -> {step + 2} steps" in r.stdout


def test_sigterm_stops_and_saves_like_ctrl_c() -> None:
    """`docker stop` / systemd send SIGTERM: the same stop-and-save as the first Ctrl-C (tested end to end above),
    a second signal aborts, and the old handlers come back afterwards."""
    import signal

    import pytest

    from trainer.jobs.cli import StopOnSignal

    before = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        assert not stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop()  # the loop's should_stop: finish the step, save the LoRA and state, exit 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before
