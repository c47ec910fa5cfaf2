"""Merging: several LoRAs into one by SVD (kohya svd_merge_lora / SuperMerger "remake dimension"), and LoRAs
into a base checkpoint.

SVD merge per module (facts.md 1):
    W = sum_i ratio_i * block_weight_i * (alpha_i / r_i) * up_i @ down_i      (float32; 3x3 convs flattened)
    k = min(rank, in_channels, out_channels);  U, S, Vh = svd(W);  up = U[:, :k] diag(S[:k]);  down = Vh[:k]
    clamp up and down to the `clamp_quantile` quantile of their joined values;  alpha = k.

W is never formed. It is B @ A with B = [c_i * up_i] (out x R) and A = [down_i] (R x in), R = sum of input
ranks, so QR(B) = Qb Rb and QR(A^T) = Qa Ra give W = Qb (Rb Ra^T) Qa^T: the SVD of the R x R core yields the
same leading singular triplets as the dense SVD at O((out + in) R^2) cost instead of O(out * in * min(out, in)).
The dense path remains only where it is cheaper or needed (R >= min(out, in), or more output rank than R).

The clamp follows kohya's code exactly: hi = quantile(cat(up.flatten(), down.flatten()), q) over the SIGNED
values, then both are clamped to [-hi, hi]. Singular vectors carry an arbitrary sign per pair and a signed
quantile notices it, so each pair is given a canonical sign first (largest |entry| of the U column positive):
results are then independent of the SVD path and of the LAPACK build.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from trainer.events import EventSink, JobCancelled, JobFailed, StopCheck, event, never_stop, null_sink
from trainer.format.header import ARCH_NAMES
from trainer.format.kohya import (
    KohyaLora,
    LoraFileError,
    delta_weight,
    read_kohya,
    resolve_lora_path,
    save_kohya,
)
from trainer.format.metadata import network_metadata, spec_architecture
from trainer.network.targets import block_of_kohya_name, block_slots, check_compatible
from trainer.spec import MergeSpec

Rank = int | Literal["auto"]
MergeInputLike = tuple[Any, float, Mapping[str, float] | None] | tuple[Any, float]

TORCH_QUANTILE_MAX = 1 << 24  # torch.quantile refuses larger inputs


class MergeError(ValueError):
    """The inputs cannot be merged as asked; the message says why and what to do."""


# --- inputs ---------------------------------------------------------------------------------------

def as_lora(src: Any) -> KohyaLora:
    """A path (read with the safe, header-checked reader), a kohya state dict, or a KohyaLora."""
    if isinstance(src, KohyaLora):
        return src
    if isinstance(src, str | os.PathLike | Mapping):
        return read_kohya(src)
    raise TypeError(f"cannot merge a {type(src).__name__}; give a path, a kohya state dict or a KohyaLora")


@dataclass
class _Input:
    lora: KohyaLora
    ratio: float
    block_weights: dict[str, float]


def _normalize_inputs(loras: Sequence[MergeInputLike], arch: str | None) -> tuple[list[_Input], str]:
    if not loras:
        raise MergeError("nothing to merge: give at least one LoRA")
    inputs: list[_Input] = []
    for item in loras:
        src, ratio = item[0], float(item[1])
        bw = dict(item[2] or {}) if len(item) > 2 else {}  # type: ignore[misc]
        inputs.append(_Input(as_lora(src), ratio, bw))
    arch = check_same_arch([i.lora for i in inputs], arch)
    slots = set(block_slots(arch))  # type: ignore[arg-type]
    for i in inputs:
        norm: dict[str, float] = {}
        for k, v in i.block_weights.items():
            key = k.strip().upper()
            if key not in slots:
                raise MergeError(f"{i.lora.source}: unknown block {k!r} in block weights for {ARCH_NAMES[arch]}; "
                                 f"valid blocks are {', '.join(block_slots(arch))}")  # type: ignore[arg-type]
            norm[key] = float(v)
        i.block_weights = norm
    return inputs, arch


def check_same_arch(loras: Sequence[KohyaLora], arch: str | None = None) -> str:
    """All inputs must be for one architecture (SD1, SD2 or SDXL); returns it.

    A file whose architecture cannot be told (tiny test models) takes the others' (or `arch`).
    """
    known = [(f"input {n + 1} ({lo.source})" if lo.source else f"input {n + 1}", lo.arch)
             for n, lo in enumerate(loras) if lo.arch is not None]
    archs = {a for _, a in known} | ({arch} if arch else set())
    if len(archs) > 1:
        listing = ", ".join(f"{src}: {ARCH_NAMES.get(a, a)}" for src, a in known)
        want = f"; the target is {ARCH_NAMES.get(arch, arch)}" if arch else ""
        raise MergeError(f"cannot merge LoRAs made for different base models: {listing}{want}. "
                         "Merge only LoRAs of one kind (all SD1.x, all SD2.x or all SDXL)")
    if archs:
        return archs.pop()
    # Nothing says: guess from names (SDXL names/prefixes are distinctive), else SD1.
    names = [n for lo in loras for n in lo.modules]
    sdxl = any(n.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks_", "lora_unet_output_blocks_",
                             "lora_unet_middle_block_")) for n in names)
    return "sdxl" if sdxl else "sd1"


# --- the SVD core ---------------------------------------------------------------------------------

def quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile (linear interpolation) for any size: beyond torch's input limit, via sorting."""
    x = x.flatten()
    if x.numel() <= TORCH_QUANTILE_MAX:
        return torch.quantile(x, q)
    pos = q * (x.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, x.numel() - 1)
    vals = torch.sort(x).values
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def clamp_factors(up: torch.Tensor, down: torch.Tensor, q: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's outlier clamp: both factors to [-hi, hi], hi = the q quantile of their joined values."""
    if q is None or q >= 1.0:
        return up, down
    hi = quantile(torch.cat([up.flatten(), down.flatten()]), q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each singular pair so the largest-magnitude entry of its U column is positive."""
    if u.shape[1] == 0:
        return u, vh
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1], device=u.device)])
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def truncated_svd_lowrank(b: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD of W = b @ a (b: out x R, a: R x in) without forming W.  Needs k <= R <= min(out, in)."""
    qb, rb = torch.linalg.qr(b)      # out x R, R x R
    qa, ra = torch.linalg.qr(a.T)    # in x R,  R x R
    uc, s, vhc = torch.linalg.svd(rb @ ra.T)
    return qb @ uc[:, :k], s[:k], vhc[:k] @ qa.T


def truncated_svd_dense(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def merge_module(terms: Sequence[tuple[float, torch.Tensor, torch.Tensor]], k: int,
                 clamp_quantile: float | None = 0.99, device: torch.device | str | None = None,
                 method: Literal["auto", "lowrank", "dense"] = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """SVD-merge one module. terms: (coefficient c_i = ratio * block weight * alpha/r, up_i, down_i) with up/down
    already flattened to 2-D. Returns (up [out, k], down [k, in]) in float32, clamped."""
    dev = torch.device(device) if device is not None else terms[0][1].device
    b = torch.cat([c * up.to(dev, torch.float32) for c, up, _ in terms], dim=1)
    a = torch.cat([down.to(dev, torch.float32) for _, _, down in terms], dim=0)
    out_dim, in_dim = b.shape[0], a.shape[1]
    r_total = b.shape[1]
    use_dense = method == "dense" or (method == "auto" and (r_total >= min(out_dim, in_dim) or k > r_total))
    if use_dense:
        u, s, vh = truncated_svd_dense(b @ a, k)
    else:
        u, s, vh = truncated_svd_lowrank(b, a, k)
    u, vh = canonical_signs(u, vh)
    up = u * s[None, :]
    return clamp_factors(up, vh, clamp_quantile)


def resolve_ranks(loras: Sequence[KohyaLora], rank: Rank, conv_rank: Rank) -> tuple[int, int]:
    """'auto' = the largest input rank (for conv: the largest 3x3-conv input rank, else the linear rank)."""
    lin = [m.rank for lo in loras for m in lo.modules.values() if m.kind != "conv3x3"]
    conv = [m.rank for lo in loras for m in lo.modules.values() if m.kind == "conv3x3"]
    r = max(lin or conv or [1]) if rank == "auto" else int(rank)
    cr = (max(conv) if conv else r) if conv_rank == "auto" else int(conv_rank)
    if r < 1 or cr < 1:
        raise MergeError("rank and conv_rank must be at least 1")
    return r, cr


def svd_merge(loras: Sequence[MergeInputLike], rank: Rank = "auto", conv_rank: Rank = "auto",
              clamp_quantile: float | None = 0.99, arch: str | None = None,
              device: torch.device | str | None = None, method: Literal["auto", "lowrank", "dense"] = "auto",
              should_stop: StopCheck = never_stop,
              on_module: Any = None) -> dict[str, torch.Tensor]:
    """Merge LoRAs into one kohya state dict (float32) — kohya's svd_merge_lora.py result.

    loras: (path | state dict | KohyaLora, ratio[, block weights {"IN04": 0.5, ...} or None]).
    A module missing from an input gets nothing from it. Block weights scale each module's contribution by
    the weight of its block (blocks not named keep 1.0). Mixing architectures raises MergeError.
    """
    inputs, arch = _normalize_inputs(loras, arch)
    r, cr = resolve_ranks([i.lora for i in inputs], rank, conv_rank)
    names = sorted({n for i in inputs for n in i.lora.modules})
    _check_shapes(inputs, names)
    out: dict[str, torch.Tensor] = {}
    for idx, name in enumerate(names):
        if should_stop():
            raise JobCancelled()
        terms, ref = [], None
        for i in inputs:
            m = i.lora.modules.get(name)
            if m is None:
                continue
            ref = ref or m
            w = _block_weight(i.block_weights, name, arch) if i.block_weights else 1.0
            c = i.ratio * w * m.scale
            if c == 0.0:
                continue  # contributes nothing; also keeps zero columns out of the QR
            terms.append((c, m.up.flatten(1), m.down.flatten(1)))
        assert ref is not None
        out_ch, in_ch = ref.up.shape[0], ref.down.shape[1]
        k = min(cr if ref.kind == "conv3x3" else r, in_ch, out_ch)
        if terms:
            up, down = merge_module(terms, k, clamp_quantile, device, method)
        else:  # every contribution weighted to zero: an exact zero delta of the right shape
            up = torch.zeros(out_ch, k)
            down = torch.zeros(k, ref.down.flatten(1).shape[1])
        if ref.down.dim() == 4:
            up = up.reshape(out_ch, k, 1, 1)
            down = down.reshape(k, in_ch, *ref.down.shape[2:])
        out[f"{name}.lora_up.weight"] = up.cpu().contiguous()
        out[f"{name}.lora_down.weight"] = down.cpu().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(k))
        if on_module is not None:
            on_module(idx + 1, len(names))
    return out


def _block_weight(weights: Mapping[str, float], name: str, arch: str) -> float:
    try:
        block = block_of_kohya_name(name, arch)  # type: ignore[arg-type]
    except ValueError as e:
        raise MergeError(f"block weights given, but {e}") from e
    return weights.get(block, 1.0)


def _check_shapes(inputs: Sequence[_Input], names: Sequence[str]) -> None:
    for name in names:
        seen: tuple[Any, ...] | None = None
        for i in inputs:
            m = i.lora.modules.get(name)
            if m is None:
                continue
            # Linear and 1x1-conv spellings of one layer merge fine (same flattened matrix); 3x3 must match.
            shape = (m.up.shape[0], m.down.flatten(1).shape[1], m.kind == "conv3x3")
            if seen is None:
                seen = (shape, i.lora.source)
            elif seen[0] != shape:
                def fmt(sh: tuple) -> str:
                    return f"{sh[1]}->{sh[0]}{' (3x3 conv)' if sh[2] else ''}"

                raise MergeError(f"{name} is {fmt(seen[0])} in {seen[1]} but {fmt(shape)} in {i.lora.source}: "
                                 "these LoRAs were made for different base models and cannot be merged")


def dense_reference_merge(loras: Sequence[MergeInputLike], rank: Rank = "auto", conv_rank: Rank = "auto",
                          clamp_quantile: float | None = 0.99, arch: str | None = None) -> dict[str, torch.Tensor]:
    """Straightforward kohya-style merge (dense W, full SVD) for tests and benchmarks."""
    return svd_merge(loras, rank, conv_rank, clamp_quantile, arch, method="dense")


# --- metadata and saving --------------------------------------------------------------------------

def merge_metadata(inputs: Sequence[tuple[str, float, Mapping[str, float] | None]], arch: str, rank: int,
                   conv_rank: int | None, clamp_quantile: float | None, output_name: str,
                   source_metadata: Sequence[Mapping[str, str]] = ()) -> dict[str, str]:
    """kohya ss_* metadata for a merged LoRA plus `loraforge_merge` (what went in, at which ratios)."""
    md: dict[str, str] = {
        **network_metadata(arch, rank, rank, conv_rank or 0, conv_rank or 0),
        "ss_output_name": output_name,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec_architecture(arch)}/lora",
        "modelspec.title": output_name,
    }
    # Keep the resolution the inputs were trained at when they agree (A1111 shows it).
    res = {m.get("ss_resolution") for m in source_metadata if m.get("ss_resolution")}
    if len(res) == 1:
        md["ss_resolution"] = res.pop()
    md["loraforge_merge"] = json.dumps({
        "method": "svd",
        "rank": rank,
        "conv_rank": conv_rank,
        "clamp_quantile": clamp_quantile,
        "inputs": [
            {"name": Path(str(p)).name, "ratio": ratio, "block_weights": dict(bw) if bw else None,
             "sshs_model_hash": (source_metadata[n].get("sshs_model_hash") if n < len(source_metadata) else None)}
            for n, (p, ratio, bw) in enumerate(inputs)
        ],
    })
    return md


def svd_merge_to_file(loras: Sequence[MergeInputLike], out_path: str | os.PathLike[str], rank: Rank = "auto",
                      conv_rank: Rank = "auto", clamp_quantile: float | None = 0.99, arch: str | None = None,
                      output_name: str | None = None, dtype: torch.dtype = torch.float16,
                      device: torch.device | str | None = None, should_stop: StopCheck = never_stop,
                      on_module: Any = None) -> Path:
    """svd_merge, then write a kohya file (atomic, with sshs hashes and merge metadata)."""
    items = [(as_lora(it[0]), float(it[1]), (it[2] if len(it) > 2 else None)) for it in loras]  # type: ignore[misc]
    tensors = svd_merge(items, rank, conv_rank, clamp_quantile, arch, device, should_stop=should_stop,
                        on_module=on_module)
    arch = check_same_arch([lo for lo, _, _ in items], arch)
    r, cr = resolve_ranks([lo for lo, _, _ in items], rank, conv_rank)
    has_conv = any(m.kind == "conv3x3" for lo, _, _ in items for m in lo.modules.values())
    names = [(lo.source or f"input{n + 1}", ratio, bw) for n, (lo, ratio, bw) in enumerate(items)]
    out_path = Path(out_path)
    md = merge_metadata(names, arch, r, cr if has_conv else None, clamp_quantile, output_name or out_path.stem,
                        [lo.metadata for lo, _, _ in items])
    cast = {k: (v if k.endswith(".alpha") else v.to(dtype)) for k, v in tensors.items()}
    save_kohya(out_path, cast, md)
    return out_path


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
        lora = as_lora(lora_src)
        try:
            targets = check_compatible(lora, model)
        except LoraFileError as e:
            raise MergeError(str(e)) from e
        with torch.no_grad():
            for name, t in targets.items():
                layer = _layer_of(model, t)
                m = lora.modules[name]
                d = delta_weight(m.down, m.up, m.alpha, m.kind).reshape(layer.weight.shape)
                layer.weight.copy_((layer.weight.float() + strength * d.to(layer.weight.device)).to(layer.weight.dtype))
    ckpt.save_single_file(model, out_path, half=half)
    return out_path


def _is_base_model(obj: Any) -> bool:
    return hasattr(obj, "unet") and hasattr(obj, "text_encoders") and hasattr(obj, "arch")


def _resolve_base_path(ref: Any, models_dir: Path | None) -> Path:
    from trainer.models.load import resolve_model_ref

    return resolve_model_ref(str(ref), models_dir)


def _layer_of(model: Any, t: Any) -> torch.nn.Module:
    root = {"unet": model.unet, "te1": model.text_encoders[0]}.get(t.model) or model.text_encoders[1]
    layer = root.get_submodule(t.path)
    if hasattr(layer, "get_base_layer"):
        layer = layer.get_base_layer()
    return layer


def checkpoint_skeleton(src: str | os.PathLike[str]) -> Any:
    """A weightless (meta-device) BaseModel with the layout of a single-file checkpoint or a diffusers folder:
    module names and shapes for check_compatible and the original-key map, without reading any tensor data."""
    from trainer.models.base import arch_of_config_dir, meta_model
    from trainer.models.single_file import detect_arch, read_safetensors_header, select_config

    src = Path(src)
    if src.is_dir():  # a diffusers folder: its own configs
        return meta_model(src, arch_of_config_dir(src), src.stem)
    header, _ = read_safetensors_header(src)
    arch = detect_arch(list(header))
    return meta_model(select_config(arch, header), arch, src.stem, src)


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
        lora = as_lora(lora_src)
        try:
            targets = check_compatible(lora, skeleton)
        except LoraFileError as e:
            raise MergeError(str(e)) from e
        for name, t in targets.items():
            m = lora.modules[name]
            ok = kmap.get(f"{comp[t.model]}.{t.path}.weight")
            if ok is None or ok.key not in tensors:
                raise MergeError(f"{src.name} has no tensor for LoRA module {name} "
                                 f"({ok.key if ok else t.path}); the checkpoint is incomplete or of another kind")
            if ok.key not in work:
                work[ok.key] = tensors[ok.key].float()
            target = work[ok.key]
            d = strength * delta_weight(m.down, m.up, m.alpha, m.kind)
            if ok.kind == "T":
                d = d.T
            # SDXL's OpenCLIP text encoder keeps q, k, v stacked in attn.in_proj_weight: add into the row slice.
            view = target[ok.rows[0]:ok.rows[1]] if ok.rows is not None else target
            view += d.reshape(view.shape)
    for k, v in work.items():
        tensors[k] = v.to(tensors[k].dtype)  # back to the checkpoint's own dtype per tensor
    if half:
        tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(meta))
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


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

        items = [(lo, inp.ratio, inp.block_weights) for lo, inp in zip(loras, spec.inputs, strict=True)]
        try:
            svd_merge_to_file(items, out, spec.rank, spec.conv_rank, spec.clamp_quantile, arch, spec.output_name,
                              dtype=torch.float16 if spec.half else torch.float32, device=device,
                              should_stop=should_stop, on_module=tick)
        except MergeError as e:
            raise JobFailed(str(e), reason="bad_input") from e
        on_event(event("file", kind="lora", path=str(out)))
        outputs["lora"] = str(out)
        r, cr = resolve_ranks(loras, spec.rank, spec.conv_rank)
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
