"""The LoRA training loop.

`train(spec, job_dir, on_event, should_stop)` loads the base, builds the network, optimizer and schedule,
resumes from `job_dir/state/` when a state is there, trains `spec.steps` optimizer steps and writes
`job_dir/outputs/<output_name>.safetensors` (kohya format), `loss.png` and `loss.json`.

Before training (setup): the concepts' class images are made ready for prior preservation (the missing ones
generated with the plain base model, before the network is attached: `trainer.train.prior`), the dataset report
is emitted (`trainer.data.report`), and latents / text-encoder outputs are cached (`trainer.data.cache`). The
step's maths live in `trainer.train.losses`, the device and precision policy in `trainer.train.precision`,
the files in `trainer.train.outputs` and the state in `trainer.train.state` (what a run writes, and when:
`trainer.train.saving`). Samples (spec.sample) are
rendered with the live network every N steps and at the end into job_dir/samples/ as `sample` events; the
validation loss of held-out images (spec.validation_split) is measured by `trainer.train.validation`.

Hooks: `prepare_base(base)` runs once the base is loaded and the network attached, before caching and the first
step (difference training applies its frozen copier there); `extra_metadata` is added to every saved LoRA.

Determinism (exact resume): nothing here draws from a global RNG stream that carries over between steps.
Step s (micro-batch a) draws its noise, noise offset and timesteps from a generator seeded with
(seed, s, a); the global torch seed is reset to (seed, s) at the start of each step for anything else
(network dropout); the data order is a function of (seed, epoch). So on CPU a run resumed from a state saved
at step k ends with exactly the weights of a run that was never interrupted; on a GPU the inputs are the same but
the kernels are not bit-deterministic (README, "What a resume reproduces"; the resume is logged saying which).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from trainer.data.dataset import TrainData, dataset_fingerprint
from trainer.data.encode import encode_text
from trainer.data.seeds import derive_seed, generator
from trainer.events import EventSink, JobCancelled, JobFailed, StopCheck, event, never_stop, null_sink
from trainer.infer.loss_plot import SMOOTH_WINDOW, prefetch_matplotlib
from trainer.spec import TrainSpec
from trainer.train import losses as L
from trainer.train import noise as N
from trainer.train import precision as pr
from trainer.train import speed
from trainer.train import state as st
from trainer.train.health import RunHealth, scaled_step
from trainer.train.optim import build_optimizer, build_scheduler, current_lrs
from trainer.train.saving import TrainerFiles
from trainer.train.tblog import TensorBoardLog
from trainer.train.validation import Validation, split_validation

SampleHook = Callable[[int, Any], Sequence[str | os.PathLike[str]]]
PROGRESS_EVERY_S = 0.5  # at most ~2 progress events a second


def _create_network(base: Any, spec: TrainSpec) -> Any:
    from trainer.network.lora import LoraNetwork

    net = spec.network
    if net.type != "lora":
        from trainer.network.lycoris_net import LycorisNetwork

        return LycorisNetwork.create(base, net.type, net.dim, net.resolved_alpha, conv_dim=net.conv_dim,
                                     conv_alpha=net.resolved_conv_alpha, train_text_encoder=net.train_text_encoder,
                                     blocks=net.blocks, seed=spec.seed, train_unet=net.train_unet,
                                     factor=net.factor, unet_modules=net.unet_modules)
    # seed= makes the init a function of the spec alone (the network forks the global RNG for it)
    return LoraNetwork.create(base, net.dim, net.resolved_alpha, conv_dim=net.conv_dim,
                              conv_alpha=net.resolved_conv_alpha, train_text_encoder=net.train_text_encoder,
                              blocks=net.blocks, dropout=net.dropout, seed=spec.seed, train_unet=net.train_unet,
                              rank_dropout=net.rank_dropout, module_dropout=net.module_dropout,
                              unet_modules=net.unet_modules)


class Trainer(TrainerFiles):
    """One training job. `run()` is the loop; the pieces are methods so tests and later features can reach them."""

    def __init__(self, spec: TrainSpec, job_dir: Path, on_event: EventSink = null_sink,
                 should_stop: StopCheck = never_stop, models_dir: Path | None = None, device: str | None = None,
                 sample_hook: SampleHook | None = None, base: Any | None = None, class_cache: Path | None = None,
                 prepare_base: Callable[[Any], None] | None = None, extra_metadata: dict[str, str] | None = None,
                 free_cached_models: bool = False):
        self.spec = spec
        # Only the job's owner may free the VAE / text encoders after caching: a caller that keeps using
        # `trainer.base` afterwards (copy-machine pass 2 and its copier check, tests reading the base) needs them.
        self.free_cached_models = free_cached_models
        # Where generated class images are kept for the next job (keyed by base model and class prompt).
        self.class_cache = Path(class_cache) if class_cache is not None else None
        self._given_base = base  # a preloaded base instead of spec.base_model
        self.prepare_base = prepare_base
        self.extra_metadata = dict(extra_metadata or {})
        self.job_dir = Path(job_dir)
        self.out_dir = self.job_dir / "outputs"
        self.emit = on_event
        self.should_stop = should_stop
        self.models_dir = models_dir
        self.device = pr.resolve_device(device)
        self.sample_hook = sample_hook
        self.step = 0
        self.resumed_from = 0
        self.health = RunHealth(spec.optimizer.lr)  # step losses, fp16 skipped steps, divergence checks
        self.samples: list[str] = []
        self.tb: TensorBoardLog | None = None  # set when training begins
        self.intermediate: list[str] = []
        self.last_state_step = -1
        self.scaler: torch.amp.GradScaler | None = None
        self.te_offloaded = False  # text encoders moved off the GPU once their outputs were cached
        self.extensions: list[dict[str, int]] = []  # resumes that changed `steps` (recorded in the state)

    @property
    def loss_history(self) -> list[list[float]]:
        """[step, loss] of every step read so far (fp16 skipped steps have none)."""
        return self.health.history

    def log(self, message: str, level: str = "info") -> None:
        self.emit(event("log", level=level, message=message))

    # -- setup --

    def setup(self) -> None:
        spec = self.spec
        from trainer.data.dataset import class_items, resolve_class_counts, scan_dataset
        from trainer.data.report import emit_dataset_report
        from trainer.models.base import ModelError
        from trainer.models.load import load_base

        instance_items, held = split_validation(spec, scan_dataset(spec), self.log)  # fails before the load
        self.concepts = resolve_class_counts(spec, instance_items)
        try:
            self.base = self._given_base or load_base(spec.base_model, self.models_dir)
        except ModelError as e:
            raise JobFailed(str(e), reason="bad_input") from None
        self.prediction_type = (spec.prediction_type if spec.prediction_type != "auto"
                                else self.base.prediction_type)
        self.noise_scheduler = N.training_scheduler(self.base.noise_scheduler.config, self.prediction_type,
                                                    spec.zero_terminal_snr)
        # kohya weighs by the SNR of the schedule before any zero-terminal-SNR rescale (finite at t = 999)
        self.snr_table = L.snr(DDPMScheduler.from_config(self.base.noise_scheduler.config).alphas_cumprod,
                               torch.arange(self.noise_scheduler.config.num_train_timesteps))
        self.validation = Validation(spec, held, self.noise_scheduler.config.num_train_timesteps)
        self.precision = pr.resolve_precision(spec.mixed_precision, self.device)
        self.mixed_precision, self.scaler = self.precision.mixed_precision, self.precision.scaler
        if self.precision.note:
            self.log(self.precision.note, "warning")
        # Cast on the CPU, before anything moves: an fp32 SDXL base alone (~13.9 GB) would not fit a 10 GB card.
        pr.cast_frozen_weights([self.base.unet, *self.base.text_encoders], self.precision, self.device)
        # Class images come from the plain base model: before the network is attached.
        self.class_images = self.prepare_class_images()
        self.items = list(instance_items)
        for i, (concept, paths) in enumerate(zip(self.concepts, self.class_images, strict=True)):
            self.items += class_items(concept, i, paths or [], spec.prior_loss_weight)
        self.report = emit_dataset_report(spec, self.concepts, self.class_images, self.job_dir, self.emit)
        self.data = TrainData.from_spec(spec, self.items)
        self.network = _create_network(self.base, spec)
        for m in [self.base.unet, self.base.vae, *self.base.text_encoders]:
            m.to(self.device)  # BaseModel.to(dtype=None) makes diffusers warn about dtypes
        if hasattr(self.network, "to"):  # LyCORIS modules live beside the models (peft layers moved with them)
            self.network.to(self.device)
        self.train_te = spec.network.train_text_encoder
        gc, gc_why = pr.choose_gradient_checkpointing(spec, self.base.arch, self.device, self.models_dir)
        self.gradient_checkpointing, self.attention = pr.setup_modes(
            self.base, spec.network.train_unet, self.train_te, gc, self.device, spec.xformers)
        self.log(pr.resolution_summary(self.device, spec.mixed_precision, self.mixed_precision,
                                       spec.gradient_checkpointing, self.gradient_checkpointing, self.base.arch,
                                       self.attention, gc_why))
        if gc_why:
            self.log(gc_why)  # "gradient checkpointing on: SDXL 1024 batch 1 needs ~12 GB without it; card 10 GB"
        compile_unet, compile_why = speed.resolve_compile(spec.compile, self.device, spec.steps)
        channels_last = speed.resolve_channels_last(spec.channels_last, self.device)
        speed.apply(self.base.unet, compile_unet, channels_last)
        self.log(f"{compile_why}; channels-last {'on' if channels_last else 'off'}"
                 f"{' (auto)' if spec.channels_last == 'auto' else ''}")
        te_lr = spec.network.text_encoder_lr or spec.optimizer.lr
        groups = list(self.network.param_groups(spec.optimizer.lr, te_lr))
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer, notes = build_optimizer(spec.optimizer, groups)
        self.lr_scheduler, notes2 = build_scheduler(spec.optimizer, self.optimizer, spec.steps)
        for n in notes + notes2:
            self.log(n, "warning")
        self.spec_fp = st.spec_fingerprint(spec)
        self.data_fp = dataset_fingerprint(self.items)
        s = st.resume_into(self.job_dir, self.spec_fp, self.data_fp, self.network, self.optimizer,
                           self.lr_scheduler, self.scaler, st.spec_fields(spec))
        if s is not None:
            self.extensions = list(s.extra.get("extensions", []))
            saved_steps = s.extra.get("spec_fields", {}).get("steps", spec.steps)
            if saved_steps != spec.steps:
                self.replan(s.step, saved_steps)
            self.step = self.resumed_from = self.last_state_step = s.step
            self.health.history = [list(x) for x in s.loss_history]
            self.samples = list(s.extra.get("samples", []))
            self.intermediate = list(s.extra.get("intermediate", []))
            self.health.skipped_steps = int(s.extra.get("skipped_steps", 0))
            self.health.skipped_in_a_row = int(s.extra.get("skipped_in_a_row", 0))
            self.validation.restore(s.extra.get("validation"))
            self.log(st.resume_note(self.device, s.step))
        elif spec.init_lora:  # a resumed run already holds the weights it started from
            from trainer.train.init_lora import load_init_lora

            self.log(load_init_lora(self.network, self.base, spec.init_lora, self.models_dir))
        if self.prepare_base is not None:
            self.prepare_base(self.base)

    def replan(self, at_step: int, old_total: int) -> None:
        """A resume with a different `steps`: continue to the new total, the schedule re-planned over it."""
        if at_step > self.spec.steps:
            raise st.StateError(f"the saved training state is at step {at_step}, past steps = {self.spec.steps}; "
                                f"set steps to {at_step} or more to continue it, or start over with a new --out folder")
        st.replan_schedule(self.lr_scheduler, self.optimizer)
        self.extensions.append({"at_step": at_step, "from_steps": old_total, "to_steps": self.spec.steps})
        lr = current_lrs(self.optimizer)[0]
        self.log(f"run re-planned at step {at_step}: {old_total} -> {self.spec.steps} steps; the learning-rate "
                 f"schedule ({self.spec.optimizer.scheduler}) now spans {self.spec.steps} steps (lr now {lr:.3g})")

    def prepare_class_images(self) -> list[list[Path] | None]:
        """Class images per concept (None: no prior preservation), generating the missing ones; they are kept
        in `class_cache/class_images/<base model + class prompt>` (or the concept's class_dir) for the next job."""
        from trainer.models.base import cache_root
        from trainer.train.prior import prepare_class_images

        if not any(c.class_count for c in self.concepts):
            return [None] * len(self.concepts)
        try:
            return prepare_class_images(self.concepts, self.base, self.spec.base_model,
                                        self.class_cache or cache_root(), self.device, self._autocast, self.emit,
                                        self.should_stop, resolution=self.spec.data.resolution, seed=self.spec.seed)
        except JobCancelled:
            self.cancel()
            raise

    def cache(self) -> None:
        from trainer.data.cache import cache_inputs

        self.te_offloaded = cache_inputs(self.spec, self.data, self.base, self.device, self.train_te,
                                         self._autocast, self.emit, self._phase_progress)
        # Nothing runs the VAE / text encoders again: their memory goes (~0.8 GB for SD1.5 in fp32).
        later = not self.free_cached_models or bool(self.spec.sample.prompts or self.sample_hook or self.validation.active
                     or self.prepare_base or self.spec.mode != "standard")
        freed = speed.free_after_cache(self.spec, self.data, self.base, needs_models_later=later)
        if freed:
            self.log(f"freed the {' and the '.join(freed)}: their outputs are cached and nothing runs them again")

    def text_encoders_to(self, device: torch.device | str) -> None:
        """Bring offloaded text encoders back for something that runs them (samples, a copier check) or send
        them off again."""
        if self.te_offloaded:
            for te in self.base.text_encoders:
                te.to(device)

    def _phase_progress(self, name: str) -> Callable[[int, int], None]:
        from trainer.data.cache import phase_counter

        return phase_counter(name, self.emit, self.should_stop, self.cancel, PROGRESS_EVERY_S)

    def _autocast(self) -> torch.autocast:
        return self.precision.autocast(self.device)

    # -- one step --

    def micro_step_loss(self, step: int, micro: int) -> torch.Tensor:
        spec = self.spec
        m = step * spec.grad_accum + micro
        b = self.data.batch(m)
        gen = generator(spec.seed, "step", step, micro)
        latents = L.batch_latents(b, self.base, self.device, gen)
        nopts = N.NoiseOptions.from_spec(spec)
        noise = N.make_noise(latents.shape, gen, latents=latents, opts=nopts).to(self.device)
        ts = N.sample_timesteps(len(b), self.noise_scheduler.config.num_train_timesteps, gen, spec.min_timestep,
                                spec.max_timestep).to(self.device)
        noisy = N.noisy_latents(self.noise_scheduler, latents, noise, ts, gen, nopts)
        target = L.target_for(self.noise_scheduler, latents, noise, ts, self.prediction_type)
        with self._autocast():
            if b.encoder_hidden_states is not None:
                hidden = b.encoder_hidden_states.to(self.device)
                pooled = b.pooled.to(self.device) if b.pooled is not None else None
            else:
                with torch.set_grad_enabled(self.train_te):
                    hidden, pooled = encode_text(self.base, b.captions, self.device)
            pred = L.unet_forward(self.base, noisy, ts, hidden, pooled, b.add_time_ids)
        return L.step_loss(pred, target, ts, self.noise_scheduler, self.snr_table, self.prediction_type,
                           L.LossOptions.from_spec(spec), b.loss_weight, b.mask)

    def train_step(self) -> torch.Tensor | None:
        """One optimizer step; its mean loss as a 0-d tensor on the device, or None when fp16 overflowed and
        GradScaler skipped the step. The value is read later, with others (`RunHealth.flush`)."""
        spec = self.spec
        torch.manual_seed(derive_seed(spec.seed, "global", self.step))  # dropout and anything else global
        total = torch.zeros((), device=self.device)
        for micro in range(spec.grad_accum):
            loss = self.micro_step_loss(self.step, micro)
            total += loss.detach().float()
            scaled = loss / spec.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if spec.optimizer.max_grad_norm:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, spec.optimizer.max_grad_norm)
        self.last_lr = current_lrs(self.optimizer)[0]  # the rate this step used (the schedule moves on below)
        skipped = scaled_step(self.optimizer, self.scaler)
        if not skipped:
            self.lr_scheduler.step()  # a skipped step does not move the schedule on
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if not skipped:
            return total / spec.grad_accum
        self.health.skipped(self.step)
        assert self.scaler is not None
        self.log(f"step {self.step} skipped: fp16 overflow (inf/NaN gradients); the loss scale drops to "
                 f"{self.scaler.get_scale():g} and the learning-rate schedule waits", "warning")
        return None

    def cancel(self) -> None:
        outputs: dict[str, Any] = {}
        if self.step > 0:  # at step 0 there is nothing worth a file
            lora = self.save_lora(f"{self.spec.output_name}-step{self.step:08d}")
            if self.last_state_step != self.step:
                self.save_state()
            outputs = self.outputs(lora)
        if self.tb is not None:
            self.tb.close()
        self.emit(event("cancelled", outputs=outputs, step=self.step))
        raise JobCancelled(f"stopped at step {self.step} of {self.spec.steps}")

    # -- the loop --

    def run(self) -> dict[str, Any]:
        spec = self.spec
        t_start = time.monotonic()
        # `started` goes out before the (possibly minutes-long) model load; the resume step is read from the
        # state folder's name and confirmed when the state is loaded.
        announced = st.latest_step(self.job_dir)
        self.emit(event("started", kind="train", total_steps=spec.steps, resumed_from=announced))
        self.emit(event("phase", name="loading model"))
        self.setup()
        if self.resumed_from != announced:
            self.log(f"resuming from step {self.resumed_from} (the newest state could not be read)", "warning")
        self.cache()
        prefetch_matplotlib()  # the loss plot at the end then does not wait seconds for its imports
        self.emit(event("phase", name="training", current=self.step, total=spec.steps))
        tb = self.tb = TensorBoardLog(self.out_dir / "tensorboard", self.step, SMOOTH_WINDOW)  # with `tensorboard`
        # The one speed figure (bar, bot, summary): steps run in this run / seconds since training began (model
        # loading and caching excluded; in-loop saves and samples included). The summary repeats the last one.
        t0, s0, last_emit, sps = time.monotonic(), self.step, 0.0, 0.0
        while self.step < spec.steps:
            if self.should_stop():
                self.cancel()
            loss = self.train_step()
            if loss is not None:
                self.health.stepped(self.step, loss)
            now = time.monotonic()
            if now - last_emit >= PROGRESS_EVERY_S or self.step == spec.steps:
                last_emit = now
                self.health.flush()  # the one GPU sync for the losses: at progress-event cadence
                tb.write(self.loss_history, self.last_lr)
                sps = (self.step - s0) / max(now - t0, 1e-9)
                window = [v for _, v in self.loss_history[-SMOOTH_WINDOW:]] or [math.nan]
                raw = self.loss_history[-1][1] if self.loss_history else math.nan
                self.emit(event("progress", step=self.step, total=spec.steps, loss=sum(window) / len(window),
                                loss_raw=raw, lr=self.last_lr, steps_per_s=sps,
                                eta_s=(spec.steps - self.step) / sps if sps > 0 else None))
            if self.validation.due(self.step):  # before the state, so that a resume keeps it
                self.validation.run(self)
            if spec.save_every_n_steps and self.step % spec.save_every_n_steps == 0 and self.step < spec.steps:
                self.intermediate.append(str(self.save_lora(f"{spec.output_name}-step{self.step:08d}")))
            if self.step % spec.state_every_n_steps == 0 and self.step < spec.steps:
                self.save_state()
            n = spec.sample.every_n_steps
            if n and spec.sample.prompts and self.step % n == 0 and self.step < spec.steps:
                self.run_samples()
        if self.last_state_step != self.step:
            self.save_state()  # a crash while writing outputs resumes straight to them
        lora = self.save_lora(spec.output_name)
        if spec.sample.prompts and spec.sample.at_end:
            self.run_samples()
        tb.close()
        outputs = self.outputs(lora)
        losses = [v for _, v in self.loss_history]
        summary = {
            "steps": self.step, "resumed_from": self.resumed_from, "steps_this_run": self.step - self.resumed_from,
            "elapsed_s": time.monotonic() - t_start,
            "steps_per_s": sps,
            "first_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-SMOOTH_WINDOW:]) / len(losses[-SMOOTH_WINDOW:]) if losses else None,
            "device": str(self.device), "prediction_type": self.prediction_type,
            "lora_bytes": lora.stat().st_size, "skipped_steps": self.health.skipped_steps,
            **self.validation.summary(),
        }
        self.emit(event("finished", outputs=outputs, summary=summary))
        return outputs


def train(spec: TrainSpec, job_dir: Path, on_event: EventSink = null_sink, should_stop: StopCheck = never_stop,
          models_dir: Path | None = None, device: str | None = None, sample_hook: SampleHook | None = None,
          context: dict[str, Any] | None = None, class_cache: Path | None = None) -> dict[str, Any]:
    """Train a LoRA; returns the outputs (kind -> path or paths). Raises JobCancelled / JobFailed.

    On a stop request the current LoRA is saved as `<output_name>-step<NNNNNNNN>.safetensors` (never under the
    final name, so a partial result is never mistaken for a finished one) together with the state; calling
    train() again with the same job_dir continues from there. `context` is the worker's cross-job cache
    (unused by training for now; accepted so the runner can pass it to every job kind). Generated class images
    are kept under `class_cache` (default: the engine's cache folder, LORAFORGE_CACHE) for the next job.
    """
    return Trainer(spec, Path(job_dir), on_event, should_stop, models_dir, device, sample_hook,
                   class_cache=class_cache, free_cached_models=True).run()
