"""LoRAs applied the way AUTOMATIC1111 does it: the weight of every targeted Linear/Conv2d is patched in place
(W += strength * alpha/r * up @ down; LoHa, LoKr and DoRA by trainer.format.lyco's rules) after backing the original weight up on the CPU. Removing a LoRA copies the
backup back, so the base returns bit-exactly and is never reloaded. This works with files from any trainer (SD1
diffusers names, SDXL original names or diffusers names, te/te1/te2 prefixes), with conv (LoCon) modules and with
any strength including negative ones, and costs nothing per denoising step.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.format.kohya import KohyaLora, read_kohya
from trainer.network.targets import check_compatible, target_layer

if TYPE_CHECKING:
    from trainer.models.base import BaseModel

LoraSource = Any  # a path, a kohya state dict, a KohyaLora, or a LoraNetwork (its current weights)


def as_kohya(src: LoraSource) -> KohyaLora:
    """Whatever callers hold, as a validated KohyaLora (files go through the safe, header-checked reader)."""
    if isinstance(src, KohyaLora):
        return src
    if isinstance(src, str | os.PathLike | Mapping):
        return read_kohya(src)
    if hasattr(src, "network_state"):  # trainer.network.lora.LoraNetwork: snapshot its weights in float32
        from trainer.format.kohya import export_state

        return read_kohya(export_state(src, torch.float32))
    raise TypeError(f"cannot use {type(src).__name__} as a LoRA (give a path, a state dict or a KohyaLora)")


class WeightPatcher:
    """Applies LoRAs to a model in place and restores the exact base weights from CPU backups."""

    def __init__(self, base: BaseModel):
        self.base = base
        self._backup: dict[nn.Module, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self._backup)

    @torch.no_grad()
    def apply(self, loras: Sequence[tuple[KohyaLora, float]]) -> None:
        """Add every LoRA at its strength (raises LoraFileError when one does not fit the base)."""
        deltas: dict[nn.Module, torch.Tensor] = {}
        plans = [(lora, strength, check_compatible(lora, self.base)) for lora, strength in loras]  # check all first
        for lora, strength, targets in plans:
            if strength == 0:
                continue
            for name, t in targets.items():
                m = target_layer(self.base, t)
                d = lora.modules[name].delta_for(m.weight) * strength  # DoRA: relative to the base weight
                deltas[m] = deltas[m] + d if m in deltas else d
        for m, d in deltas.items():
            if m not in self._backup:
                self._backup[m] = m.weight.detach().to("cpu", copy=True)
            w = m.weight
            # Sum in float32 so fp16 bases do not lose the small LoRA delta to rounding twice.
            w.copy_((w.float() + d.to(w.device)).to(w.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for m, w in self._backup.items():
            m.weight.copy_(w.to(m.weight.device))
        self._backup.clear()
