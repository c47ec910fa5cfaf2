"""Measures a training process from outside its code: put this folder on PYTHONPATH and set PEERS_PROBE_OUT.

Python imports ``sitecustomize`` at start-up; this one registers a global torch optimizer step post-hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``), so every optimizer step of any trainer (the engine,
kohya, the diffusers examples; wrapped by accelerate or not) appends one JSON line with its wall-clock time to
PEERS_PROBE_OUT. The first step also records the trained parameters (tensors and elements in the optimizer's
param groups). Nothing in the measured trainer's code changes. Without PEERS_PROBE_OUT it does nothing.
"""

import os

_OUT = os.environ.get("PEERS_PROBE_OUT")
if _OUT:
    import json
    import time

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _file = open(_OUT, "a", buffering=1)  # noqa: SIM115 - stays open for the process's life; line-buffered
    _state = {"n": 0}

    def _on_step(optimizer, args, kwargs):  # noqa: ANN001, ANN202 - torch's hook signature
        now = time.time()
        _state["n"] += 1
        rec = {"step": _state["n"], "t": now}
        if _state["n"] == 1:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
            rec.update(optimizer=type(optimizer).__name__, trained_tensors=len(params),
                       trained_params=int(sum(p.numel() for p in params)),
                       dtypes=sorted({str(p.dtype) for p in params}), threads=torch.get_num_threads())
            if torch.cuda.is_available():
                rec["device"] = torch.cuda.get_device_name()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rec["vram_peak"] = torch.cuda.max_memory_allocated()
        _file.write(json.dumps(rec) + "\n")

    register_optimizer_step_post_hook(_on_step)
