"""Whether a train job fits the GPU it will run on, asked at submit time (the engine's torch-free memory plan).

The card's memory: ``workers.gpu_memory_gib`` in the config when set, else the smallest card the CUDA workers
reported when they came up (``memory_bytes`` in their ready line), else unknown: on a CPU-only host, or before any
worker is ready, nothing is said and nothing is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bot.errors import InvalidInput
from trainer.plan import GiB, PlanError, plan_job
from trainer.spec import TrainSpec


def card_bytes(gpu_memory_gib: float | None, workers: Iterable[Any]) -> int | None:
    if gpu_memory_gib:
        return int(gpu_memory_gib * GiB)
    reported = [int(m) for w in workers if (m := getattr(w, "memory_bytes", None))]
    return min(reported) if reported else None


def plan_line(spec: TrainSpec, card: int | None, models_dir: Path | None = None) -> str:
    """The plan's one-line summary for the queued message ("" when the card is unknown or the base model's
    architecture cannot be told). Raises InvalidInput, naming the setting to change, when the job cannot fit."""
    if card is None:
        return ""
    try:
        plan = plan_job(spec, card_bytes=card, models_dir=models_dir)
    except PlanError:
        return ""  # the engine reports a base model it cannot load with its own message
    if plan.fits is False:
        raise InvalidInput(f"This job would run out of GPU memory: {plan.message()}", "Nothing was queued.")
    return plan.summary()


def submit_plan_line(bot: Any, spec: TrainSpec) -> str:
    """"\n" + the plan's summary for a job about to be queued by `bot` (/train, /retrain; "" when the card is
    unknown); raises InvalidInput when the job cannot fit the GPU."""
    card = card_bytes(bot.config.workers.gpu_memory_gib, getattr(bot.scheduler, "workers", []))
    line = plan_line(spec, card, bot.config.models_dir)
    return f"\n{line}" if line else ""
