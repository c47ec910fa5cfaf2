"""`trainer train` thinks in epochs and renders samples, as kohya users expect: --epochs, --save-every-n-epochs,
--sample-prompt (repeatable), --sample-every map onto the spec's steps, save_every_n_steps and [sample]."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from trainer.jobs.cli import main

IMAGES = Path(__file__).resolve().parents[2] / "examples" / "images"  # 4 images


def test_epochs_and_samples_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "job"
    common = ["--images", str(IMAGES), "--prompt", "chibi scs girl", "--resolution", "64", "--batch-size", "2",
              "--device", "cpu"]
    rc = main(["train", *common, "--epochs", "2", "--save-every-n-epochs", "1", "--sample-prompt", "a girl",
               "--sample-prompt", "a dress", "--sample-every", "3", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    spec = tomllib.loads((out / "spec.toml").read_text())
    assert spec["steps"] == 4 and spec["save_every_n_steps"] == 2  # 4 images / batch 2 = 2 steps an epoch
    assert [p["prompt"] for p in spec["sample"]["prompts"]] == ["a girl", "a dress"]
    assert spec["sample"]["every_n_steps"] == 3
    names = {p.name for p in (out / "samples").glob("*.png")}
    assert {"step000003_00.png", "step000003_01.png", "step000004_00.png", "step000004_01.png"} <= names
    assert len(list((out / "outputs").glob("*-step*.safetensors"))) == 1  # epoch 1 (step 2); epoch 2 is the final
    assert "step 4/4" in captured.out

    assert main(["train", *common, "--epochs", "2", "--steps", "5", "--out", str(tmp_path / "b")]) == 2
    assert "give --steps or --epochs, not both" in capsys.readouterr().err
    assert main(["train", *common, "--epochs", "0", "--out", str(tmp_path / "c")]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
