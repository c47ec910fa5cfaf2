"""Pure arithmetic of the peer benchmark (no torch): probe lines -> one run's figures -> per-side summaries ->
ratios against the engine, and the Markdown table. Kept apart from run.py so CI can test it without the peers.

A run's figures: ``steps`` (optimizer steps seen), ``steps_per_s`` (1 / median interval between consecutive steps
3..N, so start-up, the first step's one-off work and the step-2 warm-up are excluded), ``first_step_s`` (process
start -> the first optimizer step completed), ``wall_s`` (process start -> exit), ``rss_mib`` (peak RSS of the
process), ``tail_s`` (the last optimizer step -> exit: saving the LoRA and whatever else a trainer does
at the end), trained tensors/params (the first step's optimizer param groups).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from typing import Any

STEADY_FROM = 3  # steady steps/s: intervals ending at steps 3..N

# goals of issue 15 (CPU, matched settings): ours/peer steps/s, peer/ours wall time, ours/peer peak RSS
GOALS = {"steps_per_s": 1.10, "wall_speedup": 1.30, "rss_ratio": 0.80}


def parse_probe(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The probe's JSON lines, in step order; a torn last line (a killed process) is skipped."""
    recs = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return sorted(recs, key=lambda r: r["step"])


def run_figures(recs: list[dict[str, Any]], t_start: float, t_end: float, rss_kib: int) -> dict[str, Any]:
    """One run's figures from its probe records and the runner's own clock and wait4() rusage."""
    out: dict[str, Any] = {"steps": len(recs), "wall_s": t_end - t_start, "rss_mib": rss_kib / 1024}
    if not recs:
        return out | {"first_step_s": None, "steps_per_s": None, "tail_s": None}
    out["first_step_s"] = recs[0]["t"] - t_start
    out["tail_s"] = t_end - recs[-1]["t"]
    times = [r["t"] for r in recs]
    intervals = [b - a for a, b in zip(times[STEADY_FROM - 2:-1], times[STEADY_FROM - 1:], strict=True)]
    out["steps_per_s"] = 1.0 / statistics.median(intervals) if intervals else None
    for key in ("optimizer", "trained_tensors", "trained_params", "dtypes", "threads", "device"):
        if key in recs[0]:
            out[key] = recs[0][key]
    peaks = [r["vram_peak"] for r in recs if "vram_peak" in r]
    if peaks:
        out["vram_peak_mib"] = max(peaks) / 2**20
    return out


def spread(values: list[float]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}


METRICS = ("steps_per_s", "first_step_s", "tail_s", "wall_s", "rss_mib")


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per side: min/median/max of every metric over its successful rounds, and its trained parameter count."""
    sides: dict[str, dict[str, Any]] = {}
    for run in runs:
        s = sides.setdefault(run["side"], {"runs": [], "failed": 0})
        if run.get("ok"):
            s["runs"].append(run)
        else:
            s["failed"] += 1
    out = {}
    for side, s in sides.items():
        ok = s["runs"]
        out[side] = {m: spread([r.get(m) for r in ok]) for m in METRICS}
        out[side]["rounds"], out[side]["failed"] = len(ok), s["failed"]
        out[side]["trained_params"] = ok[0].get("trained_params") if ok else None
        out[side]["trained_tensors"] = ok[0].get("trained_tensors") if ok else None
    return out


def _med(summary: dict[str, Any], side: str, metric: str) -> float | None:
    m = summary.get(side, {}).get(metric)
    return m["median"] if m else None


def ratios(summary: dict[str, Any], ours: str, peer: str) -> dict[str, float | None]:
    """Medians compared so that > 1 is better for ours, except rss_ratio (ours/peer, < 1 is better)."""
    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b not in (None, 0) else None

    return {
        "steps_per_s": div(_med(summary, ours, "steps_per_s"), _med(summary, peer, "steps_per_s")),
        "first_step_speedup": div(_med(summary, peer, "first_step_s"), _med(summary, ours, "first_step_s")),
        "wall_speedup": div(_med(summary, peer, "wall_s"), _med(summary, ours, "wall_s")),
        "rss_ratio": div(_med(summary, ours, "rss_mib"), _med(summary, peer, "rss_mib")),
    }


def meets(r: dict[str, float | None]) -> dict[str, bool | None]:
    return {
        "steps_per_s": None if r["steps_per_s"] is None else r["steps_per_s"] >= GOALS["steps_per_s"],
        "wall_speedup": None if r["wall_speedup"] is None else r["wall_speedup"] >= GOALS["wall_speedup"],
        "rss_ratio": None if r["rss_ratio"] is None else r["rss_ratio"] <= GOALS["rss_ratio"],
    }


def _fmt(m: dict[str, float] | None, digits: int) -> str:
    if not m:
        return "-"
    return f"{m['median']:.{digits}f} ({m['min']:.{digits}f}-{m['max']:.{digits}f})"


def _r(x: float | None, ok: bool | None = None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" + ("" if ok is None else (" (goal met)" if ok else " (goal missed)"))


def markdown(summary: dict[str, Any], pairs: list[tuple[str, str]]) -> str:
    """The results table (median (min-max) over rounds) and, per (ours, peer) pair, the ratios and goals."""
    lines = ["| side | rounds | trained params | steps/s | first step (s) | after last step (s) | job wall (s) "
             "| peak RSS (MiB) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for side, s in summary.items():
        params = f"{s['trained_params']:,} ({s['trained_tensors']} tensors)" if s["trained_params"] else "-"
        rounds = f"{s['rounds']}" + (f" (+{s['failed']} failed)" if s["failed"] else "")
        lines.append(f"| {side} | {rounds} | {params} | {_fmt(s['steps_per_s'], 3)} | {_fmt(s['first_step_s'], 1)} "
                     f"| {_fmt(s['tail_s'], 1)} | {_fmt(s['wall_s'], 1)} | {_fmt(s['rss_mib'], 0)} |")
    if pairs:
        lines += ["", "| ours vs peer | steps/s ratio (>= 1.10) | first-step speed-up | wall speed-up (>= 1.3) "
                      "| RSS ratio (<= 0.8) |", "| --- | ---: | ---: | ---: | ---: |"]
        for ours, peer in pairs:
            if ours not in summary or peer not in summary:
                continue
            r = ratios(summary, ours, peer)
            ok = meets(r)
            lines.append(f"| {ours} vs {peer} | {_r(r['steps_per_s'], ok['steps_per_s'])} "
                         f"| {_r(r['first_step_speedup'])} | {_r(r['wall_speedup'], ok['wall_speedup'])} "
                         f"| {_r(r['rss_ratio'], ok['rss_ratio'])} |")
    return "\n".join(lines) + "\n"
