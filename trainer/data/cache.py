"""What a job caches before its first step: VAE latents (when `data.cache_latents`) and text-encoder outputs
(auto: whenever captions are fixed and the text encoders are frozen), with the phase events a user sees.

On a GPU what is cached gives its memory back: the VAE leaves the card once latents are cached (unless samples
need it), the text encoders once their outputs are (~1.6 GB for SDXL); the loop brings them back for samples."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch

from trainer.events import EventSink, event

if TYPE_CHECKING:
    from trainer.data.dataset import TrainData
    from trainer.models.base import BaseModel
    from trainer.spec import TrainSpec

Progress = Callable[[str], Callable[[int, int], None]]  # phase name -> (current, total) counter


def cache_inputs(spec: TrainSpec, data: TrainData, base: BaseModel, device: torch.device, train_te: bool,
                 autocast: Callable[[], AbstractContextManager[Any]], emit: EventSink, progress: Progress) -> bool:
    """Fill the caches; True when the text encoders were moved off the GPU (their outputs are cached)."""
    if spec.data.cache_latents:
        data.cache_latents(base.vae, progress("caching latents"))
        if device.type == "cuda" and not spec.sample.prompts:
            base.vae.to("cpu")  # not needed again; give its memory to training
    else:
        data.check_images(progress("checking images"))
    want = spec.data.cache_text_encoder_outputs
    if want is None:  # auto: whenever it applies, quietly
        if train_te or data.captions_vary:
            return False
    elif want:
        if train_te:
            emit(event("log", level="warning",
                       message="cache_text_encoder_outputs is ignored while the text encoder trains"))
            return False
        if data.captions_vary:
            # kohya refuses this combination; presets turn caching on, so explain and train without it.
            emit(event("log", level="warning", message=(
                "cache_text_encoder_outputs is turned off: shuffle_tags / caption_dropout change the captions "
                "every step, so their text-encoder outputs cannot be cached (the text encoders run each step "
                "instead: a little slower, more memory)")))
            return False
    else:
        return False
    emit(event("phase", name="caching text encoder outputs"))
    with autocast():
        data.cache_text(base, device)
    if device.type != "cuda":
        return False
    for te in base.text_encoders:  # every caption is cached: training never runs them again
        te.to("cpu")
    return True


def phase_counter(name: str, emit: EventSink, should_stop: Callable[[], bool], on_stop: Callable[[], object],
                  every_s: float = 0.5) -> Callable[[int, int], None]:
    """A counter for a phase: `phase` events for the first, then at most one per `every_s`, and the last.

    Caching a big dataset takes minutes, so a stop is honoured here too (`on_stop()`), but asked at most once a
    second: a phase that takes less than a second adds no should_stop() calls (callers count on one per step).
    """
    last = [-1.0]
    checked = [time.monotonic()]

    def report(current: int, total: int) -> None:
        now = time.monotonic()
        if now - checked[0] >= 1.0:
            checked[0] = now
            if should_stop():
                on_stop()
        if current in (0, 1, total) or now - last[0] >= every_s:
            last[0] = now
            emit(event("phase", name=name, current=current, total=total))

    return report

