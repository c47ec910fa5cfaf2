"""torchvision.transforms.functional as the peers reach it: ``crop`` (the SDXL example) and ``pil_to_tensor``
(transformers' image_utils imports it whenever a torchvision is importable)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def crop(img: Any, top: int, left: int, height: int, width: int) -> Any:
    if hasattr(img, "crop"):
        return img.crop((left, top, left + width, top + height))
    return img[..., top:top + height, left:left + width]


def pil_to_tensor(pic: Any) -> torch.Tensor:
    """PIL image -> CHW tensor of its own dtype (uint8 for RGB), unscaled."""
    arr = np.array(pic, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
