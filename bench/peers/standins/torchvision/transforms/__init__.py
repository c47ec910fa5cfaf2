"""torchvision.transforms as the peers use it: Compose, Resize, CenterCrop, RandomCrop, RandomHorizontalFlip,
ToTensor, Normalize, Lambda, InterpolationMode (PIL images in, CHW float tensors out)."""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import functional  # noqa: F401 - torchvision.transforms.functional


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL = {InterpolationMode.NEAREST: Image.NEAREST, InterpolationMode.NEAREST_EXACT: Image.NEAREST,
        InterpolationMode.BILINEAR: Image.BILINEAR, InterpolationMode.BICUBIC: Image.BICUBIC,
        InterpolationMode.BOX: Image.BOX, InterpolationMode.HAMMING: Image.HAMMING,
        InterpolationMode.LANCZOS: Image.LANCZOS}


class Compose:
    def __init__(self, transforms: list[Callable[[Any], Any]]):
        self.transforms = transforms

    def __call__(self, x: Any) -> Any:
        for t in self.transforms:
            x = t(x)
        return x


class Lambda:
    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, x: Any) -> Any:
        return self.fn(x)


class Resize:
    """An int resizes the shorter side to it (aspect kept); a pair resizes to (h, w)."""

    def __init__(self, size: int | tuple[int, int], interpolation: InterpolationMode | None = None, **_: Any):
        self.size, self.interpolation = size, interpolation or InterpolationMode.BILINEAR

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if isinstance(self.size, int):
            s = self.size
            new = (s, max(1, int(s * h / w))) if w <= h else (max(1, int(s * w / h)), s)
        else:
            new = (self.size[1], self.size[0])
        return img.resize(new, _PIL[self.interpolation])


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class CenterCrop:
    def __init__(self, size: int | tuple[int, int]):
        self.size = _pair(size)

    def __call__(self, img: Image.Image) -> Image.Image:
        th, tw = self.size
        w, h = img.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return img.crop((left, top, left + tw, top + th))


class RandomCrop:
    def __init__(self, size: int | tuple[int, int]):
        self.size = _pair(size)

    @staticmethod
    def get_params(img: Image.Image, output_size: tuple[int, int]) -> tuple[int, int, int, int]:
        w, h = img.size
        th, tw = output_size
        return random.randint(0, h - th), random.randint(0, w - tw), th, tw

    def __call__(self, img: Image.Image) -> Image.Image:
        top, left, th, tw = self.get_params(img, self.size)
        return img.crop((left, top, left + tw, top + th))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Any) -> Any:
        if random.random() >= self.p:
            return img
        return img.transpose(Image.FLIP_LEFT_RIGHT) if isinstance(img, Image.Image) else img.flip(-1)


class ToTensor:
    """PIL image or HWC uint8 array -> CHW float tensor in [0, 1]."""

    def __call__(self, pic: Any) -> torch.Tensor:
        arr = np.asarray(pic)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()
        return t.float().div(255) if t.dtype == torch.uint8 else t.float()


class Normalize:
    def __init__(self, mean: list[float], std: list[float]):
        self.mean, self.std = mean, std

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
        return (t - mean) / std
