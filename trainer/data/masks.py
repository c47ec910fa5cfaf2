"""Loss masks (kohya's `--masked_loss`): one mask image per training image, white where the loss counts.

kohya's convention: the masks of a dataset subset live in its `conditioning_data_dir` under the image's own
name (any image extension: `cat1.png` masks `cat1.jpg`); the loss uses the mask's red channel scaled to [0, 1]
(white 1: learned, black 0: ignored), resized with the image, centre-cropped and flipped with it, averaged down
to the latent grid ("area" interpolation) and multiplied into the element-wise loss before its mean. So a
half-black mask halves that image's loss rather than renormalising it, as in kohya.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from trainer.data.buckets import Bucket
from trainer.data.images import IMAGE_EXTS, crop_to_bucket, image_size, load_image
from trainer.events import JobFailed


def find_masks(images: list[Path], mask_dir: Path, where: str) -> list[Path]:
    """The mask of each image: the file in `mask_dir` with the image's name (kohya: same stem, any image type)."""
    if not mask_dir.is_dir():
        raise JobFailed(f"mask folder {mask_dir} does not exist; check {where}.mask_dir", reason="bad_input")
    by_stem: dict[str, Path] = {}
    for p in sorted(mask_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
            by_stem.setdefault(p.stem, p)
    missing = [p.name for p in images if p.stem not in by_stem]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise JobFailed(f"{len(missing)} image(s) have no mask in {mask_dir} ({shown}): add a mask image with the "
                        f"same name (white: learn, black: ignore), or remove {where}.mask_dir", reason="bad_input")
    return [by_stem[p.stem] for p in images]


def load_mask(mask_path: Path, image_path: Path, bucket: Bucket, flipped: bool) -> torch.Tensor:
    """[1, H, W] uint8 (255: full loss) at the bucket's size, cropped and flipped exactly as the image is."""
    rgb = load_image(mask_path)
    size = image_size(image_path)  # a mask of another size is stretched over the image first (kohya resizes too)
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    red = crop_to_bucket(rgb, bucket).image.getchannel("R")
    if flipped:
        red = ImageOps.mirror(red)
    return torch.from_numpy(np.asarray(red, dtype=np.uint8).copy())[None]


def to_loss_grid(masks: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """[b, 1, H, W] uint8 masks -> [b, 1, h, w] weights in [0, 1] on the loss's grid (kohya: mode "area")."""
    m = masks.to(device=loss.device, dtype=torch.float32) / 255.0
    return torch.nn.functional.interpolate(m, size=loss.shape[2:], mode="area")
