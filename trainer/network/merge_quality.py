"""How much an SVD merge lost: per module, per block and overall, against the exact weighted sum.

For one module the exact delta is W = B @ A (B = [c_i * up_i], A = [down_i]) and the merge wrote U' @ D'.
    retained energy = sum(S[:k]^2) / sum(S^2)            (what the rank truncation kept)
    relative error  = ||W - U' D'||_F / ||W||_F          (all losses: truncation, clamp, storage rounding)
||P @ Q||_F^2 = sum((P^T P) * (Q Q^T)) for P = [B, -U'], Q = [A; D'], so neither W nor the difference is formed.
The grams are float64: the cancellation in an exact merge then leaves noise near 1e-8, not float32's 3e-4.
Blocks and the overall figure weigh modules by their energy: sqrt(sum err^2 / sum ||W||^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from trainer.network.targets import block_of_kohya_name

FP16_MAX = float(torch.finfo(torch.float16).max)


def product_diff_sq(b: torch.Tensor, a: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """||b @ a - up @ down||_F^2 without forming either product (float64)."""
    p = torch.cat([b, -up], dim=1).double()
    q = torch.cat([a, down], dim=0).double()
    return max(float(((p.T @ p) * (q @ q.T)).sum()), 0.0)


def fit_fp16(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Make factors storable in fp16 while losing as little as possible: first move scale between each
    singular pair's up column and down row (the product is unchanged), then clamp only what still exceeds
    fp16's finite range (an inf would ruin the whole layer). Returns (up, down, clamped)."""
    if up.numel() == 0 or max(float(up.abs().max()), float(down.abs().max())) <= FP16_MAX:
        return up, down, False
    col = up.abs().amax(dim=0).clamp_min(1e-30)
    row = down.abs().amax(dim=1).clamp_min(1e-30)
    c = torch.sqrt(col / row)  # after this, each pair's largest up entry equals its largest down entry
    up, down = up / c[None, :], down * c[:, None]
    clamped = max(float(up.abs().max()), float(down.abs().max())) > FP16_MAX
    if clamped:
        up, down = up.clamp(-FP16_MAX, FP16_MAX), down.clamp(-FP16_MAX, FP16_MAX)
    return up, down, clamped


def block_label(name: str, arch: str) -> str:
    """The block a module is reported under: TE1/TE2/TE for text encoders, IN00..OUT11/MID for the UNet."""
    base = name.split(".", 1)[0]
    for prefix, label in (("lora_te1_", "TE1"), ("lora_te2_", "TE2"), ("lora_te_", "TE")):
        if base.startswith(prefix):
            return label
    try:
        return block_of_kohya_name(base, arch)  # type: ignore[arg-type]
    except ValueError:
        return "other"


@dataclass
class _Sums:
    w_sq: float = 0.0
    err_sq: float = 0.0
    kept_sq: float = 0.0
    modules: int = 0

    def add(self, w_sq: float, err_sq: float, kept_sq: float) -> None:
        self.w_sq += w_sq
        self.err_sq += err_sq
        self.kept_sq += kept_sq
        self.modules += 1

    def figures(self) -> dict[str, float]:
        if self.w_sq <= 0.0:  # an all-zero delta is reproduced exactly
            return {"relative_error": 0.0, "retained_energy": 1.0}
        return {"relative_error": math.sqrt(self.err_sq / self.w_sq),
                "retained_energy": min(self.kept_sq / self.w_sq, 1.0)}


@dataclass
class MergeQuality:
    """Filled by svd_merge: what each module, block and the whole merge kept of the exact weighted sum."""

    arch: str = "sd1"
    modules: dict[str, dict[str, float]] = field(default_factory=dict)
    clamped: list[str] = field(default_factory=list)
    _blocks: dict[str, _Sums] = field(default_factory=dict)
    _all: _Sums = field(default_factory=_Sums)

    def add(self, name: str, w_sq: float, err_sq: float, kept_sq: float, clamped: bool) -> None:
        one = _Sums()
        one.add(w_sq, err_sq, kept_sq)
        self.modules[name] = one.figures()
        self._blocks.setdefault(block_label(name, self.arch), _Sums()).add(w_sq, err_sq, kept_sq)
        self._all.add(w_sq, err_sq, kept_sq)
        if clamped:
            self.clamped.append(name)

    def overall(self) -> dict[str, float]:
        return self._all.figures()

    def blocks(self) -> dict[str, dict[str, float]]:
        return {b: s.figures() for b, s in sorted(self._blocks.items(), key=lambda kv: _block_order(kv[0]))}

    def as_dict(self) -> dict[str, Any]:
        """The record kept in metadata and the job summary (rounded: these are for people)."""
        return {
            **{k: _round(v) for k, v in self.overall().items()},
            "blocks": {b: {k: _round(v) for k, v in f.items()} for b, f in self.blocks().items()},
            "clamped_modules": len(self.clamped),
        }


def quality_text(q: dict[str, Any]) -> str:
    """One line for people: "merge error 0.0% of the exact weighted sum (energy kept 100%); per block: TE 0.0%, ..."."""
    blocks = ", ".join(f"{b} {pct(f['relative_error'])}" for b, f in q["blocks"].items())
    clamped = f"; {q['clamped_modules']} module(s) clamped" if q.get("clamped_modules") else ""
    return (f"merge error {pct(q['relative_error'])} of the exact weighted sum (energy kept "
            f"{pct(q['retained_energy'])}){clamped}; per block: {blocks}")


def pct(v: float) -> str:
    """A fraction as a percentage with two significant digits ("0.0%" when below 0.005%)."""
    p = 100.0 * v
    return "0.0%" if abs(p) < 0.005 else f"{float(f'{p:.2g}'):g}%"


def _round(v: float) -> float:
    return float(f"{v:.4g}")


def _block_order(label: str) -> tuple[int, int]:
    order = {"TE": 0, "TE1": 0, "TE2": 1, "BASE": 0}
    if label in order:
        return (0, order[label])
    if label.startswith("IN"):
        return (1, int(label[2:]))
    if label == "MID":
        return (2, 0)
    if label.startswith("OUT"):
        return (3, int(label[3:]))
    return (4, 0)
