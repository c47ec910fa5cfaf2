"""What a training run writes: the resumable state, LoRA files (with their metadata), the loss curve, samples
and the outputs dict of the `finished` event. `Trainer` (trainer.train.loop) inherits these; they read the
trainer's attributes set up in `Trainer.__init__` and `Trainer.setup`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.events import event
from trainer.train import outputs as out
from trainer.train import precision as pr
from trainer.train import state as st


class TrainerFiles:
    """The saving half of `trainer.train.loop.Trainer` (a mixin: no state of its own)."""

    spec: Any
    step: int
    job_dir: Path
    out_dir: Path
    emit: Any

    def save_state(self) -> Path:
        self.health.check_weights(self.params, self.step)
        s = st.TrainState(
            step=self.step, network=self.network.network_state(), optimizer=self.optimizer.state_dict(),
            scheduler=self.lr_scheduler.state_dict(), scaler=self.scaler.state_dict() if self.scaler else None,
            rng=st.rng_states(),
            data={"micro_batch": self.step * self.spec.grad_accum,
                  "epoch": self.data.order.epoch_of(self.step * self.spec.grad_accum)},
            loss_history=self.loss_history,
            extra={"optimizer_layout": st.optimizer_layout(self.optimizer), "samples": self.samples,
                   "intermediate": self.intermediate, "skipped_steps": self.health.skipped_steps,
                   "skipped_in_a_row": self.health.skipped_in_a_row, "spec_fields": st.spec_fields(self.spec),
                   "extensions": self.extensions, "validation": self.validation.state()},
            spec_fingerprint=self.spec_fp, data_fingerprint=self.data_fp,
        )
        path = st.save_state(self.job_dir, s)
        self.last_state_step = self.step
        self.emit(event("file", kind="state", path=str(path), step=self.step))
        return path

    def metadata(self, step: int) -> dict[str, str]:
        md = out.training_metadata(self.spec, self.base.arch, step, self.items, self.mixed_precision,
                                   self.gradient_checkpointing, self.prediction_type)
        md.update({**self.validation.metadata(), **self.extra_metadata})
        return md

    def save_lora(self, name: str) -> Path:
        self.health.check_weights(self.params, self.step)
        path = self.out_dir / f"{name}.safetensors"
        out.save_lora(self.network, path, self.metadata(self.step), pr.SAVE_DTYPES[self.spec.save_precision])
        self.emit(event("file", kind="lora", path=str(path), step=self.step))
        return path

    def save_loss(self) -> dict[str, str]:
        self.health.flush()
        if not self.loss_history:
            return {}
        js, png = out.save_loss(self.loss_history, self.out_dir, f"{self.spec.output_name}: loss",
                                self.validation.history)
        self.emit(event("file", kind="plot", path=str(png), step=self.step))
        return {"plot": str(png), "loss_history": str(js)}

    def run_samples(self) -> None:
        """Render spec.sample with the live network (or the given sample_hook); `sample` events."""
        from trainer.infer.sample import render_with_network

        prompts = self.spec.sample.prompts
        hook = self.sample_hook or (lambda step, network: render_with_network(
            self.base, network, prompts, self.job_dir / "samples", step))
        if not self.sample_hook and not prompts:
            return
        self.health.flush()  # no time spent rendering a run that already diverged
        modes = {id(m): m.training for m in [self.base.unet, *self.base.text_encoders]}
        self.text_encoders_to(self.device)
        try:
            if hasattr(self.network, "set_multiplier"):
                self.network.set_multiplier(1.0)
            with torch.no_grad(), self._autocast():
                paths = [str(p) for p in hook(self.step, self.network)]
        finally:
            self.text_encoders_to("cpu")
            for m in [self.base.unet, *self.base.text_encoders]:
                m.train(modes[id(m)])
        if self.tb is not None:
            self.tb.samples(self.step, paths)
        for i, p in enumerate(paths):
            self.samples.append(p)
            prompt = prompts[i].prompt if len(paths) == len(prompts) else ""
            self.emit(event("sample", path=p, step=self.step, prompt=prompt))

    def outputs(self, lora: Path | None) -> dict[str, Any]:
        res: dict[str, Any] = {}
        if lora is not None:
            res["lora"] = str(lora)
        res.update(self.save_loss())
        if self.samples:
            res["samples"] = list(self.samples)
        if self.intermediate:
            res["intermediate"] = list(self.intermediate)
        res.update(self.validation.outputs(self.out_dir))
        return res
