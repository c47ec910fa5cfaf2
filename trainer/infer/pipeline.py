"""The one Stable Diffusion pipeline builder, used by sampling during training, class images and previews.

`build_pipeline(base, sampler)` makes a diffusers StableDiffusion(XL)Pipeline that shares the BaseModel's modules
(nothing copied, no safety checker, no watermark); `render_image` is one txt2img call with a CPU generator, so a
seed gives the same image on any device.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from trainer.infer.live import LiveHook, step_callback

if TYPE_CHECKING:
    from PIL import Image

    from trainer.models.base import BaseModel

SAMPLER_NAMES = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim")


def make_scheduler(name: str, config: Mapping[str, Any]):
    """A diffusers sampler built from the base's scheduler config (prediction type, betas, spacing kept)."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    cfg = dict(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(cfg)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(cfg)
    if name in ("dpmpp_2m", "dpmpp_2m_karras"):
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                       use_karras_sigmas=name == "dpmpp_2m_karras")
    if name == "ddim":
        return DDIMScheduler.from_config(cfg)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}")


def build_pipeline(base: BaseModel, sampler: str = "euler"):
    """A txt2img pipeline sharing the BaseModel's modules (nothing copied, no safety checker)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sched = make_scheduler(sampler, base.noise_scheduler.config)
    if base.arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoders[0],
                                         text_encoder_2=base.text_encoders[1], tokenizer=base.tokenizers[0],
                                         tokenizer_2=base.tokenizers[1], unet=base.unet, scheduler=sched,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoders[0], tokenizer=base.tokenizers[0],
                                       unet=base.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def native_size(base: BaseModel) -> int:
    """The resolution the base was trained at (64 for tiny models, 512 SD1.5, 768 SD2, 1024 SDXL)."""
    vae_scale = 2 ** (len(base.vae.config.block_out_channels) - 1)
    return int(base.unet.config.sample_size) * vae_scale


@torch.no_grad()
def decode_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents (as the pipeline's denoising loop leaves them) -> images in [-1, 1], decoded in float32 with
    autocast off: an fp16 decode overflows (the known SDXL VAE problem) into black or NaN images. A VAE held in
    half precision is upcast once, for good (it is small)."""
    p = next(vae.parameters())
    if p.dtype != torch.float32:
        vae.to(dtype=torch.float32)
    cfg = vae.config
    x = latents.to(p.device, torch.float32)
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:  # as the SDXL pipeline unscales such VAEs
        x = x * torch.tensor(std).view(1, -1, 1, 1).to(x) / cfg.scaling_factor + torch.tensor(mean).view(
            1, -1, 1, 1).to(x)
    else:
        x = x / cfg.scaling_factor
    shift = getattr(cfg, "shift_factor", None)
    if shift:
        x = x + shift
    with torch.autocast(p.device.type, enabled=False):
        return vae.decode(x, return_dict=False)[0].float()


def render_image(pipe, base: BaseModel, prompt: str, negative: str, seed: int, steps: int, cfg: float,
                 width: int | None, height: int | None, sampler: str,
                 live: LiveHook | None = None) -> Image.Image:
    """One txt2img render. ``live(step, total, latents)`` sees the latents after each denoising step (a live
    preview, ``trainer.infer.live``); it cannot change them."""
    size = native_size(base)
    pipe.scheduler = make_scheduler(sampler, base.noise_scheduler.config)
    gen = torch.Generator("cpu").manual_seed(int(seed))  # CPU generator: same image for a seed on any device
    extra: dict[str, Any] = {}
    if live is not None:
        extra["callback_on_step_end"] = step_callback(live, int(steps))
    # The pipeline stops at the latents; the decode runs in float32 whatever the UNet's dtype or autocast.
    out = pipe(prompt=prompt, negative_prompt=negative or None, num_inference_steps=int(steps), guidance_scale=cfg,
               width=width or size, height=height or size, generator=gen, output_type="latent", **extra)
    return pipe.image_processor.postprocess(decode_latents(base.vae, out.images), output_type="pil")[0]
