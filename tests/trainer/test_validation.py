"""Validation loss on held-out images (kohya's validation_split): the held-out images never train, their loss at
fixed noise and timesteps is the same for the same weights, it is recorded (loss.json, the plot, metadata) and
`keep_best` keeps the LoRA of its minimum."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trainer.events import JobFailed
from trainer.spec import SpecError, parse_job
from trainer.train.validation import held_out_count, split_validation, validation_timesteps


def test_split_and_timesteps_as_kohya() -> None:
    # kohya's split_train_val keeps ceil(n x (1 - split)) for training
    assert [held_out_count(0.1, n) for n in (2, 10, 11, 25)] == [0, 1, 1, 2]
    assert held_out_count(3, 10) == 3
    assert validation_timesteps(None, None, 1000) == [200, 400, 600, 800]  # kohya's NUM_VALIDATION_TIMESTEPS = 4
    assert validation_timesteps(100, 600, 1000) == [200, 300, 400, 500]
    with pytest.raises(SpecError, match="keep_best picks the LoRA by its validation loss"):
        parse_job({"keep_best": True, "concepts": [{"image_dir": "x"}]})
    with pytest.raises(SpecError, match="validation_split is a fraction below 1"):
        parse_job({"validation_split": 1.5, "concepts": [{"image_dir": "x"}]})


def test_a_split_that_leaves_nothing_is_refused(tmp_path: Path, make_spec: Any, dataset_factory: Any) -> None:
    from trainer.data.dataset import scan_dataset

    spec = make_spec(dataset_factory(tmp_path / "img", n=2), validation_split=2)
    with pytest.raises(JobFailed, match="holds out 2 of the 2 images: none would be left to train on"):
        split_validation(spec, scan_dataset(spec), lambda m, lv: None)


def test_validation_curve_fixed_noise_and_best_checkpoint(tmp_path: Path, make_spec: Any,
                                                         dataset_factory: Any) -> None:
    from trainer.format.kohya import read_kohya
    from trainer.train.loop import Trainer

    images = dataset_factory(tmp_path / "img", n=4, captions=("a", "b", "c", "d"))
    spec = make_spec(images, steps=20, validation_split=0.25, validate_every_n_steps=5, keep_best=True,
                     optimizer={"lr": 3e-2})
    events: list[dict[str, Any]] = []
    trainer = Trainer(spec, tmp_path / "job", events.append, device="cpu")
    outputs = trainer.run()
    [held] = trainer.validation.data.items
    assert held.path not in {it.path for it in trainer.items}  # held out: never trained on
    js = json.loads(Path(outputs["loss_history"]).read_text())
    steps, losses = js["validation"]["steps"], js["validation"]["loss"]
    assert steps == [5, 10, 15, 20] and len(set(losses)) == 4, js["validation"]
    # fixed noise and timesteps: the same weights give the same validation loss, bit for bit
    again = trainer.validation.loss(trainer)
    assert again == trainer.validation.loss(trainer) == losses[-1]
    best_step = steps[losses.index(min(losses))]
    best = read_kohya(Path(outputs["best_lora"]))
    assert best.metadata["ss_steps"] == str(best_step)
    assert best.metadata["loraforge_best_validation"] == f"step {best_step}: {min(losses):.6g}"
    final = read_kohya(Path(outputs["lora"]))
    assert final.metadata["ss_validation_split"] == "0.25" and final.metadata["ss_num_validation_images"] == "1"
    assert trainer.validation.summary()["best_validation_step"] == best_step
    # each new best is announced as a `file` with role "best" (the bot delivers it beside the final LoRA), and
    # always before the final LoRA's own `file` event, which stays the last LoRA written
    loras = [e for e in events if e["type"] == "file" and e["kind"] == "lora"]
    assert loras[-1] == {"type": "file", "kind": "lora", "path": outputs["lora"], "step": 20}
    assert [e["role"] for e in loras[:-1]] == ["best"] * (len(loras) - 1)
    assert loras[-2]["step"] == best_step and loras[-2]["path"] == outputs["best_lora"]
    try:  # TensorBoard, under kohya's tag (the optional extra; the test extra installs it)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    acc = EventAccumulator(str(tmp_path / "job" / "outputs" / "tensorboard"))
    acc.Reload()
    tb = acc.Scalars("loss/validation/step_average")
    assert [e.step for e in tb] == steps and [e.value for e in tb] == pytest.approx(losses, rel=1e-6)


def test_the_plot_draws_the_validation_curve_and_its_best_step() -> None:
    from trainer.infer.loss_plot import loss_figure

    history = [[s, 0.5 - 0.004 * s] for s in range(1, 41)]
    ax = loss_figure(history, validation=[[10, 0.41], [20, 0.37], [30, 0.39], [40, 0.44]]).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[2:] == ["validation loss (held-out images, fixed noise)", "best: step 20"]
    [xs] = [line.get_xdata() for line in ax.get_lines() if line.get_label() == "best: step 20"]
    assert list(xs) == [20.0]
