"""LoHa / LoKr layers as plain LoRA layers, by SVD of each layer's full weight change.

An SVD merge (``trainer.network.svd_merge``) works on up/down factors. A LoHa layer of rank r changes the
weight by a matrix of rank up to r^2, a LoKr layer by rank(w1) * rank(w2); the SVD of that full change, cut at
its numerical rank (singular values below float32 resolution of the largest are dropped), is an exact LoRA of
it. The merge then reduces it to the rank asked for like any other input. A DoRA layer's change depends on the
base model's weights, so it cannot become a LoRA without them: that is refused with what to do instead.
"""

from __future__ import annotations

import torch

from trainer.format.kohya import KohyaLora, LoraModule
from trainer.format.lyco import LycoModule
from trainer.format.lyco_layout import ALGO_NAMES


class ConversionError(ValueError):
    """A layer cannot be written as a plain LoRA; the message says what to do."""


def _as_lora(m: LycoModule) -> LoraModule:
    d = m.delta()  # float32, the target weight's shape; the loaders' scale already applied
    mat = d.reshape(d.shape[0], -1)
    u, s, vh = torch.linalg.svd(mat.double(), full_matrices=False)
    tol = float(s[0]) * max(mat.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    k = max(1, int((s > tol).sum()))
    up = (u[:, :k] * s[:k]).float()
    down = vh[:k].float()
    if d.dim() == 4:
        up = up.reshape(d.shape[0], k, 1, 1)
        down = down.reshape(k, *d.shape[1:])
    return LoraModule(m.name, down.contiguous(), up.contiguous(), float(k), m.kind)


def as_plain_lora(lora: KohyaLora) -> tuple[KohyaLora, list[str]]:
    """The file with every LoHa/LoKr layer turned into an exact LoRA layer; also which algorithms were converted.

    Raises ConversionError for DoRA layers (their change depends on the base weights)."""
    if lora.has_dora:
        raise ConversionError(
            f"{lora.source or 'the input'} is a DoRA network: its change depends on the base model's weights, so "
            "it cannot be merged into a LoRA. Merge it into a checkpoint instead (into_checkpoint with a base "
            "model), or use it on its own in /preview")
    converted = sorted({ALGO_NAMES[m.algo] for m in lora.modules.values() if isinstance(m, LycoModule)})
    if not converted:
        return lora, []
    modules = {n: (_as_lora(m) if isinstance(m, LycoModule) else m) for n, m in lora.modules.items()}
    return KohyaLora(modules=modules, metadata=dict(lora.metadata), arch=lora.arch, source=lora.source), converted
