"""Encoding for the UNet: captions -> text-encoder outputs, pixels -> scaled VAE latents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trainer.models.base import BaseModel


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_text(base: BaseModel, captions: Sequence[str], device: torch.device | str
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(encoder_hidden_states, pooled or None) as the UNet of this architecture expects them.

    SD1/SD2: the last hidden state (clip skip 1; diffusers' convention for SD2 too).
    SDXL: TE1 and TE2 penultimate hidden states concatenated on the channel axis; pooled = TE2's projected
    text embeds. Runs with whatever grad mode the caller set (text-encoder training needs grads).
    """
    if base.arch != "sdxl":
        ids = tokenize(base.tokenizers[0], captions).to(device)
        return base.text_encoders[0](ids).last_hidden_state, None
    hidden = []
    pooled = None
    for te, tok in zip(base.text_encoders, base.tokenizers, strict=True):
        out = te(tokenize(tok, captions).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return torch.cat(hidden, dim=-1), pooled


# --- latents -----------------------------------------------------------------------------------

def vae_scale(vae, dist_sample: torch.Tensor) -> torch.Tensor:
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        dist_sample = dist_sample - shift
    return dist_sample * vae.config.scaling_factor


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents; the distribution's mean when no generator is given, a seeded sample otherwise."""
    vdtype = next(vae.parameters()).dtype
    vdev = next(vae.parameters()).device
    dist = vae.encode(pixels.to(vdev, vdtype)).latent_dist
    if gen is None:
        lat = dist.mean
    else:
        lat = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dist.mean.device, dist.mean.dtype)
    return vae_scale(vae, lat).float()
