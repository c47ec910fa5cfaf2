"""Merge jobs: several LoRAs into one (SVD, `trainer.network.svd_merge`) or LoRAs into a base checkpoint, and
the strength x seed grid of a merged LoRA."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainer import atomic
from trainer.events import EventSink, JobFailed, StopCheck, event, never_stop, null_sink
from trainer.format.kohya import KohyaLora, LoraFileError, read_kohya, resolve_lora_path
from trainer.format.lyco import target_shape
from trainer.format.lyco_layout import ALGO_NAMES
from trainer.network.lyco_convert import ConversionError, as_plain_lora
from trainer.network.merge_quality import MergeQuality, quality_text
from trainer.network.patch import as_kohya
from trainer.network.svd_merge import MergeError, check_same_arch, resolve_ranks, svd_merge_to_file
from trainer.network.targets import check_compatible, target_layer
from trainer.spec import MergeSpec

# --- merging LoRAs into a checkpoint ---------------------------------------------------------------

def merge_into_checkpoint(base: Any, loras: Sequence[tuple[Any, float]], out_path: str | os.PathLike[str],
                          half: bool = False, models_dir: Path | None = None) -> Path:
    """W += strength * (alpha / r) * up @ down for every LoRA, written as one A1111 single-file checkpoint.

    base: a single-file .safetensors checkpoint (merged on its own tensors, every other key kept as it was),
    a diffusers folder / built-in model name, or a loaded BaseModel (merged on the diffusers modules, then
    written in the original layout). fp16 when `half`. The file appears atomically.
    """
    from trainer.models import single_file as ckpt

    out_path = Path(out_path)
    src = None if _is_base_model(base) else _resolve_base_path(base, models_dir)
    if src is not None and src.is_file():
        return _merge_into_single_file(src, loras, out_path, half)
    from trainer.models.load import load_base

    model = base if src is None else load_base(src)
    for lora_src, strength in loras:
        lora, targets = _fitting(lora_src, model)
        with torch.no_grad():
            for name, t in targets.items():
                layer = target_layer(model, t)
                d = lora.modules[name].delta_for(layer.weight)  # LoHa/LoKr/DoRA by the loaders' rules
                layer.weight.copy_((layer.weight.float() + strength * d.to(layer.weight.device)).to(layer.weight.dtype))
    ckpt.save_single_file(model, out_path, half=half)
    return out_path


def _fitting(src: Any, model: Any) -> tuple[KohyaLora, dict[str, Any]]:
    """The LoRA and the layers of `model` it targets; MergeError when it does not fit."""
    lora = as_kohya(src)
    try:
        return lora, check_compatible(lora, model)
    except LoraFileError as e:
        raise MergeError(str(e)) from e


def _is_base_model(obj: Any) -> bool:
    return hasattr(obj, "unet") and hasattr(obj, "text_encoders") and hasattr(obj, "arch")


def _resolve_base_path(ref: Any, models_dir: Path | None) -> Path:
    from trainer.models.load import resolve_model_ref

    return resolve_model_ref(str(ref), models_dir)


def checkpoint_skeleton(src: str | os.PathLike[str]) -> Any:
    """A weightless (meta-device) BaseModel with the layout of a single-file checkpoint or a diffusers folder:
    module names and shapes for check_compatible and the original-key map, without reading any tensor data."""
    from trainer.models.base import arch_of_config_dir, meta_model
    from trainer.models.single_file import detect_arch, read_safetensors_header, select_config

    src = Path(src)
    if src.is_dir():  # a diffusers folder: its own configs
        return meta_model(src, arch_of_config_dir(src), src.stem)
    header, metadata = read_safetensors_header(src)
    arch = detect_arch(list(header))
    # A toy base names its config in its metadata: no tensor shape tells its layout (as load_single_file reads it).
    return meta_model(select_config(arch, header, metadata.get("loraforge.config")), arch, src.stem, src)


def _merge_into_single_file(src: Path, loras: Sequence[tuple[Any, float]], out_path: Path, half: bool) -> Path:
    """Merge on the checkpoint's own tensors (every key the file has is written back, merged or not)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from trainer.format.names import checkpoint_key_map

    skeleton = checkpoint_skeleton(src)
    kmap = checkpoint_key_map(skeleton)
    comp = {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}
    with safe_open(str(src), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    work: dict[str, torch.Tensor] = {}  # float32 copies of the tensors we touch
    for lora_src, strength in loras:
        lora, targets = _fitting(lora_src, skeleton)
        for name, t in targets.items():
            m = lora.modules[name]
            ok = kmap.get(f"{comp[t.model]}.{t.path}.weight")
            if ok is None or ok.key not in tensors:
                raise MergeError(f"{src.name} has no tensor for LoRA module {name} "
                                 f"({ok.key if ok else t.path}); the checkpoint is incomplete or of another kind")
            if ok.key not in work:
                work[ok.key] = tensors[ok.key].float()
            target = work[ok.key]
            # SDXL's OpenCLIP text encoder keeps q, k, v stacked in attn.in_proj_weight: add into the row slice.
            view = target[ok.rows[0]:ok.rows[1]] if ok.rows is not None else target
            own = (view.T if ok.kind == "T" else view).reshape(target_shape(t.kind, t.in_features, t.out_features))
            d = strength * m.delta_for(own)  # in the layer's own orientation (DoRA normalises by its columns)
            if ok.kind == "T":
                d = d.reshape(own.shape[0], -1).T
            view += d.reshape(view.shape)
    for k, v in work.items():
        tensors[k] = v.to(tensors[k].dtype)  # back to the checkpoint's own dtype per tensor
    if half:
        tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    return atomic.write_with(out_path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                                             metadata=dict(meta)))


# --- the merge job --------------------------------------------------------------------------------

def run_merge_job(spec: MergeSpec, job_dir: Path, on_event: EventSink = null_sink, should_stop: StopCheck = never_stop,
                  models_dir: Path | None = None, device: str | None = None,
                  context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a /merge job: LoRAs into one LoRA (SVD) or into a checkpoint, then (LoRA merges with a base model and a
    grid) the strength x seed grid of the merged LoRA. `context` (the worker's) lets the grid reuse a loaded base."""
    t0 = time.monotonic()
    out_dir = Path(job_dir) / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    on_event(event("phase", name="reading inputs", current=0, total=len(spec.inputs)))
    loras: list[KohyaLora] = []
    for n, inp in enumerate(spec.inputs):
        path = resolve_lora_path(inp.path, models_dir)
        try:
            loras.append(read_kohya(path))
        except LoraFileError as e:
            raise JobFailed(str(e), reason="bad_input") from e
        on_event(event("phase", name="reading inputs", current=n + 1, total=len(spec.inputs)))

    base_path: Path | None = None
    try:
        arch = check_same_arch(loras)
        if spec.base_model:
            from trainer.models.load import resolve_model_ref

            base_path = resolve_model_ref(spec.base_model, models_dir)
            skeleton = checkpoint_skeleton(base_path)  # shapes only: no weights read for the checks
            arch = check_same_arch(loras, skeleton.arch)
            for lo in loras:
                check_compatible(lo, skeleton)
    except (MergeError, LoraFileError) as e:
        raise JobFailed(str(e), reason="bad_input") from e
    except (OSError, ValueError) as e:
        raise JobFailed(f"could not use the base model {spec.base_model!r}: {e}", reason="bad_input") from e

    outputs: dict[str, Any] = {}
    summary: dict[str, Any] = {"inputs": len(loras), "arch": arch}
    out = out_dir / f"{spec.output_name}.safetensors"
    if spec.into_checkpoint:
        if base_path is None:
            raise JobFailed("merging into a checkpoint needs base_model (the checkpoint to merge into)",
                            reason="bad_input")
        on_event(event("phase", name="merging into checkpoint"))
        try:
            merge_into_checkpoint(base_path, [(lo, inp.ratio) for lo, inp in zip(loras, spec.inputs, strict=True)],
                                  out, half=spec.half)
        except MergeError as e:
            raise JobFailed(str(e), reason="bad_input") from e
        on_event(event("file", kind="checkpoint", path=str(out)))
        outputs["checkpoint"] = str(out)
        if spec.grid is not None:
            on_event(event("log", level="info", message="grid skipped: a checkpoint merge has no LoRA strength"))
    else:
        n_modules = len({n for lo in loras for n in lo.modules})
        on_event(event("phase", name="svd merge", current=0, total=n_modules))

        def tick(done: int, total: int) -> None:
            if done % 16 == 0 or done == total:
                on_event(event("phase", name="svd merge", current=done, total=total))

        try:  # LoHa/LoKr: exact LoRAs by SVD of their full change, once (ranks below are then theirs)
            plain = [as_plain_lora(lo)[0] for lo in loras]
        except ConversionError as e:
            raise JobFailed(str(e), reason="bad_input") from e
        items = [(lo, inp.ratio, inp.block_weights) for lo, inp in zip(plain, spec.inputs, strict=True)]
        converted = [f"{Path(inp.path).name} ({'/'.join(sorted(ALGO_NAMES[a] for a in lo.algos))})"
                     for lo, inp in zip(loras, spec.inputs, strict=True) if lo.algos & {"loha", "lokr"}]
        if converted:
            note = f"to LoRA by SVD of each layer's full weight change: {', '.join(converted)}"
            on_event(event("log", level="info", message="converted " + note))
            summary["converted"] = note  # the result post reads "converted to LoRA by SVD ..."
        quality = MergeQuality()
        try:
            svd_merge_to_file(items, out, spec.rank, spec.conv_rank, spec.clamp_quantile, arch, spec.output_name,
                              dtype=torch.float16 if spec.half else torch.float32, device=device,
                              should_stop=should_stop, on_module=tick, clamp=spec.clamp, quality=quality)
        except MergeError as e:
            raise JobFailed(str(e), reason="bad_input") from e
        q = quality.as_dict()
        on_event(event("log", level="info", message=quality_text(q)))
        summary.update(relative_error=q["relative_error"], retained_energy=q["retained_energy"],
                       block_error={b: f["relative_error"] for b, f in q["blocks"].items()},
                       clamped_modules=q["clamped_modules"])
        on_event(event("file", kind="lora", path=str(out)))
        outputs["lora"] = str(out)
        r, cr = resolve_ranks(plain, spec.rank, spec.conv_rank)
        summary.update(rank=r, conv_rank=cr)
        if spec.grid is not None and spec.base_model:
            from trainer.infer.sample import get_sampler, render_strength_grid_file

            on_event(event("phase", name="loading base model"))
            sampler = get_sampler(spec.base_model, models_dir, device, context)
            path = render_strength_grid_file(sampler, [(out, 1.0)], spec.grid, out_dir / "grid.png", on_event,
                                             should_stop)
            sampler.clear_loras()
            on_event(event("file", kind="grid", path=str(path)))
            outputs["grid"] = str(path)
        elif spec.grid is not None:
            on_event(event("log", level="warning", message="grid skipped: it needs base_model"))
    summary["seconds"] = round(time.monotonic() - t0, 2)
    on_event(event("finished", outputs=outputs, summary=summary))
    return outputs
