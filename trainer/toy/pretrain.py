"""Pretraining of the toy bases (``tools/pretrain_toy_bases.py`` runs it): a small VAE shared by both bases, then
the UNet of an SD1.5-shaped and an SDXL-shaped base, in the layouts of the built-in tiny models (``tiny-sd15``,
``tiny-sdxl``) so the files load through the same single-file code as any real checkpoint.

Reproducible: one thread, ``torch.use_deterministic_algorithms``, every draw from a seeded generator; the same
seed on the same CPU gives the same weights. The text encoders start from the tiny models' seeded random init and
learn with the UNet (``Recipe.te_lr``); the VAE sees every concept (it is an image codec), the UNets never see the reserved
ones (``trainer.toy.world.RESERVED_SHAPES`` / ``RESERVED_PATTERNS``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from trainer.data.encode import encode_text
from trainer.format.checkpoint import CONFIGS_DIR
from trainer.models.base import BaseModel
from trainer.toy.world import (
    FIGURES,
    PATTERNS,
    RESERVED_PATTERNS,
    RESERVED_SHAPES,
    pretrain_scenes,
    render,
    sample_scene,
)

log = logging.getLogger(__name__)
LAYOUTS = ("sd15", "sdxl")


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    vae_steps: int = 1200
    vae_batch: int = 8
    vae_lr: float = 4e-3
    unet_steps: int = 1200
    unet_batch: int = 32
    unet_lr: float = 2e-3
    images: int = 4000  # distinct pretraining scenes of the UNets
    vae_images: int = 1500  # distinct scenes of the VAE (every concept)
    decoder_steps: int = 1200  # then the decoder alone learns sharp edges (the latents, and so the UNets, stay)
    decoder_lr: float = 2e-3
    figure_weight: float = 4.0  # extra weight of the figure's pixels in the decoder's loss
    edge_weight: float = 4.0  # weight of the L1 of the image gradients (blurred corners read as circles)
    uncond_rate: float = 0.1  # captions dropped so classifier-free guidance works
    te_lr: float = 1e-3  # text encoders trained with the UNet (0: kept at their random init)
    x0_weight_max: float = 50.0  # per-sample weight 1/alpha_bar (v-loss), capped (0: plain epsilon loss)


def _deterministic(seed: int) -> torch.Generator:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pixels(scenes: list) -> torch.Tensor:
    """[n, 3, 64, 64] in [-1, 1], as the VAE takes them."""
    arr = np.stack([np.asarray(render(s), dtype=np.float32) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def skeleton(layout: str, seed: int = 0) -> BaseModel:
    """The toy layout's model with seeded random weights and its word-level tokenizers, built from the toy config
    (``trainer/configs/toy-<layout>``), to train in place."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.models.tokenizers import tokenizers_for

    folder = CONFIGS_DIR / f"toy-{layout}"
    arch = "sdxl" if layout == "sdxl" else "sd1"
    toks = tokenizers_for(arch, folder.name)
    torch.manual_seed(seed)
    tes: list = []
    for i, tok in enumerate(toks):
        cfg = json.loads((folder / f"text_encoder{'_2' if i else ''}" / "config.json").read_text())
        cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=tok.pad_token_id)
        cls = CLIPTextModelWithProjection if "Projection" in cfg["architectures"][0] else CLIPTextModel
        tes.append(cls(CLIPTextConfig(**cfg)).eval().requires_grad_(False))
    unet = UNet2DConditionModel.from_config(json.loads((folder / "unet" / "config.json").read_text()))
    torch.manual_seed(seed)  # the VAE's init does not depend on the layout's UNet: both layouts share one VAE
    vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
    sched = DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    return BaseModel(arch=arch, name=f"toy-{layout}", unet=unet.eval().requires_grad_(False),
                     vae=vae.eval().requires_grad_(False), text_encoders=tes, tokenizers=toks, noise_scheduler=sched,
                     source=folder, config_dir=folder)


def train_vae(vae: torch.nn.Module, recipe: Recipe, say: Callable[[str], None] = log.info) -> None:
    """Reconstruction (L1 + L2) with a small KL term, on every figure and pattern, reserved ones included."""
    gen = _deterministic(recipe.seed)
    data = pixels(_vae_scenes(recipe))
    with torch.no_grad():  # start nearly deterministic: unit posterior noise would drown the young latents
        vae.quant_conv.bias[vae.config.latent_channels:] = -6.0
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    lr_at = torch.optim.lr_scheduler.LambdaLR(  # cosine to 10%: a high rate finds the shapes, a low one the colours
        opt, lambda s: 0.55 + 0.45 * np.cos(np.pi * s / recipe.vae_steps))
    t0 = time.time()
    for step in range(recipe.vae_steps):
        idx = torch.randint(0, len(data), (recipe.vae_batch,), generator=gen)
        x = data[idx]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        kl = dist.kl().mean() / x[0].numel()
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_at.step()
        if step % 50 == 0 or step == recipe.vae_steps - 1:
            say(f"vae step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval().requires_grad_(False)


def _vae_scenes(recipe: Recipe) -> list:
    import random

    rng = random.Random(recipe.seed + 1)
    return [sample_scene(rng, FIGURES + RESERVED_SHAPES, PATTERNS + RESERVED_PATTERNS) for _ in range(recipe.vae_images)]


def _grads(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., 1:, :] - x[..., :-1, :], x[..., :, 1:] - x[..., :, :-1]


def refine_decoder(vae: torch.nn.Module, recipe: Recipe, say: Callable[[str], None] = log.info) -> None:
    """Train the decoder (and post_quant_conv) alone, after normalize_latents: the encoder and so the latent space
    stay exactly as they are (a base's UNet stays valid), while the decoder learns to keep corners. The plain
    reconstruction loss leaves the edges of small squares and triangles blurred, and the detectors (as a person)
    read them as circles; a higher weight on the figure's pixels and an L1 term on the image gradients fix that."""
    gen = _deterministic(recipe.seed + 4)
    scenes = _vae_scenes(recipe)
    data = pixels(scenes)
    # the figure's pixels: where the picture changes when only the figure's colour does
    fig = (pixels([replace(s, colour="white") for s in scenes]) - pixels([replace(s, colour="black") for s in scenes]))
    weight = 1.0 + recipe.figure_weight * (fig.abs().amax(1, keepdim=True) > 0.05).float()
    del fig
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        post = torch.cat([vae.encode(data[i:i + 64]).latent_dist.parameters for i in range(0, len(data), 64)])
    params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=recipe.decoder_lr, weight_decay=0.0)
    lr_at = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.55 + 0.45 * np.cos(np.pi * s / recipe.decoder_steps))
    t0 = time.time()
    for step in range(recipe.decoder_steps):
        idx = torch.randint(0, len(data), (recipe.vae_batch,), generator=gen)
        x, w = data[idx], weight[idx]
        mean, logvar = post[idx].chunk(2, dim=1)  # decode posterior samples, as the VAE stage did
        rec = vae.decode(mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape, generator=gen)).sample
        err = rec - x
        loss = (w * (err.abs() + err.pow(2))).sum() / w.sum()
        if recipe.edge_weight:
            loss = loss + recipe.edge_weight * sum((a - b).abs().mean()
                                                    for a, b in zip(_grads(rec), _grads(x), strict=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_at.step()
        if step % 100 == 0 or step == recipe.decoder_steps - 1:
            say(f"vae decoder step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def normalize_latents(vae: torch.nn.Module, data: torch.Tensor) -> None:
    """Rescale and recentre the latent space IN the weights (quant_conv, post_quant_conv), so latents times the
    config's scaling_factor have mean 0 and std 1 on toy images: the config, and so the loader, stay the tiny ones."""
    mean = torch.cat([vae.encode(data[i:i + 64]).latent_dist.mean for i in range(0, len(data), 64)])
    mu = mean.mean(dim=(0, 2, 3))
    a = 1.0 / (float(vae.config.scaling_factor) * mean.std())
    c = mean.shape[1]
    q, pq = vae.quant_conv, vae.post_quant_conv
    # encoder: z' = a (z - mu); the log-variance half shifts by 2 log a
    q.weight[:c] *= a
    q.bias[:c] = a * (q.bias[:c] - mu)
    q.bias[c:] += 2 * torch.log(a)
    # decoder: post_quant_conv(z) = W z + b with z = z' / a + mu
    pq.bias += torch.einsum("oi,i->o", pq.weight[:, :, 0, 0], mu)
    pq.weight /= a


@torch.no_grad()
def round_to_half(module: torch.nn.Module) -> None:
    """Round the weights to fp16 (kept in fp32): the files are fp16, and what trains on top of a module (the UNets on
    the VAE's latents) should see the weights the file holds, so a run from the file (--vae-from) is the same run."""
    for p in module.parameters():
        p.copy_(p.half().float())


@torch.no_grad()
def prompt_scene_ceiling(vae: torch.nn.Module, n: int = 96) -> float:
    """The share of the prompt-following check's scenes whose figure and figure colour the detectors read back
    after encode -> decode: no base drawing through this VAE can follow prompts better."""
    from trainer.toy.detect import read
    from trainer.toy.measure import prompt_scenes

    scenes = prompt_scenes(n, seed=0)
    rec = vae.decode(vae.encode(pixels(scenes)).latent_dist.mean).sample
    imgs = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    reads = [read(i) for i in imgs]
    return sum(r.figure == s.figure and r.colour == s.colour for r, s in zip(reads, scenes, strict=True)) / n


ROUND_TRIP_SCENES: list = []


@torch.no_grad()
def round_trip_accuracy(vae: torch.nn.Module, data: torch.Tensor, scenes: list | None = None) -> float:
    """The share of scenes the detectors read back right (figure, colours, pattern) after encode -> decode."""
    from trainer.toy.detect import read

    scenes = scenes if scenes is not None else ROUND_TRIP_SCENES[:len(data)]
    rec = vae.decode(vae.encode(data).latent_dist.mean).sample
    imgs = ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return sum(read(i).matches(s) for i, s in zip(imgs, scenes, strict=True)) / len(scenes)


def _conditions(base: BaseModel, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    hs, ps = [], []
    with torch.no_grad():
        for i in range(0, len(captions), 128):
            h, p = encode_text(base, captions[i:i + 128], "cpu")
            hs.append(h)
            ps.append(p)
    return torch.cat(hs), (torch.cat(ps) if ps[0] is not None else None)


def train_unet(base: BaseModel, recipe: Recipe, say: Callable[[str], None] = log.info) -> None:
    """Epsilon-prediction denoising on toy scenes (never a reserved concept), captions dropped now and then."""
    gen = _deterministic(recipe.seed + 2)
    scenes = pretrain_scenes(recipe.images, seed=recipe.seed + 3)
    data = pixels(scenes)
    with torch.no_grad():
        sf = float(base.vae.config.scaling_factor)
        lat = torch.cat([base.vae.encode(data[i:i + 64]).latent_dist.mean for i in range(0, len(data), 64)]) * sf
    del data
    captions = [s.caption() for s in scenes]
    train_te = recipe.te_lr > 0
    hidden, pooled = (None, None) if train_te else _conditions(base, captions)
    u_hidden = None if train_te else _conditions(base, [""])[0]
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)
    sched = base.noise_scheduler
    unet = base.unet.train().requires_grad_(True)
    groups = [{"params": list(unet.parameters()), "lr": recipe.unet_lr}]
    if train_te:  # random text encoders over bytes do not tell colour words apart well enough: learn them too
        for te in base.text_encoders:
            te.train().requires_grad_(True)
            groups.append({"params": list(te.parameters()), "lr": recipe.te_lr})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    lr_at = torch.optim.lr_scheduler.LambdaLR(  # short warm-up, cosine decay to 10%
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.55 + 0.45 * np.cos(np.pi * s / recipe.unet_steps)))
    t0 = time.time()
    for step in range(recipe.unet_steps):
        idx = torch.randint(0, len(lat), (recipe.unet_batch,), generator=gen)
        x0 = lat[idx]
        drop = torch.rand(len(idx), generator=gen) < recipe.uncond_rate
        if train_te:  # a dropped caption is the empty prompt (the SDXL pipeline's zeros are set below)
            h, p = encode_text(base, ["" if d else captions[i] for d, i in zip(drop.tolist(), idx.tolist(),
                                                                               strict=True)], "cpu")
        else:
            h, p = hidden[idx], (pooled[idx] if pooled is not None else None)
        if base.is_sdxl:  # the SDXL pipeline's empty negative prompt is all zeros (force_zeros_for_empty_prompt)
            h, p = h * ~drop[:, None, None], p * ~drop[:, None]
        elif not train_te:
            h = torch.where(drop[:, None, None], u_hidden, h)
        noise = torch.randn(x0.shape, generator=gen)
        ts = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        kw = {}
        if p is not None:
            kw["added_cond_kwargs"] = {"text_embeds": p, "time_ids": time_ids.expand(len(idx), 6)}
        pred = unet(sched.add_noise(x0, noise, ts), ts, encoder_hidden_states=h, **kw).sample
        mse = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if recipe.x0_weight_max > 0:
            # The epsilon loss gives almost no signal at high noise, where the layout and colours (what the prompt
            # says) are decided; the v-loss weight 1/alpha_bar there makes the UNet learn to read the prompt.
            w = (1.0 / sched.alphas_cumprod[ts]).clamp(max=recipe.x0_weight_max)
            loss = (w * mse).sum() / w.sum()
        else:
            loss = mse.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_at.step()
        if step % 50 == 0 or step == recipe.unet_steps - 1:
            say(f"{base.name} unet step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    for te in base.text_encoders:
        te.eval().requires_grad_(False)
    unet.eval().requires_grad_(False)
