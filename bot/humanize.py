"""Numbers as people read them: durations as 1m05s, rates and losses to two significant digits, sizes in
KiB/MiB, and the engine's end-of-job summary as one sentence instead of raw ``key `value``` pairs.

Pure functions (no Discord, no I/O): the progress message, the result post and ``/job show`` use them.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_duration", "format_size", "sig", "summary_text"]


def format_duration(seconds: float | None) -> str:
    """42s, 1m05s, 3h04m, 2d5h; "unknown" for None, negative or non-finite values."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "unknown"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    return f"{h // 24}d{h % 24}h"


def sig(value: Any, digits: int = 2) -> str | None:
    """``value`` to ``digits`` significant digits without an exponent for everyday sizes (3.1, 0.034, 120,
    12000); None when it is not a finite number."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):
        return None
    if v == 0:
        return "0"
    exp = math.floor(math.log10(abs(v)))
    if exp < -4 or exp >= 15:
        return f"{v:.{digits - 1}e}"
    v = round(v, digits - 1 - exp)
    exp = math.floor(math.log10(abs(v))) if v else exp  # 9.96 rounds up to 10
    return f"{v:.{max(digits - 1 - exp, 0)}f}"


def format_size(n: Any) -> str | None:
    try:
        b = float(n)
    except (TypeError, ValueError):
        return None
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{int(b)} bytes" if unit == "bytes" else f"{sig(b)} {unit}"
        b /= 1024
    return None  # unreachable


def _loss_part(first: Any, final: Any) -> str | None:
    a, b = sig(first), sig(final)
    if a is not None and b is not None:
        return f"loss {a} \u2192 {b}"
    if b is not None:
        return f"final loss {b}"
    return None


def summary_text(summary: dict[str, Any]) -> str:
    """The engine's ``finished`` summary (train, merge, preview, difference) as one line, e.g.
    "took 1m05s · 200 steps at 3.1 steps/s · loss 0.12 → 0.034 · LoRA file 1.2 MiB · on cuda:0".
    Keys it does not know are shown as ``name value`` with numbers to two significant digits."""
    s = dict(summary)
    parts: list[str] = []
    took = s.pop("elapsed_s", None)
    took = s.pop("seconds", None) if took is None else took
    s.pop("seconds", None)
    if took is not None and format_duration(_float(took)) != "unknown":
        parts.append(f"took {format_duration(_float(took))}")
    steps, rate = s.pop("steps", None), sig(s.pop("steps_per_s", None))
    if steps is not None:
        parts.append(f"{steps} steps" + (f" at {rate} steps/s" if rate else ""))
    elif rate:
        parts.append(f"{rate} steps/s")
    resumed = s.pop("resumed_from", None)
    if resumed:
        parts.append(f"resumed from step {resumed}")
    if loss := _loss_part(s.pop("first_loss", None), s.pop("final_loss", None)):
        parts.append(loss)
    if (val := _validation_part(s)) is not None:
        parts.append(val)
    if (size := format_size(s.pop("lora_bytes", None))) is not None:
        parts.append(f"LoRA file {size}")
    if (n := s.pop("inputs", None)) is not None:
        parts.append(f"{n} input(s)")
    rank, conv = s.pop("rank", None), s.pop("conv_rank", None)
    if rank is not None:
        parts.append(f"rank {rank}" + (f", conv rank {conv}" if conv else ""))
    if (merge := _merge_part(s)) is not None:
        parts.append(merge)
    if (cells := s.pop("cells", None)) is not None:
        parts.append("1 image" if cells == 1 else f"{cells} images")
    if device := s.pop("device", None):
        parts.append(f"on {device}")
    for k in ("prediction_type", "mode", "arch", "pairs"):  # said elsewhere or too technical for the post
        s.pop(k, None)
    for k, v in s.items():
        if isinstance(v, dict | list) or v is None:
            continue
        shown = v if isinstance(v, bool | str) else (sig(v) if isinstance(v, float) else v)
        parts.append(f"{k.replace('_', ' ')} {shown}")
    return " \u00b7 ".join(str(p) for p in parts)


def percent(v: Any) -> str | None:
    """A fraction as a percentage to two significant digits; "0.0%" below 0.005%."""
    f = _float(v)
    if f is None or not math.isfinite(f):
        return None
    return "0.0%" if abs(100 * f) < 0.005 else f"{sig(100 * f)}%"


def _validation_part(s: dict[str, Any]) -> str | None:
    """The held-out images' loss at the end, and where it was lowest (pops its keys)."""
    last, best = sig(s.pop("validation_loss", None)), sig(s.pop("best_validation_loss", None))
    at = s.pop("best_validation_step", None)
    if last is None:
        return None
    lowest = f" (lowest {best} at step {at})" if best is not None and at is not None else ""
    return f"validation loss {last}{lowest}"


def _merge_part(s: dict[str, Any]) -> str | None:
    """An SVD merge's loss against the exact weighted sum, overall and per block (pops its keys)."""
    err, energy = percent(s.pop("relative_error", None)), percent(s.pop("retained_energy", None))
    blocks, clamped = s.pop("block_error", None), s.pop("clamped_modules", None)
    if err is None:
        return None
    text = f"merge error {err} of the exact weighted sum" + (f" (energy kept {energy})" if energy else "")
    if clamped:
        text += f", {clamped} module(s) clamped"
    if isinstance(blocks, dict) and blocks:
        text += "; per block: " + ", ".join(f"{b} {percent(v)}" for b, v in blocks.items())
    return text


def _float(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
