"""Shared fixtures for the training-engine tests: offline, one thread, small real image folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

torch.set_num_threads(1)  # tiny ops crawl when two threads fight over a busy core

# The recipe the demo uses too: it lowers the fixed-noise denoising loss by >= 30% on the tiny models.
RECIPE: dict[str, Any] = {
    "optimizer": {"name": "AdamW", "lr": 1e-2, "scheduler": "constant", "weight_decay": 0.0},
    "network": {"dim": 4, "alpha": 4},
    "data": {"resolution": 64},
    "steps": 60,
    "batch_size": 1,
    "save_precision": "fp32",
}


def draw_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A deterministic picture with flat shapes (learnable structure, unlike noise)."""
    g = torch.Generator().manual_seed(seed)
    colors = [tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g)) for _ in range(4)]
    img = Image.new("RGB", size, colors[0])
    d = ImageDraw.Draw(img)
    w, h = size
    d.ellipse([w * 0.2, h * 0.15, w * 0.7, h * 0.65], fill=colors[1])
    d.rectangle([w * 0.5, h * 0.5, w * 0.95, h * 0.9], fill=colors[2])
    d.line([(0, h - 1), (w - 1, 0)], fill=colors[3], width=max(2, w // 16))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_dataset(folder: Path, n: int = 2, size: tuple[int, int] = (80, 64),
                 captions: tuple[str | None, ...] = ("red dress, smiling", "blue hat")) -> Path:
    """n images (img_0.png ...) with captions[i] in img_i.txt (None or past the end: no caption file)."""
    for i in range(n):
        draw_image(folder / f"img_{i}.png", size, seed=100 + i)
        cap = captions[i] if i < len(captions) else None
        if cap is not None:
            (folder / f"img_{i}.txt").write_text(cap)
    return folder


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "images")


@pytest.fixture(scope="module")
def module_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "images")


def deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def make_spec() -> Callable[..., Any]:
    """make_spec(image_dir, **overrides) -> TrainSpec built on RECIPE (nested dicts merge)."""
    from trainer.spec import TrainSpec

    def build(image_dir: Path | str, **over: Any) -> TrainSpec:
        values = deep_update({**RECIPE, "concepts": [{"image_dir": str(image_dir), "instance_prompt": "scs girl"}],
                              "state_every_n_steps": 1000}, over)
        return TrainSpec.model_validate(values)

    return build


@pytest.fixture
def dataset_factory() -> Callable[..., Path]:
    """make_dataset as a fixture (tests do not import conftest modules by name)."""
    return make_dataset


@pytest.fixture
def recipe() -> dict[str, Any]:
    return deep_update(RECIPE, {})


class StopAfter:
    """An event sink + stop check pair: stop() turns True before training step n+1.

    It counts only the checks made once training has begun (the engine also checks while caching).
    """

    def __init__(self, n: int):
        self.n = n
        self.events: list[dict[str, Any]] = []
        self._checks = 0

    def sink(self, ev: dict[str, Any]) -> None:
        self.events.append(ev)

    def stop(self) -> bool:
        if not any(e["type"] == "phase" and e["name"] == "training" for e in self.events):
            return False
        self._checks += 1
        return self._checks > self.n


@pytest.fixture
def stop_after() -> Callable[[int], StopAfter]:
    return StopAfter
