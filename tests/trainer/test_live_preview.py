"""The live preview a /preview user sees while the image forms: the cheap latent decode, throttled, never changing
the image that is delivered."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import trainer.infer.sample as sample_mod
from trainer.infer.live import LATENT_RGB, PREVIEW_SIDE, LivePreview, latents_to_rgb
from trainer.infer.sample import run_preview_job
from trainer.spec import parse_job


@pytest.mark.parametrize("space", ["sd", "sdxl"])
def test_the_cheap_decode_shows_the_colour_the_latents_hold(space: str) -> None:
    factors, bias = LATENT_RGB[space]
    f = torch.tensor(factors)  # (4, 3): latent channel -> RGB
    for rgb, channel in (((0.9, -0.9, -0.9), 0), ((-0.9, 0.9, -0.9), 1), ((-0.9, -0.9, 0.9), 2)):
        # the smallest latent whose cheap decode is this colour
        lat = torch.linalg.pinv(f.T) @ (torch.tensor(rgb) - torch.tensor(bias))
        latents = lat.view(1, 4, 1, 1).expand(1, 4, 16, 24).clone()
        img = latents_to_rgb(latents, space)
        assert img.size == (PREVIEW_SIDE, round(PREVIEW_SIDE * 16 / 24))  # the longer side, aspect kept
        px = np.asarray(img, dtype=float).reshape(-1, 3).mean(0)
        assert px.argmax() == channel and px[channel] > 200 and px.min() < 60, (rgb, px)


def test_previews_are_throttled_and_skip_the_last_step(tmp_path) -> None:
    now = [0.0]
    events: list[dict] = []
    live = LivePreview(tmp_path / "live.png", "sd", events.append, every_s=2.0, clock=lambda: now[0])
    lat = torch.zeros(1, 4, 8, 8)
    for step in range(10):  # one step per second
        now[0] += 1.0
        live(step, 10, lat)
    assert [e["step"] for e in events] == [2, 4, 6, 8]  # every 2 s, and not the 10th (the real image follows)
    assert all(e["type"] == "preview" and e["total"] == 10 for e in events)
    assert Image.open(tmp_path / "live.png").size == (PREVIEW_SIDE, PREVIEW_SIDE)


def test_a_preview_job_shows_live_previews_and_delivers_the_same_image(tmp_path, monkeypatch) -> None:
    spec = parse_job({"kind": "preview", "base_model": "tiny-sd15",
                      "grid": {"prompt": "a red circle", "strengths": [1.0], "seeds": [7], "steps": 6},
                      "output_name": "one"})
    ctx: dict = {}
    quiet = run_preview_job(spec, tmp_path / "quiet", context=ctx)  # previews every 2 s: none in a tiny render
    monkeypatch.setattr(sample_mod, "LIVE_EVERY_S", 0.0)
    events: list[dict] = []
    shown = run_preview_job(spec, tmp_path / "live", events.append, context=ctx)
    previews = [e for e in events if e["type"] == "preview"]
    assert [e["step"] for e in previews] == [1, 2, 3, 4, 5]
    assert Image.open(previews[-1]["path"]).size == (PREVIEW_SIDE, PREVIEW_SIDE)
    # watching the render does not change what is delivered
    assert np.array_equal(np.asarray(Image.open(quiet["image"])), np.asarray(Image.open(shown["image"])))
    grid = parse_job({"kind": "preview", "base_model": "tiny-sd15",
                      "grid": {"prompt": "a red circle", "strengths": [1.0], "seeds": [1, 2], "steps": 3}})
    events.clear()
    run_preview_job(grid, tmp_path / "grid", events.append, context=ctx)
    labels = [e["label"] for e in events if e["type"] == "preview"]
    assert labels[0].endswith("(1 of 2)") and labels[-1].endswith("(2 of 2)") and "seed 2" in labels[-1]
