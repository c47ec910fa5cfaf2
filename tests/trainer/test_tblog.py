"""TensorBoard logs next to loss.json, under kohya's tags, when the optional `tensorboard` package is installed."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest

from trainer.train.tblog import TensorBoardLog


def test_without_tensorboard_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_tensorboard(name: str, *a: Any, **k: Any) -> Any:
        if name.startswith(("torch.utils.tensorboard", "tensorboard")):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    tb = TensorBoardLog(tmp_path / "tb", 0, 3)
    tb.write([[1, 0.5], [2, 0.4]], 1e-3)
    tb.close()
    assert not tb.enabled and not (tmp_path / "tb").exists()


def test_a_training_run_writes_loss_smoothed_loss_and_lr(tmp_path: Path, dataset: Path, make_spec) -> None:
    pytest.importorskip("tensorboard", reason="the optional tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.train.loop import train

    out = train(make_spec(dataset, steps=3, optimizer={"lr": 1e-3}), tmp_path / "job")
    folder = Path(out["loss_history"]).parent / "tensorboard"
    acc = EventAccumulator(str(folder))
    acc.Reload()
    assert {"loss/current", "loss/average", "lr/unet"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss/current")] == [1, 2, 3]
    assert acc.Scalars("loss/average")[0].value == pytest.approx(acc.Scalars("loss/current")[0].value)
    assert acc.Scalars("lr/unet")[-1].value == pytest.approx(1e-3)


def test_samples_are_logged_as_images_at_their_step(tmp_path: Path, dataset: Path, make_spec) -> None:
    pytest.importorskip("tensorboard", reason="the optional tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.train.loop import train

    small = {"steps": 2, "width": 64, "height": 64}
    sample = {"prompts": [{"prompt": "scs girl", **small}, {"prompt": "a hat", **small}], "every_n_steps": 2}
    out = train(make_spec(dataset, steps=3, sample=sample), tmp_path / "job")
    acc = EventAccumulator(str(Path(out["loss_history"]).parent / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert {"sample/00", "sample/01"} <= set(acc.Tags()["images"])
    shown = acc.Images("sample/01")
    assert [e.step for e in shown] == [2, 3]  # every 2 steps and at the end
    assert (shown[-1].width, shown[-1].height) == (64, 64)
    assert len(out["samples"]) == 4
