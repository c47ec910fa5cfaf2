"""One entry point for every job kind: `run_job(spec, job_dir, on_event, should_stop)`.

It writes `job_dir/spec.toml` (the fully resolved spec, for /retrain and for reading later), appends every
event as one JSON line to `job_dir/events.jsonl` before forwarding it, and turns unexpected exceptions
into a `failed` event with a message a user can act on. JobCancelled and JobFailed are re-raised after
their event so the caller (worker, CLI) knows how the job ended.
"""

from __future__ import annotations

import json
import os
import threading
import traceback
from pathlib import Path
from typing import Any

from trainer.events import Event, EventSink, JobCancelled, JobFailed, StopCheck, event, never_stop, null_sink
from trainer.spec import to_toml

OOM_MESSAGE = ("out of GPU memory: lower batch size/resolution, enable gradient checkpointing or a *-8gb preset")


class EventLog:
    """Appends events to events.jsonl (flushed per line: a crash loses nothing reported) and forwards them."""

    def __init__(self, path: Path, forward: EventSink):
        self.path = path
        self.forward = forward
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, ev: Event) -> None:
        line = json.dumps(ev, default=str)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        self.forward(ev)


def _is_oom(e: BaseException) -> bool:
    try:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower() and "cuda" in str(e).lower()


def _write_spec(spec: Any, job_dir: Path) -> None:
    path = job_dir / "spec.toml"
    tmp = job_dir / ".spec.toml.tmp"
    tmp.write_text(to_toml(spec), encoding="utf-8")
    os.replace(tmp, path)


def _dispatch(spec: Any) -> Any:
    kind = getattr(spec, "kind", "train")
    if kind == "train":
        if getattr(spec, "mode", "standard") == "difference":
            from trainer.train.difference import train_difference

            return train_difference
        from trainer.train.loop import train

        return train
    if kind == "merge":
        from trainer.jobs.merge import run_merge_job

        return run_merge_job
    if kind == "preview":
        from trainer.infer.sample import run_preview_job

        return run_preview_job
    raise JobFailed(f"unknown job kind {kind!r}; expected train, merge or preview", reason="bad_input")


def run_job(spec: Any, job_dir: Path | str, on_event: EventSink = null_sink, should_stop: StopCheck = never_stop,
            models_dir: Path | None = None, device: str | None = None,
            context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a train / merge / preview job; returns its outputs. Raises JobCancelled or JobFailed."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    sink = EventLog(job_dir / "events.jsonl", on_event)
    outcome: Exception
    try:
        _write_spec(spec, job_dir)
        fn = _dispatch(spec)
        kwargs: dict[str, Any] = {"models_dir": models_dir, "device": device}
        if context is not None:
            if getattr(spec, "kind", "train") == "train":
                release_cached_models(context)
            kwargs["context"] = context
        return fn(spec, job_dir, on_event=sink, should_stop=should_stop, **kwargs)
    except JobCancelled as e:
        outcome = JobCancelled(str(e))  # the engine emitted `cancelled` with what it saved
    except JobFailed as e:
        sink(event("failed", error=str(e), reason=e.reason))
        outcome = JobFailed(str(e), reason=e.reason)
    except Exception as e:  # noqa: BLE001 - every other error becomes a readable failure
        if _is_oom(e):
            msg, reason = OOM_MESSAGE, "oom"
        elif isinstance(e, MemoryError):
            msg, reason = "out of memory (RAM): lower batch size/resolution or the number of images", "oom"
        else:
            msg, reason = f"internal error: {type(e).__name__}: {e}", "error"
        sink(event("failed", error=msg, reason=reason, traceback=traceback.format_exc(limit=20)))
        outcome = JobFailed(msg, reason=reason)
    # Only here, after the except blocks, is the engine's exception gone, and with it the frames that hold the
    # model, its activations and the optimizer: now the memory can really be given back, so the next job in this
    # worker gets the whole card. The exception raised carries the message, not those frames.
    _free_gpu_memory()
    raise outcome


def release_cached_models(context: dict[str, Any]) -> None:
    """Drop the preview pipeline a worker keeps between jobs: a training run needs the card's memory
    (an SDXL base kept for previews plus SDXL training does not fit a 10 GB card). The next preview loads it again."""
    if context.pop("sampler", None) is not None:
        context.pop("sampler_key", None)
        _free_gpu_memory()


def _free_gpu_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
