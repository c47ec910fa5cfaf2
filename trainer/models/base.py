"""A loaded base model (``BaseModel``) and diffusers folders, loaded with no network and no pickle.

Single-file (A1111) checkpoints: ``trainer.models.single_file``; the built-in tiny models: ``trainer.models.builtin``;
what a user names (any of these) is resolved and loaded by ``trainer.models.load.load_base``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from trainer.format.checkpoint import folder_arch
from trainer.format.header import PICKLE_SUFFIXES, Arch


class ModelError(ValueError):
    """A base model could not be loaded; the message says why and what to do."""


@dataclass
class BaseModel:
    arch: Arch
    name: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[CLIPTextModel]
    tokenizers: list[CLIPTokenizer]
    noise_scheduler: DDPMScheduler
    source: Path
    config_dir: Path
    extra: dict = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> BaseModel:
        for m in [self.unet, self.vae, *self.text_encoders]:
            m.to(device=device, dtype=dtype)
        return self


def arch_of_config_dir(folder: Path) -> Arch:
    # An unmarked folder of non-standard widths was always taken for SD1; it still is.
    return folder_arch(folder) or "sd1"


def cache_root() -> Path:
    """Where built models and converted configs are cached (``LORAFORGE_CACHE``)."""
    return Path(os.environ.get("LORAFORGE_CACHE", Path.home() / ".cache" / "loraforge"))


# --- loading -----------------------------------------------------------------------------------

def _refuse_pickled_weights(folder: Path, arch: Arch) -> None:
    """A diffusers folder whose weights exist only as pickles is refused before anything is read."""
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if arch == "sdxl" else [])
    for part in parts:
        d = folder / part
        if any(d.glob("*.safetensors")):
            continue
        pickles = sorted(p.name for p in d.glob("*") if p.suffix in PICKLE_SUFFIXES)
        what = f"only pickle weights ({', '.join(pickles)})" if pickles else "no .safetensors weights"
        raise ModelError(
            f"{d} has {what}. loraforge never loads pickle files because they can run code; convert the folder "
            "once in a trusted environment (diffusers: pipe.save_pretrained(dir, safe_serialization=True)) "
            "and use the converted folder"
        )


def load_diffusers_folder(folder: Path, dtype: torch.dtype = torch.float32, name: str | None = None) -> BaseModel:
    if not (folder / "model_index.json").exists() or not (folder / "unet").is_dir():
        raise ModelError(f"{folder} is not a diffusers model folder (no model_index.json / unet/)")
    arch = arch_of_config_dir(folder)
    _refuse_pickled_weights(folder, arch)
    # use_safetensors: never fall back to pytorch_model.bin / diffusion_pytorch_model.bin (pickles).
    kw = {"local_files_only": True, "torch_dtype": dtype, "use_safetensors": True}
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", **kw)
    vae = AutoencoderKL.from_pretrained(folder / "vae", **kw)
    tes: list = [CLIPTextModel.from_pretrained(folder / "text_encoder", **kw)]
    toks = [CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)]
    if arch == "sdxl":
        tes.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", **kw))
        toks.append(CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True))
    sched = DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    for m in [unet, vae, *tes]:
        m.requires_grad_(False)
        m.eval()
    return BaseModel(arch=arch, name=name or folder.name, unet=unet, vae=vae, text_encoders=tes, tokenizers=toks,
                     noise_scheduler=sched, source=folder, config_dir=folder)


def meta_model(folder: Path, arch: Arch | None = None, name: str | None = None,
               source: Path | None = None) -> BaseModel:
    """A weightless BaseModel (meta device) with a config folder's layout: module names and shapes for key maps and
    compatibility checks, without memory or any weight file. No tokenizers."""
    arch = arch or arch_of_config_dir(folder)

    def cfg(sub: str) -> dict:
        c = json.loads((folder / sub / "config.json").read_text())
        if sub.startswith("text_encoder") and not c.get("vocab_size"):
            c["vocab_size"] = 49408  # tiny configs leave it to the tokenizer; names and layer shapes do not use it
        return c

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg("unet"))
        vae = AutoencoderKL.from_config(cfg("vae"))
        tes: list = [CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))]
        if arch == "sdxl":
            tes.append(CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2"))))
    has_sched = (folder / "scheduler").is_dir()
    sched = DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True) if has_sched else DDPMScheduler()
    return BaseModel(arch=arch, name=name or folder.name, unet=unet, vae=vae, text_encoders=tes, tokenizers=[],
                     noise_scheduler=sched, source=source or folder, config_dir=folder)
