"""Validation loss on held-out images (kohya's validation_split), so a curve says when to stop.

- `split_validation(spec, items)`: the held-out instance images, chosen by `validation_seed` (default: the
  job's seed) and taken out of training: a fraction below 1 holds out len - ceil(len x (1 - fraction)) images
  (kohya's split_train_val, here over all instance images, not per subset), a whole number that many.
- `Validation`: every `validate_every_n_steps` steps and at the end, the denoising loss of each held-out image
  at kohya's fixed timesteps (linspace(min_timestep, max_timestep, 6)[1:-1]: 200, 400, 600, 800) with noise
  fixed per (image, timestep), no noise offset and the job's loss options (loss type, Huber schedule, min-SNR
  ...). The same weights therefore always give the same validation loss, and the curve is comparable across
  steps. The network runs in eval mode (no dropout). With `keep_best` the LoRA of the lowest validation loss is
  kept as `<output_name>-best.safetensors`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer.data.encode import encode_pixels, encode_text
from trainer.data.seeds import generator
from trainer.events import JobFailed, event
from trainer.train import losses as L

if TYPE_CHECKING:
    from trainer.data.dataset import ImageItem
    from trainer.spec import TrainSpec

NUM_TIMESTEPS = 4  # kohya's NUM_VALIDATION_TIMESTEPS


def held_out_count(split: float, n: int) -> int:
    if isinstance(split, float) and split < 1:
        return n - math.ceil(n * (1 - split))  # kohya's split_train_val
    return int(split)


def split_validation(spec: TrainSpec, items: Sequence[ImageItem], log: Callable[[str, str], None]
                     ) -> tuple[list[ImageItem], list[ImageItem]]:
    """(training items, held-out items); class images always train."""
    instance = [i for i, it in enumerate(items) if not it.is_class]
    n = held_out_count(spec.validation_split, len(instance)) if spec.validation_split else 0
    if not spec.validation_split:
        return list(items), []
    if n >= len(instance):
        raise JobFailed(f"validation_split = {spec.validation_split} holds out {n} of the {len(instance)} images: "
                        "none would be left to train on; hold out fewer or add images", reason="bad_input")
    if n == 0:
        log(f"validation_split = {spec.validation_split} of {len(instance)} images holds out none: no validation "
            "loss (give a count instead, e.g. validation_split = 1)", "warning")
        return list(items), []
    seed = spec.validation_seed if spec.validation_seed is not None else spec.seed
    random.Random(seed).shuffle(instance)
    held = set(instance[len(instance) - n:])  # kohya keeps the shuffled list's tail for validation
    return [it for i, it in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def validation_timesteps(min_t: int | None, max_t: int | None, total: int) -> list[int]:
    lo, hi = min_t or 0, total if max_t is None else max_t
    return [int(t) for t in np.linspace(lo, hi, NUM_TIMESTEPS + 2, dtype=int)[1:-1]]


class Validation:
    """The held-out images' fixed latents and noise, the curve so far and the best step. Without held-out
    images it is inert (never due, records nothing)."""

    def __init__(self, spec: TrainSpec, held: Sequence[ImageItem], total_timesteps: int):
        from trainer.data.dataset import TrainData

        self.spec = spec
        self.active = bool(held)
        self.data = TrainData.from_spec(spec, list(held)) if held else None  # the same crops as training
        self.every = spec.validate_every_n_steps or max(1, spec.steps // 10)
        self.timesteps = validation_timesteps(spec.min_timestep, spec.max_timestep, total_timesteps)
        self.seed = spec.validation_seed if spec.validation_seed is not None else spec.seed
        self.history: list[list[float]] = []  # [step, loss]
        self.best: tuple[int, float] | None = None  # (step, loss)
        self._fixed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []  # latents, time ids, mask

    def due(self, step: int) -> bool:
        return self.active and (step % self.every == 0 or step == self.spec.steps)

    @torch.no_grad()
    def loss(self, tr: Any) -> float:
        """The mean validation loss with the network as it is now (`tr`: the Trainer)."""
        base, device, data = tr.base, tr.device, self.data
        assert data is not None
        if not self._fixed:  # unflipped, and the latent distribution's mean: no sampling noise there either
            for i in range(len(data.items)):
                px, crop = data.pixels(i, False)
                tid = torch.tensor([[*crop.original_size, *crop.crop_top_left, *crop.target_size]],
                                   dtype=torch.float32)
                mask = data.mask_for(i, False)
                self._fixed.append((encode_pixels(base.vae, px[None]).cpu(), tid,
                                    None if mask is None else mask[None]))
        opts = L.LossOptions.from_spec(self.spec)
        models = [base.unet, *base.text_encoders]
        modes = [m.training for m in models]
        for m in models:
            m.eval()  # kohya validates with network.eval(): no dropout
        tr.text_encoders_to(device)
        total, n = 0.0, 0
        try:
            for i, it in enumerate(data.items):
                lat, tid, mask = self._fixed[i]
                lat = lat.to(device)
                with tr._autocast():
                    hidden, pooled = encode_text(base, [it.caption], device)
                for t in self.timesteps:
                    noise = torch.randn(lat.shape, generator=generator(self.seed, "validation", i, t)).to(device)
                    ts = torch.tensor([t], device=device)
                    noisy = tr.noise_scheduler.add_noise(lat, noise, ts)
                    target = L.target_for(tr.noise_scheduler, lat, noise, ts, tr.prediction_type)
                    with tr._autocast():
                        pred = L.unet_forward(base, noisy, ts, hidden, pooled, tid)
                    total += float(L.step_loss(pred, target, ts, tr.noise_scheduler, tr.snr_table,
                                               tr.prediction_type, opts, None, mask))
                    n += 1
        finally:
            tr.text_encoders_to("cpu")
            for m, mode in zip(models, modes, strict=True):
                m.train(mode)
        return total / max(n, 1)

    def run(self, tr: Any) -> float:
        """Validate at the trainer's step: record it, say it, keep the best LoRA when asked."""
        value = self.loss(tr)
        self.history.append([tr.step, value])
        if getattr(tr, "tb", None) is not None:
            tr.tb.validation(tr.step, value)
        better = self.best is None or value < self.best[1]
        if better:
            self.best = (tr.step, value)
            if self.spec.keep_best:
                from trainer.train import outputs as out
                from trainer.train.precision import SAVE_DTYPES

                tr.health.check_weights(tr.params, tr.step)
                path = tr.out_dir / f"{self.spec.output_name}-best.safetensors"
                out.save_lora(tr.network, path, tr.metadata(tr.step), SAVE_DTYPES[self.spec.save_precision])
                # role "best": the bot delivers it beside the final LoRA, never in its place
                tr.emit(event("file", kind="lora", path=str(path), step=tr.step, role="best"))
        tr.emit(event("log", level="info", message=f"validation loss {value:.5f} at step {tr.step}"
                      + (" (best so far)" if better else f" (best {self.best[1]:.5f} at step {self.best[0]})")))
        return value

    def state(self) -> dict[str, Any] | None:
        return {"history": self.history, "best": list(self.best) if self.best else None} if self.active else None

    def restore(self, saved: dict[str, Any] | None) -> None:
        if saved and self.active:
            self.history = [list(x) for x in saved.get("history", [])]
            self.best = (int(saved["best"][0]), float(saved["best"][1])) if saved.get("best") else None

    def metadata(self) -> dict[str, str]:
        """kohya's ss_num_validation_images, and where the best step was (when there was one)."""
        if self.data is None:
            return {}
        md = {"ss_num_validation_images": str(len(self.data.items))}
        if self.best is not None:
            md["loraforge_best_validation"] = f"step {self.best[0]}: {self.best[1]:.6g}"
        return md

    def outputs(self, out_dir: Path) -> dict[str, str]:
        if not (self.spec.keep_best and self.best):
            return {}
        return {"best_lora": str(out_dir / f"{self.spec.output_name}-best.safetensors")}

    def summary(self) -> dict[str, Any]:
        if self.best is None:
            return {}
        return {"validation_loss": self.history[-1][1], "best_validation_step": self.best[0],
                "best_validation_loss": self.best[1]}
