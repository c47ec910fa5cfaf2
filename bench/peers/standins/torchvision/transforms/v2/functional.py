"""torchvision.transforms.v2.functional placeholder: any attribute use says that it is not in the stand-in."""

from typing import Any


def __getattr__(name: str) -> Any:
    raise AttributeError(f"torchvision.transforms.v2.functional.{name} is not in the benchmark's torchvision stand-in")
