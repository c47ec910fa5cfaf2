"""`python -m trainer demo`: the engine end to end on the built-in tiny SD1.5 model, offline, in about a minute.

It draws a few pictures of a chibi figure with Pillow, trains a LoRA on them with the recipe the tests use to
check that training learns (AdamW lr 1e-2, constant, dim 4 / alpha 4, 64 px), renders the sample prompts with
the trained network, and measures the denoising loss on the training images at FIXED noise and timesteps before
and after (trainer.train.loop.eval_denoise_loss): a drop there means the LoRA learned the images, whatever the
random-weight model's pictures look like.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEMO_PROMPT = "chibi scs girl"
DEMO_STEPS = 60
BASE = "tiny-sd15"

# (background, hair, dress, skin) per picture: the same figure on different backgrounds and dresses.
_PALETTES = [
    ((235, 225, 200), (120, 60, 30), (200, 40, 60), (250, 215, 185)),
    ((190, 220, 240), (120, 60, 30), (40, 90, 200), (250, 215, 185)),
    ((210, 240, 200), (120, 60, 30), (230, 150, 40), (250, 215, 185)),
    ((240, 210, 230), (120, 60, 30), (120, 50, 160), (250, 215, 185)),
]


def draw_chibi(path: Path, palette: tuple[tuple[int, int, int], ...], size: int = 96, shift: int = 0) -> Path:
    """A flat-colour chibi figure: big head, hair, eyes, a triangular dress (learnable structure, not noise)."""
    from PIL import Image, ImageDraw

    bg, hair, dress, skin = palette
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = size / 96
    cx = 48 * s + shift

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [cx + x0 * s, y0 * s, cx + x1 * s, y1 * s]

    d.polygon([(cx, 44 * s), (cx - 22 * s, 90 * s), (cx + 22 * s, 90 * s)], fill=dress)  # dress
    d.ellipse(box(-26, 6, 26, 54), fill=hair)  # hair behind the head
    d.ellipse(box(-21, 14, 21, 54), fill=skin)  # face
    d.pieslice(box(-24, 6, 24, 40), 180, 360, fill=hair)  # fringe
    d.ellipse(box(-12, 30, -5, 39), fill=(30, 30, 40))  # eyes
    d.ellipse(box(5, 30, 12, 39), fill=(30, 30, 40))
    d.arc(box(-6, 38, 6, 47), 20, 160, fill=(170, 60, 60), width=max(1, int(2 * s)))  # smile
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_images(folder: Path, n: int = 4, size: int = 96) -> list[Path]:
    return [draw_chibi(folder / f"chibi_{i}.png", _PALETTES[i % len(_PALETTES)], size, shift=(i % 3 - 1) * 6)
            for i in range(n)]


def demo_spec(image_dir: Path, steps: int = DEMO_STEPS) -> Any:
    from trainer.spec import TrainSpec

    return TrainSpec.model_validate({
        "base_model": BASE,
        "output_name": "demo-chibi",
        "concepts": [{"image_dir": str(image_dir), "instance_prompt": DEMO_PROMPT}],
        "steps": steps,
        "seed": 1111,
        # The tests' learning recipe (tests/trainer/conftest.py RECIPE): it visibly learns within 40-60 steps.
        "network": {"dim": 4, "alpha": 4},
        "optimizer": {"name": "AdamW", "lr": 1e-2, "scheduler": "constant", "weight_decay": 0.0},
        "data": {"resolution": 64},
        "sample": {"prompts": [
            {"prompt": DEMO_PROMPT, "seed": 1, "steps": 20, "width": 64, "height": 64, "cfg": 5.0},
            {"prompt": f"{DEMO_PROMPT}, blue dress", "seed": 2, "steps": 20, "width": 64, "height": 64, "cfg": 5.0},
        ]},
        "state_every_n_steps": max(steps, 1),
    })


def run_demo(out: Path, steps: int = DEMO_STEPS, device: str | None = "cpu",
             on_event: Callable[[dict[str, Any]], None] | None = None,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the demo LoRA under `out`; returns {"lora", "samples", "plot", "loss_before", "loss_after", ...}."""
    from trainer.data.dataset import TrainData
    from trainer.events import null_sink
    from trainer.jobs.runner import run_job
    from trainer.models.load import load_base
    from trainer.network.lora import apply_kohya_file
    from trainer.train.losses import eval_denoise_loss

    t0 = time.monotonic()
    out = Path(out)
    images = make_images(out / "images")
    say(f"drew {len(images)} training images in {images[0].parent}")
    spec = demo_spec(out / "images", steps)
    base = load_base(BASE)
    data = TrainData.from_spec(spec)
    before = eval_denoise_loss(base, data)
    say(f"denoising loss at fixed noise before training: {before:.4f}")
    job_dir, n = out / "job", 1
    while job_dir.exists():  # a second demo in the same folder trains afresh instead of resuming a finished job
        n += 1
        job_dir = out / f"job-{n}"
    outputs = run_job(spec, job_dir, on_event=on_event or null_sink, device=device)
    lora = Path(outputs["lora"])
    apply_kohya_file(base, lora)  # the saved file, as any tool would load it
    after = eval_denoise_loss(base, data)
    result = {
        "lora": str(lora), "samples": list(outputs.get("samples", [])), "plot": outputs.get("plot"),
        "images": [str(p) for p in images], "loss_before": before, "loss_after": after,
        "drop": 1 - after / before if before > 0 else 0.0, "steps": steps, "elapsed_s": time.monotonic() - t0,
        "job_dir": str(job_dir),
    }
    say("")
    say(f"denoising loss at fixed noise: {before:.4f} -> {after:.4f} ({100 * result['drop']:.0f}% lower after "
        f"{steps} steps)")
    say(f"LoRA: {lora}")
    for p in result["samples"]:
        say(f"sample: {p}")
    if result["plot"]:
        say(f"loss curve: {result['plot']}")
    say(f"done in {result['elapsed_s']:.0f} s; the LoRA loads in diffusers, ComfyUI, A1111 and kohya "
        f"(base: the built-in {BASE}, random weights, so the samples show learning, not art)")
    return result
