"""Speed settings that leave the training maths unchanged: `compile` (torch.compile of the UNet), `channels_last`
(the UNet's memory layout), and freeing the VAE / text encoders once everything they compute is cached.

"auto" resolves on the device and the job (measured on CPU in docs/benchmarks-peers.md):
- compile: on only on a GPU for jobs of `COMPILE_AUTO_MIN_STEPS` steps or more. Compiling the UNet's forward and
  backward takes minutes (more on CPU than the whole of a short job) and is paid again by every job, so it is
  worth it only where the saved seconds per step add up past it; on CPU it is off.
- channels_last: on a GPU on (its convolutions run in NHWC, diffusers' own advice; not measured here), on CPU off
  (the full-size SD1.5 UNet's forward + backward at 256 px took 0.98x the speed in NHWC).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from trainer.spec import TrainSpec

COMPILE_AUTO_MIN_STEPS = 1000  # below this a GPU job spends more on compiling than it saves


def resolve_compile(requested: bool | str, device: torch.device, steps: int) -> tuple[bool, str]:
    """(compile the UNet?, a line for the job's log saying why)."""
    if requested != "auto":
        return bool(requested), f"torch.compile of the UNet {'on' if requested else 'off'}"
    if device.type != "cuda":
        return False, f"torch.compile off (auto: on {device.type} compiling costs more than it saves)"
    if steps < COMPILE_AUTO_MIN_STEPS:
        return False, (f"torch.compile off (auto: a {steps}-step job is too short to pay back the compile time; "
                       f"on from {COMPILE_AUTO_MIN_STEPS} steps)")
    return True, f"torch.compile of the UNet on (auto: a {steps}-step GPU job; the first step waits for it)"


def resolve_channels_last(requested: bool | str, device: torch.device) -> bool:
    if requested != "auto":
        return bool(requested)
    return device.type == "cuda"


def apply(unet: torch.nn.Module, compile_unet: bool, channels_last: bool) -> None:
    """In place: the module keeps its parameter names (Module.compile, not torch.compile's wrapper), so the
    network, its state and samples see the same UNet."""
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_unet:
        unet.compile()


def free_after_cache(spec: TrainSpec, data: Any, base: Any, *, needs_models_later: bool) -> list[str]:
    """Free the weights of the VAE and the text encoders when training never runs them again (latents and every
    caption's text-encoder outputs cached, and no samples, validation or copier to run). Their parameters move
    to the meta device: the modules stay (for names and configs), their memory goes. Returns what was freed."""
    if needs_models_later:
        return []
    freed = []
    if spec.data.cache_latents and data.latents_cached:
        base.vae.to("meta")
        freed.append("VAE")
    if data.text_cached and not spec.network.train_text_encoder and not data.captions_vary:
        for te in base.text_encoders:
            te.to("meta")
        freed.append("text encoder" + ("s" if len(base.text_encoders) > 1 else ""))
    return freed
