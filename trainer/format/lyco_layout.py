"""The LyCORIS layer layouts (LoHa, LoKr, DoRA) as AUTOMATIC1111 and ComfyUI load them, checked on shapes alone.

Torch-free (the bot checks uploads with it). A LyCORIS file uses kohya's module names and `.alpha`, with other
weight suffixes (facts read from LyCORIS `lycoris/modules/{loha,lokr,locon}.py`, A1111 `network_hada.py`,
`network_lokr.py`, `network.py`, ComfyUI `comfy/weight_adapter/{loha,lokr,base}.py`):

- LoHa: `hada_w1_a [out, r]`, `hada_w1_b [r, in*k*k]`, `hada_w2_a [out, r]`, `hada_w2_b [r, in*k*k]`;
  with Tucker (3x3 convs): `hada_t1/hada_t2 [r, r, k, k]`, `hada_w*_a [r, out]`, `hada_w*_b [r, in]`.
- LoKr: `lokr_w1 [a, b]` or `lokr_w1_a [a, r] @ lokr_w1_b [r, b]`; `lokr_w2 [c, d(, k, k)]` or
  `lokr_w2_a [c, r] @ lokr_w2_b [r, d*k*k]` (Tucker: `lokr_t2 [r, r, k, k]`, `lokr_w2_a [r, c]`, `lokr_w2_b [r, d]`);
  out = a*c, in = b*d.
- DoRA: any of these (or a plain LoRA) plus `dora_scale`, `[1, in(, 1, 1)]` (A1111 and ComfyUI: per input
  column) or `[out, 1(, 1, 1)]` (ComfyUI only: per output row).

Each layer is summarised as the (kind, down shape, up shape) a kohya LoRA of the same layer and rank would have,
so the callers that show ranks and widths need not know the algorithm. A 2-D LoHa/LoKr layer of a conv is stored
flattened ([out, in*k*k]); its kind reads "linear" here and the base model's layer decides (``fits``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

Algo = Literal["lora", "loha", "lokr"]

LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
DORA_PART = "dora_scale"
LYCO_SUFFIXES = tuple("." + p for p in (*LOHA_PARTS, *LOKR_PARTS, DORA_PART))
ALGO_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


class LycoLayoutError(ValueError):
    """A LyCORIS layer's tensors do not fit together (message without the file name; the caller adds it)."""


def algo_of(parts: Sequence[str]) -> Algo:
    """The algorithm of a module from its tensor suffixes (without the leading dot)."""
    if any(p in LOHA_PARTS for p in parts):
        return "loha"
    if any(p in LOKR_PARTS for p in parts):
        return "lokr"
    return "lora"


def _kind_of_k(k: Sequence[int]) -> str:
    if list(k) == [1, 1]:
        return "conv1x1"
    if list(k) == [3, 3]:
        return "conv3x3"
    raise LycoLayoutError(f"has a {list(k)} kernel; only 1x1 and 3x3 convs are supported")


def _eq(kind: str, rank: int, fin: int, fout: int) -> tuple[str, list[int], list[int]]:
    if kind == "linear":
        return kind, [rank, fin], [fout, rank]
    k = 3 if kind == "conv3x3" else 1
    return kind, [rank, fin, k, k], [fout, rank, 1, 1]


def _need(shapes: Mapping[str, Sequence[int]], name: str, dims: int | tuple[int, ...]) -> list[int]:
    s = shapes.get(name)
    if s is None:
        raise LycoLayoutError(f"has no {name}; the file is incomplete")
    ok = (dims,) if isinstance(dims, int) else dims
    if len(s) not in ok:
        raise LycoLayoutError(f"has {name} of shape {list(s)}; expected {' or '.join(map(str, ok))} dimensions")
    if 0 in s:
        raise LycoLayoutError(f"has an empty {name} {list(s)}")
    return list(s)


# UNet 3x3 convs by kohya name (diffusers and SGM spellings): resnet convs, down/upsamplers, conv_in/conv_out.
KERNEL3_ENDINGS = ("_conv1", "_conv2", "_in_layers_2", "_out_layers_3", "_op", "_conv", "_conv_in", "_conv_out")


def unflatten(module: str, layout: tuple[str, list[int], list[int]]) -> tuple[str, list[int], list[int]]:
    """A 2-D LoHa/LoKr layer of a 3x3 conv is stored as [out, in*9]: name it for what it is."""
    kind, down, up = layout
    if kind == "linear" and module.startswith("lora_unet_") and module.endswith(KERNEL3_ENDINGS) \
            and down[1] % 9 == 0:
        return _eq("conv3x3", down[0], down[1] // 9, up[0])
    return layout


def loha_layout(shapes: Mapping[str, Sequence[int]]) -> tuple[str, list[int], list[int]]:
    if "hada_t1" in shapes or "hada_t2" in shapes:
        t1, t2 = _need(shapes, "hada_t1", 4), _need(shapes, "hada_t2", 4)
        w1a, w1b = _need(shapes, "hada_w1_a", 2), _need(shapes, "hada_w1_b", 2)
        w2a, w2b = _need(shapes, "hada_w2_a", 2), _need(shapes, "hada_w2_b", 2)
        r = t1[0]
        if t1[:2] != [r, r] or w1a[0] != r or w1b[0] != r or t2[0] != t2[1] or w2a[0] != t2[0] \
                or w2b[0] != t2[0] or w1a[1] != w2a[1] or w1b[1] != w2b[1] or t1[2:] != t2[2:]:
            raise LycoLayoutError("has LoHa Tucker tensors whose ranks or sizes do not match")
        return _eq(_kind_of_k(t1[2:]), r, w1b[1], w1a[1])
    w1a, w1b = _need(shapes, "hada_w1_a", 2), _need(shapes, "hada_w1_b", 2)
    w2a, w2b = _need(shapes, "hada_w2_a", 2), _need(shapes, "hada_w2_b", 2)
    if w1a[1] != w1b[0] or w2a[1] != w2b[0]:
        raise LycoLayoutError(f"has mismatched LoHa ranks (hada_w1_a {w1a} / hada_w1_b {w1b}, "
                              f"hada_w2_a {w2a} / hada_w2_b {w2b})")
    if w1a[0] != w2a[0] or w1b[1] != w2b[1]:
        raise LycoLayoutError(f"has LoHa halves of different sizes ({w1a[0]}x{w1b[1]} and {w2a[0]}x{w2b[1]})")
    return _eq("linear", w1b[0], w1b[1], w1a[0])


def lokr_layout(shapes: Mapping[str, Sequence[int]]) -> tuple[str, list[int], list[int]]:
    rank = 0
    if "lokr_w1" in shapes:
        a, b = _need(shapes, "lokr_w1", 2)
    else:
        w1a, w1b = _need(shapes, "lokr_w1_a", 2), _need(shapes, "lokr_w1_b", 2)
        if w1a[1] != w1b[0]:
            raise LycoLayoutError(f"has mismatched LoKr ranks (lokr_w1_a {w1a} / lokr_w1_b {w1b})")
        a, b, rank = w1a[0], w1b[1], w1b[0]
    kind = "linear"
    if "lokr_w2" in shapes:
        w2 = _need(shapes, "lokr_w2", (2, 4))
        c, d = w2[0], w2[1]
        if len(w2) == 4:
            kind = _kind_of_k(w2[2:])
    elif "lokr_t2" in shapes:
        t2, w2a, w2b = _need(shapes, "lokr_t2", 4), _need(shapes, "lokr_w2_a", 2), _need(shapes, "lokr_w2_b", 2)
        rank = t2[0]
        if t2[1] != rank or w2a[0] != rank or w2b[0] != rank:
            raise LycoLayoutError("has LoKr Tucker tensors whose ranks do not match")
        c, d, kind = w2a[1], w2b[1], _kind_of_k(t2[2:])
    else:
        w2a, w2b = _need(shapes, "lokr_w2_a", 2), _need(shapes, "lokr_w2_b", 2)
        if w2a[1] != w2b[0]:
            raise LycoLayoutError(f"has mismatched LoKr ranks (lokr_w2_a {w2a} / lokr_w2_b {w2b})")
        c, d, rank = w2a[0], w2b[1], w2b[0]
    out, fin = a * c, b * d
    return _eq(kind, rank or min(out, fin), fin, out)


def dora_fits(dora: Sequence[int], kind: str, fin: int, fout: int) -> bool:
    """dora_scale is [1, in] / [out, 1] (linear) or the same with trailing 1, 1 (convs). A layer read as
    "linear" may be a flattened conv (fin = in*k*k), so there any 2- or 4-dimensional form whose size fits passes."""
    dora = list(dora)
    if len(dora) not in (2, 4) or any(x != 1 for x in dora[2:]):
        return False
    if kind != "linear" and len(dora) != 4:
        return False
    if dora[0] == fout and dora[1] == 1:
        return True
    return dora[0] == 1 and (dora[1] == fin or (kind == "linear" and len(dora) == 4 and fin in (dora[1], 9 * dora[1])))


def module_layout(module: str, parts: Mapping[str, Sequence[int]]) -> tuple[Algo, tuple[str, list[int], list[int]]]:
    """(algo, (kind, equivalent down shape, equivalent up shape)) of a LoHa/LoKr module; LycoLayoutError."""
    names = list(parts)
    algo = algo_of(names)
    other = "lokr_" if algo == "loha" else "hada_"
    stray = [p for p in names if p.startswith((other, "lora_"))]
    if stray:
        raise LycoLayoutError(f"mixes {ALGO_NAMES[algo]} tensors with others ({', '.join(sorted(names))})")
    layout = unflatten(module, loha_layout(parts) if algo == "loha" else lokr_layout(parts))
    known = set(LOHA_PARTS if algo == "loha" else LOKR_PARTS)
    if algo == "lokr":
        used = {"lokr_w1"} if "lokr_w1" in parts else {"lokr_w1_a", "lokr_w1_b"}
        used |= {"lokr_w2"} if "lokr_w2" in parts else {"lokr_w2_a", "lokr_w2_b"} | (
            {"lokr_t2"} if "lokr_t2" in parts else set())
        extra = [p for p in names if p in known and p not in used]
        if extra:
            raise LycoLayoutError(f"has both full and decomposed LoKr tensors ({', '.join(sorted(names))})")
    return algo, layout


def flat_in(down: Sequence[int]) -> int:
    """The input size a layer's equivalent down shape stands for, with any kernel flattened in."""
    return math.prod(down[1:])
