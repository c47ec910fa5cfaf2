"""Base models: built-in tiny models and diffusers folders, loaded the same way, with no network.

Single-file (A1111) checkpoints are handled in `trainer.models.single_file`; every path ends in `load_base`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

Arch = Literal["sd1", "sd2", "sdxl"]
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
TINY_MODELS = ("tiny-sd15", "tiny-sd2", "tiny-sdxl")
# Full-size architectures whose configs we ship (used for single-file loading and key-set checks).
FULL_CONFIGS = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}


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
    marker = folder / "loraforge.json"
    if marker.exists():
        return json.loads(marker.read_text())["arch"]
    index = json.loads((folder / "model_index.json").read_text())
    if "XL" in index.get("_class_name", "") or "text_encoder_2" in index:
        return "sdxl"
    te = json.loads((folder / "text_encoder" / "config.json").read_text())
    return "sd2" if te.get("hidden_size") == 1024 else "sd1"


# --- tokenizer ---------------------------------------------------------------------------------

def _bytes_to_unicode() -> list[str]:
    # CLIP's byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 on.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_local_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer built in memory: every text tokenizes, nothing is downloaded."""
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 77
    return tok


# --- tiny models -------------------------------------------------------------------------------

def _config_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.json")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("LORAFORGE_CACHE", Path.home() / ".cache" / "loraforge"))


def tiny_model_dir(name: str) -> Path:
    """The diffusers folder of a built-in tiny model, built on first use (random weights, seed 0)."""
    if name not in TINY_MODELS:
        raise ModelError(f"unknown built-in model {name!r}; built-in models are {', '.join(TINY_MODELS)}")
    src = CONFIGS_DIR / name
    dest = cache_root() / "tiny" / f"{name}-{_config_hash(src)}"
    if (dest / "model_index.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest.parent))
    try:
        _build_tiny(src, tmp)
        try:
            os.replace(tmp, dest)  # atomic: a concurrent builder's identical result may already be there
        except OSError:
            if not (dest / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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


# --- loading -----------------------------------------------------------------------------------

def resolve_model_ref(ref: str, models_dir: Path | None = None) -> Path:
    """Turn what a user typed (a built-in name, a name in the models folder, or a path) into a path."""
    if ref in TINY_MODELS:
        return tiny_model_dir(ref)
    # The models folder first: a name there must not be shadowed by a same-named file in the working folder.
    candidates: list[Path] = []
    if models_dir is not None:
        candidates += [models_dir / ref, *(models_dir / f"{ref}{ext}" for ext in (".safetensors", ".ckpt", ".pt"))]
    candidates.append(Path(ref).expanduser())
    for c in candidates:
        if c.exists():
            return c
    where = f" or in the models folder {models_dir}" if models_dir else ""
    raise ModelError(
        f"base model {ref!r} not found as a path{where}; use a built-in model ({', '.join(TINY_MODELS)}), "
        "a diffusers folder, or a single-file .safetensors checkpoint"
    )


def load_base(ref: str | Path, models_dir: Path | None = None, dtype: torch.dtype = torch.float32) -> BaseModel:
    path = resolve_model_ref(str(ref), models_dir)
    if path.is_dir():
        return load_diffusers_folder(path, dtype=dtype)
    from trainer.models.single_file import load_single_file  # single files need the key-layout code

    return load_single_file(path, dtype=dtype)


PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


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
