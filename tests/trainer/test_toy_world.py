"""The toy world draws what its captions say, keeps its reserved concepts out of pretraining, and the detectors
read back what was drawn (they are the measure the learning tests and the demo rely on)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from trainer.toy.detect import concept_score, read
from trainer.toy.world import (
    FIGURES,
    PATTERNS,
    RESERVED_PATTERNS,
    RESERVED_SHAPES,
    Scene,
    concept_scenes,
    pretrain_scenes,
    render,
    sample_scene,
)

ALL_FIGURES = FIGURES + RESERVED_SHAPES
ALL_PATTERNS = PATTERNS + RESERVED_PATTERNS


def _scenes(n: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, figures=ALL_FIGURES, patterns=ALL_PATTERNS) for _ in range(n)]


def _accuracy(scenes: list[Scene], noise: float = 0.0) -> dict[str, float]:
    nrng = np.random.default_rng(0)
    right = dict.fromkeys(("background", "colour", "figure", "pattern"), 0)
    for s in scenes:
        px = np.asarray(render(s), dtype=np.float32) + nrng.normal(0, noise, (64, 64, 3))
        r = read(np.clip(px, 0, 255))
        for k in right:
            right[k] += getattr(r, k) == getattr(s, k)
    return {k: v / len(scenes) for k, v in right.items()}


def test_render_is_deterministic_and_captions_name_the_scene() -> None:
    s = Scene("star", "red", "blue", "small", "checkered", dx=3, dy=-2)
    assert np.array_equal(np.asarray(render(s)), np.asarray(render(s)))
    assert render(s).size == (64, 64)
    assert s.caption() == "small red star on blue with checkered"
    assert s.caption(trigger="zqx") == "small red zqx on blue with zqx"
    assert Scene("girl", "red", "green").caption() == "large chibi girl in red dress on green"


def test_pretraining_never_shows_a_reserved_concept() -> None:
    scenes = pretrain_scenes(500, seed=0)
    assert not {s.figure for s in scenes} & set(RESERVED_SHAPES)
    assert not {s.pattern for s in scenes} & set(RESERVED_PATTERNS)
    assert {s.figure for s in scenes} == set(FIGURES) and {s.pattern for s in scenes} == set(PATTERNS)
    assert all(s.figure == "star" for s in concept_scenes("star", 10, seed=1))
    assert all(s.pattern == "checkered" for s in concept_scenes("checkered", 10, seed=1))
    with pytest.raises(ValueError, match="not a reserved concept"):
        concept_scenes("circle", 3, seed=0)


@pytest.mark.parametrize("noise", [0.0, 8.0])
def test_detectors_read_back_what_was_drawn(noise: float) -> None:
    acc = _accuracy(_scenes(120, seed=int(noise) + 7), noise)
    assert min(acc.values()) >= 0.95, acc


def test_concept_scores_separate_the_reserved_concepts() -> None:
    stars = [render(s) for s in concept_scenes("star", 12, seed=3)]
    others = [render(s) for s in pretrain_scenes(12, seed=3)]
    assert min(concept_score(i, "star") for i in stars) > max(concept_score(i, "star") for i in others)
    checks = [render(s) for s in concept_scenes("checkered", 12, seed=4)]
    assert min(concept_score(i, "checkered") for i in checks) > max(concept_score(i, "checkered") for i in others)
    blank = np.full((64, 64, 3), 128, dtype=np.uint8)
    assert read(blank).figure == "" and read(blank).pattern == "plain"
