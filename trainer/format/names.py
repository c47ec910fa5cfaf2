"""diffusers <-> original (LDM/SGM, as AUTOMATIC1111 stores it) parameter names for SD1.x, SD2 and SDXL.

diffusers only ships original -> diffusers (``diffusers.loaders.single_file_utils``); this module is the inverse
of exactly those converters, and the round-trip tests in tests/trainer/test_checkpoint.py hold it to that.

Public API (used by trainer.models.single_file for saving and by the LoRA -> checkpoint merge):

- ``OrigKey(key, rows=None, kind="copy")``: where one diffusers tensor lives in the original file.
  ``rows=(start, stop)``: the tensor is that row slice of ``key`` (OpenCLIP ``attn.in_proj_weight``/``in_proj_bias``
  hold q, k, v stacked in that order). ``kind``: ``"copy"``; ``"T"`` (stored transposed: OpenCLIP
  ``text_projection``); ``"conv1x1"`` (diffusers Linear stored as a 1x1 conv ``[out, in, 1, 1]``: VAE mid attention).
  To merge a LoRA delta ``dW`` (diffusers shape) into a checkpoint tensor ``T`` under ``ok = OrigKey(...)``:
  ``T[ok.rows[0]:ok.rows[1]] += dW`` when rows is set; ``T += dW.T`` for "T"; ``T += dW[..., None, None]`` for "conv1x1".
- ``diffusers_to_original_unet_key(name, layers_per_block=2, up_block_has_attention=None, prefix=UNET_PREFIX)``:
  a diffusers UNet parameter name OR module path (``down_blocks.1.attentions.0.proj_in``) -> original name.
  With ``prefix=""`` it gives the SGM module path kohya uses for SDXL LoRA names
  (``input_blocks.4.1.proj_in`` -> ``lora_unet_input_blocks_4_1_proj_in``); ``trainer.network.targets`` names
  and places every LoRA module with it, so checkpoints and LoRA files share this one table.
  ``up_block_has_attention`` (one bool per up block) is needed only for upsampler names.
- ``unet_layout(unet)``: (layers_per_block, up_block_has_attention) of a diffusers UNet, from its config.
- ``unet_key_map(unet)``, ``vae_key_map(vae)``, ``text_encoder_key_map(te, prefix, openclip)``: every
  ``state_dict()`` name of the module -> ``OrigKey`` (full key, prefix included).
- ``checkpoint_key_map(model)``: ``{"unet.<name>" | "vae.<name>" | "text_encoder.<name>" | "text_encoder_2.<name>": OrigKey}``
  for a ``trainer.models.base.BaseModel``.
- ``to_original_state_dict(model, dtype=None)``: the whole model as an original-layout state dict.

Text encoders: transformers 5 flattened ``CLIPTextModel`` (state-dict names have no ``text_model.`` prefix);
``CLIPTextModelWithProjection`` keeps it. Both are accepted: the prefix is stripped before mapping.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from trainer.format.checkpoint import TEXT_ENCODER_PREFIXES, UNET_PREFIX, VAE_PREFIX

if TYPE_CHECKING:
    from trainer.models.base import BaseModel

Kind = Literal["copy", "T", "conv1x1"]


@dataclass(frozen=True)
class OrigKey:
    key: str
    rows: tuple[int, int] | None = None
    kind: Kind = "copy"


# --- UNet --------------------------------------------------------------------------------------

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def _resnet_rest(rest: str) -> str:
    # rest is "" (the resnet module itself) or ".<part>[.<param>]"
    if not rest:
        return ""
    part, _, tail = rest[1:].partition(".")
    if part not in _RESNET_PARTS:
        raise KeyError(f"unknown resnet part {part!r}")
    return "." + _RESNET_PARTS[part] + (("." + tail) if tail else "")


_UNET_FIXED = [
    (re.compile(r"^time_embedding\.linear_1(.*)$"), "time_embed.0"),
    (re.compile(r"^time_embedding\.linear_2(.*)$"), "time_embed.2"),
    (re.compile(r"^add_embedding\.linear_1(.*)$"), "label_emb.0.0"),
    (re.compile(r"^add_embedding\.linear_2(.*)$"), "label_emb.0.2"),
    (re.compile(r"^class_embedding\.linear_1(.*)$"), "label_emb.0.0"),
    (re.compile(r"^class_embedding\.linear_2(.*)$"), "label_emb.0.2"),
    (re.compile(r"^conv_in(.*)$"), "input_blocks.0.0"),
    (re.compile(r"^conv_norm_out(.*)$"), "out.0"),
    (re.compile(r"^conv_out(.*)$"), "out.2"),
]
_DOWN_RES = re.compile(r"^down_blocks\.(\d+)\.resnets\.(\d+)(.*)$")
_DOWN_ATT = re.compile(r"^down_blocks\.(\d+)\.attentions\.(\d+)(.*)$")
_DOWN_SAMPLE = re.compile(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)$")
_MID_RES = re.compile(r"^mid_block\.resnets\.(\d+)(.*)$")
_MID_ATT = re.compile(r"^mid_block\.attentions\.0(.*)$")
_UP_RES = re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)(.*)$")
_UP_ATT = re.compile(r"^up_blocks\.(\d+)\.attentions\.(\d+)(.*)$")
_UP_SAMPLE = re.compile(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv(.*)$")


def diffusers_to_original_unet_key(
    name: str,
    layers_per_block: int = 2,
    up_block_has_attention: Sequence[bool] | None = None,
    prefix: str = UNET_PREFIX,
) -> str:
    """diffusers UNet parameter name or module path -> original (LDM/SGM) name (see the module doc)."""
    n = layers_per_block + 1  # input blocks per down level (resnets + the downsampler slot); output blocks per up level
    for pat, new in _UNET_FIXED:
        if m := pat.match(name):
            return prefix + new + m.group(1)
    if m := _DOWN_RES.match(name):
        i, j = int(m.group(1)), int(m.group(2))
        return f"{prefix}input_blocks.{n * i + j + 1}.0{_resnet_rest(m.group(3))}"
    if m := _DOWN_ATT.match(name):
        i, j = int(m.group(1)), int(m.group(2))
        return f"{prefix}input_blocks.{n * i + j + 1}.1{m.group(3)}"
    if m := _DOWN_SAMPLE.match(name):
        return f"{prefix}input_blocks.{n * (int(m.group(1)) + 1)}.0.op{m.group(2)}"
    if m := _MID_RES.match(name):
        return f"{prefix}middle_block.{2 * int(m.group(1))}{_resnet_rest(m.group(2))}"
    if m := _MID_ATT.match(name):
        return f"{prefix}middle_block.1{m.group(1)}"
    if m := _UP_RES.match(name):
        i, j = int(m.group(1)), int(m.group(2))
        return f"{prefix}output_blocks.{n * i + j}.0{_resnet_rest(m.group(3))}"
    if m := _UP_ATT.match(name):
        i, j = int(m.group(1)), int(m.group(2))
        return f"{prefix}output_blocks.{n * i + j}.1{m.group(3)}"
    if m := _UP_SAMPLE.match(name):
        i = int(m.group(1))
        if up_block_has_attention is None:
            raise ValueError("up_block_has_attention is needed to place an upsampler (its slot is 1 or 2)")
        slot = 2 if up_block_has_attention[i] else 1
        return f"{prefix}output_blocks.{n * i + n - 1}.{slot}.conv{m.group(2)}"
    raise KeyError(f"no original-layout name for UNet parameter {name!r}")


def unet_layout(unet: torch.nn.Module) -> tuple[int, list[bool]]:
    """(layers_per_block, up_block_has_attention) from the UNet's config; a per-block list of layer counts has
    no original-layout equivalent (ValueError)."""
    cfg = unet.config  # type: ignore[attr-defined]
    lpb = cfg.layers_per_block
    if not isinstance(lpb, int):
        raise ValueError("per-block layers_per_block has no original-layout equivalent")
    return lpb, ["CrossAttn" in t for t in cfg.up_block_types]


def unet_key_map(unet: torch.nn.Module, prefix: str = UNET_PREFIX) -> dict[str, OrigKey]:
    lpb, has_attn = unet_layout(unet)
    return {
        name: OrigKey(diffusers_to_original_unet_key(name, lpb, has_attn, prefix))
        for name in unet.state_dict()
    }


# --- VAE ---------------------------------------------------------------------------------------

_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def diffusers_to_original_vae_key(name: str, num_up_blocks: int, prefix: str = VAE_PREFIX) -> OrigKey:
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return OrigKey(prefix + name)
    side, _, rest = name.partition(".")  # encoder | decoder
    if side not in ("encoder", "decoder"):
        raise KeyError(f"no original-layout name for VAE parameter {name!r}")
    head = prefix + side + "."
    for old, new in _VAE_FIXED.items():
        if rest.startswith(old + "."):
            return OrigKey(head + new + rest[len(old):])
    if rest.startswith(("conv_in.", "conv_out.")):
        return OrigKey(head + rest)
    if m := re.match(r"^down_blocks\.(\d+)\.resnets\.(\d+)(.*)$", rest):
        return OrigKey(f"{head}down.{m.group(1)}.block.{m.group(2)}{_vae_resnet(m.group(3))}")
    if m := re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)$", rest):
        return OrigKey(f"{head}down.{m.group(1)}.downsample.conv{m.group(2)}")
    if m := re.match(r"^up_blocks\.(\d+)\.resnets\.(\d+)(.*)$", rest):
        # the original decoder counts its levels from the bottom: up.{n-1-i} is diffusers' up_blocks.i
        return OrigKey(f"{head}up.{num_up_blocks - 1 - int(m.group(1))}.block.{m.group(2)}{_vae_resnet(m.group(3))}")
    if m := re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv(.*)$", rest):
        return OrigKey(f"{head}up.{num_up_blocks - 1 - int(m.group(1))}.upsample.conv{m.group(2)}")
    if m := re.match(r"^mid_block\.resnets\.(\d+)(.*)$", rest):
        return OrigKey(f"{head}mid.block_{int(m.group(1)) + 1}{_vae_resnet(m.group(2))}")
    if m := re.match(r"^mid_block\.attentions\.0\.(.+)\.(weight|bias)$", rest):
        part, what = m.group(1), m.group(2)
        if part not in _VAE_ATTN:
            raise KeyError(f"no original-layout name for VAE parameter {name!r}")
        # the original stores q/k/v/proj_out as 1x1 convs; diffusers as Linear
        kind: Kind = "conv1x1" if what == "weight" and part != "group_norm" else "copy"
        return OrigKey(f"{head}mid.attn_1.{_VAE_ATTN[part]}.{what}", kind=kind)
    raise KeyError(f"no original-layout name for VAE parameter {name!r}")


def vae_key_map(vae: torch.nn.Module, prefix: str = VAE_PREFIX) -> dict[str, OrigKey]:
    n_up = len(vae.config.up_block_types)  # type: ignore[attr-defined]
    return {name: diffusers_to_original_vae_key(name, n_up, prefix) for name in vae.state_dict()}


# --- text encoders -----------------------------------------------------------------------------

_OPENCLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def diffusers_to_original_te_key(name: str, prefix: str, openclip: bool, hidden_size: int) -> OrigKey:
    """A transformers CLIP text-model state-dict name (with or without ``text_model.``) -> original name."""
    if name == "text_projection.weight":
        if not openclip:
            raise KeyError("a CLIP-L text encoder has no text_projection in the original layout")
        return OrigKey(prefix + "text_projection", kind="T")  # OpenCLIP computes x @ P; Linear stores P.T
    bare = name.removeprefix("text_model.")
    if not openclip:
        return OrigKey(prefix + bare)
    if bare in _OPENCLIP_FIXED:
        return OrigKey(prefix + _OPENCLIP_FIXED[bare])
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", bare)
    if not m:
        raise KeyError(f"no OpenCLIP name for text-encoder parameter {name!r}")
    layer, part, what = m.groups()
    head = f"{prefix}transformer.resblocks.{layer}."
    if part.startswith("self_attn.") and part[len("self_attn."):] in _QKV:
        i = _QKV[part[len("self_attn."):]]
        return OrigKey(f"{head}attn.in_proj_{what}", rows=(i * hidden_size, (i + 1) * hidden_size))
    if part not in _OPENCLIP_LAYER:
        raise KeyError(f"no OpenCLIP name for text-encoder parameter {name!r}")
    return OrigKey(f"{head}{_OPENCLIP_LAYER[part]}.{what}")


def text_encoder_key_map(te: torch.nn.Module, prefix: str, openclip: bool) -> dict[str, OrigKey]:
    hidden = te.config.hidden_size  # type: ignore[attr-defined]
    # position_ids is a buffer that recent transformers does not persist; the original files don't need it either
    return {
        name: diffusers_to_original_te_key(name, prefix, openclip, hidden)
        for name in te.state_dict()
        if not name.endswith("position_ids")
    }


# --- whole model -------------------------------------------------------------------------------

def checkpoint_key_map(model: BaseModel) -> dict[str, OrigKey]:
    out: dict[str, OrigKey] = {}
    for name, ok in unet_key_map(model.unet).items():
        out["unet." + name] = ok
    for name, ok in vae_key_map(model.vae).items():
        out["vae." + name] = ok
    layouts = TEXT_ENCODER_PREFIXES[model.arch]
    if len(layouts) != len(model.text_encoders):
        raise ValueError(f"{model.arch} expects {len(layouts)} text encoder(s), the model has {len(model.text_encoders)}")
    for idx, (te, (prefix, openclip)) in enumerate(zip(model.text_encoders, layouts, strict=True)):
        comp = "text_encoder" if idx == 0 else f"text_encoder_{idx + 1}"
        for name, ok in text_encoder_key_map(te, prefix, openclip).items():
            out[f"{comp}.{name}"] = ok
    return out


def _component_tensors(model: BaseModel) -> Iterable[tuple[str, torch.Tensor]]:
    for comp, mod in [("unet", model.unet), ("vae", model.vae)]:
        for k, v in mod.state_dict().items():
            yield f"{comp}.{k}", v
    for idx, te in enumerate(model.text_encoders):
        comp = "text_encoder" if idx == 0 else f"text_encoder_{idx + 1}"
        for k, v in te.state_dict().items():
            yield f"{comp}.{k}", v


def to_original_state_dict(model: BaseModel, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the model under its original-layout name (q/k/v re-stacked, 1x1 convs re-shaped)."""
    kmap = checkpoint_key_map(model)
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, t in _component_tensors(model):
        ok = kmap.get(name)
        if ok is None:
            continue  # unpersisted buffers (position_ids)
        t = t.detach()
        if ok.kind == "T":
            t = t.T
        elif ok.kind == "conv1x1":
            t = t[:, :, None, None]
        if ok.rows is not None:
            stacked.setdefault(ok.key, []).append((ok.rows[0], t))
            continue
        if ok.key in out:
            raise ValueError(f"two parameters map to {ok.key}")
        out[ok.key] = t
    for key, parts in stacked.items():
        out[key] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])], dim=0)
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return {k: v.contiguous() for k, v in out.items()}
