"""The loss curve the bot posts: raw loss per step and its centred moving average, drawn with matplotlib."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer import atomic

SMOOTH_WINDOW = 25
SIZE_PX = (800, 450)  # fits a Discord embed without scaling
DPI = 100


def _import_matplotlib() -> None:
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
        import matplotlib.ticker  # noqa: F401
    except Exception:  # noqa: BLE001 - the plot itself reports a broken matplotlib, with its own error
        pass


def prefetch_matplotlib() -> threading.Thread:
    """Import matplotlib on a side thread (seconds on a small CPU: ~3 s of a tiny CPU job's ~20 s) while training
    runs, so the plot at the end does not wait for it. Training steps run in torch kernels that release the GIL."""
    t = threading.Thread(target=_import_matplotlib, name="loss-plot-imports", daemon=True)
    t.start()
    return t


def smooth_centered(values: Sequence[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """A centred moving average: unlike a trailing one it does not lag behind a falling curve."""
    half = window // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def loss_figure(history: Sequence[Sequence[float]], title: str = "training loss", window: int = SMOOTH_WINDOW,
                validation: Sequence[Sequence[float]] | None = None) -> Any:
    """A matplotlib Figure (Agg, no display needed): raw loss grey, moving average blue, a legend naming both."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(SIZE_PX[0] / DPI, SIZE_PX[1] / DPI), dpi=DPI)
    ax = fig.add_subplot()
    pts = [(float(s), float(v)) for s, v in history if math.isfinite(v)]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if len(pts) > 1:
        ax.plot(xs, ys, color="0.67", linewidth=1, label="loss per step")
        ax.plot(xs, smooth_centered(ys, window), color="#1e5ac8", linewidth=2,
                label=f"moving average ({min(window, len(ys))} steps, centred)")
    elif pts:
        ax.plot(xs, ys, "o", color="#1e5ac8", label="loss per step")
    val = [(float(s), float(v)) for s, v in validation or [] if math.isfinite(v)]
    if val:  # held-out images at fixed noise: its minimum is the step to stop at
        best = min(val, key=lambda p: p[1])
        ax.plot([p[0] for p in val], [p[1] for p in val], "o-", color="#d2641e", linewidth=2,
                label="validation loss (held-out images, fixed noise)")
        ax.plot([best[0]], [best[1]], "*", color="#d2641e", markersize=14, label=f"best: step {best[0]:g}")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))  # never a fractional step
    ax.grid(True, color="0.9")
    if pts or val:
        ax.legend(loc="upper right")
    fig.tight_layout()
    return fig


def draw_loss_plot(history: Sequence[Sequence[float]], path: Path, title: str = "training loss",
                   validation: Sequence[Sequence[float]] | None = None) -> Path:
    """Write the loss curve (and the validation loss, when there is one) as an 800x450 PNG at `path`, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = loss_figure(history, title, validation=validation)
    FigureCanvasAgg(fig)
    return atomic.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
