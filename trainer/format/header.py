"""The safetensors header, read without torch: the one parser the bot and the engine share.

A safetensors file is 8 bytes of little-endian header length, a JSON header (tensor name -> dtype, shape,
byte offsets; plus ``__metadata__``, str -> str) and the raw tensor bytes, laid end to end. Reading the header
alone tells a pickle renamed ``.safetensors``, a truncated upload, damaged offsets, a checkpoint or VAE sent as a
LoRA, a non-kohya layout, mismatched down/up shapes and the architecture, without loading a single tensor.

Stdlib only: ``bot/`` imports this module and must never import torch. Every refusal is a ``HeaderError`` whose
text names the file and says what to do; callers with their own error class re-raise it with the same text
(``raise MyError(str(e))``), so the bot and the worker refuse a bad file in the same words.

Public API:
- ``parse_header(head, size, name)``, ``read_file_header(path, name)``: checked (tensor entries, metadata).
- ``pickle_refusal(name, what)``: the one message for pickled files (``.ckpt``/``.pt``/``torch.save``).
- ``check_lora_layout(dtypes_shapes, where)``: kohya key names, dtypes, down/up pairs -> module -> (kind, down, up);
  LyCORIS layers (LoHa, LoKr, DoRA: ``trainer.format.lyco_layout``) as the shapes a LoRA of that layer would have.
- ``layer_kind``, ``diagnose_foreign``, ``lora_arch``; key helpers ``module_of``, ``is_lora_key``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from trainer.format.lyco_layout import (
    ALGO_NAMES,
    DORA_PART,
    LYCO_SUFFIXES,
    Algo,
    LycoLayoutError,
    algo_of,
    dora_fits,
    module_layout,
)

Arch = Literal["sd1", "sd2", "sdxl"]
Kind = Literal["linear", "conv1x1", "conv3x3"]
ARCH_NAMES: dict[str, str] = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}

MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit; real SDXL checkpoint headers are ~200 KB
# Bits per element of every dtype safetensors knows (F4/F6 pack several elements per byte).
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# kohya's svd_merge_lora.py writes alpha as torch.tensor(k): an I64 scalar. Weights are always float.
INT_DTYPES = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")

PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
SUFFIX_DOWN = ".lora_down.weight"
SUFFIX_UP = ".lora_up.weight"
SUFFIX_ALPHA = ".alpha"
_SGM_UNET = ("lora_unet_input_blocks_", "lora_unet_output_blocks_", "lora_unet_middle_block_")


class HeaderError(ValueError):
    """A file is not a usable safetensors file or kohya LoRA; ``str()`` names the file and says what to do."""


def quote(name: str) -> str:
    return f"`{name}`"


def pickle_refusal(name: str, what: str) -> str:
    return (f"{quote(name)} is {what}. loraforge never unpickles files: unpickling can run any code hidden in the "
            "file. Convert it to .safetensors first (load it once in an environment you trust and save it with "
            "safetensors.torch.save_file), then use the .safetensors file.")


def _looks_pickled(head: bytes) -> bool:
    # torch.save writes a zip archive (PK..); older files are a bare pickle stream (0x80, protocol 1-5).
    return head.startswith(b"PK") or (len(head) >= 2 and head[0] == 0x80 and 1 <= head[1] <= 5)


# ------------------------------------------------------------------------------------- the header


def header_length(head: bytes | memoryview) -> int:
    """The JSON header's length from a file's first 8 bytes."""
    return int(struct.unpack("<Q", bytes(head[:8]))[0])


def parse_header(head: bytes | memoryview, size: int, name: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Check the header of a file of ``size`` bytes whose first bytes are ``head`` (at least 8 + the header
    length when the file has that many). Returns (tensor entries, metadata); raises HeaderError."""
    head = memoryview(head)
    where = quote(name)
    invalid = f"{where} is not a valid .safetensors file"
    if size < 8 or len(head) < 8:
        raise HeaderError(f"{invalid}: it is only {size} bytes, so it is not a safetensors file at all "
                          "(empty or truncated upload?). Use the complete .safetensors file.")
    n = header_length(head)
    if n > MAX_HEADER or 8 + n > size:
        if _looks_pickled(bytes(head[:8])):
            raise HeaderError(pickle_refusal(name, "a pickled PyTorch file (.ckpt/.pt, torch.save), not a "
                                                   "safetensors file"))
        raise HeaderError(f"{invalid} or is truncated (its header claims {n} bytes, the file has {size}). "
                          "Use the complete .safetensors file (re-download or re-export it).")
    raw = bytes(head[8:8 + n])
    if len(raw) < n:
        raise HeaderError(f"{invalid}: it is truncated inside its header. Use the complete file.")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # not UTF-8, not JSON, absurd numbers or nesting
        header = None
    if not isinstance(header, dict):
        raise HeaderError(f"{invalid}: its header is damaged (not a JSON object), so it is another format or "
                          "the upload broke. Re-download or re-save the file.")
    meta = header.pop("__metadata__", None)
    meta = {} if meta is None else meta  # JSON null is "no metadata" to safetensors too
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise HeaderError(f"{where} has malformed metadata (safetensors metadata values must be strings); "
                          "re-save the file.")
    for k, info in header.items():
        _check_entry(k, info, invalid)
    _check_layout_of_data(header, size - 8 - n, invalid, where)
    return header, meta


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entry(k: str, info: Any, invalid: str) -> None:
    if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
        raise HeaderError(f"{invalid}: header entry `{k}` is malformed (it needs dtype, shape and data_offsets). "
                          "Re-download or re-save the file.")
    dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(offs, list) or len(offs) != 2 or not all(_whole(x) for x in offs) or not 0 <= offs[0] <= offs[1]:
        raise HeaderError(f"{invalid}: tensor `{k}` has bad data_offsets {json.dumps(offs)} (two whole numbers, "
                          "start <= end, are needed). Re-download or re-save the file.")
    if not isinstance(shape, list) or not all(_whole(x) and x >= 0 for x in shape):
        raise HeaderError(f"{invalid}: tensor `{k}` has a bad shape {json.dumps(shape)}. "
                          "Re-download or re-save the file.")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(f"{invalid}: tensor `{k}` has unknown dtype {json.dumps(dtype)}. "
                          "Re-download or re-save the file.")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or offs[1] - offs[0] != bits // 8:
        raise HeaderError(f"{invalid}: tensor `{k}` has the wrong byte size for its dtype and shape "
                          f"({offs[1] - offs[0]} bytes for {dtype} {shape}); the file is damaged. "
                          "Re-download or re-save it.")


def _check_layout_of_data(header: Mapping[str, dict[str, Any]], data_len: int, invalid: str, where: str) -> None:
    """Tensors lie end to end from byte 0 to the end of the file, as safetensors itself requires."""
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], k) for k, info in header.items())
    end = max((b for _, b, _ in spans), default=0)
    if end > data_len:
        raise HeaderError(f"{invalid}: it is truncated (its tensors need {end} bytes of data but only {data_len} "
                          "are there; incomplete download?). Use the complete file.")
    prev, prev_name = 0, ""
    for a, b, k in spans:
        if a < prev:
            raise HeaderError(f"{invalid}: tensors `{prev_name}` and `{k}` overlap in the data; the file is damaged "
                              "or was not written by a safetensors writer. Re-download or re-save it.")
        if a > prev:
            raise HeaderError(f"{invalid}: {a - prev} unused bytes lie before tensor `{k}`; the file is damaged "
                              "or was not written by a safetensors writer. Re-download or re-save it.")
        prev, prev_name = b, k
    if end < data_len:
        raise HeaderError(f"{where} has {data_len - end} unexpected bytes after its tensors; it was not written by "
                          "a safetensors writer. Re-save or re-download it.")


def read_file_header(path: str | os.PathLike[str], name: str | None = None,
                     ) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """Check the header of a file on disk, reading only the header. Returns (entries, metadata, file size)."""
    p = Path(path)
    name = name or p.name
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) == 8:
                n = header_length(head)
                if n <= MAX_HEADER and 8 + n <= size:
                    head += f.read(n)
    except OSError as e:
        raise HeaderError(f"{quote(name)} could not be read ({e.strerror or e}).") from None
    return (*parse_header(head, size, name), size)


def dtypes_and_shapes(header: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, list[int]]]:
    return {k: (str(v["dtype"]), list(v["shape"])) for k, v in header.items()}


# ----------------------------------------------------------------------------------- kohya layout


SUFFIXES = (SUFFIX_DOWN, SUFFIX_UP, SUFFIX_ALPHA, *LYCO_SUFFIXES)


def module_of(key: str) -> str:
    """``<module>.lora_down.weight`` -> ``<module>`` (also ``.lora_up.weight``, ``.alpha`` and LyCORIS parts)."""
    for s in SUFFIXES:
        if key.endswith(s):
            return key[: -len(s)]
    return key


def part_of(key: str) -> str:
    """``<module>.hada_w1_a`` -> ``hada_w1_a``: the tensor's part name after the module name."""
    return key[len(module_of(key)) + 1:]


def is_lora_key(key: str) -> bool:
    return key.startswith(PREFIXES) and key.endswith(SUFFIXES) and "." not in module_of(key)


def module_algos(keys: Sequence[str]) -> dict[str, Algo]:
    """Module -> "lora" / "loha" / "lokr" from a file's (kohya/LyCORIS) keys."""
    parts: dict[str, list[str]] = {}
    for k in keys:
        parts.setdefault(module_of(k), []).append(part_of(k))
    return {m: algo_of(p) for m, p in parts.items()}


def diagnose_foreign(keys: Sequence[str], where: str) -> str | None:
    """A friendly name for common files that are not kohya LoRAs (None when it is none of them)."""
    joined = " ".join(keys[:2000])
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."))
           for k in keys):
        return (f"{where} is a full Stable Diffusion checkpoint (a base model), not a LoRA; use it as a base model "
                "instead, or send the LoRA file.")
    if ".oft_" in joined or ".lora_mid." in joined or ".ia3_" in joined or ".lokr_t1" in joined \
            or ".on_input" in joined or ".a1.weight" in joined:
        return (f"{where} is a LyCORIS network of a kind loraforge does not read (OFT, GLoRA, IA3 or a Tucker "
                "LoCon); LoRA, LoCon, LoHa, LoKr and DoRA files are supported.")
    if any(".lora_A." in k or ".lora_B." in k or ".lora.down." in k or "_lora.down." in k for k in keys):
        return (f"{where} is a diffusers/PEFT-format LoRA (lora_A/lora_B keys), not a kohya file; "
                "convert it to kohya format first.")
    if any(k in ("emb_params", "string_to_param", "clip_l", "clip_g") or k.startswith("string_to_param")
           for k in keys):
        return f"{where} is a textual-inversion embedding, not a LoRA."
    if any(k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv")) for k in keys):
        return f"{where} is a VAE, not a LoRA."
    return None


def layer_kind(module: str, down: Sequence[int], up: Sequence[int], where: str) -> Kind:
    """linear / conv1x1 / conv3x3 from a module's down and up shapes, or a HeaderError."""
    down, up = list(down), list(up)
    kind: Kind
    if len(down) == 2 and len(up) == 2:
        kind = "linear"
    elif len(down) == 4 and len(up) == 4 and up[2:] == [1, 1] and down[2:] in ([1, 1], [3, 3]):
        kind = "conv1x1" if down[2:] == [1, 1] else "conv3x3"
    else:
        raise HeaderError(f"{where}: `{module}` has down shape {down} and up shape {up}, which do not form a kohya "
                          "LoRA layer ([r, in] / [out, r], or [r, in, k, k] / [out, r, 1, 1] with k 1 or 3). "
                          "The file is damaged or in another format; re-export it.")
    if down[0] != up[1]:
        raise HeaderError(f"{where}: `{module}` has mismatched ranks (lora_down rank {down[0]}, lora_up rank "
                          f"{up[1]}); the file is damaged or was edited wrongly. Re-export it.")
    if down[0] == 0:
        raise HeaderError(f"{where}: `{module}` has rank 0; re-export the LoRA.")
    return kind


def check_lora_layout(tensors: Mapping[str, tuple[str, Sequence[int]]], where: str,
                      ) -> dict[str, tuple[Kind, list[int], list[int]]]:
    """Key names, dtypes and down/up pairs of a kohya LoRA from (dtype code, shape) per key.

    Returns module -> (kind, down shape, up shape), sorted by module name. ``where`` names the file in messages.
    """
    keys = list(tensors)
    if not keys:
        raise HeaderError(f"{where} contains no tensors; it is not a LoRA.")
    foreign = [k for k in keys if not is_lora_key(k)]
    if foreign:
        raise HeaderError(diagnose_foreign(keys, where) or (
            f"{where} is not a kohya LoRA: {len(foreign)} tensor(s) are not kohya LoRA parts, e.g. "
            f"{', '.join('`' + k + '`' for k in foreign[:3])}. A kohya LoRA holds only "
            "<lora_unet_|lora_te_|lora_te1_|lora_te2_ name>.lora_down.weight / .lora_up.weight / .alpha, or the "
            "LyCORIS LoHa/LoKr/DoRA parts (A1111 refuses other files too): remove those tensors or re-export it."))
    for k, (d, _) in tensors.items():
        if d not in FLOAT_DTYPES and not (k.endswith(SUFFIX_ALPHA) and d in INT_DTYPES):
            raise HeaderError(f"{where}: tensor `{k}` has dtype {d}; LoRA weights must be F16, BF16, F32 or F64 "
                              "(an alpha may also be an integer).")
    modules: dict[str, tuple[Kind, list[int], list[int]]] = {}
    parts: dict[str, dict[str, list[int]]] = {}
    for k, (_, shape) in tensors.items():
        parts.setdefault(module_of(k), {})[part_of(k)] = list(shape)
    for m in sorted(parts):
        p = parts[m]
        a = p.get("alpha")
        if a is not None and math.prod(a) != 1:
            raise HeaderError(f"{where}: `{m}.alpha` has shape {a}; alpha must be a single number.")
        algo = algo_of(list(p))
        if algo == "lora":
            d, u = p.get("lora_down.weight"), p.get("lora_up.weight")
            if d is None or u is None:
                missing = "lora_down.weight" if d is None else "lora_up.weight"
                raise HeaderError(f"{where}: module `{m}` has no {missing}; the file is incomplete. Re-export it.")
            modules[m] = (layer_kind(m, d, u, where), d, u)
        else:
            try:
                modules[m] = module_layout(m, p)[1]  # type: ignore[assignment]
            except LycoLayoutError as e:
                raise HeaderError(f"{where}: {ALGO_NAMES[algo]} module `{m}` {e}. Re-export it.") from None
        dora = p.get(DORA_PART)
        kind, d, u = modules[m]
        if dora is not None and not dora_fits(dora, kind, d[1], u[0]):
            raise HeaderError(f"{where}: `{m}.dora_scale` has shape {dora}, which fits neither the layer's input "
                              f"({d[1]}) nor its output ({u[0]}). Re-export the DoRA file.")
    return modules


def lora_arch(modules: Mapping[str, tuple[Sequence[int], Sequence[int]]],
              metadata: Mapping[str, str] | None = None) -> Arch | None:
    """SD1/SD2/SDXL from module names and widths (module -> (down shape, up shape)), then the metadata;
    None when it cannot be told (e.g. tiny test models)."""
    names = list(modules)
    sgm = any(n.startswith(_SGM_UNET) for n in names)
    if sgm or any(n.startswith(("lora_te1_", "lora_te2_")) for n in names):
        # diffusers writes lora_te1_ for SD1 text encoders: SDXL only if the UNet or TE2 agrees.
        if not sgm and not any(n.startswith("lora_te2_") for n in names):
            widths = _widths(modules, lambda n: n.endswith("_self_attn_q_proj"))
            if widths & {768, 1024}:
                return "sd1" if 768 in widths else "sd2"
        return "sdxl"
    cross = _widths(modules, lambda n: n.endswith("attn2_to_k"))
    te = _widths(modules, lambda n: n.startswith("lora_te_") and n.endswith("_self_attn_q_proj"))
    for widths, table in ((cross, ((2048, "sdxl"), (1024, "sd2"), (768, "sd1"))), (te, ((1024, "sd2"), (768, "sd1")))):
        for w, arch in table:
            if w in widths:
                return arch  # type: ignore[return-value]
    hint = (metadata or {}).get("ss_base_model_version", "")
    for prefix, arch in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1")):
        if hint.startswith(prefix):
            return arch  # type: ignore[return-value]
    return None


def _widths(modules: Mapping[str, tuple[Sequence[int], Sequence[int]]], pick: Callable[[str], bool]) -> set[int]:
    return {int(modules[n][0][1]) for n in modules if pick(n) and len(modules[n][0]) > 1}
