"""Training noise and timesteps with kohya sd-scripts' options, every draw from the step's seeded generator.

kohya's order (train_util.get_noise_noisy_latents_and_timesteps): noise -> offset noise (optionally of random
strength, optionally adaptive to the latents' channel means) -> multires (pyramid) noise -> timesteps in
[min_timestep, max_timestep) -> noisy latents, with input-perturbation noise (ip_noise_gamma) added to the
noise that makes the noisy latents but not to the target. kohya draws from torch's global RNG and python's
`random`; here every draw comes from `gen`, in the same order, so a step is reproducible on resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


@dataclass(frozen=True)
class NoiseOptions:
    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int | None = None
    max_timestep: int | None = None

    @classmethod
    def from_spec(cls, spec: object) -> NoiseOptions:
        return cls(**{f: getattr(spec, f) for f in cls.__dataclass_fields__})


def offset_noise(noise: torch.Tensor, latents: torch.Tensor, gen: torch.Generator, offset: float | torch.Tensor,
                 adaptive_noise_scale: float | None = None) -> torch.Tensor:
    """kohya's apply_noise_offset: a per-channel constant shift of size `offset` (plus, when adaptive,
    adaptive_noise_scale x |the channel's latent mean|, floored at 0) teaches overall brightness."""
    if adaptive_noise_scale is not None:
        latent_mean = torch.abs(latents.float().mean(dim=(2, 3), keepdim=True)).cpu()
        offset = torch.clamp(offset + adaptive_noise_scale * latent_mean, 0.0, None)
    return noise + offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen)


def pyramid_noise(noise: torch.Tensor, gen: torch.Generator, iterations: int = 6, discount: float = 0.4
                  ) -> torch.Tensor:
    """kohya's pyramid_noise_like (multires noise): coarser noise at random scale steps r in [2, 4), each
    bilinearly upsampled and damped by discount^i, then rescaled to unit std."""
    b, c, w, h = noise.shape
    noise = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=gen)) * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        coarse = torch.randn((b, c, wn, hn), generator=gen)
        noise += F.interpolate(coarse, size=(w, h), mode="bilinear") * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def make_noise(shape: Sequence[int], gen: torch.Generator, noise_offset: float = 0.0,
               latents: torch.Tensor | None = None, opts: NoiseOptions | None = None) -> torch.Tensor:
    """The noise of one step (on the CPU): plain, offset, multires as `opts` (or just `noise_offset`) ask."""
    opts = opts or NoiseOptions(noise_offset=noise_offset)
    noise = torch.randn(tuple(shape), generator=gen)
    if opts.noise_offset:
        offset: float | torch.Tensor = opts.noise_offset
        if opts.noise_offset_random_strength:
            offset = torch.rand(1, generator=gen) * opts.noise_offset
        ref = latents if latents is not None else noise
        noise = offset_noise(noise, ref, gen, offset, opts.adaptive_noise_scale)
    if opts.multires_noise_iterations:
        noise = pyramid_noise(noise, gen, opts.multires_noise_iterations, opts.multires_noise_discount)
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, gen: torch.Generator, min_timestep: int | None = None,
                     max_timestep: int | None = None) -> torch.Tensor:
    """kohya's get_timesteps: uniform in [min, max) (defaults 0 and num_train_timesteps), or all max when
    min >= max."""
    lo = 0 if min_timestep is None else min_timestep
    hi = num_train_timesteps if max_timestep is None else max_timestep
    if lo < hi:
        return torch.randint(lo, hi, (batch,), generator=gen, dtype=torch.long)
    return torch.full((batch,), hi, dtype=torch.long)


def noisy_latents(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  gen: torch.Generator, opts: NoiseOptions) -> torch.Tensor:
    """The UNet's input. With ip_noise_gamma, input perturbation (arXiv 2301.11706): extra noise in the input
    only, the target keeps `noise`."""
    if opts.ip_noise_gamma:
        strength: float | torch.Tensor = opts.ip_noise_gamma
        if opts.ip_noise_gamma_random_strength:
            strength = (torch.rand(1, generator=gen) * opts.ip_noise_gamma).to(latents.device)
        extra = torch.randn(tuple(latents.shape), generator=gen).to(latents.device, latents.dtype)
        return scheduler.add_noise(latents, noise + strength * extra, timesteps)
    return scheduler.add_noise(latents, noise, timesteps)


def training_scheduler(config: object, prediction_type: str, zero_terminal_snr: bool = False) -> DDPMScheduler:
    """The DDPM schedule training noises with; zero_terminal_snr rescales its betas so the last timestep is pure
    noise (Lin et al. 2023, arXiv 2305.08891; kohya's --zero_terminal_snr; diffusers' rescale_betas_zero_snr)."""
    return DDPMScheduler.from_config(config, prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr)
