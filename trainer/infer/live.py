"""A live preview of an image while it is being sampled: the cheap decode A1111 and ComfyUI show.

The VAE decode is the slowest part of a preview on a small card and a full decode per step would double the render
time, so the preview maps the 4 latent channels to RGB with one linear map per architecture (the "approx cheap"
latent-to-RGB factors both tools use), then scales the latent-sized picture up. It is written at most every
``every_s`` seconds, atomically, and announced with a ``preview`` event the bot shows in the job's progress message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer.atomic import write_with
from trainer.events import EventSink, event

# Latent channel -> (R, G, B) factors and bias, per latent space (SD1.x and SD2.x share the SD VAE's latents).
LATENT_RGB: dict[str, tuple[list[list[float]], list[float]]] = {
    "sd": ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721],
            [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0]),
    "sdxl": ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362],
              [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
}
LiveHook = Callable[[int, int, torch.Tensor], None]  # (step, total steps, latents) after each step
PREVIEW_SIDE = 256  # pixels on the longer side: enough to see the composition form, small to upload


def latent_space(arch: str) -> str:
    return "sdxl" if arch == "sdxl" else "sd"


def latents_to_rgb(latents: torch.Tensor, space: str) -> Image.Image:
    """The first latent of a (B, 4, h, w) batch as an RGB picture, PREVIEW_SIDE pixels on its longer side."""
    factors, bias = LATENT_RGB[space]
    x = latents[0].detach().float().cpu()
    if x.shape[0] != len(factors):
        raise ValueError(f"a live preview needs {len(factors)} latent channels, these latents have {x.shape[0]}")
    rgb = torch.einsum("chw,cr->rhw", x, torch.tensor(factors)) + torch.tensor(bias).view(3, 1, 1)
    arr = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    scale = PREVIEW_SIDE / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)


class LivePreview:
    """Called by the pipeline after each denoising step; writes ``path`` and emits ``preview`` at most every
    ``every_s`` seconds (never on the last step: the real image follows at once)."""

    def __init__(self, path: Path, space: str, on_event: EventSink, every_s: float = 2.0,
                 label: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.space, self.on_event = Path(path), space, on_event
        self.every_s, self.label, self.clock = every_s, label, clock
        self.last = clock()  # the first preview comes after every_s, once there is something to see
        self.written = 0

    def __call__(self, step: int, total: int, latents: torch.Tensor) -> None:
        now = self.clock()
        if step + 1 >= total or now - self.last < self.every_s:
            return
        self.last = now
        img = latents_to_rgb(latents, self.space)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_with(self.path, lambda f: img.save(f, format="PNG"))
        self.written += 1
        self.on_event(event("preview", path=str(self.path), step=step + 1, total=total, label=self.label))


def step_callback(live: LiveHook, total: int) -> Callable[..., dict[str, Any]]:
    """A diffusers ``callback_on_step_end`` that hands each step's latents to ``live``."""

    def on_step_end(_pipe: Any, step: int, _timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        live(step, total, kwargs["latents"])
        return kwargs

    return on_step_end
