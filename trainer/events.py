"""Events the engine reports while it works, as plain JSON-able dicts (they cross a process boundary).

Every event has a "type"; the others fields by type:
- started:  total_steps, kind ("train" | "merge" | "preview"), resumed_from (step or 0)
- phase:    name (e.g. "caching latents", "generating class images", "training", "pass 1 of 2"),
            current, total (optional counters within the phase), pair (difference mode, optional)
- report:   text (a human-readable dataset report), warnings (list of str)
- progress: step, total, loss, lr, steps_per_s, eta_s
- sample:   path, step, prompt
- preview:  path, step, total, label (a live preview of the image being sampled: trainer.infer.live)
- file:     kind ("lora" | "state" | "grid" | "plot" | "checkpoint" | "image" | "sample"), path, step (optional)
- log:      level, message
- finished: outputs (dict kind -> path or list of paths), summary (dict)
- cancelled: outputs (what was saved before stopping)
- failed:   error (a message for the user), reason (short machine code, e.g. "nan", "oom", "bad_input")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Event = dict[str, Any]
EventSink = Callable[[Event], None]
StopCheck = Callable[[], bool]


class JobCancelled(Exception):
    """Raised inside the engine when a stop was requested; the engine saves what it has first."""


class JobFailed(Exception):
    """A job failed for a reason the user can act on (bad input, NaN loss, not converged...)."""

    def __init__(self, message: str, reason: str = "error"):
        super().__init__(message)
        self.reason = reason


def event(type_: str, **fields: Any) -> Event:
    return {"type": type_, **fields}


def null_sink(_: Event) -> None:
    return None


def never_stop() -> bool:
    return False
