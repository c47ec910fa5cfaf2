"""What a user names as a base model (a built-in name, a name in the models folder, or a path) -> a loaded model."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.models.base import BaseModel, ModelError, load_diffusers_folder
from trainer.models.builtin import TINY_MODELS, tiny_model_dir
from trainer.models.refs import ModelRefError, locate_model
from trainer.models.single_file import load_single_file


def resolve_model_ref(ref: str, models_dir: Path | None = None) -> Path:
    """Turn what a user typed (a built-in name, a name in the models folder, or a path) into a path
    (the rule of ``trainer.models.refs``, which the bot's model list follows too)."""
    if ref in TINY_MODELS:
        return tiny_model_dir(ref)
    try:
        path = locate_model(ref, models_dir)
    except ModelRefError as e:
        raise ModelError(str(e)) from None
    assert path is not None
    return path


def load_base(ref: str | Path, models_dir: Path | None = None, dtype: torch.dtype = torch.float32) -> BaseModel:
    path = resolve_model_ref(str(ref), models_dir)
    if path.is_dir():
        return load_diffusers_folder(path, dtype=dtype)
    return load_single_file(path, dtype=dtype)
