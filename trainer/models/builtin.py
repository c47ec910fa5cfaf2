"""The built-in tiny models (``tiny-sd15``, ``tiny-sd2``, ``tiny-sdxl``): real diffusers models with random weights
(seed 0), built on first use from the configs we ship and cached as diffusers folders, so tests and demos load them
through the same code as any base model. Their tokenizers are byte-level (``trainer.models.tokenizers``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainer.atomic import folder_atomic
from trainer.format.checkpoint import CONFIGS_DIR, TINY_CONFIGS
from trainer.models.base import ModelError, cache_root
from trainer.models.tokenizers import build_local_tokenizer

TINY_MODELS = tuple(TINY_CONFIGS.values())


def config_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.json")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def tiny_model_dir(name: str) -> Path:
    """The diffusers folder of a built-in tiny model, built on first use (random weights, seed 0)."""
    if name not in TINY_MODELS:
        raise ModelError(f"unknown built-in model {name!r}; built-in models are {', '.join(TINY_MODELS)}")
    src = CONFIGS_DIR / name
    dest = cache_root() / "tiny" / f"{name}-{config_hash(src)}"
    if (dest / "model_index.json").exists():
        return dest
    with folder_atomic(dest, replace=False) as tmp:  # a concurrent builder's identical result may win
        _build_tiny(src, tmp)
    return dest


def _build_tiny(src: Path, out: Path) -> None:
    shutil.copytree(src, out, dirs_exist_ok=True)
    tok = build_local_tokenizer()
    index = json.loads((src / "model_index.json").read_text())
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        for te_name in ("text_encoder", "text_encoder_2"):
            if te_name not in index:
                continue
            cfg = json.loads((src / te_name / "config.json").read_text())
            cfg["vocab_size"] = len(tok)
            cfg["bos_token_id"] = tok.bos_token_id
            cfg["eos_token_id"] = tok.eos_token_id
            cfg["pad_token_id"] = tok.pad_token_id
            cls = CLIPTextModelWithProjection if "Projection" in cfg["architectures"][0] else CLIPTextModel
            cls(CLIPTextConfig(**cfg)).save_pretrained(out / te_name)
            tok.save_pretrained(out / te_name.replace("text_encoder", "tokenizer"))
        UNet2DConditionModel.from_config(json.loads((src / "unet" / "config.json").read_text())).save_pretrained(
            out / "unet"
        )
        AutoencoderKL.from_config(json.loads((src / "vae" / "config.json").read_text())).save_pretrained(out / "vae")
    finally:
        torch.random.set_rng_state(gen_state)
