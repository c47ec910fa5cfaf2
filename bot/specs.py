"""The job-spec vocabulary the cogs use, re-exported from the engine's torch-free `trainer.spec`.

The house plan lets only `bot` reach into `trainer` (job specs and the worker protocol); cogs import from here,
so the arrows stay cogs -> bot -> trainer.spec and a cog never depends on the engine directly.
"""

from __future__ import annotations

from trainer.spec import (
    OPTIMIZERS,
    SAMPLERS,
    SCHEDULERS,
    GridSpec,
    LoraRef,
    MergeSpec,
    PreviewSpec,
    SpecError,
    TrainSpec,
    deep_merge,
    list_presets,
    load_toml_text,
    preset_values,
    resolve_job,
)

__all__ = [
    "OPTIMIZERS", "SAMPLERS", "SCHEDULERS", "GridSpec", "LoraRef", "MergeSpec", "PreviewSpec", "SpecError",
    "TrainSpec", "deep_merge", "list_presets", "load_toml_text", "preset_values", "resolve_job",
]
