"""Loading one image and cropping it to the size it trains at.

`load_image` honours EXIF orientation and puts transparency on white; `crop_to_bucket` / `resize_center_crop`
return the pixels with the geometry SDXL is conditioned on; `to_tensor` gives [3, H, W] in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.data.buckets import Bucket, apply_plan, center_crop_plan, fit_to_bucket, sdxl_size_conditioning
from trainer.events import JobFailed

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos: honour the orientation tag
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                # Transparent areas become white, not the undefined colour the pixels happen to hold.
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, rgba).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise JobFailed(
            f"{path} could not be read as an image ({type(e).__name__}: {e}); remove or replace that file",
            reason="bad_input",
        ) from None


@dataclass
class Cropped:
    image: Image.Image
    original_size: tuple[int, int]  # (h, w) of the file, for SDXL's size conditioning
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]  # (h, w) trained at


def image_size(path: Path) -> tuple[int, int]:
    """(w, h) as `load_image` will return it (EXIF orientation applied), from the header alone."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap width and height
                w, h = h, w
            return w, h
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise JobFailed(
            f"{path} could not be read as an image ({type(e).__name__}: {e}); remove or replace that file",
            reason="bad_input",
        ) from None


def crop_to_bucket(img: Image.Image, bucket: Bucket) -> Cropped:
    """Resize to cover `bucket` (w, h), centre crop; the geometry SDXL is conditioned on comes along."""
    plan = fit_to_bucket(img.size, bucket)
    h, w, top, left, th, tw = sdxl_size_conditioning(img.size, plan, bucket)
    return Cropped(apply_plan(img, plan, bucket), (h, w), (top, left), (th, tw))


def resize_center_crop(img: Image.Image, resolution: int) -> Cropped:
    """Shorter side to `resolution`, then a centred square crop (kohya's non-bucketed path)."""
    plan = center_crop_plan(img.size, resolution)
    bucket = (resolution, resolution)
    h, w, top, left, th, tw = sdxl_size_conditioning(img.size, plan, bucket)
    return Cropped(apply_plan(img, plan, bucket), (h, w), (top, left), (th, tw))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
