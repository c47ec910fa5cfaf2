"""Device and precision policy: where a job runs, the dtype it computes in, and how the frozen base is stored.

"auto" (the default) resolves on the device the job runs on: bf16 on a GPU with native bf16 (compute capability
8.0+), else fp16 with a GradScaler; fp32 on CPU. Gradient checkpointing None (auto) follows the memory plan on a GPU
(`trainer.plan.choose_auto`: on only when the job would not fit the card without it), falls back to "on for SDXL"
when no plan can be made, and is off on CPU.
The UNet uses PyTorch SDPA, or xformers when the spec asks for it (`xformers = true`). Mixed precision "bf16"
autocasts to bfloat16 (CPU and GPU). "fp16" autocasts to float16 with a GradScaler on a GPU; on CPU, where float16
autocast is slow and GradScaler buys nothing, an fp16 job trains in fp32 and says so. On a GPU the frozen base
weights are stored in the autocast dtype (half the memory); the LoRA weights, their gradients and the optimizer
state stay float32.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainer.events import JobFailed

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """bf16 in hardware: compute capability 8.0 or newer (RTX 30xx, A100 and later) of this very device.

    torch.cuda.is_bf16_supported() also counts emulation, which makes Turing/Volta (RTX 20xx, T4, V100) slow."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """The precision an "auto" spec trains in on `device`; explicit values are returned unchanged."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if native_bf16(device) else "fp16"
    return "no"


def resolve_gradient_checkpointing(requested: bool | None, arch: str, device: torch.device) -> bool:
    """None (auto): on for SDXL on a GPU, off for SD1.x/SD2.x on a GPU and off on CPU."""
    if requested is not None:
        return bool(requested)
    return device.type == "cuda" and arch == "sdxl"


def choose_gradient_checkpointing(spec: Any, arch: str, device: torch.device,
                                  models_dir: Any = None) -> tuple[bool, str | None]:
    """Gradient checkpointing for this job on `device`, and why when "auto" decided it (for the job's log).

    On a GPU the memory plan decides against the card's size: checkpointing costs ~35% more compute, so it is on
    only when the job would not fit without it. Without a plan (an architecture the plan cannot tell), today's rule."""
    requested = spec.gradient_checkpointing
    if requested is not None or device.type != "cuda":
        return resolve_gradient_checkpointing(requested, arch, device), None
    from trainer.plan import PlanError, choose_auto, gb, plan_job

    card = torch.cuda.get_device_properties(device).total_memory
    try:
        on = bool(choose_auto(spec, card, models_dir=models_dir)["gradient_checkpointing"])
        without = plan_job(spec, card_bytes=card, models_dir=models_dir, gradient_checkpointing=False)
    except PlanError as e:
        on = resolve_gradient_checkpointing(None, arch, device)
        return on, f"gradient checkpointing {'on' if on else 'off'} (auto, {arch} on a GPU; no memory plan: {e})"
    return on, (f"gradient checkpointing {'on' if on else 'off'}: {without.describe_job()} needs "
                f"~{gb(without.total)} without it; card {gb(card)}")


@dataclass
class Precision:
    """What a job computes in: the resolved setting, the autocast dtype (None: fp32) and the GradScaler."""

    mixed_precision: str  # "no", "fp16" or "bf16"
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    note: str | None = None  # a warning for the job's log

    def autocast(self, device: torch.device) -> torch.autocast:
        if self.autocast_dtype is None:
            return torch.autocast(device.type, enabled=False)
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    mp = resolve_mixed_precision(requested, device)
    if mp == "bf16":
        if device.type == "cuda" and not native_bf16(device):
            major, minor = torch.cuda.get_device_capability(device)
            if not torch.cuda.is_bf16_supported():
                raise JobFailed("this GPU does not support bf16; set mixed_precision to fp16", reason="bad_input")
            return Precision(mp, torch.bfloat16, None, f"this GPU (compute capability {major}.{minor}) only emulates "
                                                       "bf16, which is slow: fp16 (or auto) trains faster here")
        return Precision(mp, torch.bfloat16, None)
    if mp == "fp16":
        if device.type == "cuda":
            return Precision(mp, torch.float16, torch.amp.GradScaler("cuda"))
        return Precision(mp, None, None, "fp16 mixed precision needs a GPU; on CPU this job trains in fp32 "
                                         "(bf16 works on CPU)")
    return Precision(mp, None, None)


def cast_frozen_weights(modules: Iterable[torch.nn.Module], precision: Precision, device: torch.device) -> None:
    """On a GPU the frozen base weights go to the compute dtype: half the memory, same autocast result.

    Call it while the modules are still on the CPU (the cast then never needs fp32 and half copies on the card).
    Trainable weights (the LoRA) keep float32; the VAE is not passed in: it decodes in float32 (fp16 overflows).
    """
    if precision.autocast_dtype is None or device.type != "cuda":
        return
    for m in modules:
        for p in m.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(precision.autocast_dtype)


def enable_fast_attention(unet: Any, device: torch.device, use_xformers: bool = False) -> str:
    """PyTorch SDPA (diffusers' default), or xformers' memory-efficient attention when asked for (`xformers = true`)
    on a GPU with xformers installed. Returns a short description of what the UNet uses."""
    sdpa = "PyTorch SDPA" if hasattr(F, "scaled_dot_product_attention") else "PyTorch attention"
    if not use_xformers:
        return sdpa
    if device.type != "cuda":
        return f"{sdpa} (xformers needs a GPU)"
    try:
        import xformers  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or broken against this torch
        return f"{sdpa} (xformers was asked for but is not installed or does not import)"
    try:
        unet.enable_xformers_memory_efficient_attention()
    except Exception as e:  # noqa: BLE001 - a mismatched xformers build: keep SDPA
        return f"{sdpa} (xformers is installed but could not be enabled: {type(e).__name__}: {e})"
    return "xformers memory-efficient attention"


def setup_modes(base: Any, train_unet: bool, train_te: bool, requested_gc: bool | None,
                device: torch.device, use_xformers: bool = False) -> tuple[bool, str]:
    """Train/eval modes, gradient checkpointing and attention; returns (checkpointing on, attention used)."""
    base.unet.train(train_unet)
    for te in base.text_encoders:
        te.train(train_te)
    base.vae.eval()
    gc = resolve_gradient_checkpointing(requested_gc, base.arch, device)
    if gc:
        base.unet.enable_gradient_checkpointing()
        if train_te:
            for te in base.text_encoders:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return gc, enable_fast_attention(base.unet, device, use_xformers)


def resolution_summary(device: torch.device, requested_mp: str, mixed_precision: str, requested_gc: bool | None,
                       gradient_checkpointing: bool, arch: str, attention: str, gc_why: str | None = None) -> str:
    """One line saying what runs: precision, gradient checkpointing and attention, auto choices marked."""
    mp = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[mixed_precision]
    if mixed_precision == "fp16" and device.type != "cuda":
        mp = "fp32 (fp16 needs a GPU)"
    if requested_mp == "auto":
        mp += f" (auto on {device.type})"
    gc = "on" if gradient_checkpointing else "off"
    if requested_gc is None:
        gc += " (auto: by the memory plan)" if gc_why else f" (auto: {arch} on {device.type})"
    return f"device {device}; precision {mp}; gradient checkpointing {gc}; attention {attention}"
