"""LoRA / LoCon networks on the base model, built with peft.

peft layers are injected with `peft.inject_adapter_in_model` using the exact module paths from
`trainer.network.targets`, so each peft layer maps one-to-one to a kohya module name (peft's lora_A/lora_B shapes are
kohya's lora_down/lora_up shapes, and peft's scaling lora_alpha / r is kohya's alpha / r).
Several networks can live on one model (e.g. a frozen LoRA applied from a file plus the one being trained);
each is a separate peft adapter and can be enabled, scaled and removed on its own.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from trainer.format.kohya import (
    SUFFIX_ALPHA,
    SUFFIX_DOWN,
    SUFFIX_UP,
    KohyaLora,
    LoraFileError,
    export_state,
    read_kohya,
    save_kohya,
)
from trainer.models.base import BaseModel
from trainer.network.dropout import Dropouts
from trainer.network.dropout import install as install_dropout
from trainer.network.groups import TrainableNetwork
from trainer.network.targets import Target, UnetModules, check_compatible, lora_targets, parse_blocks

ADAPTER = "loraforge"
_REGISTRY_ATTR = "_loraforge_adapters"  # on each model root: adapter name -> {"enabled", "trainable"}
_MAX_PATTERNS = 200  # peft matches rank/alpha patterns by regex; keep each inject call well inside re's cache


class NetworkStateError(ValueError):
    """A network state (checkpoint) does not fit this network."""


@dataclass
class _Slot:
    target: Target
    layer: LoraLayer
    rank: int
    alpha: float


def _model_of(base: BaseModel, key: str) -> nn.Module:
    if key == "unet":
        return base.unet
    return base.text_encoders[0 if key == "te1" else 1]


def _inject(model: nn.Module, adapter: str, specs: Mapping[str, tuple[int, float]], dropout: float) -> None:
    """Inject `adapter` on exactly the module paths in `specs` (path -> (rank, alpha))."""
    if not specs:
        return
    registry = model.__dict__.setdefault(_REGISTRY_ATTR, {})
    if adapter in registry:
        raise ValueError(f"adapter {adapter!r} already exists on this model; remove it first or pick another name")
    # The most common (rank, alpha) is the config default; the rest go to rank/alpha patterns, in chunks.
    common = Counter(specs.values()).most_common(1)[0][0]
    paths = sorted(specs)
    plain = [p for p in paths if specs[p] == common]
    special = [p for p in paths if specs[p] != common]
    chunks: list[list[str]] = [plain + special[:_MAX_PATTERNS]]
    chunks += [special[i:i + _MAX_PATTERNS] for i in range(_MAX_PATTERNS, len(special), _MAX_PATTERNS)]
    had_config = "peft_config" in model.__dict__ or hasattr(model, "peft_config")
    prev_config = getattr(model, "peft_config", None)
    for chunk in chunks:
        exc = [p for p in chunk if specs[p] != common]
        cfg = LoraConfig(
            r=common[0], lora_alpha=common[1],
            # a regex string is matched with fullmatch: exact paths, and one compiled pattern instead of a suffix scan
            target_modules="|".join(re.escape(p) for p in chunk),
            rank_pattern={"^" + re.escape(p): specs[p][0] for p in exc},
            alpha_pattern={"^" + re.escape(p): specs[p][1] for p in exc},
            lora_dropout=dropout, init_lora_weights=True, bias="none",
        )
        inject_adapter_in_model(cfg, model, adapter_name=adapter)
        # peft leaves its config on the model; diffusers would read it as its own adapters, so restore what was there.
        if had_config:
            model.peft_config = prev_config
        elif "peft_config" in model.__dict__:
            del model.peft_config
    registry[adapter] = {"enabled": True, "trainable": True}
    # peft activates only the new adapter on EVERY LoRA layer of the model: put the others back.
    for mod in model.modules():
        if isinstance(mod, LoraLayer):
            _sync_layer(model, mod)


def _sync_layer(model: nn.Module, layer: LoraLayer) -> None:
    """Make the layer's active adapters and requires_grad follow the model's registry."""
    reg = model.__dict__.get(_REGISTRY_ATTR, {})
    names = list(layer.lora_A.keys())
    active = [n for n in names if reg.get(n, {"enabled": True})["enabled"]]
    layer.set_adapter(active)
    for n in names:
        grad = bool(n in active and reg.get(n, {}).get("trainable", False))
        for mod in (layer.lora_A[n], layer.lora_B[n]):
            mod.requires_grad_(grad)


class LoraNetwork(TrainableNetwork):
    """A LoRA/LoCon network attached to a BaseModel (one peft adapter across UNet and text encoders)."""

    def __init__(self, base: BaseModel, adapter: str, slots: dict[str, _Slot], *, dim: int, alpha: float,
                 conv_dim: int, conv_alpha: float, trainable: bool) -> None:
        self.base = base
        self.arch = base.arch
        self.adapter = adapter
        self.slots = slots  # kohya name -> slot, in enumeration order
        self.dim, self.alpha, self.conv_dim, self.conv_alpha = dim, alpha, conv_dim, conv_alpha
        self.trainable = trainable
        self.multiplier = 1.0
        self.dropouts = Dropouts()
        self._hooks: list[Any] = []
        self._removed = False

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def create(cls, base: BaseModel, dim: int, alpha: float, conv_dim: int = 0, conv_alpha: float = 1.0,
               train_text_encoder: bool = False, blocks: str | Sequence[str] | None = None,
               dropout: float = 0.0, seed: int | None = None, train_unet: bool = True,
               dtype: torch.dtype = torch.float32, adapter: str = ADAPTER, rank_dropout: float = 0.0,
               module_dropout: float = 0.0, unet_modules: UnetModules = "transformer") -> LoraNetwork:
        """A trainable network: kohya's module set, down kaiming-uniform, up zero (output starts unchanged).

        conv_dim > 0 adds LoCon (resnets, down/upsamplers); 3x3 convs get conv_dim/conv_alpha.
        `blocks` limits training to block slots ("OUT03-OUT05,MID"; BASE = text encoders).
        unet_modules="attention" keeps, of the transformer blocks' linears, only the attention q/k/v/out.
        LoRA weights are kept in `dtype` (fp32 by default, as kohya does; peft casts inputs to it).
        dropout / rank_dropout / module_dropout: kohya's LoRAModule semantics (trainer.network.dropout).
        """
        if dim <= 0:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if alpha <= 0 or (conv_dim and conv_alpha <= 0):
            raise ValueError("alpha and conv_alpha must be > 0")
        if conv_dim < 0:
            raise ValueError(f"conv_dim must be >= 0, got {conv_dim}")
        drops = Dropouts(dropout, rank_dropout, module_dropout)  # validates the ranges
        chosen = parse_blocks(blocks, base.arch)
        targets = lora_targets(base.unet, base.text_encoders, base.arch, conv=conv_dim > 0, train_unet=train_unet,
                               train_te=train_text_encoder, blocks=chosen, unet_modules=unet_modules)
        if not targets:
            raise ValueError("this selection trains no module: check train_unet / train_text_encoder / blocks "
                             "(BASE is the text encoder)")
        specs = {t.kohya_name: ((conv_dim, float(conv_alpha)) if t.uses_conv_dim else (dim, float(alpha)))
                 for t in targets}
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            # peft's own dropout (on the layer input) stays off: kohya's runs on the rank-r activations instead
            net = cls._build(base, adapter, targets, specs, 0.0, trainable=True, dtype=dtype)
        net.dim, net.alpha, net.conv_dim, net.conv_alpha = dim, float(alpha), conv_dim, float(conv_alpha)
        net.dropouts = drops
        for slot in net.slots.values():
            net._hooks += install_dropout(slot.layer, adapter, drops)
        return net

    @classmethod
    def _build(cls, base: BaseModel, adapter: str, targets: Sequence[Target],
               specs: Mapping[str, tuple[int, float]], dropout: float, *, trainable: bool,
               dtype: torch.dtype | None) -> LoraNetwork:
        by_model: dict[str, dict[str, tuple[int, float]]] = {}
        for t in targets:
            by_model.setdefault(t.model, {})[t.path] = specs[t.kohya_name]
        for key, paths in by_model.items():
            _inject(_model_of(base, key), adapter, paths, dropout)
        slots: dict[str, _Slot] = {}
        for t in targets:
            model = _model_of(base, t.model)
            layer = model.get_submodule(t.path)
            if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
                raise RuntimeError(f"peft did not wrap {t.model}.{t.path}")
            r, a = specs[t.kohya_name]
            if layer.r[adapter] != r or float(layer.lora_alpha[adapter]) != float(a):
                raise RuntimeError(f"peft gave {t.path} rank {layer.r[adapter]} alpha {layer.lora_alpha[adapter]}, "
                                   f"expected {r}/{a}")
            if dtype is not None:
                layer.lora_A[adapter].to(dtype)
                layer.lora_B[adapter].to(dtype)
            slots[t.kohya_name] = _Slot(t, layer, r, float(a))
        for key in by_model:
            _model_of(base, key).__dict__[_REGISTRY_ATTR][adapter]["trainable"] = trainable
        net = cls(base, adapter, slots, dim=0, alpha=0.0, conv_dim=0, conv_alpha=0.0, trainable=trainable)
        net._sync()
        return net

    # --- training-loop API --------------------------------------------------------------------

    def _params(self, te: bool) -> Iterator[nn.Parameter]:
        for s in self.slots.values():
            if (s.target.model != "unet") == te:
                yield from s.layer.lora_A[self.adapter].parameters()
                yield from s.layer.lora_B[self.adapter].parameters()

    def targets(self) -> list[Target]:
        return [s.target for s in self.slots.values()]

    # --- state ----------------------------------------------------------------------------------

    def network_state(self) -> dict[str, torch.Tensor]:
        """kohya-named fp32 CPU copies (down, up, 0-dim alpha) of every module: for checkpoints and export."""
        out: dict[str, torch.Tensor] = {}
        for n, s in self.slots.items():
            out[n + SUFFIX_DOWN] = s.layer.lora_A[self.adapter].weight.detach().to("cpu", torch.float32).clone()
            out[n + SUFFIX_UP] = s.layer.lora_B[self.adapter].weight.detach().to("cpu", torch.float32).clone()
            out[n + SUFFIX_ALPHA] = torch.tensor(s.alpha, dtype=torch.float32)
        return out

    def load_network_state(self, sd: Mapping[str, torch.Tensor]) -> None:
        """Strict load (names, shapes and alphas must match this network); raises NetworkStateError."""
        expected = {n + suf for n in self.slots for suf in (SUFFIX_DOWN, SUFFIX_UP, SUFFIX_ALPHA)}
        missing, extra = sorted(expected - sd.keys()), sorted(sd.keys() - expected)
        if missing or extra:
            raise NetworkStateError(
                f"network state does not match this network ({len(missing)} missing, {len(extra)} unexpected; "
                f"e.g. missing {missing[:2]}, unexpected {extra[:2]}): it was saved with other settings "
                "(dim/conv_dim/blocks/text encoder) or for another base model")
        for n, s in self.slots.items():
            a_w = s.layer.lora_A[self.adapter].weight
            b_w = s.layer.lora_B[self.adapter].weight
            down, up = sd[n + SUFFIX_DOWN], sd[n + SUFFIX_UP]
            if tuple(down.shape) != tuple(a_w.shape) or tuple(up.shape) != tuple(b_w.shape):
                raise NetworkStateError(f"{n}: saved shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not "
                                        f"match the network's {tuple(a_w.shape)} / {tuple(b_w.shape)}")
            alpha = float(sd[n + SUFFIX_ALPHA].float().reshape(-1)[0])
            if abs(alpha - s.alpha) > 1e-3 * max(1.0, abs(s.alpha)):
                raise NetworkStateError(f"{n}: saved alpha {alpha} differs from the network's {s.alpha}")
        with torch.no_grad():
            for n, s in self.slots.items():
                s.layer.lora_A[self.adapter].weight.copy_(sd[n + SUFFIX_DOWN])
                s.layer.lora_B[self.adapter].weight.copy_(sd[n + SUFFIX_UP])

    def save(self, path: str | os.PathLike[str], metadata: Mapping[str, str],
             dtype: torch.dtype = torch.float16) -> str:
        """Write the kohya .safetensors atomically; returns sshs_model_hash."""
        if dtype not in (torch.float16, torch.float32, torch.bfloat16):
            raise ValueError(f"save dtype must be float16, float32 or bfloat16, not {dtype}")
        return save_kohya(path, export_state(self, dtype), metadata)

    # --- runtime control ------------------------------------------------------------------------

    def _models(self) -> list[nn.Module]:
        keys = {s.target.model for s in self.slots.values()}
        return [_model_of(self.base, k) for k in ("unet", "te1", "te2") if k in keys]

    def _sync(self) -> None:
        for s in self.slots.values():
            _sync_layer(_model_of(self.base, s.target.model), s.layer)

    def set_multiplier(self, m: float) -> None:
        """Scale this network's output (dW * m): preview strengths, or -1.0 to subtract it."""
        self._check()
        self.multiplier = float(m)
        for s in self.slots.values():
            s.layer.set_scale(self.adapter, self.multiplier)

    def enable(self, on: bool = True) -> None:
        """Switch this network on or off without touching other adapters on the same model."""
        self._check()
        for model in self._models():
            model.__dict__[_REGISTRY_ATTR][self.adapter]["enabled"] = bool(on)
        self._sync()

    def set_trainable(self, on: bool) -> None:
        self._check()
        self.trainable = bool(on)
        for model in self._models():
            model.__dict__[_REGISTRY_ATTR][self.adapter]["trainable"] = bool(on)
        self._sync()

    def remove(self) -> None:
        """Unload: drop this adapter; layers with no adapter left become the original base modules again."""
        if self._removed:
            return
        for h in self._hooks:
            h.remove()
        for s in self.slots.values():
            model = _model_of(self.base, s.target.model)
            layer = s.layer
            if set(layer.lora_A.keys()) <= {self.adapter}:
                parent_name, _, child = s.target.path.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, layer.get_base_layer())
            else:
                layer.delete_adapter(self.adapter)
                _sync_layer(model, layer)
        for model in self._models():
            reg = model.__dict__.get(_REGISTRY_ATTR, {})
            reg.pop(self.adapter, None)
            if not reg:
                model.__dict__.pop(_REGISTRY_ATTR, None)
        self._removed = True

    def _check(self) -> None:
        if self._removed:
            raise RuntimeError("this network was removed")


def _as_lora(source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | KohyaLora) -> KohyaLora:
    return source if isinstance(source, KohyaLora) else read_kohya(source)


def apply_kohya_file(base: BaseModel, source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | KohyaLora,
                     multiplier: float = 1.0, adapter: str | None = None,
                     dtype: torch.dtype | None = None) -> LoraNetwork:
    """Attach a kohya LoRA from any trainer (any per-module rank/alpha, with or without conv) as a FROZEN network.

    For previews and for training on top of another LoRA (copier / difference mode). The returned network
    supports set_multiplier / enable / remove. Raises LoraFileError when the file does not fit the base.
    LoRA weights take the dtype of each base layer unless `dtype` is given.
    """
    lora = _as_lora(source)
    if not lora.is_plain:
        raise LoraFileError(f"{lora.source or 'the LoRA'} is a {'/'.join(sorted(lora.algos))} network; only plain "
                            "LoRA/LoCon files can be attached as a network (preview and merge apply the others)")
    mapping = check_compatible(lora, base)
    name = adapter or _free_adapter_name(base, "applied")
    targets = list(mapping.values())
    # Slots are keyed by the canonical kohya name of the base module, whatever spelling the file used.
    specs = {t.kohya_name: (m.rank, m.alpha) for m, t in ((lora.modules[n], mapping[n]) for n in mapping)}
    net = LoraNetwork._build(base, name, targets, specs, dropout=0.0, trainable=False, dtype=None)
    with torch.no_grad():
        for n, t in mapping.items():
            m = lora.modules[n]
            s = net.slots[t.kohya_name]
            a_w = s.layer.lora_A[name].weight
            b_w = s.layer.lora_B[name].weight
            wdt = dtype or s.layer.get_base_layer().weight.dtype
            if wdt.is_floating_point and wdt != a_w.dtype:
                s.layer.lora_A[name].to(wdt)
                s.layer.lora_B[name].to(wdt)
                a_w, b_w = s.layer.lora_A[name].weight, s.layer.lora_B[name].weight
            # a linear-shaped LoRA on a 1x1 conv (or the reverse) only differs by trailing 1x1 dims
            a_w.copy_(m.down.reshape(a_w.shape))
            b_w.copy_(m.up.reshape(b_w.shape))
    ranks = Counter(m.rank for m in lora.modules.values())
    net.dim = ranks.most_common(1)[0][0] if ranks else 0
    net.alpha = Counter(m.alpha for m in lora.modules.values()).most_common(1)[0][0] if ranks else 0.0
    if multiplier != 1.0:
        net.set_multiplier(multiplier)
    net._sync()
    return net


def _free_adapter_name(base: BaseModel, stem: str) -> str:
    used: set[str] = set()
    for m in (base.unet, *base.text_encoders):
        used |= set(m.__dict__.get(_REGISTRY_ATTR, {}))
    i = 0
    while f"{stem}{i}" in used:
        i += 1
    return f"{stem}{i}"


def merge_into_weights(base: BaseModel, source: str | os.PathLike[str] | Mapping[str, torch.Tensor] | KohyaLora,
                       multiplier: float = 1.0) -> int:
    """W += multiplier * (alpha / r) * up @ down on the base's own weights (in place); returns modules merged.

    For baking a LoRA into a base (checkpoint merge, or the frozen part of difference-mode training).
    The sum is done in float32 and cast back to each weight's dtype.
    """
    lora = _as_lora(source)
    mapping = check_compatible(lora, base)
    with torch.no_grad():
        for n, t in mapping.items():
            layer = _model_of(base, t.model).get_submodule(t.path)
            if isinstance(layer, LoraLayer):
                layer = layer.get_base_layer()
            w = layer.weight
            dw = lora.modules[n].delta_for(w)  # LoHa/LoKr/DoRA too, by the loaders' rules
            w.copy_((w.float() + multiplier * dw).to(w.dtype))
    return len(mapping)


__all__ = ["ADAPTER", "LoraFileError", "LoraNetwork", "NetworkStateError", "apply_kohya_file", "merge_into_weights"]
