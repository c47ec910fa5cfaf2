"""Is the run still healthy? The step losses, read off the device in batches; fp16 steps GradScaler skipped; and
the divergence checks that stop a job with what to change (a NaN loss without GradScaler, too many skipped
steps in a row, NaN/inf in the LoRA weights)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from trainer.events import JobFailed

# fp16: GradScaler skips a step whose gradients overflowed and halves the loss scale; that many in a row is no
# longer a scale being found but a run that diverged.
MAX_SKIPPED_IN_A_ROW = 25


def scaled_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> bool:
    """The optimizer step (through GradScaler when there is one); True when GradScaler skipped it."""
    if scaler is None:
        optimizer.step()
        return False
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skips the update when the gradients hold inf/NaN
    scaler.update()
    return scaler.get_scale() < scale  # update() lowers the scale exactly when it skipped


class RunHealth:
    """Step losses and skipped steps of one run. `lr` goes into the messages (what to lower)."""

    def __init__(self, lr: float):
        self.lr = lr
        self.history: list[list[float]] = []  # [step, loss] read so far
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on the device) not read yet
        self.skipped_steps = 0
        self.skipped_in_a_row = 0

    def stepped(self, step: int, loss: torch.Tensor) -> None:
        self.skipped_in_a_row = 0
        self.pending.append((step, loss))

    def skipped(self, step: int) -> None:
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise JobFailed(
                f"training diverged: fp16 overflowed (inf/NaN gradients) {self.skipped_in_a_row} steps in a row, up "
                f"to step {step}, and every one was skipped. Lower the learning rate (now {self.lr:g}) or use bf16 "
                "(RTX 30xx / A100 and newer) or fp32. Nothing was saved after the last good step.", reason="nan")

    def flush(self) -> None:
        """Read the pending losses in one go (one sync, at progress cadence; float() per micro-step would make the
        CPU wait for the GPU each time). Without GradScaler a non-finite loss is divergence."""
        if not self.pending:
            return
        values = torch.stack([t for _, t in self.pending]).tolist()
        pending, self.pending = self.pending, []
        for (step, _), value in zip(pending, values, strict=True):
            if not math.isfinite(value):
                raise JobFailed(f"loss became NaN at step {step}; lower the learning rate (now {self.lr:g}) or use "
                                "bf16/fp32 instead of fp16. Nothing was saved after this step.", reason="nan")
            self.history.append([step, value])

    def check_weights(self, params: Iterable[torch.Tensor], step: int) -> None:
        """Before anything is saved: every loss read, and no NaN/inf in the LoRA weights."""
        self.flush()
        for p in params:
            if not torch.isfinite(p.detach()).all():
                raise JobFailed(f"the LoRA weights became NaN/inf at step {step}; lower the learning rate (now "
                                f"{self.lr:g}) or use bf16/fp32 instead of fp16. Nothing was saved.", reason="nan")
