"""Torch-free checks of an uploaded LoRA file, for an answer before anything is queued.

The header rules (safetensors structure, kohya layout, foreign-file diagnosis, layer kinds, architecture) are
``trainer.format.header``'s, the parser the worker uses too (stdlib only, so the bot still never imports torch):
the bot and the worker refuse a bad file in the same words. The worker still runs the full check (finite values,
shapes against the base model) with torch.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.format.checkpoint import builtin_arch, file_arch, folder_arch
from trainer.format.header import (
    ARCH_NAMES,
    MAX_HEADER,
    HeaderError,
    check_lora_layout,
    dtypes_and_shapes,
    lora_arch,
    module_algos,
    parse_header,
    quote,
    read_file_header,
)


class LoraCheckError(ValueError):
    """An uploaded file is not a usable LoRA; ``str()`` names the file and says what to do."""


@dataclass
class LoraInfo:
    """What the header says about one LoRA file."""

    name: str
    size: int
    modules: dict[str, tuple[str, list[int], list[int]]]  # module -> (kind, down shape, up shape)
    metadata: dict[str, str] = field(default_factory=dict)
    arch: str | None = None
    algos: set[str] = field(default_factory=lambda: {"lora"})  # lora, loha, lokr; dora when any dora_scale

    @property
    def kind_name(self) -> str:
        """"LoRA", or the LyCORIS kinds in it ("LoHa", "LoKr+DoRA"...)."""
        names = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}
        shown = [a for a in sorted(self.algos) if not (a == "lora" and "dora" in self.algos)]
        return "+".join(names[a] for a in shown)

    @property
    def rank(self) -> int:
        """The largest rank of the linear / 1x1 layers (0 when it has none)."""
        return max((d[0] for k, d, _ in self.modules.values() if k != "conv3x3"), default=0)

    @property
    def conv_rank(self) -> int:
        """The largest rank of the 3x3 conv (LoCon) layers (0 when it has none)."""
        return max((d[0] for k, d, _ in self.modules.values() if k == "conv3x3"), default=0)

    @property
    def arch_name(self) -> str:
        return ARCH_NAMES.get(self.arch or "", "an unknown base")


def inspect_header(header: Mapping[str, Any], meta: Mapping[str, str], name: str, size: int) -> LoraInfo:
    """Check key names, dtypes and down/up shapes of a parsed header."""
    try:
        modules = check_lora_layout(dtypes_and_shapes(header), quote(name))
    except HeaderError as e:
        raise LoraCheckError(str(e)) from None
    arch = lora_arch({m: (d, u) for m, (_, d, u) in modules.items()}, meta)
    algos = set(module_algos(list(header)).values()) | ({"dora"} if any(k.endswith(".dora_scale") for k in header) else set())
    return LoraInfo(name=name, size=size, modules=dict(modules), metadata=dict(meta), arch=arch, algos=algos)


def inspect_bytes(data: bytes, name: str) -> LoraInfo:
    """Check an uploaded file held in memory (slash-command attachments are downloaded at once)."""
    if not name.lower().endswith(".safetensors"):
        raise LoraCheckError(f"`{name}` is not a .safetensors file. Only kohya LoRAs saved as .safetensors "
                             "are accepted (nothing is ever unpickled).")
    try:
        header, meta = parse_header(memoryview(data)[: 8 + MAX_HEADER], len(data), name)
    except HeaderError as e:
        raise LoraCheckError(str(e)) from None
    return inspect_header(header, meta, name, len(data))


def inspect_file(path: str | Path, name: str | None = None) -> LoraInfo:
    """Check a file on disk, reading only its header."""
    name = name or Path(path).name
    try:
        header, meta, size = read_file_header(path, name)
    except HeaderError as e:
        raise LoraCheckError(str(e)) from None
    return inspect_header(header, meta, name, size)


# ---------------------------------------------------------------------------------- several files


def check_same_arch(infos: Sequence[LoraInfo], base_arch: str | None = None, base_name: str = "") -> str | None:
    """All inputs for one architecture, and that of the base model when given. Returns the arch."""
    known = [i for i in infos if i.arch]
    arches = {i.arch for i in known}
    if len(arches) > 1:
        listing = ", ".join(f"`{i.name}` ({i.arch_name})" for i in known)
        raise LoraCheckError(f"These LoRAs were made for different base models: {listing}. "
                             "Only LoRAs of one architecture can be used together.")
    arch = next(iter(arches), None)
    if base_arch and arch and arch != base_arch:
        wrong = [i.name for i in known]
        raise LoraCheckError(f"{', '.join('`' + n + '`' for n in wrong)} is a LoRA for {ARCH_NAMES[arch]}, but "
                             f"the base model `{base_name}` is {ARCH_NAMES.get(base_arch, base_arch)}. "
                             f"Pick a {ARCH_NAMES[arch]} base model.")
    return arch or base_arch


def check_shapes_match(infos: Sequence[LoraInfo]) -> None:
    """A layer present in several inputs must have the same in/out size (and kernel) in each."""
    seen: dict[str, tuple[tuple[int, ...], str]] = {}
    for info in infos:
        for m, (_, down, up) in info.modules.items():
            io = (up[0], *down[1:])  # out, in, kernel...: everything but the rank
            if m in seen and seen[m][0] != io:
                raise LoraCheckError(f"`{m}` has size {list(seen[m][0])} in `{seen[m][1]}` but {list(io)} in "
                                     f"`{info.name}`: these LoRAs do not fit the same model and cannot be merged.")
            seen.setdefault(m, (io, info.name))


def tag_prompt(meta: Mapping[str, str]) -> str:
    """A prompt for the verification grid from a LoRA's own metadata: a trigger phrase, the most
    frequent training tag, else its output name."""
    for k in ("modelspec.trigger_phrase", "ss_trigger_word"):
        if meta.get(k, "").strip():
            return meta[k].strip()
    try:
        freq = json.loads(meta.get("ss_tag_frequency") or "{}")
        counts: Counter[str] = Counter()
        for tags in freq.values() if isinstance(freq, dict) else []:
            if isinstance(tags, dict):
                counts.update({str(t).strip(): int(c) for t, c in tags.items() if str(t).strip()})
        if counts:
            return counts.most_common(1)[0][0]
    except (ValueError, TypeError):
        pass
    return (meta.get("ss_output_name") or meta.get("modelspec.title") or "").strip()


# ---------------------------------------------------------------------------------- base models


def base_model_arch(ref: str, models_dir: str | Path) -> str | None:
    """The architecture of a base model name from ``list_base_models``: a built-in tiny model, a
    single-file checkpoint (header key names only) or a diffusers folder (its configs). None when
    it cannot be told; the worker checks again with the real model."""
    if arch := builtin_arch(ref):
        return arch
    root = Path(models_dir)
    p = (root / ref).resolve()
    if not p.is_relative_to(root.resolve()):
        return None
    try:
        if p.is_file():
            return file_arch(p)
        if p.is_dir():
            return folder_arch(p)
    except (OSError, ValueError):
        return None
    return None


__all__ = [
    "ARCH_NAMES",
    "LoraCheckError",
    "LoraInfo",
    "base_model_arch",
    "check_same_arch",
    "check_shapes_match",
    "inspect_bytes",
    "inspect_file",
    "inspect_header",
    "tag_prompt",
]
