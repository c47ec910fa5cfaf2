"""LoHa, LoKr and DoRA networks, trained with the LyCORIS reference modules (the `lycoris-lora` package).

Each target module of kohya's set (``trainer.network.targets``: the same layers, names and block selection as
LoRA/LoCon) gets one LyCORIS module built on it: ``LohaModule``, ``LokrModule`` or, for DoRA, ``LoConModule``
with weight decomposition on the input axis (``wd_on_out=False``: the form AUTOMATIC1111 applies; ComfyUI reads
both). The module's ``apply_to`` takes over the layer's forward; ``restore`` gives it back. Its state dict is
what LyCORIS writes to a file (``hada_w1_a``..., ``lokr_w1``..., ``lora_down.weight``/``lora_up.weight`` +
``dora_scale``, ``alpha``), so the saved file is LyCORIS' own layout under kohya's module names.
3x3 convs take conv_dim/conv_alpha, everything else dim/alpha (LyCORIS' rule too).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from trainer.format.kohya import save_kohya
from trainer.models.base import BaseModel
from trainer.network.groups import TrainableNetwork
from trainer.network.targets import Target, UnetModules, lora_targets, parse_blocks, target_layer

ALGOS = ("loha", "lokr", "dora")


class LycorisStateError(ValueError):
    """A network state (checkpoint) does not fit this network."""


def _module_class(algo: str) -> type[nn.Module]:
    # imported here: lycoris pulls in its kernels at import time, and only LyCORIS jobs need it
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    return {"loha": LohaModule, "lokr": LokrModule, "dora": LoConModule}[algo]


def _part(mod: nn.Module, part: str) -> torch.Tensor:
    return functools.reduce(getattr, part.split("."), mod)  # "lora_up.weight" -> mod.lora_up.weight


class LycorisNetwork(TrainableNetwork):
    """A LoHa / LoKr / DoRA network on a BaseModel, with LoraNetwork's training-loop API."""

    def __init__(self, base: BaseModel, algo: str, mods: dict[str, tuple[Target, nn.Module]], *, dim: int,
                 alpha: float, conv_dim: int, conv_alpha: float) -> None:
        self.base = base
        self.arch = base.arch
        self.algo = algo
        self.mods = mods  # kohya name -> (target, LyCORIS module), in enumeration order
        self.dim, self.alpha, self.conv_dim, self.conv_alpha = dim, alpha, conv_dim, conv_alpha
        self.multiplier = 1.0
        self.trainable = True
        self._applied = True
        self._removed = False

    @classmethod
    def create(cls, base: BaseModel, algo: str, dim: int, alpha: float, conv_dim: int = 0, conv_alpha: float = 1.0,
               train_text_encoder: bool = False, blocks: str | Sequence[str] | None = None,
               seed: int | None = None, train_unet: bool = True,
               dtype: torch.dtype = torch.float32, factor: int = -1,
               unet_modules: UnetModules = "transformer") -> LycorisNetwork:
        """A trainable network that starts as a no-op (LyCORIS' own initialisation). Weights kept in `dtype`.
        factor: LoKr's Kronecker split (LyCORIS' `factor`; -1 automatic)."""
        if algo not in ALGOS:
            raise ValueError(f"unknown LyCORIS algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
        if dim <= 0 or conv_dim < 0:
            raise ValueError(f"dim must be >= 1 and conv_dim >= 0, got {dim} / {conv_dim}")
        if alpha <= 0 or (conv_dim and conv_alpha <= 0):
            raise ValueError("alpha and conv_alpha must be > 0")
        chosen = parse_blocks(blocks, base.arch)
        targets = lora_targets(base.unet, base.text_encoders, base.arch, conv=conv_dim > 0, train_unet=train_unet,
                               train_te=train_text_encoder, blocks=chosen, unet_modules=unet_modules)
        if not targets:
            raise ValueError("this selection trains no module: check train_unet / train_text_encoder / blocks "
                             "(BASE is the text encoder)")
        module_class = _module_class(algo)
        extra: dict[str, Any] = {"weight_decompose": True, "wd_on_out": False} if algo == "dora" else {}
        if algo == "lokr":
            extra["factor"] = factor
        mods: dict[str, tuple[Target, nn.Module]] = {}
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            for t in targets:
                layer = target_layer(base, t)
                r, a = (conv_dim, conv_alpha) if t.uses_conv_dim else (dim, alpha)
                mod = module_class(t.kohya_name, layer, 1.0, r, float(a), bypass_mode=False, **extra)
                mod.to(device=layer.weight.device, dtype=dtype)
                mod.requires_grad_(True)
                mod.apply_to()
                mods[t.kohya_name] = (t, mod)
        return cls(base, algo, mods, dim=dim, alpha=float(alpha), conv_dim=conv_dim, conv_alpha=float(conv_alpha))

    # --- training-loop API --------------------------------------------------------------------

    def _params(self, te: bool) -> Iterator[nn.Parameter]:
        for t, mod in self.mods.values():
            if (t.model != "unet") == te:
                yield from mod.parameters()

    def targets(self) -> list[Target]:
        return [t for t, _ in self.mods.values()]

    # --- state ----------------------------------------------------------------------------------

    def network_state(self) -> dict[str, torch.Tensor]:
        """LyCORIS-named fp32 CPU copies of every module's tensors (its file layout): checkpoints and export."""
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for n, (_, mod) in self.mods.items():
                for part, v in mod.state_dict().items():
                    out[f"{n}.{part}"] = v.detach().to("cpu", torch.float32).clone().reshape(v.shape)
        return out

    def load_network_state(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Strict load (names, shapes and alphas must match); raises LycorisStateError."""
        mine = self.network_state()
        missing, extra = sorted(mine.keys() - sd.keys()), sorted(sd.keys() - mine.keys())
        if missing or extra:
            raise LycorisStateError(
                f"network state does not match this {self.algo} network ({len(missing)} missing, {len(extra)} "
                f"unexpected; e.g. missing {missing[:2]}, unexpected {extra[:2]}): it was saved with other settings "
                "(type/dim/conv_dim/blocks/text encoder) or for another base model")
        for k, v in mine.items():
            if tuple(sd[k].shape) != tuple(v.shape):
                raise LycorisStateError(f"{k}: saved shape {tuple(sd[k].shape)} differs from {tuple(v.shape)}")
            if k.endswith(".alpha") and abs(float(sd[k]) - float(v)) > 1e-3 * max(1.0, abs(float(v))):
                raise LycorisStateError(f"{k}: saved alpha {float(sd[k])} differs from the network's {float(v)}")
        with torch.no_grad():
            for n, (_, mod) in self.mods.items():
                for part in mod.state_dict():
                    if part != "alpha":
                        _part(mod, part).copy_(sd[f"{n}.{part}"])

    def save(self, path: str | os.PathLike[str], metadata: Mapping[str, str],
             dtype: torch.dtype = torch.float16) -> str:
        """Write the LyCORIS .safetensors atomically (weights in `dtype`, alpha float32); returns sshs_model_hash."""
        if dtype not in (torch.float16, torch.float32, torch.bfloat16):
            raise ValueError(f"save dtype must be float16, float32 or bfloat16, not {dtype}")
        state = {k: (v.reshape(()) if k.endswith(".alpha") else v.to(dtype).contiguous())
                 for k, v in self.network_state().items()}
        return save_kohya(path, state, metadata)

    # --- runtime control ------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> LycorisNetwork:
        """Move the modules (they are not children of the base's models, so moving the base leaves them)."""
        for _, mod in self.mods.values():
            mod.to(device)
        return self

    def set_multiplier(self, m: float) -> None:
        self._check()
        self.multiplier = float(m)
        for _, mod in self.mods.values():
            mod.multiplier = self.multiplier

    def enable(self, on: bool = True) -> None:
        """On or off: off gives each layer its own forward back (a DoRA layer at multiplier 0 is not a no-op)."""
        self._check()
        if bool(on) == self._applied:
            return
        for _, mod in self.mods.values():
            if on:
                mod.apply_to()
            else:
                mod.restore()
        self._applied = bool(on)

    def set_trainable(self, on: bool) -> None:
        self._check()
        self.trainable = bool(on)
        for _, mod in self.mods.values():
            mod.requires_grad_(self.trainable)

    def remove(self) -> None:
        if self._removed:
            return
        self.enable(False)
        self._removed = True

    def _check(self) -> None:
        if self._removed:
            raise RuntimeError("this network was removed")


__all__ = ["ALGOS", "LycorisNetwork", "LycorisStateError"]
