"""The loss maths of one training step, and the fixed-noise evaluation loss.

Per-sample l2/l1/pseudo-Huber loss, min-SNR-gamma weighting, noise (with offset) and timesteps drawn from a
seeded generator, the epsilon / v-prediction target, and the UNet call with SDXL's extra conditioning. Each piece
is a plain function so tests can check it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from trainer.data.encode import encode_pixels, encode_text
from trainer.data.seeds import generator
from trainer.events import JobFailed

if TYPE_CHECKING:
    from trainer.data.dataset import Batch, TrainData


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.1
                    ) -> torch.Tensor:
    """Mean loss per sample, [b], in float32."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    elif loss_type == "huber":
        # kohya's pseudo-Huber: quadratic near 0, linear far away, scaled so both ends match l2/l1 shapes.
        loss = 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return loss.mean(dim=list(range(1, loss.ndim)))


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1 - ac)


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                   prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023), kohya's form: eps min(snr, g)/snr; v-pred min(snr, g)/(snr + 1)."""
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s


def make_noise(shape: Sequence[int], gen: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    noise = torch.randn(tuple(shape), generator=gen)
    if noise_offset:
        # A per-channel constant shift teaches the model to change the image's overall brightness.
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=gen)
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=gen, dtype=torch.long)


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
