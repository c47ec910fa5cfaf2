"""kohya's three LoRA dropouts on peft LoRA layers (kohya networks/lora.py, LoRAModule.forward).

peft's `lora_dropout` drops the layer INPUT; kohya's `network_dropout` drops the rank-r activations after
lora_down. kohya also has `rank_dropout` (whole ranks, per sample, with the output rescaled by 1/(1-p)) and
`module_dropout` (the whole LoRA of a layer skipped for a step). peft offers neither, so forward hooks on the
peft layer and its lora_A / lora_B give kohya's forward, in kohya's order of random draws (global RNG):
    module: torch.rand(1) < p  -> the layer returns the base output (its LoRA contributes 0)
    lx = down(x);  dropout: F.dropout(lx, p);  rank: lx *= (rand(b, r) > p) [broadcast over tokens/pixels]
    out = base(x) + up(lx) * scale / (1 - p_rank)
Only while the layer is in training mode, as kohya's `self.training`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class Dropouts:
    dropout: float = 0.0  # kohya's network_dropout (ss_network_dropout)
    rank_dropout: float = 0.0  # network_args rank_dropout
    module_dropout: float = 0.0  # network_args module_dropout

    def __post_init__(self) -> None:
        for name in ("dropout", "rank_dropout", "module_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")

    @property
    def any(self) -> bool:
        return bool(self.dropout or self.rank_dropout or self.module_dropout)


def install(layer: Any, adapter: str, d: Dropouts) -> list[RemovableHandle]:
    """Give `adapter` on peft LoRA layer `layer` kohya's dropouts; returns the hook handles."""
    if not d.any:
        return []
    skip = [False]

    def module_draw(mod: Any, args: Any) -> None:
        skip[0] = bool(d.module_dropout) and mod.training and bool(torch.rand(1) < d.module_dropout)

    def after_down(mod: Any, args: Any, lx: torch.Tensor) -> torch.Tensor | None:
        if not layer.training or skip[0]:
            return None
        if d.dropout:
            lx = F.dropout(lx, p=d.dropout)
        if d.rank_dropout:
            mask = torch.rand((lx.size(0), lx.size(-1) if lx.dim() == 3 else lx.size(1)), device=lx.device)
            mask = mask > d.rank_dropout
            if lx.dim() == 3:
                mask = mask.unsqueeze(1)  # [b, tokens, r]: the same ranks for every token of a sample
            elif lx.dim() == 4:
                mask = mask.unsqueeze(-1).unsqueeze(-1)  # conv: [b, r, h, w]
            lx = lx * mask * (1.0 / (1.0 - d.rank_dropout))  # kohya: "as if the rank changed"
        return lx

    def after_up(mod: Any, args: Any, out: torch.Tensor) -> torch.Tensor | None:
        return out * 0.0 if (layer.training and skip[0]) else None

    handles = [layer.register_forward_pre_hook(module_draw)] if d.module_dropout else []
    handles.append(layer.lora_A[adapter].register_forward_hook(after_down))
    if d.module_dropout:
        handles.append(layer.lora_B[adapter].register_forward_hook(after_up))
    return handles
