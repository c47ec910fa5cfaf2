"""Prior preservation: class images generated exactly as needed and reused; the DreamBooth loss composition."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image

from trainer.events import JobCancelled, JobFailed
from trainer.spec import Concept
from trainer.train.prior import (
    MANIFEST,
    class_cache_dir,
    combine_losses,
    ensure_class_images,
    list_class_images,
    prior_weights,
)


class RecordingRender:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int, int]] = []

    def __call__(self, prompt: str, seed: int, width: int, height: int) -> Image.Image:
        self.calls.append((prompt, seed, width, height))
        return Image.new("RGB", (width, height), (seed % 256, 0, 0))


def _save(path: Path, color: tuple[int, int, int] = (1, 2, 3)) -> None:
    Image.new("RGB", (32, 32), color).save(path)


def test_count_zero_means_no_regularization(tmp_path: Path) -> None:
    r = RecordingRender()
    concept = Concept(image_dir=str(tmp_path), class_prompt="girl", class_count=0)
    assert ensure_class_images(concept, None, "tiny-sd15", tmp_path, render=r) == []
    assert r.calls == [] and not (tmp_path / "class_images").exists()


def test_generates_exactly_the_missing_images_then_reuses(tmp_path: Path) -> None:
    class_dir = tmp_path / "reg"
    class_dir.mkdir()
    for i in range(2):  # two images from elsewhere: they count
        _save(class_dir / f"mine_{i}.jpg")
    concept = Concept(image_dir=str(tmp_path), class_prompt="girl", class_dir=str(class_dir), class_count=5)
    r, events = RecordingRender(), []
    paths = ensure_class_images(concept, None, "tiny-sd15", tmp_path / "cache", render=r, on_event=events.append,
                                resolution=64)
    assert len(paths) == 5 and len(list_class_images(class_dir)) == 5
    assert [c[0] for c in r.calls] == ["girl"] * 3
    assert all(c[2:] == (64, 64) for c in r.calls)
    assert len({c[1] for c in r.calls}) == 3  # a seed per index
    generated = sorted(class_dir.glob("class_*.png"))
    assert [p.name for p in generated] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    for p in generated:
        assert p.with_suffix(".txt").read_text().strip() == "girl"
    manifest = json.loads((class_dir / MANIFEST).read_text())
    assert manifest["base_model"] == "tiny-sd15" and manifest["class_prompt"] == "girl"
    assert manifest["count"] == 5 and manifest["resolution"] == 64 and len(manifest["generated"]) == 3
    assert not [p for p in class_dir.iterdir() if p.name.startswith(".")]  # no temporary files left
    phases = [e for e in events if e["type"] == "phase"]
    assert phases[0]["name"] == "generating class images"
    assert [(e["current"], e["total"]) for e in phases] == [(0, 3), (1, 3), (2, 3), (3, 3)]

    r2 = RecordingRender()
    assert ensure_class_images(concept, None, "tiny-sd15", tmp_path / "cache", render=r2) == paths
    assert r2.calls == []  # second run: nothing generated


def test_cache_folder_keyed_by_model_and_prompt(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    r = RecordingRender()
    girl = Concept(image_dir=str(tmp_path), class_prompt="girl", class_count=2)
    woman = Concept(image_dir=str(tmp_path), class_prompt="woman", class_count=2)
    a = ensure_class_images(girl, None, "tiny-sd15", cache, render=r, resolution=64)
    assert a[0].parent == class_cache_dir(cache, "tiny-sd15", "girl")
    assert len(r.calls) == 2
    b = ensure_class_images(woman, None, "tiny-sd15", cache, render=r, resolution=64)
    assert b[0].parent != a[0].parent and len(r.calls) == 4 and r.calls[-1][0] == "woman"
    c = ensure_class_images(girl, None, "tiny-sdxl", cache, render=r, resolution=64)
    assert c[0].parent not in (a[0].parent, b[0].parent) and len(r.calls) == 6
    # the same model and prompt again: reused; asking for more generates only the extra one
    assert ensure_class_images(girl, None, "tiny-sd15", cache, render=r) == a and len(r.calls) == 6
    more = Concept(image_dir=str(tmp_path), class_prompt="girl", class_count=3)
    assert len(ensure_class_images(more, None, "tiny-sd15", cache, render=r, resolution=64)) == 3
    assert len(r.calls) == 7
    # a folder with more than asked for: exactly class_count are used
    assert ensure_class_images(girl, None, "tiny-sd15", cache, render=r) == a


def test_stop_resume_gives_the_same_files(tmp_path: Path) -> None:
    concept = Concept(image_dir=str(tmp_path), class_prompt="girl", class_count=4)
    r = RecordingRender()
    checks = iter([False, False, True])
    with pytest.raises(JobCancelled):
        ensure_class_images(concept, None, "m", tmp_path, render=r, should_stop=lambda: next(checks), resolution=64)
    assert len(r.calls) == 2
    ensure_class_images(concept, None, "m", tmp_path, render=r, resolution=64)
    full = RecordingRender()
    ensure_class_images(concept, None, "m", tmp_path / "other", render=full, resolution=64)
    assert r.calls == full.calls  # same indices, same seeds as an uninterrupted run


def test_explicit_dir_without_prompt(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    reg.mkdir()
    _save(reg / "a.png")
    enough = Concept(image_dir=str(tmp_path), class_dir=str(reg), class_count=1)
    assert ensure_class_images(enough, None, "m", tmp_path, render=RecordingRender()) == [reg / "a.png"]
    short = Concept(image_dir=str(tmp_path), class_dir=str(reg), class_count=3)
    with pytest.raises(JobFailed, match="class_prompt"):
        ensure_class_images(short, None, "m", tmp_path, render=RecordingRender())


def test_default_render_with_tiny_sd15(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    from trainer.models.load import load_base

    base = load_base("tiny-sd15")
    concept = Concept(image_dir=str(tmp_path), class_prompt="girl", class_count=3)
    paths = ensure_class_images(concept, base, "tiny-sd15", tmp_path, steps=2)
    assert len(paths) == 3
    sizes = set()
    for p in paths:
        with Image.open(p) as im:
            sizes.add(im.size)
    assert sizes == {(64, 64)}  # the tiny model's native resolution
    assert json.loads((paths[0].parent / MANIFEST).read_text())["steps"] == 2
    assert len({p.read_bytes() for p in paths}) == 3  # different seeds, different images


def test_combine_losses_is_dreambooth_formula_and_weights_agree() -> None:
    loss = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0])
    is_class = torch.tensor([False, False, True, True, True])
    w = 0.5
    expected = (1.0 + 3.0) / 2 + w * (10.0 + 20.0 + 30.0) / 3
    assert combine_losses(loss, is_class, w).item() == pytest.approx(expected)
    assert (loss * prior_weights(is_class, w)).mean().item() == pytest.approx(expected)
    # only one group in the batch: that group's mean (weighted for class)
    assert combine_losses(loss[:2], is_class[:2], w).item() == pytest.approx(2.0)
    assert combine_losses(loss[2:], is_class[2:], w).item() == pytest.approx(w * 20.0)
    for sl in (slice(0, 2), slice(2, 5), slice(1, 4)):
        assert (loss[sl] * prior_weights(is_class[sl], w)).mean().item() == pytest.approx(
            combine_losses(loss[sl], is_class[sl], w).item())
    # per-pixel losses are reduced per sample first; gradients flow
    pix = torch.ones(5, 4, 8, 8, requires_grad=True)
    total = combine_losses(pix * loss.view(5, 1, 1, 1), is_class, w)
    total.backward()
    assert total.item() == pytest.approx(expected)
    assert pix.grad is not None
