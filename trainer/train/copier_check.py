"""The copier check of difference training: does the pass-1 copier reproduce its original?

The denoising loss on the original at fixed noise and timesteps, without and with the copier, and a side-by-side
picture (original, base alone, with copier) made by a short img2img from the noised original. A copier that did
not learn its image would make the difference LoRA blurry, so the job stops with what to change.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from trainer.data.encode import encode_pixels, encode_text
from trainer.data.seeds import generator
from trainer.events import JobFailed
from trainer.spec import TrainSpec
from trainer.train.losses import eval_denoise_loss, unet_forward

if TYPE_CHECKING:
    from trainer.data.dataset import TrainData

COPIER_ADAPTER = "copier"
# Fixed timesteps spread over the schedule, two noise draws each (deterministic from the seed).
CHECK_TIMESTEPS = (50, 200, 400, 600, 800)
CHECK_DRAWS = 2
# The side-by-side image: a short img2img from the noised original (strength 0.6, DDIM, fixed noise).
RECON_STRENGTH = 0.6
RECON_STEPS = 12


@dataclass
class CopierCheck:
    loss_without: float
    loss_with: float
    improvement: float  # (without - with) / without
    required: float
    image: str | None = None

    @property
    def passed(self) -> bool:
        return self.improvement >= self.required


def apply_copier(base: Any, copier: Path) -> Any:
    from trainer.format.kohya import LoraFileError
    from trainer.network.lora import apply_kohya_file

    # apply_kohya_file's peft injection may draw from the global RNG: keep the training stream untouched
    with torch.random.fork_rng(devices=[]):
        try:
            return apply_kohya_file(base, copier, multiplier=1.0, adapter=COPIER_ADAPTER)
        except LoraFileError as e:
            raise JobFailed(f"the copier {copier} cannot be applied to base model {base.name!r}: {e}",
                            reason="bad_input") from None


def _compute_ctx(base: Any, device: torch.device) -> AbstractContextManager[Any]:
    # A GPU trainer may have cast the frozen base to bf16/fp16: run the check under the same autocast.
    dtype = next(base.unet.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


def _decode(vae: Any, latents: torch.Tensor) -> Image.Image:
    from trainer.infer.pipeline import decode_latents

    img = decode_latents(vae, latents)[0].clamp(-1, 1)
    arr = ((img + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


@torch.no_grad()
def reconstruct(base: Any, data: TrainData, prediction_type: str, device: torch.device, seed: int,
                strength: float = RECON_STRENGTH, steps: int = RECON_STEPS) -> Image.Image:
    """What the model (with whatever LoRAs are on it) makes of the noised first image: a short DDIM img2img."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(base.noise_scheduler.config, prediction_type=prediction_type)
    sched.set_timesteps(steps)
    ts = sched.timesteps[int(round(steps * (1 - strength))):]
    px, crop = data.pixels(0, False)
    lat = encode_pixels(base.vae, px[None]).to(device)
    hidden, pooled = encode_text(base, [data.items[0].caption], device)
    tid = torch.tensor([[*crop.original_size, *crop.crop_top_left, *crop.target_size]], dtype=torch.float32)
    noise = torch.randn(lat.shape, generator=generator(seed, "copier-check", "reconstruct")).to(device)
    x = sched.add_noise(lat, noise, ts[:1])
    for t in ts:
        out = unet_forward(base, x, t.reshape(1).to(device), hidden, pooled, tid)
        x = sched.step(out.float(), t, x).prev_sample
    return _decode(base.vae, x)


def copier_check(base: Any, data: TrainData, copier: Path, prediction_type: str, device: torch.device, seed: int,
                 required: float, image_path: Path, title: str) -> CopierCheck:
    """Loss on the original at fixed noise/timesteps without and with the copier, and the side-by-side PNG.

    `base` must carry no other LoRA; the copier is applied here and removed before returning.
    """
    from trainer.infer.grid import make_grid, save_png
    modes = {id(m): m.training for m in (base.unet, *base.text_encoders)}
    for m in (base.unet, *base.text_encoders):
        m.eval()
    net = None
    try:
        with _compute_ctx(base, device):
            without = eval_denoise_loss(base, data, prediction_type, str(device), seed, CHECK_TIMESTEPS, CHECK_DRAWS)
            img_base = reconstruct(base, data, prediction_type, device, seed)
            net = apply_copier(base, copier)
            with_ = eval_denoise_loss(base, data, prediction_type, str(device), seed, CHECK_TIMESTEPS, CHECK_DRAWS)
            img_copier = reconstruct(base, data, prediction_type, device, seed)
    finally:
        if net is not None:
            net.remove()
        for m in (base.unet, *base.text_encoders):
            m.train(modes[id(m)])
    improvement = (without - with_) / without if without > 0 else 0.0
    original = data.cropped(0).image
    grid, _ = make_grid([[original, img_base, img_copier]], ["original", "base alone", "with copier"],
                        [f"loss {without:.4f} -> {with_:.4f}"], title=title)
    save_png(grid, image_path)
    return CopierCheck(without, with_, improvement, required, str(image_path))


def not_converged_message(pair: str, check: CopierCheck, spec: TrainSpec, arch: str) -> str:
    opt = spec.optimizer
    tips = [f"train pass 1 longer (steps = {spec.steps}; try {max(spec.steps * 2, 200)})"]
    if arch == "sdxl":
        if opt.lr > 5e-5 or opt.name not in ("Lion", "Lion8bit"):
            tips.append(f"for SDXL use a lower learning rate: Lion at 5e-5 (now {opt.name} {opt.lr:g})")
        if spec.network.dim < 16 or spec.network.conv_dim < 8:
            tips.append("a bigger copier: network dim 16 / alpha 16, conv_dim 8 / conv_alpha 8")
        tips.append("or start from the copy-machine-sdxl preset")
    else:
        if opt.lr > 1e-4:
            tips.append(f"a lower learning rate (now {opt.lr:g}; try 1e-4)")
        elif opt.lr < 2e-5:
            tips.append(f"a higher learning rate (now {opt.lr:g}; try 1e-4)")
        if spec.network.dim < 16:
            tips.append("a bigger copier: network dim 16 / alpha 16, conv_dim 8 / conv_alpha 8")
        tips.append("or start from the copy-machine-sd15 preset")
    return (f"pair {pair!r}: the copier did not learn the original image, so the difference LoRA would be blurry. "
            f"Denoising loss on the original: {check.loss_without:.4f} without the copier, {check.loss_with:.4f} "
            f"with it ({check.improvement:.0%} lower; at least {check.required:.0%} is needed, "
            f"difference.copier_min_improvement). Try: " + "; ".join(tips) + ".")


def base_for_check(spec: TrainSpec, models_dir: Path | None, device: torch.device) -> Any:
    from trainer.models.base import ModelError
    from trainer.models.load import load_base

    dtype = torch.float32
    if device.type == "cuda":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.mixed_precision, torch.float32)
    try:
        return load_base(spec.base_model, models_dir, dtype=dtype).to(device)
    except ModelError as e:
        raise JobFailed(str(e), reason="bad_input") from None
