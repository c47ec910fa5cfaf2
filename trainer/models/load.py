"""What a user names as a base model (a built-in name, a name in the models folder, or a path) -> a loaded model."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.format.checkpoint import TOY_BASES, toy_base_path
from trainer.models.base import BaseModel, ModelError, load_diffusers_folder
from trainer.models.builtin import TINY_MODELS, tiny_model_dir
from trainer.models.single_file import load_single_file


def resolve_model_ref(ref: str, models_dir: Path | None = None) -> Path:
    """Turn what a user typed (a built-in name, a name in the models folder, or a path) into a path."""
    if ref in TINY_MODELS:
        return tiny_model_dir(ref)
    if ref in TOY_BASES:
        path = toy_base_path(ref)
        if not path.is_file():
            raise ModelError(f"the built-in toy base {ref!r} is missing ({path}); re-create it with "
                             "`python tools/pretrain_toy_bases.py` (docs/toy-world.md) or reinstall loraforge")
        return path
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
        f"base model {ref!r} not found as a path{where}; use a built-in model ({', '.join((*TOY_BASES, *TINY_MODELS))}), "
        "a diffusers folder, or a single-file .safetensors checkpoint"
    )


def load_base(ref: str | Path, models_dir: Path | None = None, dtype: torch.dtype = torch.float32) -> BaseModel:
    path = resolve_model_ref(str(ref), models_dir)
    if path.is_dir():
        return load_diffusers_folder(path, dtype=dtype)
    return load_single_file(path, dtype=dtype)
