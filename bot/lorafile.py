"""Torch-free checks of an uploaded LoRA file, for an answer before anything is queued.

A safetensors file is 8 bytes of little-endian header length, a JSON header (tensor name -> dtype,
shape, byte offsets; plus ``__metadata__``) and the raw tensor bytes. Reading the header alone tells
a pickle renamed ``.safetensors``, a truncated upload, a checkpoint or VAE sent as a LoRA, a
non-kohya layout, mismatched down/up shapes and the architecture (SD1/SD2/SDXL), without loading a
single tensor. The bot never imports torch, so this mirrors the header rules of ``trainer.format.kohya``;
the worker still runs the full check (finite values, shapes against the base model) with torch.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
SUFFIX_DOWN = ".lora_down.weight"
SUFFIX_UP = ".lora_up.weight"
SUFFIX_ALPHA = ".alpha"
ARCH_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
# Built-in tiny models (trainer.models.base.TINY_MODELS) and their architectures.
BUILTIN_ARCH = {"tiny-sd15": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
_SGM_UNET = ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_")


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


# ------------------------------------------------------------------------------------- the header


def _module_of(key: str) -> str:
    for s in (SUFFIX_DOWN, SUFFIX_UP, SUFFIX_ALPHA):
        if key.endswith(s):
            return key[: -len(s)]
    return key


def _valid_key(key: str) -> bool:
    return key.startswith(PREFIXES) and key.endswith((SUFFIX_DOWN, SUFFIX_UP, SUFFIX_ALPHA)) \
        and "." not in _module_of(key)


def read_header(head: bytes | memoryview, size: int, name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse the header from the first bytes of a file of ``size`` bytes. ``head`` must hold at least
    8 + the header length bytes (the caller reads them). Returns (tensor entries, metadata)."""
    head = memoryview(head)
    if size < 8 or len(head) < 8:
        raise LoraCheckError(f"`{name}` is {size} bytes: not a safetensors file (empty or truncated upload). "
                             "Attach the .safetensors file again.")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER or 8 + n > size:
        if bytes(head[:2]) == b"PK" or bytes(head[:1]) == b"\x80":
            raise LoraCheckError(f"`{name}` is not a safetensors file: it is a pickled PyTorch file (.ckpt/.pt) "
                                 "renamed to .safetensors. Pickles are never loaded here (they can run code); "
                                 "convert it to .safetensors first.")
        raise LoraCheckError(f"`{name}` is not a valid safetensors file or is truncated (its header claims "
                             f"{n} bytes, the file has {size}). Attach the complete .safetensors file again.")
    raw = bytes(head[8:8 + n])
    if len(raw) < n:
        raise LoraCheckError(f"`{name}` is truncated inside its header. Attach the complete file again.")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LoraCheckError(f"`{name}` has a damaged safetensors header; it is not a LoRA file "
                             "(or the upload broke). Attach the .safetensors file again.") from None
    if not isinstance(header, dict):
        raise LoraCheckError(f"`{name}` has a damaged safetensors header. Attach the file again.")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise LoraCheckError(f"`{name}` has malformed metadata (values must be strings); re-save the file.")
    data_len = size - 8 - n
    end = 0
    for k, info in header.items():
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
            raise LoraCheckError(f"`{name}`: header entry `{k}` is malformed. Attach the file again.")
        offs, shape = info["data_offsets"], info["shape"]
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(x, int) for x in offs)
                or not 0 <= offs[0] <= offs[1] or not isinstance(shape, list)
                or not all(isinstance(x, int) and x >= 0 for x in shape)):
            raise LoraCheckError(f"`{name}`: header entry `{k}` has bad offsets or shape. Attach the file again.")
        width = DTYPE_BYTES.get(str(info["dtype"]))
        if width is not None and offs[1] - offs[0] != math.prod(shape) * width:
            raise LoraCheckError(f"`{name}`: tensor `{k}` has the wrong byte size for its shape; "
                                 "the file is damaged. Attach it again.")
        end = max(end, offs[1])
    if end > data_len:
        raise LoraCheckError(f"`{name}` is truncated: its tensors need {end} bytes of data but only {data_len} "
                             "arrived (incomplete download?). Attach the complete file again.")
    if end < data_len:
        raise LoraCheckError(f"`{name}` has {data_len - end} unexpected bytes after its tensors; it was not "
                             "written by a safetensors writer. Re-save or re-download it.")
    return header, meta


def _foreign(keys: list[str], name: str) -> str | None:
    """A friendly name for common files that are not kohya LoRAs."""
    joined = " ".join(keys[:2000])
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
           for k in keys):
        return (f"`{name}` is a full Stable Diffusion checkpoint (a base model), not a LoRA. "
                "Ask an admin to add it as a base model, or attach the LoRA file instead.")
    if "hada_w1" in joined or "lokr_w1" in joined or ".oft_" in joined:
        return f"`{name}` is a LyCORIS LoHa/LoKr/OFT file; only LoRA and LoCon files are supported."
    if "dora_scale" in joined:
        return f"`{name}` is a DoRA LoRA (it has dora_scale); only plain LoRA/LoCon files are supported."
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or "_lora.down." in k for k in keys):
        return (f"`{name}` is a diffusers/PEFT-format LoRA (lora_A/lora_B keys), not a kohya file; "
                "convert it to kohya format first.")
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") or k.startswith("string_to_param")
           for k in keys):
        return f"`{name}` is a textual-inversion embedding, not a LoRA."
    if any(k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv")) for k in keys):
        return f"`{name}` is a VAE, not a LoRA."
    return None


def _kind(module: str, down: list[int], up: list[int], name: str) -> str:
    if len(down) == 2 and len(up) == 2:
        kind = "linear"
    elif len(down) == 4 and len(up) == 4 and up[2:] == [1, 1] and down[2:] in ([1, 1], [3, 3]):
        kind = "conv1x1" if down[2:] == [1, 1] else "conv3x3"
    else:
        raise LoraCheckError(f"`{name}`: `{module}` has down shape {down} and up shape {up}, which do not form "
                             "a kohya LoRA layer. The file is damaged or in another format; re-export it.")
    if down[0] != up[1]:
        raise LoraCheckError(f"`{name}`: `{module}` has mismatched shapes (lora_down rank {down[0]}, "
                             f"lora_up rank {up[1]}). The file is damaged; re-export it.")
    if down[0] == 0:
        raise LoraCheckError(f"`{name}`: `{module}` has rank 0.")
    return kind


def detect_arch(modules: Mapping[str, tuple[str, list[int], list[int]]], metadata: Mapping[str, str]) -> str | None:
    """SD1/SD2/SDXL from module names and widths, then the metadata; None when it cannot be told
    (trainer.format.kohya.detect_arch, by the same rules)."""
    names = list(modules)
    sgm = any(n.startswith(_SGM_UNET) for n in names)
    if sgm or any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        if not sgm and not any(n.startswith("lora_te2_") for n in names):
            widths = {modules[n][1][1] for n in names if n.endswith("_self_attn_q_proj")}
            if widths & {768, 1024}:
                return "sd1" if 768 in widths else "sd2"
        return "sdxl"
    widths = {modules[n][1][1] for n in names if n.endswith("attn2_to_k")}
    for w, arch in ((2048, "sdxl"), (1024, "sd2"), (768, "sd1")):
        if w in widths:
            return arch
    te = {modules[n][1][1] for n in names if n.startswith("lora_te_") and n.endswith("_self_attn_q_proj")}
    if 1024 in te:
        return "sd2"
    if 768 in te:
        return "sd1"
    hint = metadata.get("ss_base_model_version", "")
    for prefix, arch in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")):
        if hint.startswith(prefix):
            return arch
    return None


def inspect_header(header: Mapping[str, Any], meta: Mapping[str, str], name: str, size: int) -> LoraInfo:
    """Check key names, dtypes and down/up shapes of a parsed header."""
    keys = list(header)
    if not keys:
        raise LoraCheckError(f"`{name}` contains no tensors; it is not a LoRA.")
    bad = [k for k in keys if not _valid_key(k)]
    if bad:
        raise LoraCheckError(_foreign(keys, name) or (
            f"`{name}` is not a kohya LoRA: {len(bad)} tensor(s) are not LoRA parts, e.g. "
            f"{', '.join('`' + k + '`' for k in bad[:3])}. Attach a kohya-format LoRA (.safetensors)."))
    for k in keys:
        d = str(header[k]["dtype"])
        if d not in DTYPE_BYTES:
            raise LoraCheckError(f"`{name}`: tensor `{k}` has dtype {d}; LoRA tensors must be F16, BF16, F32 or F64.")
    modules: dict[str, tuple[str, list[int], list[int]]] = {}
    for m in sorted({_module_of(k) for k in keys}):
        d, u, a = header.get(m + SUFFIX_DOWN), header.get(m + SUFFIX_UP), header.get(m + SUFFIX_ALPHA)
        if d is None or u is None:
            missing = "lora_down.weight" if d is None else "lora_up.weight"
            raise LoraCheckError(f"`{name}`: `{m}` has no {missing}; the file is incomplete. Re-export it.")
        if a is not None and math.prod(a["shape"]) != 1:
            raise LoraCheckError(f"`{name}`: `{m}.alpha` has shape {a['shape']}; alpha must be a single number.")
        down, up = list(d["shape"]), list(u["shape"])
        modules[m] = (_kind(m, down, up, name), down, up)
    return LoraInfo(name=name, size=size, modules=modules, metadata=dict(meta), arch=detect_arch(modules, meta))


def inspect_bytes(data: bytes, name: str) -> LoraInfo:
    """Check an uploaded file held in memory (slash-command attachments are downloaded at once)."""
    if not name.lower().endswith(".safetensors"):
        raise LoraCheckError(f"`{name}` is not a .safetensors file. Only kohya LoRAs saved as .safetensors "
                             "are accepted (nothing is ever unpickled).")
    header, meta = read_header(memoryview(data)[: 8 + MAX_HEADER], len(data), name)
    return inspect_header(header, meta, name, len(data))


def inspect_file(path: str | Path, name: str | None = None) -> LoraInfo:
    """Check a file on disk, reading only its header."""
    p = Path(path)
    name = name or p.name
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= MAX_HEADER and 8 + n <= size:
                    head += f.read(n)
    except OSError as e:
        raise LoraCheckError(f"`{name}` could not be read ({e.strerror or e}).") from None
    header, meta = read_header(head, size, name)
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
    if ref in BUILTIN_ARCH:
        return BUILTIN_ARCH[ref]
    root = Path(models_dir)
    p = (root / ref).resolve()
    if not p.is_relative_to(root.resolve()):
        return None
    try:
        if p.is_file():
            return _checkpoint_arch(p)
        if p.is_dir():
            return _folder_arch(p)
    except (OSError, ValueError, LoraCheckError):
        return None
    return None


def _checkpoint_arch(path: Path) -> str | None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        if n > MAX_HEADER or 8 + n > size:
            return None
        head += f.read(n)
    header = json.loads(head[8:])
    return keys_arch(k for k in header if k != "__metadata__")


def keys_arch(keys: Iterable[str]) -> str | None:
    """SD1/SD2/SDXL from the key names of an original-layout (A1111) checkpoint."""
    ks = list(keys)
    if any(k.startswith("conditioner.embedders.1.model.") for k in ks):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in ks):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in ks):
        return "sd1"
    return None


def _folder_arch(folder: Path) -> str | None:
    own = folder / "loraforge.json"
    if own.is_file():
        arch = json.loads(own.read_text()).get("arch")
        if arch in ARCH_NAMES:
            return str(arch)
    index = json.loads((folder / "model_index.json").read_text())
    if "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index:
        return "sdxl"
    unet = folder / "unet" / "config.json"
    if unet.is_file():
        dim = json.loads(unet.read_text()).get("cross_attention_dim")
        return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(dim)  # type: ignore[arg-type]
    return None


__all__ = [
    "LoraCheckError",
    "LoraInfo",
    "base_model_arch",
    "check_same_arch",
    "check_shapes_match",
    "detect_arch",
    "inspect_bytes",
    "inspect_file",
    "inspect_header",
    "keys_arch",
    "read_header",
    "tag_prompt",
]
