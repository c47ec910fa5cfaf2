"""Optimizers and learning-rate schedules by name, as kohya users know them.

AdamW is torch's; AdamW8bit, Lion and Lion8bit come from bitsandbytes (its 32-bit Lion steps on CPU too,
so no lion-pytorch is needed); Prodigy from prodigyopt; Adafactor from transformers with a fixed learning
rate (relative_step=False, scale_parameter=False, warmup_init=False), as kohya's LoRA guides set it.
Schedules are diffusers' `get_scheduler`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

from trainer.events import JobFailed
from trainer.spec import OptimizerSpec


class OptimizerError(JobFailed):
    """An optimizer setting that cannot work; the message names it and says what to do."""

    def __init__(self, message: str):
        super().__init__(message, reason="bad_input")


# Defaults each library uses when the spec leaves betas/eps unset.
_DEFAULT_BETAS = {"AdamW": (0.9, 0.999), "AdamW8bit": (0.9, 0.999), "Lion": (0.9, 0.99), "Lion8bit": (0.9, 0.99),
                  "Prodigy": (0.9, 0.999)}


def _groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out = []
    for g in groups:
        ps = [p for p in g["params"] if p.requires_grad]
        if ps:
            out.append({**g, "params": ps})
    if not out:
        raise OptimizerError("nothing to train: the network has no trainable parameters "
                             "(check network.blocks and train_unet/train_text_encoder)")
    return out


def _bnb():
    try:
        from trainer.bnb_gate import load

        bnb = load()
    except Exception as e:  # noqa: BLE001 - any import failure means the same thing to the user
        raise OptimizerError(f"bitsandbytes could not be loaded ({e}); choose optimizer AdamW or Prodigy") from None
    return bnb


def build_optimizer(spec: OptimizerSpec, params: Iterable[Any]) -> tuple[torch.optim.Optimizer, list[str]]:
    """(optimizer, notes): `params` is a list of tensors or of param-group dicts with their own "lr".

    Notes are warnings worth showing the user (settings that were ignored or look wrong).
    """
    groups = _groups(params)
    notes: list[str] = []
    name = spec.name
    betas = spec.betas or _DEFAULT_BETAS.get(name)
    if spec.betas is not None and not all(0.0 <= b < 1.0 for b in spec.betas):
        raise OptimizerError(f"optimizer.betas must both be in [0, 1) (got {list(spec.betas)})")
    wd = spec.weight_decay
    lr = spec.lr

    if name == "AdamW":
        # foreach: one kernel call per group instead of ~10 per tensor (torch's default on CPU is the per-tensor
        # loop); bit-identical to it on CPU, and what torch picks on a GPU anyway. fused is faster but not identical.
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=spec.eps or 1e-8,
                                                       weight_decay=wd, foreach=True)
    elif name in ("AdamW8bit", "Lion", "Lion8bit"):
        bnb = _bnb()
        if name == "AdamW8bit":
            opt = bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=spec.eps or 1e-8, weight_decay=wd)
        else:
            if spec.eps is not None:
                notes.append(f"{name} has no eps; optimizer.eps is ignored")
            cls = bnb.optim.Lion8bit if name == "Lion8bit" else bnb.optim.Lion
            opt = cls(groups, lr=lr, betas=betas, weight_decay=wd)
            if lr > 1e-3:
                notes.append(f"Lion usually wants a learning rate 3-10x below AdamW's (got {lr:g}); "
                             "expect instability above 1e-3")
    elif name == "Prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise OptimizerError("prodigyopt is not installed; choose optimizer AdamW") from None
        if lr < 0.1:
            notes.append(f"Prodigy finds its own step size; its lr is a multiplier, usually 1.0 (got {lr:g})")
        opt = Prodigy(groups, lr=lr, betas=betas, eps=spec.eps or 1e-8, weight_decay=wd)
    elif name == "Adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(groups, lr=lr, eps=(spec.eps or 1e-30, 1e-3), beta1=betas[0] if betas else None,
                        weight_decay=wd, relative_step=False, scale_parameter=False, warmup_init=False)
    else:  # the spec's Literal makes this unreachable; kept for callers that build specs by hand
        raise OptimizerError(f"unknown optimizer {name!r}")
    return opt, notes


def resolve_scheduler_name(spec: OptimizerSpec) -> str:
    # diffusers' "constant" ignores warmup; a user who asked for warmup gets it.
    if spec.scheduler == "constant" and spec.warmup_steps:
        return "constant_with_warmup"
    return spec.scheduler


def build_scheduler(spec: OptimizerSpec, optimizer: torch.optim.Optimizer, total_steps: int
                    ) -> tuple[LRScheduler, list[str]]:
    """diffusers' schedule for `total_steps` optimizer steps (one per training step, after accumulation)."""
    notes = []
    warmup = spec.resolved_warmup(total_steps)
    if warmup >= total_steps and spec.scheduler != "constant":
        notes.append(f"warmup_steps ({warmup}) >= steps ({total_steps}): the learning rate never "
                     "reaches its set value")
    name = resolve_scheduler_name(spec)
    kwargs: dict[str, Any] = {"num_warmup_steps": warmup, "num_training_steps": total_steps}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = spec.num_cycles
    if name == "polynomial":
        kwargs["power"] = spec.power
    return get_scheduler(name, optimizer, **kwargs), notes


def current_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """The learning rate each group steps with now (Prodigy's effective rate is d * lr)."""
    out = []
    for g in optimizer.param_groups:
        lr = float(g["lr"])
        if "d" in g:  # Prodigy
            lr *= float(g["d"])
        out.append(lr)
    return out
