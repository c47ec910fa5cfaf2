"""The CUDA path, checked on CPU: what would reach a GPU, in which dtype, and the precision chosen per device.

A fake "cuda" device: `nn.Module.to` is wrapped so that a move to cuda is recorded (module, the dtypes of its frozen
floating-point weights) and then left on the CPU; the setup of a real Trainer runs against it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn

from trainer.train import prior
from trainer.train.loop import Trainer


class CudaMoves:
    """Records every move of a module to a cuda device and keeps the module on the CPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.moves: list[tuple[str, set[torch.dtype]]] = []
        real = nn.Module.to

        def to(module: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
            if device is not None and device.type == "cuda":
                real(module, dtype=dtype) if dtype is not None else None
                frozen = {p.dtype for p in module.parameters() if not p.requires_grad and p.is_floating_point()}
                self.moves.append((type(module).__name__, frozen))
                return module
            return real(module, *args, **kwargs)

        monkeypatch.setattr(nn.Module, "to", to)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 6))


def _fake_render(base: Any, **kw: Any):
    def render(prompt: str, seed: int, w: int, h: int) -> Image.Image:
        return Image.new("RGB", (w, h), (120 + seed % 50, 90, 60))

    return render


@pytest.mark.parametrize("mp", ["bf16", "fp16"])
def test_frozen_weights_reach_the_gpu_only_in_the_compute_dtype(tmp_path: Path, dataset: Path, make_spec, mp: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    moves = CudaMoves(monkeypatch)
    monkeypatch.setattr(prior, "default_render", _fake_render)
    # class images are generated first (the base goes to the GPU for them), then the base moves for training
    spec = make_spec(dataset, steps=1, mixed_precision=mp,
                     concepts=[{"image_dir": str(dataset), "instance_prompt": "scs girl", "class_prompt": "girl",
                                "class_dir": str(tmp_path / "class"), "class_count": 1}])
    tr = Trainer(spec, tmp_path / "job", device="cuda")
    tr.setup()
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[mp]
    unet_te = [(name, dtypes) for name, dtypes in moves.moves if name != "AutoencoderKL"]
    assert {name for name, _ in unet_te} == {"UNet2DConditionModel", "CLIPTextModel"}
    assert len(unet_te) >= 4  # for the class images and again for training
    for name, dtypes in unet_te:
        assert dtypes == {half}, f"{name} went to the GPU holding {dtypes} weights"
    # the LoRA weights stay float32 (trainable, not touched by the cast)
    assert {p.dtype for p in tr.params} == {torch.float32}


def test_images_are_decoded_in_float32_even_under_half_autocast() -> None:
    from trainer.infer.pipeline import build_pipeline, render_image
    from trainer.models.load import load_base

    base = load_base("tiny-sd15")
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    hook = base.vae.decoder.conv_out.register_forward_hook(
        lambda m, args, out: seen.append((m.weight.dtype, out.dtype)))
    try:
        # what the trainer does for samples and class images when it computes in half precision
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            img = render_image(build_pipeline(base), base, "a cat", "", 1, 2, 7.0, 64, 64, "euler")
    finally:
        hook.remove()
    assert seen == [(torch.float32, torch.float32)]
    assert img.size == (64, 64)


def test_a_black_class_image_is_refused_not_saved(tmp_path: Path) -> None:
    from trainer.events import JobFailed
    from trainer.spec import Concept

    concept = Concept(image_dir=str(tmp_path), class_prompt="girl", class_count=2, class_dir=str(tmp_path / "cls"))
    with pytest.raises(JobFailed) as e:
        prior.ensure_class_images(concept, None, "tiny-sd15", tmp_path / "cache", resolution=64,
                                  render=lambda prompt, seed, w, h: Image.new("RGB", (w, h), (0, 0, 0)))
    assert e.value.reason == "nan" and "all black" in str(e.value) and "bf16" in str(e.value)
    assert not list((tmp_path / "cls").glob("*.png"))
