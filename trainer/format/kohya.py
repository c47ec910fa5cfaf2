"""The kohya LoRA file: writing it atomically with its hashes, and reading it safely.

A file holds, per module, `<name>.lora_down.weight`, `<name>.lora_up.weight` and `<name>.alpha` and nothing else
(facts.md section 1); LyCORIS files (LoHa, LoKr, DoRA) hold their own parts instead (``trainer.format.lyco``). Files are read with safetensors only and checked header-first by ``trainer.format.header``
(the parser the bot uses too, so both refuse a bad file in the same words): a bad upload costs a clear message and
no memory. Metadata and hashes: ``trainer.format.metadata``. Which base module each LoRA module fits:
``trainer.network.targets.check_compatible``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file

from trainer.atomic import write_with
from trainer.events import JobFailed
from trainer.format.header import (
    MAX_HEADER,
    SUFFIX_ALPHA,
    SUFFIX_DOWN,
    SUFFIX_UP,
    Arch,
    HeaderError,
    Kind,
    check_lora_layout,
    dtypes_and_shapes,
    is_lora_key,
    lora_arch,
    module_of,
    parse_header,
    part_of,
    quote,
    read_file_header,
)
from trainer.format.lyco import LycoModule, dora_change
from trainer.format.lyco_layout import algo_of
from trainer.format.metadata import file_model_hash, legacy_hash_of_bytes, model_hash_of_bytes

if TYPE_CHECKING:
    from trainer.network.lora import LoraNetwork

# safetensors dtype codes of in-memory tensors (weights must be float; an alpha may be an integer).
DTYPE_CODES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
               torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.uint8: "U8"}


class LoraFileError(ValueError):
    """A LoRA file is unusable; the message says what is wrong and what to do."""


# --- tensors in ------------------------------------------------------------------------------------

@dataclass
class LoraModule:
    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    kind: Kind
    dora_scale: torch.Tensor | None = None  # DoRA (LyCORIS weight decomposition)
    algo = "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def needs_base(self) -> bool:
        """DoRA: the change depends on the base weight it is applied to."""
        return self.dora_scale is not None

    def delta(self) -> torch.Tensor:
        return delta_weight(self.down, self.up, self.alpha, self.kind)

    def delta_for(self, weight: torch.Tensor) -> torch.Tensor:
        """The change at strength 1 that loaders add to `weight` (float32, weight's shape; DoRA included)."""
        d = self.delta().reshape(weight.shape).to(weight.device)
        return d if self.dora_scale is None else dora_change(self.dora_scale.to(weight.device), weight, d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {self.name + SUFFIX_DOWN: self.down, self.name + SUFFIX_UP: self.up,
               self.name + SUFFIX_ALPHA: torch.tensor(float(self.alpha), dtype=torch.float32)}
        if self.dora_scale is not None:
            out[self.name + ".dora_scale"] = self.dora_scale
        return out


AnyModule = LoraModule | LycoModule


@dataclass
class KohyaLora:
    modules: dict[str, AnyModule]
    metadata: dict[str, str] = field(default_factory=dict)
    arch: Arch | None = None  # None: could not tell (e.g. tiny test models); check_compatible decides
    source: str = ""

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for m in self.modules.values():
            out.update(m.state_dict())
        return out

    @property
    def algos(self) -> set[str]:
        """"lora", "loha", "lokr" and "dora" (any layer with dora_scale) as found in the file."""
        return {m.algo for m in self.modules.values()} | ({"dora"} if self.has_dora else set())

    @property
    def has_dora(self) -> bool:
        return any(m.needs_base for m in self.modules.values())

    @property
    def is_plain(self) -> bool:
        """Only LoRA/LoCon layers (lora_down/lora_up, no DoRA)."""
        return self.algos == {"lora"}


def delta_weight(down: torch.Tensor, up: torch.Tensor, alpha: float, kind: Kind | None = None) -> torch.Tensor:
    """dW = (alpha / r) * up @ down in float32, shaped like the target weight.

    Linear -> [out, in]; conv1x1 -> [out, in, 1, 1]; conv3x3 -> [out, in, 3, 3].
    """
    r = down.shape[0]
    d = down.float().flatten(1)
    u = up.float().flatten(1)
    w = (u @ d) * (float(alpha) / r)
    if kind is None:
        kind = "linear" if down.dim() == 2 else ("conv3x3" if down.shape[-1] == 3 else "conv1x1")
    if kind == "linear":
        return w
    if down.dim() == 4:
        return w.reshape(up.shape[0], down.shape[1], down.shape[2], down.shape[3])
    return w.reshape(up.shape[0], down.shape[1], 1, 1)  # a linear-shaped LoRA on a 1x1 conv


# --- writing --------------------------------------------------------------------------------------

def export_state(network: LoraNetwork, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The network's tensors as kohya keys; weights in `dtype`, alpha kept float32 (exact, every loader calls .item())."""
    out: dict[str, torch.Tensor] = {}
    for k, v in network.network_state().items():
        if k.endswith(SUFFIX_ALPHA):
            out[k] = v.detach().to("cpu", torch.float32).reshape(())
        else:
            out[k] = v.detach().to("cpu", dtype).contiguous()
    return out


def save_kohya(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
               metadata: Mapping[str, str]) -> str:
    """Write a kohya .safetensors atomically with sshs hashes; returns sshs_model_hash.

    Only kohya keys (`<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`) and LyCORIS parts are accepted.
    """
    path = Path(path)
    bad = [k for k in tensors if not is_lora_key(k)]
    if bad:
        raise ValueError(f"not kohya LoRA keys: {bad[:5]}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata must be str -> str; {k!r} has {type(v).__name__}")
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    md = {k: v for k, v in metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    # The data section does not depend on the metadata, so hash a first serialisation and write the second.
    first = st_save(clean, md)
    model_hash = model_hash_of_bytes(first)
    # kohya computes the legacy hash over a file with only the ss_* metadata (user fields must not change it).
    legacy = legacy_hash_of_bytes(st_save(clean, {k: v for k, v in md.items() if k.startswith("ss_")}))
    del first
    md["sshs_model_hash"] = model_hash
    md["sshs_legacy_hash"] = legacy

    def write(tmp: Path) -> None:
        save_file(clean, str(tmp), metadata=md)
        if file_model_hash(tmp) != model_hash:  # guards against a safetensors change in layout
            raise RuntimeError("sshs_model_hash does not match the written data section")

    write_with(path, write)
    return model_hash


# --- reading --------------------------------------------------------------------------------------

def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """A LoRA file's metadata from its checked header alone (no tensor is read). Raises LoraFileError."""
    try:
        return read_file_header(path)[1]
    except HeaderError as e:
        raise LoraFileError(str(e)) from None


def read_kohya(source: str | os.PathLike[str] | Mapping[str, torch.Tensor], *,
               metadata: Mapping[str, str] | None = None, device: str = "cpu") -> KohyaLora:
    """Read and validate a kohya LoRA (a .safetensors path or an in-memory state dict).

    Missing alpha means alpha = rank (kohya/A1111 behaviour). Raises LoraFileError on anything unusable.
    """
    if isinstance(source, Mapping):
        shapes = {k: (DTYPE_CODES.get(v.dtype, str(v.dtype)), list(v.shape)) for k, v in source.items()}
        return _checked(shapes, dict(metadata or {}), "the LoRA", "the LoRA", lambda: dict(source))
    path = Path(source)
    if not path.is_file():
        raise LoraFileError(f"LoRA file {path} does not exist")
    try:
        header, md, _ = read_file_header(path)
    except HeaderError as e:
        raise LoraFileError(str(e)) from None

    def load() -> dict[str, torch.Tensor]:
        with safe_open(str(path), framework="pt", device=device) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__

    return _checked(dtypes_and_shapes(header), md, quote(path.name), path.name, load)


def read_kohya_bytes(blob: bytes, name: str = "lora.safetensors") -> KohyaLora:
    """Validate in-memory file bytes by the same rules as a file on disk."""
    try:
        header, md = parse_header(memoryview(blob)[: 8 + MAX_HEADER], len(blob), name)
    except HeaderError as e:
        raise LoraFileError(str(e)) from None
    return _checked(dtypes_and_shapes(header), md, quote(name), name, lambda: st_load(blob))


def _checked(shapes: Mapping[str, tuple[str, list[int]]], md: dict[str, str], where: str, source: str,
             load: Callable[[], Mapping[str, torch.Tensor]]) -> KohyaLora:
    """Layout checks on (dtype, shape) per key, then the tensors (loaded only after they pass) and their values."""
    try:
        layout = check_lora_layout(shapes, where)
    except HeaderError as e:
        raise LoraFileError(str(e)) from None
    try:
        tensors = load()
    except Exception as e:  # safetensors' own checks, or an unreadable file
        raise LoraFileError(f"{where} could not be read as safetensors ({e}); re-download or re-save it") from e
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        parts.setdefault(module_of(k), {})[part_of(k)] = t
    modules: dict[str, AnyModule] = {}
    for n, (kind, down_eq, up_eq) in layout.items():
        p = parts[n]
        for part, t in p.items():
            if part != "alpha" and not torch.isfinite(t).all():
                raise LoraFileError(f"{where}: {n}.{part} contains NaN or infinite values (training diverged?); "
                                    "this LoRA cannot be used — retrain with a lower learning rate")
        a = p.pop("alpha", None)
        alpha = float(a.float().reshape(-1)[0]) if a is not None else None
        if alpha is not None and not math.isfinite(alpha):
            raise LoraFileError(f"{where}: {n}.alpha is not a finite number; re-export the LoRA")
        dora = p.pop("dora_scale", None)
        algo = algo_of(list(p))
        if algo == "lora":
            down, up = p["lora_down.weight"], p["lora_up.weight"]
            modules[n] = LoraModule(n, down, up, alpha if alpha is not None else float(down.shape[0]), kind, dora)
        else:
            modules[n] = LycoModule(n, algo, p, alpha, kind, down_eq[0], down_eq[1], up_eq[0], dora)
    arch = lora_arch({n: (d, u) for n, (_, d, u) in layout.items()}, md)
    return KohyaLora(modules=modules, metadata=dict(md), arch=arch, source=source)


def load_state_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Raw tensors of a (trusted, our own) kohya file, e.g. for resume; use read_kohya for uploads."""
    return st_load(Path(path).read_bytes())


def resolve_lora_path(ref: str, models_dir: Path | None = None) -> Path:
    """A LoRA named in a job spec: a path, or a file name in the models folder (with or without .safetensors)."""
    p = Path(ref).expanduser()
    if p.exists():
        return p
    if models_dir is not None:
        for c in (Path(models_dir) / ref, Path(models_dir) / f"{ref}.safetensors"):
            if c.exists():
                return c
    raise JobFailed(f"LoRA file {ref!r} not found; give a path or a file name in the models folder",
                    reason="bad_input")
