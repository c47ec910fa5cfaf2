"""torchvision.io placeholder: transformers imports it whenever a torchvision is importable; the peers never decode
images through it (they use PIL), so every use says what is missing."""

import enum
from typing import Any


class ImageReadMode(enum.Enum):
    UNCHANGED = 0
    GRAY = 1
    GRAY_ALPHA = 2
    RGB = 3
    RGB_ALPHA = 4


def __getattr__(name: str) -> Any:
    raise AttributeError(f"torchvision.io.{name} is not in the benchmark's torchvision stand-in (images load via PIL)")


def decode_image(*_: Any, **__: Any) -> Any:
    raise NotImplementedError("torchvision.io.decode_image is not in the benchmark's torchvision stand-in")
