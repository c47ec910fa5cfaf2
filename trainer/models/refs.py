"""What a user names as a base model -> a path: one rule for the engine (load, plan, preflight) and the bot's list.

Torch-free: the bot and the CLI's checks before loading use it. A name is looked up in the models folder and in
its A1111 ``Stable-diffusion/`` subfolder (a ``.safetensors`` checkpoint, with or without its extension, or a
diffusers folder), then as a path. Pickle checkpoints (``.ckpt``/``.pt``...) are found only to be refused by name.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainer.format.checkpoint import TINY_CONFIGS, TOY_BASES, toy_base_path
from trainer.format.header import PICKLE_SUFFIXES

TINY_NAMES = tuple(TINY_CONFIGS.values())
MODEL_EXTS = (".safetensors",)
A1111_SUBFOLDER = "Stable-diffusion"


class ModelRefError(ValueError):
    """A base model name that names nothing usable; the message says what to use instead."""


def model_folders(models_dir: str | os.PathLike[str]) -> list[Path]:
    """The folders base models are listed from and found in: the models folder, then its A1111 subfolder."""
    root = Path(models_dir)
    return [root, root / A1111_SUBFOLDER]


def is_base_model_path(p: Path) -> bool:
    """A single-file .safetensors checkpoint or a diffusers folder."""
    return (p.is_file() and p.suffix.lower() in MODEL_EXTS) or (p.is_dir() and (p / "model_index.json").is_file())


def _candidates(ref: str, models_dir: str | os.PathLike[str] | None) -> list[Path]:
    out: list[Path] = []
    # The models folder first: a name there must not be shadowed by a same-named file in the working folder.
    if models_dir is not None:
        for folder in model_folders(models_dir):
            out += [folder / ref, *(folder / f"{ref}{ext}" for ext in MODEL_EXTS)]
    out.append(Path(ref).expanduser())
    return out


def find_model(ref: str, models_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The file or folder ``ref`` names (not a built-in tiny name), None when nothing by that name exists."""
    for c in _candidates(ref, models_dir):
        if c.exists():
            return c
    return None


def _shipped_toy() -> list[str]:
    """The toy bases whose files are there (a checkout whose bases were not re-created yet offers none)."""
    return [n for n in TOY_BASES if toy_base_path(n).is_file()]


def locate_model(ref: str, models_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The path of a base model named by a user, None for a built-in tiny model. A pickle checkpoint by that name is
    returned too (to be refused by name, see ``refuse_pickle``). Raises ModelRefError when the name names nothing."""
    if ref in TINY_NAMES:
        return None
    if ref in TOY_BASES:  # shipped in the package, found wherever the models folder is
        path = toy_base_path(ref)
        if not path.is_file():
            raise ModelRefError(f"the built-in toy base {ref!r} is missing ({path}); re-create it with "
                                "`python tools/pretrain_toy_bases.py` (docs/toy-world.md) or reinstall loraforge")
        return path
    path = find_model(ref, models_dir)
    if path is None and models_dir is not None:
        for folder in model_folders(models_dir):
            path = next((folder / f"{ref}{s}" for s in PICKLE_SUFFIXES if (folder / f"{ref}{s}").is_file()), None)
            if path:
                break
    if path is None:
        where = f" or in the models folder {models_dir}" if models_dir is not None else ""
        raise ModelRefError(
            f"base model {ref!r} not found as a path{where}; use a built-in model ({', '.join((*_shipped_toy(), *TINY_NAMES))}), "
            "a diffusers folder, or a single-file .safetensors checkpoint")
    return path


def refuse_pickle(path: Path) -> None:
    """Refuse a pickle checkpoint by its name, before anything reads it (the loader also refuses its content)."""
    if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelRefError(
            f"base model {path} is a {path.suffix} (pickle) file, which can run code when loaded, so it is never "
            "read: convert it to .safetensors (e.g. with A1111's checkpoint merger or diffusers' conversion "
            "scripts) and pass that file")
