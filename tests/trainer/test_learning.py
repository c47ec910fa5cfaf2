"""Learning you can see, on the toy bases (trainer/toy, docs/toy-world.md): the bases draw what the prompt asks
for, and a LoRA trained here on a few pictures of a concept the base never saw (a star) bound to a trigger word
draws that concept, with its strength, while prompts without the trigger stay close to the base.

Measured by the toy world's pixel detectors; seeds fixed; thresholds are measured values with a margin (the
numbers in the comments, from this CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.toy.detect import concept_score
from trainer.toy.measure import draw, write_dataset
from trainer.toy.world import Scene, concept_scenes

TRIGGER = "zqx"
# The concept prompts: a star of a colour on a background, named by the trigger word.
STAR_PROMPTS = [Scene("star", c, b).caption(TRIGGER) for c, b in (("red", "blue"), ("yellow", "black"),
                                                                    ("white", "green"), ("blue", "yellow"))]
OTHER_PROMPTS = [Scene("circle", "red", "blue").caption(), Scene("square", "yellow", "black").caption()]
SEEDS = [0, 1, 2, 3]


@pytest.fixture(scope="session")
def toy_sd15():
    from trainer.models.load import load_base

    return load_base("toy-sd15")


@pytest.fixture(scope="session")
def star_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA trained on 10 pictures of stars captioned with the trigger word (the tests' learning recipe)."""
    from trainer.jobs.runner import run_job
    from trainer.spec import TrainSpec

    root = tmp_path_factory.mktemp("star")
    images = write_dataset(root / "images", concept_scenes("star", 10, seed=11), trigger=TRIGGER)
    spec = TrainSpec.model_validate({
        "base_model": "toy-sd15", "output_name": "star", "seed": 5, "steps": STAR_STEPS, "batch_size": 2,
        "concepts": [{"image_dir": str(images), "caption_mode": "caption_only"}],
        "network": {"dim": 8, "alpha": 8},
        "optimizer": {"name": "AdamW", "lr": 3e-3, "scheduler": "constant", "weight_decay": 0.0},
        "data": {"resolution": 64}, "save_precision": "fp32", "state_every_n_steps": 1000,
    })
    return Path(run_job(spec, root / "job")["lora"])


STAR_STEPS = 80


def _star_scores(base, prompts: list[str], strength: float | None, lora: Path | None) -> list[float]:
    from trainer.network.lora import apply_kohya_file

    net = apply_kohya_file(base, lora, multiplier=strength) if lora is not None else None
    try:
        imgs = draw(base, [p for p in prompts for _ in SEEDS], [s for _ in prompts for s in SEEDS])
    finally:
        if net is not None:
            net.remove()
    return [concept_score(i, "star") for i in imgs]


def test_the_toy_base_draws_what_the_prompt_asks_for(toy_sd15) -> None:
    acc, res = prompt_following(toy_sd15, n=16, seed=0)
    assert acc >= MIN_PROMPT_FOLLOWING, [(r.scene.caption(), r.reading.colour, r.reading.figure) for r in res]


def test_a_lora_learns_a_new_concept_bound_to_its_trigger(toy_sd15, star_lora: Path) -> None:
    base_scores = _star_scores(toy_sd15, STAR_PROMPTS, None, None)
    lora_scores = _star_scores(toy_sd15, STAR_PROMPTS, 1.0, star_lora)
    stars = sum(s > 0 for s in lora_scores) / len(lora_scores)
    assert sum(s > 0 for s in base_scores) / len(base_scores) <= MAX_BASE_STARS, base_scores  # the base never saw one
    assert stars >= MIN_LORA_STARS, lora_scores


def test_prompts_without_the_trigger_stay_close_to_the_base(toy_sd15, star_lora: Path) -> None:
    from trainer.network.lora import apply_kohya_file

    seeds = [s for _ in OTHER_PROMPTS for s in SEEDS]
    prompts = [p for p in OTHER_PROMPTS for _ in SEEDS]
    before = draw(toy_sd15, prompts, seeds)
    net = apply_kohya_file(toy_sd15, star_lora)
    try:
        after = draw(toy_sd15, prompts, seeds)
    finally:
        net.remove()
    same = sum(read(a).figure == read(b).figure and read(a).colour == read(b).colour for a, b in zip(before, after,
                                                                                                    strict=True))
    drift = float(np.mean([np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() for a, b in zip(before, after,
                                                                                                       strict=True)]))
    assert same / len(before) >= MIN_UNCHANGED and drift <= MAX_DRIFT, (same, drift)


def test_the_strength_grid_is_monotone(toy_sd15, star_lora: Path) -> None:
    """The mean star score rises with strength from 0 to 1; a negative strength does not move towards the star."""
    mean = {s: float(np.mean(_star_scores(toy_sd15, STAR_PROMPTS[:2], s, star_lora))) for s in (-1.0, 0.0, 0.5, 1.0)}
    assert mean[0.0] < mean[0.5] < mean[1.0], mean
    assert mean[-1.0] <= mean[0.0] + 0.02, mean
