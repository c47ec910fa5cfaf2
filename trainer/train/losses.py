"""The loss maths of one training step, and the fixed-noise evaluation loss.

Per-sample l2/l1/pseudo-Huber/smooth-l1 loss with kohya's Huber schedules, the SNR-based weightings kohya
offers (min-SNR-gamma, scale_v_pred_loss_like_noise_pred, v_pred_like_loss, debiased estimation), the epsilon /
v-prediction target, and the UNet call with SDXL's extra conditioning. Noise and timesteps: trainer.train.noise.
Each piece is a plain function so tests can check it alone, against kohya sd-scripts' formulas
(library/train_util.py, library/custom_train_functions.py) on identical inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from trainer.data.encode import encode_pixels, encode_text
from trainer.data.seeds import generator
from trainer.events import JobFailed
from trainer.train.noise import make_noise, sample_timesteps

__all__ = ["make_noise", "sample_timesteps"]  # re-exported: older callers import them from here

if TYPE_CHECKING:
    from trainer.data.dataset import Batch, TrainData


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                    huber_c: float | torch.Tensor = 0.1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss per sample, [b], in float32 (kohya's conditional_loss, then the mean over all but the batch).
    huber_c: one value or one per sample (a Huber schedule). mask: [b, 1, H, W] uint8 loss masks, averaged down
    to the loss's grid and multiplied in before the mean (kohya's apply_masked_loss)."""
    pred, target = pred.float(), target.float()
    if isinstance(huber_c, torch.Tensor):
        huber_c = huber_c.float().to(pred.device).view(-1, *([1] * (pred.ndim - 1)))
    if loss_type == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    elif loss_type == "huber":
        # kohya's pseudo-Huber: quadratic near 0, linear far away, scaled so both ends match l2/l1 shapes.
        loss = 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    elif loss_type == "smooth_l1":
        # kohya's smooth_l1: the same curve without the factor c, so its far end is l1 for any c.
        loss = 2 * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    if mask is not None:
        from trainer.data.masks import to_loss_grid

        loss = loss * to_loss_grid(mask, loss)
    return loss.mean(dim=list(range(1, loss.ndim)))


def huber_threshold(timesteps: torch.Tensor, schedule: str, huber_c: float, huber_scale: float,
                    alphas_cumprod: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """kohya's get_huber_threshold_if_needed: the per-sample Huber c.
    constant: c * scale;  exponential: scale * exp(ln(c) t / T) (scale at t=0, c * scale at t=T);
    snr: (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - abar_t) / abar_t) (~0.95 at t=0, ~c at t=999)."""
    t = timesteps.cpu()
    if schedule == "constant":
        return torch.full((t.shape[0],), huber_c * huber_scale)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / num_train_timesteps
        return torch.exp(-alpha * t) * huber_scale
    if schedule == "snr":
        ac = torch.index_select(alphas_cumprod.cpu(), 0, t)
        sigmas = ((1.0 - ac) / ac) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ValueError(f"unknown huber_schedule {schedule!r}")


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1 - ac)


def snr_scale(snr_t: torch.Tensor) -> torch.Tensor:
    """kohya's get_snr_scale: snr / (snr + 1), snr capped at 1000 (t = 0 would be inf)."""
    snr_t = torch.clamp(snr_t, max=1000.0)
    return snr_t / (snr_t + 1)


def debiased_weight(snr_t: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """kohya's apply_debiased_estimation (arXiv 2310.08442): 1/sqrt(snr); v-prediction 1/(snr + 1); snr capped
    at 1000."""
    snr_t = torch.clamp(snr_t, max=1000.0)
    return 1 / (snr_t + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(snr_t)


@dataclass(frozen=True)
class LossOptions:
    """The loss options of a training spec, kohya's names."""

    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    huber_scale: float = 1.0
    min_snr_gamma: float | None = None
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float | None = None
    debiased_estimation_loss: bool = False

    @classmethod
    def from_spec(cls, spec: object) -> LossOptions:
        return cls(**{f: getattr(spec, f) for f in cls.__dataclass_fields__})


def step_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler,
              snr_table: torch.Tensor, prediction_type: str, opts: LossOptions,
              loss_weight: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """kohya's loss of one step (train_network.process_batch + post_process_loss), in its order:
    per-sample loss (Huber c from the schedule) -> per-sample weights -> min-SNR -> scale_v_pred_loss_like_noise_pred
    -> v_pred_like_loss -> debiased estimation -> batch mean.
    snr_table: SNR per timestep of the schedule BEFORE any zero-terminal-SNR rescale (kohya computes all_snr
    first), so the weights stay finite at the last timestep; the Huber 'snr' schedule uses `scheduler`'s own."""
    c: float | torch.Tensor = opts.huber_c
    if opts.loss_type in ("huber", "smooth_l1"):
        c = huber_threshold(timesteps, opts.huber_schedule, opts.huber_c, opts.huber_scale,
                            scheduler.alphas_cumprod, scheduler.config.num_train_timesteps)
    loss = per_sample_loss(pred, target, opts.loss_type, c, mask)
    if loss_weight is not None:
        loss = loss * loss_weight.to(loss)
    snr_t = snr_table.to(loss.device)[timesteps.to(loss.device)].float()
    if opts.min_snr_gamma:
        clipped = torch.clamp(snr_t, max=opts.min_snr_gamma)
        loss = loss * (clipped / (snr_t + 1) if prediction_type == "v_prediction" else clipped / snr_t)
    if opts.scale_v_pred_loss_like_noise_pred:
        loss = loss * snr_scale(snr_t)
    if opts.v_pred_like_loss:
        loss = loss + loss / snr_scale(snr_t) * opts.v_pred_like_loss
    if opts.debiased_estimation_loss:
        loss = loss * debiased_weight(snr_t, prediction_type)
    return loss.mean()


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                   prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023), kohya's form: eps min(snr, g)/snr; v-pred min(snr, g)/(snr + 1)."""
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s


def target_for(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise JobFailed(f"prediction type {prediction_type!r} is not supported; use epsilon or v_prediction",
                    reason="bad_input")


def weighted_loss(per_sample: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler,
                  prediction_type: str, min_snr_gamma: float | None, loss_weight: torch.Tensor | None
                  ) -> torch.Tensor:
    """per-sample loss -> min-SNR weighting -> per-sample weights (prior preservation) -> batch mean."""
    loss = per_sample
    if min_snr_gamma:
        loss = loss * min_snr_weight(scheduler.alphas_cumprod, timesteps, min_snr_gamma, prediction_type).to(loss)
    if loss_weight is not None:
        loss = loss * loss_weight.to(loss)
    return loss.mean()


def unet_forward(base: Any, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                 pooled: torch.Tensor | None, add_time_ids: torch.Tensor | None) -> torch.Tensor:
    kwargs: dict[str, Any] = {}
    if base.arch == "sdxl":
        if pooled is None or add_time_ids is None:
            raise RuntimeError("SDXL needs pooled text embeds and add_time_ids")
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": add_time_ids.to(noisy.device)}
    return base.unet(noisy, timesteps, encoder_hidden_states=hidden, **kwargs).sample


def batch_latents(data_batch: Batch, base: Any, device: torch.device, gen: torch.Generator | None) -> torch.Tensor:
    if data_batch.latents is not None:
        return data_batch.latents.to(device)
    assert data_batch.pixels is not None
    return encode_pixels(base.vae, data_batch.pixels, gen).to(device)


@torch.no_grad()
def eval_denoise_loss(base: Any, data: TrainData, prediction_type: str | None = None, device: str = "cpu",
                      seed: int = 0, timesteps: Sequence[int] = (50, 200, 400, 600, 800), draws: int = 2) -> float:
    """The plain l2 denoising loss over every training image at FIXED noise and timesteps.

    Used to check that training learned the images: the same numbers before and after, the network
    being whatever is currently injected into `base`.
    """
    sched = DDPMScheduler.from_config(base.noise_scheduler.config)
    pred = prediction_type or str(sched.config.prediction_type)
    total, n = 0.0, 0
    for i, it in enumerate(data.items):
        px, crop = data.pixels(i, False)
        lat = encode_pixels(base.vae, px[None]).to(device)
        hidden, pooled = encode_text(base, [it.caption], device)
        tid = torch.tensor([[*crop.original_size, *crop.crop_top_left, *crop.target_size]], dtype=torch.float32)
        for t in timesteps:
            for d in range(draws):
                noise = torch.randn(lat.shape, generator=generator(seed, i, t, d)).to(device)
                ts = torch.tensor([t], device=device)
                noisy = sched.add_noise(lat, noise, ts)
                out = unet_forward(base, noisy, ts, hidden, pooled, tid)
                total += float(per_sample_loss(out, target_for(sched, lat, noise, ts, pred)).mean())
                n += 1
    return total / n
