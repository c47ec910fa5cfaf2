"""`python -m trainer train` refuses what cannot work before it loads anything: one line on stderr, exit 2."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainer.jobs.cli import main

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "examples" / "images"


def _refused(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Runs the CLI; asserts exit 2, nothing on stdout (no "job folder", no "loading model") and a single line on
    stderr, which it returns."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert out == "", out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_paths_and_base_are_checked_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "job"
    common = ("--prompt", "x", "--out", str(out), "--device", "cpu")
    line = _refused(capsys, "train", "--images", str(tmp_path / "no_such_dir"), *common)
    assert "no_such_dir does not exist" in line and "--images" in line
    line = _refused(capsys, "train", "--images", str(IMAGES / "scs_0.png"), *common)
    assert "is a file, not a folder" in line
    # A folder or an image given where the job file goes: say what it is and what to use instead.
    line = _refused(capsys, "train", str(IMAGES), "--out", str(out))
    assert "is a folder, not a job file" in line and f"--images {IMAGES}" in line
    line = _refused(capsys, "train", str(IMAGES / "scs_0.png"), "--out", str(out))
    assert "is an image, not a job file" in line and "--images" in line
    line = _refused(capsys, "validate", str(IMAGES / "scs_0.png"))
    assert "is an image" in line
    blob = tmp_path / "job.toml"
    blob.write_bytes(b"\x89\xff\xfe binary")
    line = _refused(capsys, "run", str(blob), "--out", str(out))
    assert "not a text job file" in line
    line = _refused(capsys, "train", "--images", str(IMAGES), "--base", "no_such_model", *common)
    assert "'no_such_model' not found" in line and "tiny-sd15" in line
    # A pickle checkpoint is refused by name: its bytes would raise if anything unpickled them.
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    line = _refused(capsys, "train", "--images", str(IMAGES), "--base", str(ckpt), *common)
    assert "pickle" in line and ".safetensors" in line
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    (models / "Stable-diffusion" / "old.ckpt").write_bytes(b"not read")
    line = _refused(capsys, "train", "--images", str(IMAGES), "--base", "old", "--models-dir", str(models), *common)
    assert "old.ckpt" in line and "pickle" in line
    line = _refused(capsys, "train", "--images", str(IMAGES), "--init-lora", str(tmp_path / "first.safetensors"),
                    *common)
    assert line.startswith("error: init_lora: LoRA file") and "first.safetensors" in line and "not found" in line
    assert not out.exists()  # nothing was written


def test_cuda_missing_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _refused(capsys, "train", "--images", str(IMAGES), "--prompt", "x", "--device", "cuda",
                    "--out", str(tmp_path / "job"))
    assert "--device cuda" in line and "--device cpu" in line
    assert "AssertionError" not in line


def test_a_job_that_does_not_fit_the_card_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """On a CUDA device the memory plan is checked against the card (here a pretend 64 MiB card)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=64 * 2**20))
    line = _refused(capsys, "train", "--images", str(IMAGES), "--prompt", "x", "--device", "cuda",
                    "--resolution", "64", "--out", str(tmp_path / "job"))
    assert "out of GPU memory on cuda:0" in line and "your card has" in line and "To fit" in line
    line = _refused(capsys, "train", "--images", str(IMAGES), "--device", "cuda:3", "--out", str(tmp_path / "job"))
    assert "has 1 CUDA GPU" in line


def test_a_failure_after_loading_is_printed_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "broken.safetensors"  # passes the name checks; the loader refuses its bytes
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    rc = main(["train", "--images", str(IMAGES), "--prompt", "x", "--base", str(bad), "--resolution", "64",
               "--device", "cpu", "--out", str(tmp_path / "job")])
    out, err = capsys.readouterr()
    assert rc == 1 and "failed" not in out
    assert err.count("failed: ") == 1 and "broken.safetensors" in err


def test_difference_pairs_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "diff.toml"
    job.write_text(f'mode = "difference"\n[difference]\n[[difference.pairs]]\noriginal = "{IMAGES / "scs_0.png"}"\n'
                   f'target = "{tmp_path / "gone.png"}"\n')
    line = _refused(capsys, "run", str(job), "--device", "cpu", "--out", str(tmp_path / "job"))
    assert "the target image" in line and "gone.png does not exist" in line
