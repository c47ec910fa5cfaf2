"""`python -m trainer demo`: the engine end to end on the built-in toy SD1.5 base, offline, in a few minutes.

It draws ten toy-world pictures of a concept the toy base never saw (a checkered background, trainer/toy/world.py)
captioned with the trigger word ``zqx``, trains a LoRA on them, and renders a before/after grid of a trigger prompt
(rows: seeds, columns: LoRA strength 0 = the base alone, 0.5, 1; titled with the prompt and the LoRA) in which the
concept appears; the toy world's detector scores each column (docs/toy-world.md). It also measures the denoising
loss on the training images at FIXED noise and timesteps before and after (trainer.train.losses.eval_denoise_loss).

A checkout whose toy base was not re-created (tools/pretrain_toy_bases.py) runs on the random-weight tiny-sd15
instead: the loss still drops, but its pictures are noise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer.toy.recipe import CONCEPT, N_IMAGES, SCENE_SEED, STEPS, TRIGGER, concept_lora_overrides

# The concept is a checkered background (trainer/toy/recipe.py says why not the star).
DEMO_PROMPT = f"large yellow square on black with {TRIGGER}"
GRID_STRENGTHS = (0.0, 0.5, 1.0)
GRID_SEEDS = (1, 2, 3)
DEMO_STEPS = STEPS
TOY_BASE = "toy-sd15"
FALLBACK_BASE = "tiny-sd15"  # random weights: used only while the toy base's file is missing


def demo_base() -> str:
    """The toy base when its file is there (a fresh clone ships it), else the random-weight tiny model."""
    from trainer.format.checkpoint import toy_base_path

    return TOY_BASE if toy_base_path(TOY_BASE).is_file() else FALLBACK_BASE

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


def demo_images(folder: Path) -> list[Path]:
    """Ten toy-world pictures of the concept, each captioned with the trigger word for it (img_i.txt)."""
    from trainer.toy.measure import write_dataset
    from trainer.toy.world import concept_scenes

    write_dataset(folder, concept_scenes(CONCEPT, N_IMAGES, seed=SCENE_SEED), trigger=TRIGGER)
    return sorted(folder.glob("*.png"))


def demo_spec(image_dir: Path, steps: int = DEMO_STEPS, base: str = TOY_BASE) -> Any:
    from trainer.spec import TrainSpec

    return TrainSpec.model_validate({
        "base_model": base,
        "output_name": f"demo-{CONCEPT}",
        "concepts": [{"image_dir": str(image_dir), "caption_mode": "caption_only"}],
        **concept_lora_overrides(steps),  # the learning tests' recipe (tests/trainer/test_learning.py)
        "sample": {"prompts": [
            {"prompt": DEMO_PROMPT, "seed": 1, "steps": 12, "width": 64, "height": 64, "cfg": 5.0, "sampler": "euler"},
            {"prompt": f"small red circle on blue with {TRIGGER}", "seed": 2, "steps": 12, "width": 64, "height": 64,
             "cfg": 5.0, "sampler": "euler"},
        ]},
        "state_every_n_steps": max(steps, 1),
    })


def before_after_grid(base: Any, lora: Path, out: Path) -> tuple[Path, dict[float, float]]:
    """The trigger prompt at LoRA strengths 0 (the base alone), 0.5 and 1 for three seeds, labelled; and the mean
    concept score of each column (the toy world's detector: above 0 the background reads as checkered)."""
    from trainer.infer.grid import save_png, strength_seed_grid
    from trainer.infer.sample import Sampler, grid_title
    from trainer.spec import GridSpec
    from trainer.toy.detect import concept_score

    grid = GridSpec(prompt=DEMO_PROMPT, strengths=list(GRID_STRENGTHS), seeds=list(GRID_SEEDS), sampler="euler",
                    steps=12, cfg=5.0)
    loras = [(str(lora), 1.0)]
    cells = Sampler(base, device="cpu").render_grid(loras, grid)
    img, _ = strength_seed_grid(cells, grid.strengths, grid.seeds, grid_title(DEMO_PROMPT, loras))
    scores = {s: sum(concept_score(row[c], CONCEPT) for row in cells) / len(cells)
              for c, s in enumerate(grid.strengths)}
    return save_png(img, out), scores


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
    images = demo_images(out / "images")
    say(f"drew {len(images)} training images in {images[0].parent}")
    base_name = demo_base()
    if base_name != TOY_BASE:
        say(f"the toy base {TOY_BASE} is not in this checkout (tools/pretrain_toy_bases.py re-creates it): "
            f"training the random-weight {base_name}, whose pictures are noise")
    spec = demo_spec(out / "images", steps, base_name)
    base = load_base(base_name)
    data = TrainData.from_spec(spec)
    before = eval_denoise_loss(base, data)
    say(f"denoising loss at fixed noise before training: {before:.4f}")
    job_dir, n = out / "job", 1
    while job_dir.exists():  # a second demo in the same folder trains afresh instead of resuming a finished job
        n += 1
        job_dir = out / f"job-{n}"
    outputs = run_job(spec, job_dir, on_event=on_event or null_sink, device=device)
    lora = Path(outputs["lora"])
    net = apply_kohya_file(base, lora)  # the saved file, as any tool would load it
    after = eval_denoise_loss(base, data)
    net.remove()
    grid, scores = before_after_grid(base, lora, out / "before-after.png")
    result = {
        "lora": str(lora), "samples": list(outputs.get("samples", [])), "plot": outputs.get("plot"),
        "images": [str(p) for p in images], "loss_before": before, "loss_after": after,
        "drop": 1 - after / before if before > 0 else 0.0, "steps": steps, "elapsed_s": time.monotonic() - t0,
        "job_dir": str(job_dir), "grid": str(grid), "concept_scores": scores, "base": base_name,
    }
    say("")
    say(f"denoising loss at fixed noise: {before:.4f} -> {after:.4f} ({100 * result['drop']:.0f}% lower after "
        f"{steps} steps)")
    say(f"LoRA: {lora}")
    for p in result["samples"]:
        say(f"sample: {p}")
    if result["plot"]:
        say(f"loss curve: {result['plot']}")
    say(f"grid: {grid}")
    say(f"{CONCEPT} score of the grid's columns (toy-world detector; higher shows more of it): "
        + ", ".join(f"strength {k:g}: {v:+.3f}" for k, v in scores.items()))
    what = (f"pretrained on the toy world, which never showed it a {CONCEPT} background" if base_name == TOY_BASE
            else "random weights, so the pictures show noise, not the concept")
    say(f"done in {result['elapsed_s']:.0f} s; the LoRA loads in diffusers, ComfyUI, A1111 and kohya "
        f"(base: the built-in {base_name}, {what})")
    return result
