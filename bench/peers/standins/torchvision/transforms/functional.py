"""torchvision.transforms.functional.crop, the one function the SDXL example imports."""

from __future__ import annotations

from typing import Any


def crop(img: Any, top: int, left: int, height: int, width: int) -> Any:
    if hasattr(img, "crop"):
        return img.crop((left, top, left + width, top + height))
    return img[..., top:top + height, left:left + width]
