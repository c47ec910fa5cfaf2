"""Sampling: txt2img with a base model and any set of kohya LoRAs, grids of strength x seed, preview jobs.

LoRAs are patched into the base's weights A1111-style (`trainer.network.patch`), so swapping them costs no
reload; pipelines come from the one builder, `trainer.infer.pipeline`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer.events import EventSink, JobCancelled, JobFailed, StopCheck, event, never_stop, null_sink  # noqa: E402
from trainer.format.kohya import KohyaLora, LoraFileError, read_kohya, resolve_lora_path
from trainer.infer.grid import save_png, strength_seed_grid  # noqa: E402
from trainer.infer.live import LiveHook, LivePreview, latent_space  # noqa: E402
from trainer.infer.pipeline import build_pipeline, render_image  # noqa: E402
from trainer.models.base import BaseModel  # noqa: E402
from trainer.models.load import load_base  # noqa: E402
from trainer.network.patch import LoraSource, WeightPatcher, as_kohya  # noqa: E402
from trainer.spec import GridSpec, PreviewSpec, SamplePrompt  # noqa: E402
from trainer.train.precision import resolve_device  # noqa: E402

LIVE_EVERY_S = 2.0  # a live preview at most this often while a preview job renders


def _place(m: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # Cast only when needed: diffusers warns on every dtype .to() of a loaded model.
    p = next(m.parameters(), None)
    if p is not None and p.dtype != dtype:
        m.to(device=device, dtype=dtype)
    else:
        m.to(device)


def _source_key(src: LoraSource) -> Any:
    """Identity of a LoRA source for "is this set already patched in?": a file by path and mtime, a
    KohyaLora by object; anything else (a training network whose weights move) never matches."""
    if isinstance(src, str | Path):
        p = Path(src).resolve()
        return f"{p}:{p.stat().st_mtime_ns}" if p.exists() else str(p)
    if isinstance(src, KohyaLora):
        return ("kohya", id(src))
    return object()


class Sampler:
    """Keeps one base pipeline loaded and renders with any set of LoRAs, swapping them without a reload."""

    CACHE_FILES = 8  # parsed LoRA files kept (a grid re-applies the same file at every strength)

    def __init__(self, base: BaseModel | str | Path, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, models_dir: Path | None = None):
        self.device = resolve_device(device)
        if dtype is None:
            dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if not isinstance(base, BaseModel):
            self.ref = str(base)
            base = load_base(base, models_dir)
        else:
            self.ref = str(base.source)
        self.base = base
        # UNet and text encoders in the compute dtype; the VAE stays float32: images are decoded in float32
        # (trainer.infer.pipeline.decode_latents), since an fp16 decode overflows into black or NaN images.
        for m in [base.unet, *base.text_encoders]:
            _place(m, self.device, dtype)
        _place(base.vae, self.device, torch.float32)
        self.pipe = build_pipeline(self.base)
        self.patcher = WeightPatcher(self.base)
        self._applied: tuple = ()  # key of the LoRA set now patched in; () = none
        self._files: dict[str, KohyaLora] = {}

    def _load(self, src: LoraSource) -> KohyaLora:
        if isinstance(src, str | Path):
            key = _source_key(src)
            if key not in self._files:
                if len(self._files) >= self.CACHE_FILES:
                    self._files.pop(next(iter(self._files)))
                self._files[key] = read_kohya(src)
            return self._files[key]
        return as_kohya(src)

    def set_loras(self, loras: Sequence[tuple[LoraSource, float]] = ()) -> None:
        """Make exactly these LoRAs active (restoring the base first when the set changes)."""
        key = tuple((_source_key(s), float(w)) for s, w in loras)
        if key == self._applied:
            return
        self.patcher.restore()
        self._applied = ()
        if loras:
            self.patcher.apply([(self._load(s), float(w)) for s, w in loras])
        self._applied = key

    def clear_loras(self) -> None:
        self.set_loras(())

    @torch.no_grad()
    def render(self, prompt: str, negative: str = "", seed: int = 1111, steps: int = 20, cfg: float = 7.0,
               width: int | None = None, height: int | None = None, sampler: str = "euler_a",
               loras: Sequence[tuple[Any, float]] = (), live: LiveHook | None = None) -> Image.Image:
        self.set_loras(loras)
        return render_image(self.pipe, self.base, prompt, negative, seed, steps, cfg, width, height, sampler, live)

    def render_grid(self, loras: Sequence[tuple[Any, float]], grid: GridSpec,
                    on_event: EventSink = null_sink, should_stop: StopCheck = never_stop,
                    live: LivePreview | None = None) -> list[list[Image.Image]]:
        """images[seed][strength]: every LoRA at (its strength x the column's strength).

        Strength-major order, so each LoRA set is patched in once per column, not once per cell.
        """
        strengths, seeds = list(grid.strengths), list(grid.seeds)
        cells: list[list[Image.Image | None]] = [[None] * len(strengths) for _ in seeds]
        total, done = len(strengths) * len(seeds), 0
        for c, s in enumerate(strengths):
            for r, seed in enumerate(seeds):
                if should_stop():
                    raise JobCancelled()
                if live is not None:
                    live.label = f"strength {s:g}, seed {seed} ({done + 1} of {total})"
                cells[r][c] = self.render(grid.prompt, grid.negative_prompt, seed, grid.steps, grid.cfg,
                                          grid.width, grid.height, grid.sampler,
                                          [(src, w * s) for src, w in loras], live)
                done += 1
                on_event(event("phase", name="rendering grid", current=done, total=total))
        return cells  # type: ignore[return-value]


# --- sampling during training -----------------------------------------------------------------

def render_with_network(base: BaseModel, network: Any, prompts: Sequence[SamplePrompt], out_dir: Path,
                        step: int) -> list[Path]:
    """Render the training samples with the in-memory network at its current weights.

    The network's layers are already injected into base's modules (peft), so the pipeline sees them as they are;
    eval mode for the render, then each module's previous train/eval mode comes back.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = [base.unet, base.vae, *base.text_encoders]
    if isinstance(network, nn.Module):
        modules.append(network)
    modes = [{n: m.training for n, m in mod.named_modules()} for mod in modules]
    pipe = build_pipeline(base)
    paths: list[Path] = []
    try:
        for mod in modules:
            mod.eval()
        with torch.no_grad():
            for i, p in enumerate(prompts):
                img = render_image(pipe, base, p.prompt, p.negative_prompt, p.seed, p.steps, p.cfg, p.width,
                                   p.height, p.sampler)
                path = out_dir / f"step{step:06d}_{i:02d}.png"
                paths.append(save_png(img, path))
    finally:
        for mod, mode in zip(modules, modes, strict=True):
            for n, m in mod.named_modules():
                m.training = mode.get(n, m.training)
    return paths


# --- preview job ------------------------------------------------------------------------------------

def get_sampler(base_ref: str, models_dir: Path | None, device: str | None,
                context: dict[str, Any] | None = None) -> Sampler:
    """A Sampler for this base, reused from the worker's context when it is already loaded there."""
    key = (base_ref, str(models_dir), str(resolve_device(device)))
    if context is not None:
        cached = context.get("sampler")
        if cached is not None and context.get("sampler_key") == key:
            return cached
        context.pop("sampler", None)  # free the old base before loading another
    try:
        sampler = Sampler(base_ref, device=device, models_dir=models_dir)
    except (OSError, ValueError) as e:
        raise JobFailed(f"could not load the base model {base_ref!r}: {e}", reason="bad_input") from e
    if context is not None:
        context["sampler"], context["sampler_key"] = sampler, key
    return sampler


def render_strength_grid_file(sampler: Sampler, loras: Sequence[tuple[Any, float]], grid: GridSpec, out_path: Path,
                              on_event: EventSink = null_sink, should_stop: StopCheck = never_stop,
                              live: LivePreview | None = None) -> Path:
    cells = sampler.render_grid(loras, grid, on_event, should_stop, live)
    img, _ = strength_seed_grid(cells, grid.strengths, grid.seeds, grid_title(grid.prompt, loras))
    return save_png(img, out_path)


def grid_title(prompt: str, loras: Sequence[tuple[Any, float]]) -> str:
    """The grid's title names what it shows: the prompt and each LoRA (file name x its weight; the columns scale it)."""
    names = ", ".join(f"{Path(src).name if isinstance(src, str | Path) else 'LoRA'} x{w:g}" for src, w in loras)
    return f"{prompt}  (LoRA {names})" if names else prompt


def run_preview_job(spec: PreviewSpec, job_dir: Path, on_event: EventSink = null_sink,
                    should_stop: StopCheck = never_stop, models_dir: Path | None = None, device: str | None = None,
                    context: dict[str, Any] | None = None) -> dict[str, Any]:
    """One image when the grid has one strength and one seed, otherwise a strength x seed grid."""
    t0 = time.monotonic()
    out_dir = Path(job_dir) / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    on_event(event("phase", name="loading base model"))
    sampler = get_sampler(spec.base_model, models_dir, device, context)
    loras = [(resolve_lora_path(r.path, models_dir), r.strength) for r in spec.loras]
    grid = spec.grid
    if not loras and len(grid.strengths) > 1:
        # Without a LoRA every column would be the same image: render one column.
        grid = grid.model_copy(update={"strengths": [1.0]})
        on_event(event("log", level="info", message="no LoRA given: one column per seed"))
    try:
        sampler.set_loras(loras)
    except (LoraFileError, OSError) as e:
        raise JobFailed(str(e), reason="bad_input") from e
    outputs: dict[str, Any] = {}
    # A live preview in the job's progress message while it renders (the cheap latent decode, every few seconds).
    live = LivePreview(Path(job_dir) / "live" / "preview.png", latent_space(sampler.base.arch), on_event,
                       every_s=LIVE_EVERY_S)
    if len(grid.strengths) == 1 and len(grid.seeds) == 1:
        on_event(event("phase", name="rendering", current=0, total=1))
        s = grid.strengths[0]
        img = sampler.render(grid.prompt, grid.negative_prompt, grid.seeds[0], grid.steps, grid.cfg, grid.width,
                             grid.height, grid.sampler, [(src, w * s) for src, w in loras], live)
        path = save_png(img, out_dir / f"{spec.output_name}.png")
        on_event(event("file", kind="image", path=str(path)))
        outputs["image"] = str(path)
    else:
        path = render_strength_grid_file(sampler, loras, grid, out_dir / f"{spec.output_name}_grid.png", on_event,
                                         should_stop, live)
        on_event(event("file", kind="grid", path=str(path)))
        outputs["grid"] = str(path)
    summary = {"seconds": round(time.monotonic() - t0, 2), "cells": len(grid.strengths) * len(grid.seeds)}
    on_event(event("finished", outputs=outputs, summary=summary))
    return outputs
