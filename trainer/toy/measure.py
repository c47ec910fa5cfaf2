"""What a toy base (with or without a LoRA) draws for toy prompts, read back by the detectors: the numbers the
pretraining script prints, the learning tests assert and the demo reports."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from trainer.toy.detect import Reading, read
from trainer.toy.world import SHAPES, Scene, sample_scene

SAMPLER = "euler"
STEPS = 12
CFG = 2.0  # the toy bases follow prompts best at 2 (docs/toy-world.md, Status)


@dataclass(frozen=True)
class Followed:
    scene: Scene
    reading: Reading

    @property
    def shape_and_colour(self) -> bool:
        return self.reading.figure == self.scene.figure and self.reading.colour == self.scene.colour


def prompt_scenes(n: int, seed: int) -> list[Scene]:
    """Plain-background shape scenes (the prompts the prompt-following check draws)."""
    rng = random.Random(seed)
    return [sample_scene(rng, figures=SHAPES, patterns=("plain",)) for _ in range(n)]


def draw(base, prompts: Sequence[str], seeds: Sequence[int], steps: int = STEPS, cfg: float = CFG) -> list:
    """One picture per (prompt, seed) with the project's own pipeline (CPU generator: the same on any device)."""
    from trainer.infer.pipeline import build_pipeline, render_image

    pipe = build_pipeline(base, SAMPLER)
    return [render_image(pipe, base, p, "", s, steps, cfg, None, None, SAMPLER) for p, s in zip(prompts, seeds,
                                                                                                 strict=True)]


def prompt_following(base, n: int = 24, seed: int = 0, steps: int = STEPS, cfg: float = CFG
                     ) -> tuple[float, list[Followed]]:
    """The share of samples whose figure and figure colour are what the prompt asked for."""
    scenes = prompt_scenes(n, seed)
    imgs = draw(base, [s.caption() for s in scenes], list(range(seed, seed + n)), steps, cfg)
    res = [Followed(s, read(i)) for s, i in zip(scenes, imgs, strict=True)]
    return sum(r.shape_and_colour for r in res) / n, res


def write_dataset(folder, scenes: Sequence[Scene], trigger: str | None = None):
    """Training images of the scenes (img_i.png) with their captions (img_i.txt; a reserved concept is named by the
    trigger word)."""
    from pathlib import Path

    from trainer.toy.world import render

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(scenes):
        render(s).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(s.caption(trigger))
    return folder
