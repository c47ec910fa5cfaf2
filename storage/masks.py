"""Loss masks in uploads (masked loss: white where the loss counts, black where it is ignored).

The engine reads kohya's convention (trainer.data.masks): a mask folder holding each mask under its image's
name. Uploads reach it so:
- inside a .zip, a file in a folder named ``mask`` or ``masks`` is the mask of the image with the same name
  beside that folder (``set.zip/masks/cat1.png`` masks ``set.zip/cat1.jpg``), or anywhere in the upload or the
  dataset when exactly one image has that name (``set.zip/img/cat1.jpg`` + ``set.zip/mask/cat1.png``, kohya's
  two-folder layout);
- any upload (attachments have no folders): ``<image name>-masklabel.<ext>`` (OneTrainer's name) masks
  ``<image name>.<any ext>``.
A mask must be a readable image of exactly its image's size; a mask may come later than its image (``/dataset
add`` pairs it with the image already in the dataset). The bot's training snapshot writes the masks under the
images' stored names (bot.service) and turns masked_loss on.
"""

from __future__ import annotations

import io
import os
import posixpath
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MASKS_DIR = "masks"  # inside a training snapshot: the concept's mask_dir
MASK_DIRS = frozenset({"mask", "masks"})
MASK_SUFFIX = "-masklabel"
HOW = ("masks pair with images by name: `masks/<image name>.png` inside a zip, or `<image name>-masklabel.png` "
       "(white: learn, black: ignore)")


@dataclass(frozen=True, slots=True)
class AcceptedMask:
    name: str  # display name of the mask file
    image_sha256: str  # the image it masks (in this upload or already in the dataset)
    image_name: str
    sha256: str
    ext: str
    bytes: int
    data: bytes


@dataclass(frozen=True, slots=True)
class KnownImage:
    """An image a mask may pair with: one of this upload (accepted or a duplicate) or a dataset row."""

    name: str
    key: str  # lowercased path without extension, as intake keys upload items
    sha256: str
    width: int
    height: int


def mask_target(key: str) -> str | None:
    """The key of the image a file with this key masks, or None when the file is not a mask."""
    folder, _, stem = key.rpartition("/")
    if stem.endswith(MASK_SUFFIX) and len(stem) > len(MASK_SUFFIX):
        return posixpath.join(folder, stem[: -len(MASK_SUFFIX)])
    parent, _, last = folder.rpartition("/")
    if last in MASK_DIRS and folder.count("/") >= 1:  # zip entries only: "<archive>.zip/.../masks/<stem>"
        return posixpath.join(parent, stem)
    return None


def known_rows(rows: Iterable[Any]) -> list[KnownImage]:
    """Dataset rows (``DatasetImage``) as images a mask may pair with, keyed by their upload names."""
    return [KnownImage(r.original_name, posixpath.splitext(r.original_name)[0].lower(), r.sha256, r.width, r.height)
            for r in rows]


def pair_masks(masks: list[tuple[str, str, bytes]], images: list[KnownImage], check: Callable[[str, bytes], Any]
               ) -> tuple[list[AcceptedMask], list[tuple[str, str]]]:
    """(accepted masks, rejected (name, reason)) for masks given as (display name, key, bytes). ``images``:
    this upload's first, then the dataset's; ``check(name, data)``: intake's image check (raises IntakeError)."""
    by_key: dict[str, KnownImage] = {}
    by_stem: dict[str, dict[str, KnownImage]] = {}
    for im in images:
        by_key.setdefault(im.key, im)
        by_stem.setdefault(posixpath.basename(im.key), {}).setdefault(im.sha256, im)
    accepted: list[AcceptedMask] = []
    rejected: list[tuple[str, str]] = []
    masked: dict[str, str] = {}  # image sha -> the mask's name
    for name, key, data in masks:
        target_key = mask_target(key) or key
        image = by_key.get(target_key)
        if image is None:
            same = by_stem.get(posixpath.basename(target_key), {})
            image = next(iter(same.values())) if len(same) == 1 else None
            if len(same) > 1:
                rejected.append((name, f"could mask any of {len(same)} images named "
                                       f"`{posixpath.basename(target_key)}`: put it in a `masks` folder beside "
                                       "its image inside the zip"))
                continue
        if image is None:
            rejected.append((name, f"is a mask, but no image named `{posixpath.basename(target_key)}` came with it "
                                   f"or is in the dataset; upload the image too ({HOW})"))
            continue
        try:
            checked = check(name, data)
        except Exception as e:  # noqa: BLE001 - intake's IntakeError: its reason says what is wrong
            rejected.append((name, str(getattr(e, "reason", e))))
            continue
        if (checked.width, checked.height) != (image.width, image.height):
            rejected.append((name, f"is {checked.width}x{checked.height} but its image `{image.name}` is "
                                   f"{image.width}x{image.height}: a mask must be exactly the size of its image"))
            continue
        if image.sha256 in masked:
            rejected.append((name, f"is a second mask for `{image.name}` (after `{masked[image.sha256]}`); "
                                   "upload one mask per image"))
            continue
        masked[image.sha256] = name
        accepted.append(AcceptedMask(name, image.sha256, image.name, checked.sha256, checked.ext, len(data), data))
    return accepted, rejected


def _white_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buf, format="PNG")
    return buf.getvalue()


def write_masks(folder: Path, images: Iterable[Any], stored: Callable[[str, str], Path]) -> None:
    """A snapshot's mask folder: each image's mask (hardlinked) under the image's stored name, as the engine
    pairs them (same stem). The engine wants a mask for every image: one without gets an all-white mask (the
    engine stretches a mask over its image), which counts the loss everywhere, as no mask would."""
    folder.mkdir(parents=True, exist_ok=True)
    white: bytes | None = None
    for im in images:
        if im.mask_sha256:
            src, dst = stored(im.mask_sha256, im.mask_ext), folder / f"{im.sha256}.{im.mask_ext}"
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        else:
            white = white or _white_png()
            (folder / f"{im.sha256}.png").write_bytes(white)
