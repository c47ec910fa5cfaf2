"""The concept-LoRA recipe measured to learn on the shipped toy-sd15 (tests/trainer/test_learning.py): ten pictures
of a checkered background (a pattern the base never saw) captioned with the trigger word, 300 steps.

Torch-free (plain dicts), so the bot's demo, the engine's demo and the learning tests share one recipe.

Why checkered and not the star: the third-round toy VAE decoded a star as a circle (1 of 16 star scenes read back
as a star; the fourth round's: 5 of 16, large ones only); it keeps the checkers. Why 300 steps (measured on the
third-round toy-sd15): at 100 the checkers did not show yet (0 of 12 samples), at 300 in 10 of 12 at strength 1
(the fourth-round base: 8 of 12); at 500 strength 0.5 drew stripes (docs/toy-world.md, "Learning").
"""

from __future__ import annotations

from typing import Any

TRIGGER = "zqx"
CONCEPT = "checkered"
N_IMAGES = 10
SCENE_SEED = 11  # concept_scenes(CONCEPT, N_IMAGES, seed=SCENE_SEED): the training pictures
STEPS = 300


def concept_lora_overrides(steps: int = STEPS) -> dict[str, Any]:
    """TrainSpec fields of the recipe (add base_model, output_name and the concept's image_dir)."""
    return {
        "steps": steps,
        "seed": 5,
        "batch_size": 2,
        "network": {"dim": 8, "alpha": 8},
        "optimizer": {"name": "AdamW", "lr": 3e-3, "scheduler": "constant", "weight_decay": 0.0},
        "data": {"resolution": 64},
    }
