"""What a base model on disk is, from header key names and config files alone (torch-free: the bot uses it too).

- ``checkpoint_arch(keys)``: SD1.x / SD2.x / SDXL from the key names of an original-layout (A1111) checkpoint.
- ``describe_non_checkpoint(keys)``: a short guess at what a file that is not an SD checkpoint holds.
- ``folder_arch(folder)``: the architecture of a diffusers folder (or one of our config folders).
- ``file_arch(path)``: ``checkpoint_arch`` of a single file's header, None when it cannot be told.
- ``CONFIGS_DIR``, ``FULL_CONFIGS``, ``TINY_CONFIGS``: the config folders we ship, per architecture.
- ``TOY_BASES``, ``toy_base_path(name)``: the toy bases we ship (pretrained on the toy world, tiny layouts).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from trainer.format.header import ARCH_NAMES, Arch, HeaderError, read_file_header

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
# Full-size architectures whose configs we ship (single-file loading and key-set checks) and the built-in tiny ones.
FULL_CONFIGS: dict[Arch, str] = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}
TINY_CONFIGS: dict[Arch, str] = {"sd1": "tiny-sd15", "sd2": "tiny-sd2", "sdxl": "tiny-sdxl"}
# Built-in toy bases: single-file checkpoints in the tiny layouts, pretrained on trainer.toy.world
# (tools/pretrain_toy_bases.py; docs/toy-world.md). Name -> architecture.
TOY_BASES: dict[str, Arch] = {"toy-sd15": "sd1", "toy-sdxl": "sdxl"}
TOY_BASES_DIR = CONFIGS_DIR.parent / "toy" / "bases"

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# (prefix, OpenCLIP layout?) per text encoder, in BaseModel.text_encoders order.
TEXT_ENCODER_PREFIXES: dict[str, list[tuple[str, bool]]] = {
    "sd1": [("cond_stage_model.transformer.text_model.", False)],
    "sd2": [("cond_stage_model.model.", True)],
    "sdxl": [("conditioner.embedders.0.transformer.text_model.", False), ("conditioner.embedders.1.model.", True)],
}


def checkpoint_arch(keys: Iterable[str]) -> Arch | None:
    """SD1/SD2/SDXL from the key names of an original-layout checkpoint; None when they fit none of them."""
    ks = set(keys)
    if UNET_PREFIX + "label_emb.0.0.weight" in ks and any(k.startswith("conditioner.embedders.1.model.") for k in ks):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in ks):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in ks):
        return "sd1"
    return None


def describe_non_checkpoint(keys: Iterable[str]) -> str:
    """A short guess at what a file that is not an SD checkpoint holds."""
    ks = set(keys)
    if any(s in k for k in ks for s in ("lora_down", "lora_up", "lora_A", "lora_B", "hada_w1", "lokr_w1", "oft_")):
        return "a LoRA/LyCORIS network; use it as a LoRA (for /merge or /preview), not as a base model"
    if ks and all(k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", VAE_PREFIX)) for k in ks):
        return "a VAE alone; base models need the UNet and text encoder(s) too"
    if ks & {"emb_params", "clip_l", "clip_g", "string_to_param", "string_to_token"}:
        return "a textual-inversion embedding"
    if any(k.startswith(("control_model.", "controlnet_")) for k in ks):
        return "a ControlNet"
    if any(k.startswith(("joint_blocks.", "double_blocks.", UNET_PREFIX + "joint_blocks.",
                         UNET_PREFIX + "double_blocks.")) for k in ks):
        return "an SD3/Flux-family model, which loraforge does not train"
    if "conv_in.weight" in ks and any(k.startswith("down_blocks.") for k in ks):
        return "a diffusers-format UNet weights file; pass the whole diffusers model folder instead"
    if any(k.startswith("conditioner.embedders.0.model.") for k in ks):
        return "an SDXL refiner, which is not a base model for LoRA training"
    sample = ", ".join(sorted(ks)[:3]) or "no tensors"
    return f"something unknown (first keys: {sample})"


def file_arch(path: str | os.PathLike[str]) -> Arch | None:
    """The architecture of a single-file checkpoint from its header's key names; None when it cannot be told."""
    try:
        header, _, _ = read_file_header(path)
    except HeaderError:
        return None
    return checkpoint_arch(header)


def folder_arch(folder: str | os.PathLike[str]) -> Arch | None:
    """The architecture of a diffusers folder from its configs: our ``loraforge.json`` marker, the pipeline class,
    the UNet's cross-attention width, then the text encoder's width. None when it cannot be told.
    Raises OSError / ValueError for unreadable or malformed config files."""
    folder = Path(folder)
    own = folder / "loraforge.json"
    if own.is_file():
        arch = json.loads(own.read_text()).get("arch")
        if arch in ARCH_NAMES:
            return arch  # type: ignore[no-any-return]
    index = json.loads((folder / "model_index.json").read_text())
    if "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index:
        return "sdxl"
    for sub, key, table in (("unet", "cross_attention_dim", {768: "sd1", 1024: "sd2", 2048: "sdxl"}),
                            ("text_encoder", "hidden_size", {768: "sd1", 1024: "sd2"})):
        cfg = folder / sub / "config.json"
        if cfg.is_file():
            arch = table.get(json.loads(cfg.read_text()).get(key))
            if arch is not None:
                return arch  # type: ignore[return-value]
    return None


def builtin_arch(name: str) -> Arch | None:
    """The architecture of a built-in model name (``tiny-sd15``, ``toy-sd15``...), None for any other name."""
    if name in TOY_BASES:
        return TOY_BASES[name]
    return next((a for a, n in TINY_CONFIGS.items() if n == name), None)


def toy_base_path(name: str) -> Path:
    """The shipped file of a built-in toy base (``toy-sd15`` -> trainer/toy/bases/toy-sd15.safetensors)."""
    return TOY_BASES_DIR / f"{name}.safetensors"
