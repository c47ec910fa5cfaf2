"""fp16 under GradScaler, checked on CPU (a CPU GradScaler decides which steps to skip, as the CUDA one would):
an overflowing step is skipped, not fatal; the learning-rate schedule waits; the loss scale survives a resume;
a run that only overflows is stopped with a clear message."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer.events import JobCancelled, JobFailed
from trainer.train.loop import Trainer


def _fp16_with_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 as on a GPU (a GradScaler deciding which steps to skip), computed in fp32 on the CPU."""
    from trainer.train import precision as pr

    real = pr.resolve_precision

    def resolve(requested: str, device: torch.device) -> pr.Precision:
        if requested == "fp16":
            return pr.Precision("fp16", None, torch.amp.GradScaler("cpu"))
        return real(requested, device)

    monkeypatch.setattr(pr, "resolve_precision", resolve)


def _overflow_at(monkeypatch: pytest.MonkeyPatch, bad: Callable[[int], bool]) -> None:
    """The loss of 0-based step s is inf when bad(s): what an fp16 overflow looks like to the loop."""
    real = Trainer.micro_step_loss

    def micro_step_loss(self: Trainer, step: int, micro: int) -> torch.Tensor:
        loss = real(self, step, micro)
        return loss * float("inf") if bad(step) else loss

    monkeypatch.setattr(Trainer, "micro_step_loss", micro_step_loss)


def test_fp16_overflow_step_is_skipped_not_fatal(tmp_path: Path, dataset: Path, make_spec,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _fp16_with_scaler(monkeypatch)
    _overflow_at(monkeypatch, lambda s: s == 2)
    spec = make_spec(dataset, steps=5, mixed_precision="fp16", optimizer={"scheduler": "linear"})
    events: list[dict[str, Any]] = []
    tr = Trainer(spec, tmp_path / "job", events.append)
    out = tr.run()
    assert Path(out["lora"]).is_file() and tr.step == 5
    assert tr.scaler is not None and tr.scaler.get_scale() == 2.0**16 / 2  # the scaler backed off once
    assert tr.lr_scheduler.last_epoch == 4  # 5 steps, one skipped: the schedule moved 4 times
    assert json.loads(Path(out["loss_history"]).read_text())["steps"] == [1, 2, 4, 5]
    logs = [e["message"] for e in events if e["type"] == "log"]
    assert any("step 3 skipped" in m and "fp16" in m for m in logs)
    assert events[-1]["type"] == "finished" and events[-1]["summary"]["skipped_steps"] == 1


def test_fp16_divergence_fails_after_skipped_steps_in_a_row(tmp_path: Path, dataset: Path, make_spec,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer.train import health

    _fp16_with_scaler(monkeypatch)
    _overflow_at(monkeypatch, lambda s: s >= 1)
    monkeypatch.setattr(health, "MAX_SKIPPED_IN_A_ROW", 3)
    spec = make_spec(dataset, steps=10, mixed_precision="fp16")
    with pytest.raises(JobFailed) as e:
        Trainer(spec, tmp_path / "job").run()
    assert e.value.reason == "nan"
    assert "3 steps in a row" in str(e.value) and "lower the learning rate" in str(e.value).lower()


def test_fp16_resume_restores_the_loss_scale(tmp_path: Path, dataset: Path, make_spec, stop_after,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    _fp16_with_scaler(monkeypatch)
    _overflow_at(monkeypatch, lambda s: s == 2)
    spec = make_spec(dataset, steps=6, mixed_precision="fp16", state_every_n_steps=2,
                     optimizer={"scheduler": "cosine"})
    full = Trainer(spec, tmp_path / "full")
    full_w = load_file(full.run()["lora"])
    s = stop_after(4)
    with pytest.raises(JobCancelled):
        Trainer(spec, tmp_path / "job", s.sink, s.stop).run()
    events: list[dict[str, Any]] = []
    resumed = Trainer(spec, tmp_path / "job", events.append)
    res_w = load_file(resumed.run()["lora"])
    assert resumed.resumed_from == 4
    notes = [e["message"] for e in events if e["type"] == "log" and "resumed from step 4" in e["message"]]
    assert len(notes) == 1 and "same data order" in notes[0] and "bit-exact" in notes[0]  # what a resume keeps
    assert resumed.scaler.get_scale() == full.scaler.get_scale() == 2.0**15
    assert resumed.lr_scheduler.last_epoch == full.lr_scheduler.last_epoch == 5
    assert all(torch.equal(res_w[k], full_w[k]) for k in full_w)
