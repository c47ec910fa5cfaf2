"""Prior preservation (DreamBooth): class images, and how their loss combines with the instance loss.

API:

- `ensure_class_images(concept, base, base_model_id, cache_root, render=None, on_event=null_sink,
  should_stop=never_stop, *, resolution=None, steps=20, sampler="ddim", guidance_scale=7.0,
  negative_prompt="", seed=0) -> list[Path]`
  Call it once per concept BEFORE the LoRA network is attached to the UNet (class images must come
  from the plain base model) and before scanning/caching the data. It returns exactly
  `concept.class_count` image paths (sorted; [] when class_count is 0: no regularization).
  - folder: `concept.class_dir` when given, else `cache_root/class_images/<sha256(base_model_id,
    class_prompt)[:16]>`, so another base model or class prompt never reuses the wrong images.
  - images already there are counted (any image files, e.g. the user's own); only the missing ones are
    generated, EXACTLY `class_count - present`, as `class_NNNNN.png` with seed `derive(seed, NNNNN)`:
    an interrupted run resumes and produces the same files as an uninterrupted one.
  - every generated PNG is written atomically with a sidecar `.txt` holding the class prompt (written
    first, so a PNG never lacks its caption), and `loraforge_class_images.json` records base model id,
    class prompt, count, resolution, sampler, steps and the seed of every generated file.
  - a folder holding more than class_count images: the first class_count (sorted) are used.
  - events: `phase` "generating class images" with current/total (only when something is generated);
    `should_stop()` is checked before each image and raises `JobCancelled` (finished files are kept).
  - `render(prompt, seed, width, height) -> PIL.Image`; None builds `default_render(base, ...)`: a
    diffusers StableDiffusion(XL)Pipeline sharing the base's modules, at the base's native resolution
    (64 px for the tiny models) unless `resolution` is given.
  The caption a class image trains with is the class prompt (what its sidecar .txt says).

- Loss composition. DreamBooth (diffusers train_dreambooth.py) computes
      loss = mean(loss over instance samples) + prior_loss_weight * mean(loss over class samples)
  `combine_losses(per_sample_loss, is_class, prior_loss_weight)` is exactly that (a group absent from
  the batch contributes 0). `prior_weights(is_class, prior_loss_weight)` gives per-sample weights w with
  `(per_sample_loss * w).mean() == combine_losses(...)` for the same batch, for a loop that multiplies a
  per-sample `loss_weight` (min-SNR weights can be multiplied in as well).
  kohya instead uses static weights (1 for instance, prior_loss_weight for class) and the batch mean;
  both agree whenever a batch is all-instance or all-class (always at batch_size 1) and differ only in
  how a mixed batch is normalised (diffusers' is ~2x kohya's for a half-and-half batch). The spec's
  `prior_loss_form` picks one: "kohya", "diffusers", or "auto" (kohya's for a job imported from a kohya config,
  else diffusers').
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer import atomic
from trainer.data.images import IMAGE_EXTS
from trainer.events import EventSink, JobCancelled, JobFailed, StopCheck, event, never_stop, null_sink

if TYPE_CHECKING:
    from PIL import Image

    from trainer.models.base import BaseModel
    from trainer.spec import Concept

Render = Callable[[str, int, int, int], "Image.Image"]  # (prompt, seed, width, height) -> RGB image
MANIFEST = "loraforge_class_images.json"
PHASE = "generating class images"


# --- where and which -----------------------------------------------------------------------------

def class_cache_dir(cache_root: Path, base_model_id: str, class_prompt: str) -> Path:
    key = hashlib.sha256(f"{base_model_id}\0{' '.join(class_prompt.split())}".encode()).hexdigest()[:16]
    return Path(cache_root) / "class_images" / key


def class_folder(concept: Concept, base_model_id: str, cache_root: Path) -> Path:
    if concept.class_dir:
        return Path(concept.class_dir).expanduser()
    return class_cache_dir(cache_root, base_model_id, concept.class_prompt or "")


def list_class_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def class_seed(seed: int, index: int) -> int:
    """Seed of generated image `index`: stable across runs and machines, independent of the others."""
    digest = hashlib.sha256(f"class:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")  # 32 bits: valid for every torch generator


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- the default renderer --------------------------------------------------------------------------

def default_render(base: BaseModel, *, steps: int = 20, sampler: str = "ddim", guidance_scale: float = 7.0,
                   negative_prompt: str = "") -> Render:
    """txt2img with the base model's own modules, through the one pipeline builder (trainer.infer.pipeline)."""
    from trainer.infer.pipeline import build_pipeline, render_image

    try:
        pipe = build_pipeline(base, sampler)
    except ValueError as e:
        raise ValueError(f"class images: {e}") from None

    def render(prompt: str, seed: int, width: int, height: int) -> Image.Image:
        return render_image(pipe, base, prompt, negative_prompt, seed, steps, guidance_scale, width, height,
                            sampler).convert("RGB")

    return render


# --- class images ----------------------------------------------------------------------------------

def ensure_class_images(
    concept: Concept,
    base: BaseModel | None,
    base_model_id: str,
    cache_root: Path,
    render: Render | None = None,
    on_event: EventSink = null_sink,
    should_stop: StopCheck = never_stop,
    *,
    resolution: int | None = None,
    steps: int = 20,
    sampler: str = "ddim",
    guidance_scale: float = 7.0,
    negative_prompt: str = "",
    seed: int = 0,
) -> list[Path]:
    wanted = concept.class_count or 0  # None (not resolved by the caller): no class images
    if wanted <= 0:
        return []
    prompt = " ".join((concept.class_prompt or "").split())
    folder = class_folder(concept, base_model_id, cache_root)
    present = list_class_images(folder)
    if len(present) >= wanted:
        _check_manifest(folder, base_model_id, prompt, on_event)
        return present[:wanted]
    if not prompt:
        raise JobFailed(
            f"class folder {folder} holds {len(present)} of the {wanted} class images asked for, and the concept "
            "has no class_prompt to generate the rest: set class_prompt (e.g. 'girl') or lower class_count",
            reason="bad_input",
        )
    if render is None and base is None:
        raise ValueError("ensure_class_images needs a base model or a render function to generate class images")
    _check_manifest(folder, base_model_id, prompt, on_event)
    from trainer.infer.pipeline import native_size

    size = resolution or (native_size(base) if base is not None else 512)
    folder.mkdir(parents=True, exist_ok=True)
    missing = wanted - len(present)
    names = {p.name for p in present}
    todo: list[int] = []
    index = 0
    while len(todo) < missing:  # the lowest free class_NNNNN names: a resumed run fills the same ones
        if f"class_{index:05d}.png" not in names:
            todo.append(index)
        index += 1
    if render is None:
        assert base is not None
        render = default_render(base, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                                negative_prompt=negative_prompt)
    manifest = read_manifest(folder) or {}
    generated: dict[str, int] = dict(manifest.get("generated", {})) if manifest.get("class_prompt") == prompt else {}
    settings = {"base_model": base_model_id, "class_prompt": prompt, "resolution": size, "sampler": sampler,
                "steps": steps, "guidance_scale": guidance_scale, "negative_prompt": negative_prompt}
    on_event(event("phase", name=PHASE, current=0, total=len(todo)))
    for done, i in enumerate(todo, start=1):
        if should_stop():
            raise JobCancelled(f"stopped while generating class images ({done - 1} of {len(todo)} done)")
        s = class_seed(seed, i)
        img = render(prompt, s, size, size)
        if is_blank(img):  # trained on as regularisation, a black image would teach the class "black"
            raise JobFailed(
                f"class image {i} for {prompt!r} came out all black (the model produced NaN/inf; with fp16 this is "
                "usually an overflow): it was not saved. Set mixed_precision to bf16 or no (fp32), or give your own "
                f"class images in class_dir ({folder})", reason="nan")
        png = folder / f"class_{i:05d}.png"
        atomic.write_text(png.with_suffix(".txt"), prompt + "\n")
        atomic.write_with(png, lambda p, img=img: img.save(p, format="PNG"))
        generated[png.name] = s
        count = len(list_class_images(folder))
        atomic.write_text(folder / MANIFEST, json.dumps({**settings, "count": count, "generated": generated}, indent=1))
        on_event(event("phase", name=PHASE, current=done, total=len(todo)))
    return list_class_images(folder)[:wanted]


def prepare_class_images(concepts: Sequence[Concept], base: BaseModel, base_model_id: str, cache_root: Path,
                         device: torch.device, autocast: Callable[[], AbstractContextManager[Any]],
                         on_event: EventSink = null_sink, should_stop: StopCheck = never_stop, *,
                         resolution: int | None = None, seed: int = 0) -> list[list[Path] | None]:
    """Class images per concept (None: no prior preservation), generating the missing ones with the plain base.

    On a GPU the base goes there only when something is generated, and back to the CPU afterwards, so its
    memory is free until training starts. Raises JobCancelled on a stop request (finished files are kept).
    """
    modules = [base.unet, base.vae, *base.text_encoders]
    moved = False
    render_fn: list[Render] = []

    def render(prompt: str, seed: int, width: int, height: int) -> Image.Image:
        nonlocal moved
        if not render_fn:
            if device.type == "cuda":
                for m in modules:
                    m.to(device)
                moved = True
            render_fn.append(default_render(base))
        with autocast():
            return render_fn[0](prompt, seed, width, height)

    out: list[list[Path] | None] = []
    try:
        for concept in concepts:
            if not concept.class_count:
                out.append(None)
                continue
            out.append(ensure_class_images(concept, base, base_model_id, cache_root, render=render,
                                           on_event=on_event, should_stop=should_stop, resolution=resolution,
                                           seed=seed))
    finally:
        if moved:
            for m in modules:
                m.to("cpu")
    return out


def is_blank(img: Image.Image, threshold: int = 4) -> bool:
    """True for an all-black image (what NaN latents decode to once converted to 8-bit pixels)."""
    return max(hi for _, hi in img.convert("RGB").getextrema()) <= threshold


def _check_manifest(folder: Path, base_model_id: str, prompt: str, on_event: EventSink) -> None:
    # Only an explicit class_dir can hold images of another model or prompt (cache folders are keyed by both).
    m = read_manifest(folder)
    if m and (m.get("base_model") != base_model_id or (prompt and m.get("class_prompt") != prompt)):
        on_event(event("log", level="warning",
                       message=f"class folder {folder} was generated with base model {m.get('base_model')!r} "
                               f"and class prompt {m.get('class_prompt')!r}; using its images as they are"))


# --- loss composition ------------------------------------------------------------------------------

def _per_sample(loss: torch.Tensor) -> torch.Tensor:
    return loss.reshape(loss.shape[0], -1).mean(dim=1) if loss.dim() > 1 else loss


def combine_losses(per_sample_loss: torch.Tensor, is_class: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """mean(instance losses) + prior_loss_weight * mean(class losses); [B] or [B, ...] (reduced per sample)."""
    loss = _per_sample(per_sample_loss)
    is_class = is_class.to(device=loss.device, dtype=torch.bool).reshape(-1)
    total = loss.new_zeros(())
    if (~is_class).any():
        total = total + loss[~is_class].mean()
    if is_class.any():
        total = total + prior_loss_weight * loss[is_class].mean()
    return total


def prior_weights(is_class: torch.Tensor, prior_loss_weight: float) -> torch.Tensor:
    """Per-sample weights w such that (loss * w).mean() == combine_losses(loss, is_class, prior_loss_weight)."""
    is_class = is_class.to(torch.bool).reshape(-1)
    b = is_class.numel()
    n_class = int(is_class.sum())
    n_inst = b - n_class
    w = torch.empty(b, dtype=torch.float32, device=is_class.device)
    if n_inst:
        w[~is_class] = b / n_inst
    if n_class:
        w[is_class] = prior_loss_weight * b / n_class
    return w
