"""The weight change of a LyCORIS layer (LoHa, LoKr, DoRA) as AUTOMATIC1111 and ComfyUI compute it from the file.

Rules (A1111 `network_hada.py`, `network_lokr.py`, `network.py`; ComfyUI `comfy/weight_adapter/{loha,lokr,base}.py`;
LyCORIS `lycoris/modules/*.py` writes them):
- LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) (Tucker: each factor rebuilt from t, a, b), scale alpha / w1_b rows.
- LoKr: dW = kron(w1, w2), w1 = lokr_w1 or w1_a @ w1_b, w2 = lokr_w2 or w2_a @ w2_b (Tucker with t2);
  scale alpha / dim with dim = rows of w2_b, else of w1_b; both factors full: scale 1 (alpha ignored).
- A missing alpha is scale 1 for both.
- DoRA (dora_scale): W' = (W + s dW) * dora_scale / ||W + s dW|| with the norm per input column (dora_scale
  [1, in, ...]) or per output row ([out, 1, ...]); the change at strength m is m * (W' - W).
Shapes are reshaped to the base layer's weight, as both loaders do (a 2-D LoHa of a 3x3 conv is [out, in*9]).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from trainer.format.header import Kind
from trainer.format.lyco_layout import Algo


def target_shape(kind: Kind, fin: int, fout: int) -> tuple[int, ...]:
    if kind == "linear":
        return (fout, fin)
    k = 3 if kind == "conv3x3" else 1
    return (fout, fin, k, k)


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker rebuild: t [r, r, k, k], a [r, out], b [r, in] -> [out, in, k, k]."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t.float(), b.float(), a.float())


def loha_diff(p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if "hada_t1" in p:
        return _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * _tucker(p["hada_t2"], p["hada_w2_a"],
                                                                             p["hada_w2_b"])
    return (p["hada_w1_a"].float() @ p["hada_w1_b"].float()) * (p["hada_w2_a"].float() @ p["hada_w2_b"].float())


def lokr_diff(p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    w1 = p["lokr_w1"].float() if "lokr_w1" in p else p["lokr_w1_a"].float() @ p["lokr_w1_b"].float()
    if "lokr_w2" in p:
        w2 = p["lokr_w2"].float()
    elif "lokr_t2" in p:
        w2 = _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = p["lokr_w2_a"].float() @ p["lokr_w2_b"].float()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2)


def lyco_scale(algo: Algo, p: Mapping[str, torch.Tensor], alpha: float | None) -> float:
    if alpha is None:
        return 1.0
    if algo == "loha":
        return alpha / p["hada_w1_b"].shape[0]
    dim = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else (p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None)
    return alpha / dim if dim else 1.0


def dora_change(dora_scale: torch.Tensor, weight: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """W' - W for DoRA, float32: `diff` is the scaled plain change, shaped like `weight`."""
    w = weight.float()
    calc = w + diff
    ds = dora_scale.float()
    if ds.shape[0] == calc.shape[0] and ds.shape[0] != 1:  # per output row
        norm = calc.reshape(calc.shape[0], -1).norm(dim=1).reshape(calc.shape[0], *[1] * (calc.dim() - 1))
    else:  # per input column (what A1111 reads)
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1).reshape(
            calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    ds = ds.reshape(norm.shape)
    return calc * (ds / (norm + torch.finfo(torch.float32).eps)) - w


@dataclass
class LycoModule:
    """One LoHa or LoKr layer of a file (any of them may carry a DoRA dora_scale)."""

    name: str
    algo: Algo
    parts: dict[str, torch.Tensor]  # part name (hada_w1_a ...) -> tensor
    alpha: float | None
    kind: Kind
    rank: int
    in_features: int
    out_features: int
    dora_scale: torch.Tensor | None = None

    @property
    def scale(self) -> float:
        return lyco_scale(self.algo, self.parts, self.alpha)

    @property
    def needs_base(self) -> bool:
        """DoRA: the change depends on the base weight it is applied to."""
        return self.dora_scale is not None

    def delta(self) -> torch.Tensor:
        """scale * dW in float32, shaped like the target weight (not for DoRA: use delta_for)."""
        if self.needs_base:
            raise ValueError(f"{self.name} is a DoRA layer: its change depends on the base weight")
        diff = loha_diff(self.parts) if self.algo == "loha" else lokr_diff(self.parts)
        return (diff * self.scale).reshape(target_shape(self.kind, self.in_features, self.out_features))

    def delta_for(self, weight: torch.Tensor) -> torch.Tensor:
        """The change at strength 1 that A1111/ComfyUI add to `weight` (float32, weight's shape)."""
        diff = loha_diff(self.parts) if self.algo == "loha" else lokr_diff(self.parts)
        diff = (diff * self.scale).reshape(weight.shape).to(weight.device)
        return diff if self.dora_scale is None else dora_change(self.dora_scale.to(weight.device), weight, diff)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"{self.name}.{k}": v for k, v in self.parts.items()}
        if self.alpha is not None:
            out[f"{self.name}.alpha"] = torch.tensor(float(self.alpha), dtype=torch.float32)
        if self.dora_scale is not None:
            out[f"{self.name}.dora_scale"] = self.dora_scale
        return out
