"""The full training state for resume, written without pickle.

A state is a folder `job_dir/state/step-XXXXXXXX/` with two files:
- `tensors.safetensors`: the network's kohya-named fp32 tensors (`network.<key>`) and every tensor found in
  the optimizer / scheduler / scaler state (`t.<n>`), referenced from the JSON;
- `state.json`: everything else (step, optimizer param groups and scalars, scheduler state, RNG states as
  base64, data position, loss history, GradScaler state) plus a fingerprint of the spec and the dataset.

Nested Python values are encoded to JSON losslessly: tensors -> {"__tensor__": "t.<n>"}, tuples ->
{"__tuple__": [...]}, bytes -> {"__bytes__": base64}, non-string dict keys -> {"__dict__": [[k, v], ...]}.
Floats survive JSON exactly (repr round-trips), NaN/inf included.

A state is written into a temporary folder and renamed into place (os.replace), so a crash leaves either
the old state or the new one, never half of one. The latest two are kept.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer import atomic
from trainer.events import JobFailed

STATE_VERSION = 1
KEEP = 2
# Spec fields that do not change the training trajectory: a state stays valid when only these differ.
_NOT_FINGERPRINTED = {"output_name", "sample", "save_every_n_steps", "state_every_n_steps", "preset",
                      "save_precision", "xformers", "validate_every_n_steps", "keep_best", "compile",
                      "channels_last"}


class StateError(JobFailed):
    def __init__(self, message: str):
        super().__init__(message, reason="bad_state")


# Fields a resume may change: `steps` extends (or re-plans) the run; the schedule is re-planned over the new total.
EXTENDABLE = {"steps"}


def spec_fields(spec: Any) -> dict[str, Any]:
    """The spec's trajectory-relevant settings (stored in every state so a mismatch can name its fields)."""
    return {k: v for k, v in spec.model_dump(mode="json").items() if k not in _NOT_FINGERPRINTED}


def spec_fingerprint(spec: Any) -> str:
    return hashlib.sha256(json.dumps(spec_fields(spec), sort_keys=True).encode()).hexdigest()[:16]


def _flat(v: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(v, dict):
        out: dict[str, Any] = {}
        for k, x in v.items():
            out.update(_flat(x, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: v}


@functools.cache
def _default_fields() -> dict[str, Any]:
    from trainer.spec import TrainSpec

    return _flat({k: v for k, v in TrainSpec.model_construct().model_dump(mode="json").items()})


def differing_fields(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (saved value, this job's value) for every setting that differs. A field the saved state
    does not have (one added by a later version) at its default value is no difference: the run it saved is the
    same run, and a job running across an upgrade still resumes."""
    a, b = _flat(saved), _flat(now)
    defaults = _default_fields()
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not (k not in a and k in defaults and b.get(k) == defaults[k])}


def _conflict_message(job_dir: Path, diff: dict[str, tuple[Any, Any]]) -> str:
    shown = "; ".join(f"{k} (saved {json.dumps(old)}, now {json.dumps(new)})" for k, (old, new) in list(diff.items())[:8])
    more = f" and {len(diff) - 8} more" if len(diff) > 8 else ""
    return (f"the saved training state in {state_root(job_dir)} was made with different settings: {shown}{more}. "
            "Resume with the original values (only steps may change, to extend a run), or start over with a new "
            "--out folder or by deleting the state folder")


# --- lossless encoding of nested values ----------------------------------------------------------

class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def __call__(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            key = f"t.{len(self.tensors)}"
            # safetensors wants contiguous, unshared CPU tensors
            self.tensors[key] = v.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(v, dict):
            if all(isinstance(k, str) for k in v):
                return {k: self(x) for k, x in v.items()}
            return {"__dict__": [[self(k), self(x)] for k, x in v.items()]}
        if isinstance(v, tuple):
            return {"__tuple__": [self(x) for x in v]}
        if isinstance(v, list):
            return [self(x) for x in v]
        if isinstance(v, bytes | bytearray):
            return {"__bytes__": base64.b64encode(bytes(v)).decode()}
        if isinstance(v, np.ndarray):
            return {"__ndarray__": v.tolist(), "dtype": str(v.dtype)}
        if isinstance(v, np.generic):
            return v.item()
        if v is None or isinstance(v, bool | int | float | str):
            return v
        if isinstance(v, torch.dtype | torch.device):
            return {"__str__": str(v)}
        raise TypeError(f"cannot store a {type(v).__name__} in a training state")


def _decode(v: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(v, list):
        return [_decode(x, tensors) for x in v]
    if not isinstance(v, dict):
        return v
    if "__tensor__" in v:
        return tensors[v["__tensor__"]]
    if "__tuple__" in v:
        return tuple(_decode(x, tensors) for x in v["__tuple__"])
    if "__bytes__" in v:
        return base64.b64decode(v["__bytes__"])
    if "__dict__" in v:
        return {_decode(k, tensors): _decode(x, tensors) for k, x in v["__dict__"]}
    if "__ndarray__" in v:
        return np.array(v["__ndarray__"], dtype=v["dtype"])
    if "__str__" in v:
        return v["__str__"]
    return {k: _decode(x, tensors) for k, x in v.items()}


# --- RNG states ----------------------------------------------------------------------------------

def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"].to(torch.uint8))
    if "python" in states:
        v, internal, gauss = states["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in states:
        np.random.set_state(tuple(states["numpy"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in states["cuda"]])


# --- the state ---------------------------------------------------------------------------------

@dataclass
class TrainState:
    step: int
    network: dict[str, torch.Tensor]  # kohya-named fp32 tensors
    optimizer: dict[str, Any]  # optimizer.state_dict()
    scheduler: dict[str, Any]  # lr_scheduler.state_dict()
    scaler: dict[str, Any] | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # {"micro_batch": m, "epoch": e}
    loss_history: list[list[float]] = field(default_factory=list)  # [[step, loss], ...]
    extra: dict[str, Any] = field(default_factory=dict)  # smoothed loss, elapsed time, notes...
    spec_fingerprint: str = ""
    data_fingerprint: str = ""


def state_root(job_dir: Path) -> Path:
    return Path(job_dir) / "state"


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))


def has_state(job_dir: Path) -> bool:
    return bool(_step_dirs(state_root(job_dir)))


def latest_step(job_dir: Path) -> int:
    """The step of the newest state folder, from its name alone (0 when there is none): cheap, for `started`."""
    dirs = _step_dirs(state_root(job_dir))
    return int(dirs[-1].name.split("-")[1]) if dirs else 0


def save_state(job_dir: Path, state: TrainState, keep: int = KEEP) -> Path:
    root = state_root(job_dir)
    root.mkdir(parents=True, exist_ok=True)
    enc = _Encoder()
    meta = {
        "version": STATE_VERSION,
        "step": state.step,
        "spec_fingerprint": state.spec_fingerprint,
        "data_fingerprint": state.data_fingerprint,
        "optimizer": enc(state.optimizer),
        "scheduler": enc(state.scheduler),
        "scaler": enc(state.scaler),
        "rng": enc(state.rng),
        "data": enc(state.data),
        "loss_history": state.loss_history,
        "extra": enc(state.extra),
        "network_keys": sorted(state.network),
    }
    tensors = dict(enc.tensors)
    for k, v in state.network.items():
        tensors[f"network.{k}"] = v.detach().to("cpu", torch.float32).contiguous().clone()
    final = root / f"step-{state.step:08d}"
    # Written into a hidden folder, fsynced, then renamed over any folder of the same step (a cancel right after a
    # periodic save): a crash leaves the old state or the new one, never half of one.
    with atomic.folder_atomic(final) as tmp:
        save_file(tensors, str(tmp / "tensors.safetensors"), metadata={"format": "pt", "loraforge_state": "1"})
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    for old in _step_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".tmp-*"), *root.glob(".step-*.tmp")]:  # left by a crash mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _read(folder: Path) -> TrainState:
    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if meta.get("version") != STATE_VERSION:
        raise StateError(f"training state {folder} has format version {meta.get('version')}, this engine "
                         f"reads {STATE_VERSION}; start the job again without its state folder")
    tensors = load_file(str(folder / "tensors.safetensors"))
    network = {k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")}
    return TrainState(
        step=int(meta["step"]),
        network=network,
        optimizer=_decode(meta["optimizer"], tensors),
        scheduler=_decode(meta["scheduler"], tensors),
        scaler=_decode(meta["scaler"], tensors),
        rng=_decode(meta["rng"], tensors),
        data=_decode(meta["data"], tensors),
        loss_history=[list(x) for x in meta["loss_history"]],
        extra=_decode(meta["extra"], tensors),
        spec_fingerprint=meta["spec_fingerprint"],
        data_fingerprint=meta["data_fingerprint"],
    )


def load_latest_state(job_dir: Path, spec_fp: str | None = None, data_fp: str | None = None,
                      fields: dict[str, Any] | None = None) -> TrainState | None:
    """The newest readable state (falling back to the previous one if the newest is damaged), or None.

    A state of different settings is refused naming each differing field (when the state recorded them); one that
    differs only in EXTENDABLE fields is returned (the caller re-plans the run)."""
    dirs = _step_dirs(state_root(job_dir))
    errors = []
    for folder in reversed(dirs):
        try:
            st = _read(folder)
        except StateError:
            raise
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            errors.append(f"{folder.name}: {e}")
            continue
        saved_fields = st.extra.get("spec_fields")
        if spec_fp is not None and st.spec_fingerprint != spec_fp and fields is not None and saved_fields:
            diff = differing_fields(saved_fields, fields)
            if not diff.keys() <= EXTENDABLE:
                raise StateError(_conflict_message(job_dir, diff))
        elif spec_fp is not None and st.spec_fingerprint != spec_fp:
            raise StateError(
                f"the saved training state in {state_root(job_dir)} belongs to different settings "
                f"(spec fingerprint {st.spec_fingerprint}, this job {spec_fp}); resume with the original "
                "settings, or start over by deleting the state folder / using a new job"
            )
        if data_fp is not None and st.data_fingerprint and st.data_fingerprint != data_fp:
            raise StateError(
                f"the dataset changed since the training state in {state_root(job_dir)} was saved "
                "(images or captions differ); restore the dataset or start the job over"
            )
        return st
    if errors:
        raise StateError(f"no readable training state in {state_root(job_dir)} ({'; '.join(errors)}); "
                         "delete the state folder to start over")
    return None


def optimizer_layout(optimizer: torch.optim.Optimizer) -> list[list[list[int]]]:
    """Shapes of the parameters per group: a state is only loaded into an optimizer with the same layout."""
    return [[list(p.shape) for p in g["params"]] for g in optimizer.param_groups]


def resume_note(device: torch.device, step: int) -> str:
    """What a resume at `step` reproduces on `device`, for the job's log (README: "What a resume reproduces")."""
    same = (f"resumed from step {step}: the same data order, captions, flips, noise and timesteps as an uninterrupted "
            "run (every draw is seeded from seed and step), with the optimizer, schedule and RNG states restored")
    if device.type == "cpu":
        return same + "; on CPU the final weights are bit-exact"
    return (same + f"; on {device.type} the kernels are not bit-deterministic, so the final weights match an "
            "uninterrupted run closely but not bit for bit (as two runs with the same seed do)")


def resume_into(job_dir: Path, spec_fp: str, data_fp: str, network: Any, optimizer: torch.optim.Optimizer,
                lr_scheduler: Any, scaler: torch.amp.GradScaler | None,
                fields: dict[str, Any] | None = None) -> TrainState | None:
    """Load the newest valid state of `job_dir` into the network, optimizer, schedule, GradScaler and the RNGs;
    None when there is none. The caller takes the step, loss history and extras from the returned state."""
    s = load_latest_state(job_dir, spec_fp, data_fp, fields)
    if s is None:
        return None
    if s.extra.get("optimizer_layout") not in (None, optimizer_layout(optimizer)):
        raise StateError(f"the saved training state in {state_root(job_dir)} does not fit this network "
                         "(different layers); start the job over")
    network.load_network_state(s.network)
    optimizer.load_state_dict(s.optimizer)
    lr_scheduler.load_state_dict(s.scheduler)
    if scaler is not None and s.scaler:
        scaler.load_state_dict(s.scaler)
    set_rng_states(s.rng)
    return s


def replan_schedule(lr_scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """After a resume into a run of a different length: the schedule (built for the new total, its position
    restored from the state) sets the rate of the next step from the new plan, not the old one."""
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if not lambdas:
        return
    lrs = [base * f(lr_scheduler.last_epoch) for f, base in zip(lambdas, lr_scheduler.base_lrs, strict=True)]
    for g, lr in zip(optimizer.param_groups, lrs, strict=True):
        g["lr"] = lr
    lr_scheduler._last_lr = lrs

