"""The LoRA training loop.

`train(spec, job_dir, on_event, should_stop)` loads the base, builds the network, optimizer and schedule,
resumes from `job_dir/state/` when a state is there, trains `spec.steps` optimizer steps and writes
`job_dir/outputs/<output_name>.safetensors` (kohya format), `loss.png` and `loss.json`.

Before training (setup): the concepts' class images are made ready for prior preservation (the missing ones
generated with the plain base model and its class prompt, before the network is attached; phase "generating
class images"), and the dataset report is emitted (`report` event, job_dir/report.txt). The data pipeline
(trainer/data/dataset.py) then applies aspect-ratio buckets, per-draw caption shuffling/dropout and the
prior-preservation loss weights; samples (spec.sample) are rendered with the live network every N steps and
at the end into job_dir/samples/ and reported as `sample` events.

Determinism (exact resume): nothing here draws from a global RNG stream that carries over between steps.
Step s (micro-batch a) draws its noise, noise offset and timesteps from a generator seeded with
(seed, s, a); the global torch seed is reset to (seed, s) at the start of each step for anything else
(network dropout); the data order is a function of (seed, epoch). So a run resumed from a state saved at
step k ends with exactly the weights of a run that was never interrupted.

Precision, checkpointing, attention: "auto" (the default) resolves on the device the job runs on (bf16 on a GPU
that supports it, else fp16; fp32 on CPU), gradient checkpointing None resolves to on for SDXL on a GPU only,
and the UNet uses xformers on a GPU when it is installed, else PyTorch SDPA; the values that ran are logged
and written into the LoRA's metadata. Mixed precision: "bf16" autocasts to bfloat16 (CPU and GPU). "fp16" autocasts to float16 with a GradScaler
on a GPU; on CPU, where float16 autocast is slow and GradScaler buys nothing, an fp16 job trains in fp32
and says so in a log event. On a GPU the frozen base weights are stored in the autocast dtype (half the
memory); the LoRA weights, their gradients and the optimizer state stay float32.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from trainer.data.dataset import (
    Batch,
    TrainData,
    dataset_fingerprint,
    derive_seed,
    encode_pixels,
    encode_text,
    generator,
)
from trainer.events import EventSink, JobCancelled, JobFailed, StopCheck, event, never_stop, null_sink
from trainer.spec import TrainSpec
from trainer.train import state as st
from trainer.train.optim import build_optimizer, build_scheduler, current_lrs

SampleHook = Callable[[int, Any], Sequence[str | os.PathLike[str]]]
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PROGRESS_EVERY_S = 0.5  # at most ~2 progress events a second
SMOOTH_WINDOW = 25


# --- losses (unit-testable pieces) ----------------------------------------------------------------

def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2", huber_c: float = 0.1
                    ) -> torch.Tensor:
    """Mean loss per sample, [b], in float32."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif loss_type == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    elif loss_type == "huber":
        # kohya's pseudo-Huber: quadratic near 0, linear far away, scaled so both ends match l2/l1 shapes.
        loss = 2 * huber_c * (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return loss.mean(dim=list(range(1, loss.ndim)))


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    ac = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1 - ac)


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float,
                   prediction_type: str = "epsilon") -> torch.Tensor:
    """Min-SNR-gamma (Hang et al. 2023), kohya's form: eps min(snr, g)/snr; v-pred min(snr, g)/(snr + 1)."""
    s = snr(alphas_cumprod, timesteps)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if prediction_type == "v_prediction" else clipped / s


def make_noise(shape: Sequence[int], gen: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    noise = torch.randn(tuple(shape), generator=gen)
    if noise_offset:
        # A per-channel constant shift teaches the model to change the image's overall brightness.
        noise = noise + noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=gen)
    return noise


def sample_timesteps(batch: int, num_train_timesteps: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, num_train_timesteps, (batch,), generator=gen, dtype=torch.long)


def target_for(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise JobFailed(f"prediction type {prediction_type!r} is not supported; use epsilon or v_prediction",
                    reason="bad_input")


def weighted_loss(per_sample: torch.Tensor, timesteps: torch.Tensor, scheduler: DDPMScheduler,
                  prediction_type: str, min_snr_gamma: float | None, loss_weight: torch.Tensor | None
                  ) -> torch.Tensor:
    """per-sample loss -> min-SNR weighting -> per-sample weights (prior preservation) -> batch mean."""
    loss = per_sample
    if min_snr_gamma:
        loss = loss * min_snr_weight(scheduler.alphas_cumprod, timesteps, min_snr_gamma, prediction_type).to(loss)
    if loss_weight is not None:
        loss = loss * loss_weight.to(loss)
    return loss.mean()


def unet_forward(base: Any, noisy: torch.Tensor, timesteps: torch.Tensor, hidden: torch.Tensor,
                 pooled: torch.Tensor | None, add_time_ids: torch.Tensor | None) -> torch.Tensor:
    kwargs: dict[str, Any] = {}
    if base.arch == "sdxl":
        if pooled is None or add_time_ids is None:
            raise RuntimeError("SDXL needs pooled text embeds and add_time_ids")
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": add_time_ids.to(noisy.device)}
    return base.unet(noisy, timesteps, encoder_hidden_states=hidden, **kwargs).sample


def batch_latents(data_batch: Batch, base: Any, device: torch.device, gen: torch.Generator | None) -> torch.Tensor:
    if data_batch.latents is not None:
        return data_batch.latents.to(device)
    assert data_batch.pixels is not None
    return encode_pixels(base.vae, data_batch.pixels, gen).to(device)


@torch.no_grad()
def eval_denoise_loss(base: Any, data: TrainData, prediction_type: str | None = None, device: str = "cpu",
                      seed: int = 0, timesteps: Sequence[int] = (50, 200, 400, 600, 800), draws: int = 2) -> float:
    """The plain l2 denoising loss over every training image at FIXED noise and timesteps.

    Used to check that training learned the images: the same numbers before and after, the network
    being whatever is currently injected into `base`.
    """
    sched = DDPMScheduler.from_config(base.noise_scheduler.config)
    pred = prediction_type or str(sched.config.prediction_type)
    total, n = 0.0, 0
    for i, it in enumerate(data.items):
        px, crop = data.pixels(i, False)
        lat = encode_pixels(base.vae, px[None]).to(device)
        hidden, pooled = encode_text(base, [it.caption], device)
        tid = torch.tensor([[*crop.original_size, *crop.crop_top_left, *crop.target_size]], dtype=torch.float32)
        for t in timesteps:
            for d in range(draws):
                noise = torch.randn(lat.shape, generator=generator(seed, i, t, d)).to(device)
                ts = torch.tensor([t], device=device)
                noisy = sched.add_noise(lat, noise, ts)
                out = unet_forward(base, noisy, ts, hidden, pooled, tid)
                total += float(per_sample_loss(out, target_for(sched, lat, noise, ts, pred)).mean())
                n += 1
    return total / n


# --- the network, through its public API -----------------------------------------------------------

def _create_network(base: Any, spec: TrainSpec) -> Any:
    from trainer.network.lora import LoraNetwork

    net = spec.network
    # seed= makes the init a function of the spec alone (the network forks the global RNG for it)
    return LoraNetwork.create(base, net.dim, net.resolved_alpha, conv_dim=net.conv_dim,
                              conv_alpha=net.resolved_conv_alpha, train_text_encoder=net.train_text_encoder,
                              blocks=net.blocks, dropout=net.dropout, seed=spec.seed, train_unet=net.train_unet)


def _param_groups(network: Any, spec: TrainSpec) -> list[dict[str, Any]]:
    te_lr = spec.network.text_encoder_lr or spec.optimizer.lr
    return list(network.param_groups(spec.optimizer.lr, te_lr))


def save_lora(network: Any, path: Path, metadata: dict[str, str], dtype: torch.dtype) -> Path:
    if hasattr(network, "save"):
        network.save(path, metadata, dtype)
    else:  # adapter: write through the kohya module directly
        from trainer.format.kohya import export_state, save_kohya

        save_kohya(path, export_state(network, dtype), metadata)
    return path


# --- the loss plot ---------------------------------------------------------------------------------

def smooth(values: Sequence[float], window: int = SMOOTH_WINDOW) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


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


def nice_ticks(lo: float, hi: float, target: int = 5, integers: bool = False) -> list[float]:
    """About `target` round tick values (1, 2, 2.5 or 5 times a power of ten) inside [lo, hi]."""
    span = hi - lo
    if not (math.isfinite(span) and span > 0):
        return [lo]
    mag = 10 ** math.floor(math.log10(span / max(1, target - 1)))
    best: list[float] = []
    for m in (1, 2, 2.5, 5, 10):
        step = max(1.0, round(m * mag)) if integers else m * mag
        first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
        ticks = [round(k * step, 12) for k in range(first, last + 1)]
        if not best or abs(len(ticks) - target) < abs(len(best) - target):
            best = ticks
    return best or [lo]


def draw_loss_plot(history: Sequence[Sequence[float]], path: Path, title: str = "training loss") -> Path:
    """A loss curve with axes, ticks and labels, drawn with Pillow (raw loss grey, moving average blue)."""
    from PIL import Image, ImageDraw, ImageFont

    W, H, L, R, T, B = 800, 450, 70, 20, 40, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((W // 2 - 50, 10), title, fill="black", font=font)
    d.line([(L, T), (L, H - B), (W - R, H - B)], fill="black", width=1)
    d.text((W // 2 - 10, H - 20), "step", fill="black", font=font)
    d.text((8, T - 25), "loss", fill="black", font=font)
    pts = [(float(s), float(v)) for s, v in history if math.isfinite(v)]
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1e-6
        pad = (y1 - y0) * 0.05
        y0, y1 = y0 - pad, y1 + pad

        def px(x: float, y: float) -> tuple[float, float]:
            return (L + (x - x0) / (x1 - x0) * (W - L - R), H - B - (y - y0) / (y1 - y0) * (H - T - B))

        for fy in nice_ticks(y0, y1):  # round values a reader can use: 0.6, 0.8, 1.0 rather than 0.543, 0.77
            _, yy = px(x0, fy)
            d.line([(L - 4, yy), (W - R, yy)], fill=(225, 225, 225))
            label = f"{fy:.6g}"
            d.text((L - 8 - d.textlength(label, font=font), yy - 6), label, fill="black", font=font)
        for fx in nice_ticks(x0, x1, integers=True):
            xx, _ = px(fx, y0)
            d.line([(xx, H - B), (xx, H - B + 4)], fill="black")
            label = f"{fx:.0f}"
            d.text((xx - d.textlength(label, font=font) / 2, H - B + 8), label, fill="black", font=font)
        raw = [px(x, y) for x, y in pts]
        if len(raw) > 1:
            d.line(raw, fill=(170, 170, 170), width=1)
            d.line([px(x, y) for x, y in zip(xs, smooth_centered(ys), strict=True)], fill=(30, 90, 200), width=2)
        else:
            d.ellipse([raw[0][0] - 3, raw[0][1] - 3, raw[0][0] + 3, raw[0][1] + 3], fill=(30, 90, 200))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def _write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)
    return path


# --- the trainer -----------------------------------------------------------------------------------

def resolve_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """The precision an "auto" spec trains in on `device`; explicit values are returned unchanged."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def resolve_gradient_checkpointing(requested: bool | None, arch: str, device: torch.device) -> bool:
    """None (auto): on for SDXL on a GPU, off for SD1.x/SD2.x on a GPU and off on CPU."""
    if requested is not None:
        return bool(requested)
    return device.type == "cuda" and arch == "sdxl"


def enable_fast_attention(unet: Any, device: torch.device) -> str:
    """xformers' memory-efficient attention on a GPU when xformers is installed, else PyTorch SDPA
    (diffusers' default). Returns a short description of what the UNet uses."""
    sdpa = "PyTorch SDPA" if hasattr(F, "scaled_dot_product_attention") else "PyTorch attention"
    if device.type != "cuda":
        return sdpa
    try:
        import xformers  # noqa: F401
    except Exception:  # noqa: BLE001 - not installed, or broken against this torch
        return sdpa
    try:
        unet.enable_xformers_memory_efficient_attention()
    except Exception as e:  # noqa: BLE001 - a mismatched xformers build: keep SDPA
        return f"{sdpa} (xformers is installed but could not be enabled: {type(e).__name__}: {e})"
    return "xformers memory-efficient attention"


class Trainer:
    """One training job. `run()` is the loop; the pieces are methods so tests and later features can reach them."""

    def __init__(self, spec: TrainSpec, job_dir: Path, on_event: EventSink = null_sink,
                 should_stop: StopCheck = never_stop, models_dir: Path | None = None, device: str | None = None,
                 sample_hook: SampleHook | None = None, base: Any | None = None, class_cache: Path | None = None):
        self.spec = spec
        # Where generated class images are kept for the next job (keyed by base model and class prompt).
        self.class_cache = Path(class_cache) if class_cache is not None else None
        self._given_base = base  # a preloaded base (e.g. with a frozen LoRA applied) instead of spec.base_model
        self.job_dir = Path(job_dir)
        self.out_dir = self.job_dir / "outputs"
        self.emit = on_event
        self.should_stop = should_stop
        self.models_dir = models_dir
        self.device = resolve_device(device)
        self.sample_hook = sample_hook
        self.step = 0
        self.resumed_from = 0
        self.loss_history: list[list[float]] = []
        self.samples: list[str] = []
        self.intermediate: list[str] = []
        self.extra: dict[str, Any] = {}
        self.last_state_step = -1
        self.scaler: torch.amp.GradScaler | None = None

    # -- setup --

    def log(self, message: str, level: str = "info") -> None:
        self.emit(event("log", level=level, message=message))

    def setup(self) -> None:
        spec = self.spec
        from trainer.data.dataset import class_items, resolve_class_counts, scan_dataset
        from trainer.models.base import ModelError
        from trainer.models.load import load_base

        instance_items = scan_dataset(spec)  # bad folders fail before the model is loaded
        self.concepts = resolve_class_counts(spec, instance_items)
        try:
            self.base = self._given_base or load_base(spec.base_model, self.models_dir)
        except ModelError as e:
            raise JobFailed(str(e), reason="bad_input") from None
        self.prediction_type = (spec.prediction_type if spec.prediction_type != "auto"
                                else self.base.prediction_type)
        self.noise_scheduler = DDPMScheduler.from_config(self.base.noise_scheduler.config,
                                                          prediction_type=self.prediction_type)
        self._setup_precision()
        # Class images come from the plain base model: before the network is attached.
        self.class_images = self.prepare_class_images()
        self.items = list(instance_items)
        for i, (concept, paths) in enumerate(zip(self.concepts, self.class_images, strict=True)):
            self.items += class_items(concept, i, paths or [], spec.prior_loss_weight)
        self.emit_report()
        self.data = TrainData.from_spec(spec, self.items)
        self.network = _create_network(self.base, spec)
        for m in [self.base.unet, self.base.vae, *self.base.text_encoders]:
            m.to(self.device)  # BaseModel.to(dtype=None) makes diffusers warn about dtypes
        self._cast_frozen_weights()
        self._setup_modes()
        groups = _param_groups(self.network, spec)
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer, notes = build_optimizer(spec.optimizer, groups)
        self.lr_scheduler, notes2 = build_scheduler(spec.optimizer, self.optimizer, spec.steps)
        for n in notes + notes2:
            self.log(n, "warning")
        self.spec_fp = st.spec_fingerprint(spec)
        self.data_fp = dataset_fingerprint(self.items)
        self._maybe_resume()

    # -- prior preservation and the dataset report --

    def prepare_class_images(self) -> list[list[Path] | None]:
        """Class images per concept (None: no prior preservation), generating the missing ones.

        Generated images are kept in `class_cache/class_images/<base model + class prompt>` (or the concept's
        class_dir) and reused by the next job; only `class_count - present` images are ever generated.
        """
        from trainer.train.prior import default_render, ensure_class_images

        spec = self.spec
        if not any(c.class_count for c in self.concepts):
            return [None] * len(self.concepts)
        cache = self.class_cache
        if cache is None:
            from trainer.models.base import cache_root

            cache = cache_root()
        on_gpu = self.device.type == "cuda"
        moved = False
        render_fn: list[Any] = []

        def render(prompt: str, seed: int, width: int, height: int) -> Any:
            nonlocal moved
            if not render_fn:
                if on_gpu:  # generate on the GPU, then give the memory back until training starts
                    for m in [self.base.unet, self.base.vae, *self.base.text_encoders]:
                        m.to(self.device)
                    moved = True
                render_fn.append(default_render(self.base))
            with self._autocast():
                return render_fn[0](prompt, seed, width, height)

        out: list[list[Path] | None] = []
        try:
            for concept in self.concepts:
                if not concept.class_count:
                    out.append(None)
                    continue
                out.append(ensure_class_images(concept, self.base, spec.base_model, cache, render=render,
                                               on_event=self.emit, should_stop=self.should_stop,
                                               resolution=spec.data.resolution, seed=spec.seed))
        except JobCancelled:
            self.cancel()
        finally:
            if moved:
                for m in [self.base.unet, self.base.vae, *self.base.text_encoders]:
                    m.to("cpu")
        return out

    def emit_report(self) -> None:
        """What will train (images per concept and bucket, captions, duplicates, undersized images): a
        `report` event and job_dir/report.txt, before any training time is spent."""
        from trainer.data.report import report_for_spec

        d = self.spec.data
        if d.bucketing and (d.bucket_min_side > d.resolution or d.bucket_max_side < d.resolution):
            self.log(f"bucket sides {d.bucket_min_side}-{d.bucket_max_side} do not include the resolution "
                     f"{d.resolution}: buckets use sides {min(d.bucket_min_side, d.resolution)}-"
                     f"{max(d.bucket_max_side, d.resolution)}", "warning")
        for i, (given, c) in enumerate(zip(self.spec.concepts, self.concepts, strict=True)):
            if (c.class_prompt or "").strip() and not c.class_count and given.class_count is None:
                self.log(f"concepts[{i}] has a class_prompt but no class images: no prior preservation (set its "
                         "class_count, or data.class_images_per_image)")
        spec = self.spec.model_copy(update={"concepts": self.concepts})
        try:
            r = report_for_spec(spec, class_images=self.class_images)
        except Exception as e:  # noqa: BLE001 - the report informs; it never stops a job on its own
            self.log(f"dataset report failed: {type(e).__name__}: {e}", "warning")
            return
        self.report = r
        self.job_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".report.txt.", dir=self.job_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(r.text + "\n")
        os.replace(tmp, self.job_dir / "report.txt")
        self.emit(event("report", text=r.text, warnings=list(r.warnings)))

    def _setup_precision(self) -> None:
        # "auto" is resolved here, on the device the job runs on; explicit values keep their old behaviour.
        mp = self.mixed_precision = resolve_mixed_precision(self.spec.mixed_precision, self.device)
        self.autocast_dtype: torch.dtype | None = None
        if mp == "bf16":
            if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
                raise JobFailed("this GPU does not support bf16; set mixed_precision to fp16", reason="bad_input")
            self.autocast_dtype = torch.bfloat16
        elif mp == "fp16":
            if self.device.type == "cuda":
                self.autocast_dtype = torch.float16
                self.scaler = torch.amp.GradScaler("cuda")
            else:
                self.log("fp16 mixed precision needs a GPU; on CPU this job trains in fp32 "
                         "(bf16 works on CPU)", "warning")

    def _cast_frozen_weights(self) -> None:
        # On a GPU the frozen base weights go to the compute dtype: half the memory, same autocast result.
        if self.autocast_dtype is None or self.device.type != "cuda":
            return
        for m in [self.base.unet, *self.base.text_encoders]:
            for p in m.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(self.autocast_dtype)

    def _setup_modes(self) -> None:
        net = self.spec.network
        self.train_te = net.train_text_encoder
        self.base.unet.train(net.train_unet)
        for te in self.base.text_encoders:
            te.train(self.train_te)
        self.base.vae.eval()
        self.gradient_checkpointing = resolve_gradient_checkpointing(self.spec.gradient_checkpointing,
                                                                     self.base.arch, self.device)
        if self.gradient_checkpointing:
            self.base.unet.enable_gradient_checkpointing()
            if self.train_te:
                for te in self.base.text_encoders:
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.attention = enable_fast_attention(self.base.unet, self.device)
        self.log(self.resolution_summary())

    def resolution_summary(self) -> str:
        """One line saying what runs: precision, gradient checkpointing and attention, auto choices marked."""
        spec = self.spec
        mp = {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[self.mixed_precision]
        if self.mixed_precision == "fp16" and self.device.type != "cuda":
            mp = "fp32 (fp16 needs a GPU)"
        if spec.mixed_precision == "auto":
            mp += f" (auto on {self.device.type})"
        gc = "on" if self.gradient_checkpointing else "off"
        if spec.gradient_checkpointing is None:
            gc += f" (auto: {self.base.arch} on {self.device.type})"
        return f"device {self.device}; precision {mp}; gradient checkpointing {gc}; attention {self.attention}"

    # -- resume --

    def _maybe_resume(self) -> None:
        s = st.load_latest_state(self.job_dir, self.spec_fp, self.data_fp)
        if s is None:
            return
        layout = st.optimizer_layout(self.optimizer)
        if s.extra.get("optimizer_layout") not in (None, layout):
            raise st.StateError(f"the saved training state in {st.state_root(self.job_dir)} does not fit this "
                                "network (different layers); start the job over")
        self.network.load_network_state(s.network)
        self.optimizer.load_state_dict(s.optimizer)
        self.lr_scheduler.load_state_dict(s.scheduler)
        if self.scaler is not None and s.scaler:
            self.scaler.load_state_dict(s.scaler)
        st.set_rng_states(s.rng)
        self.step = self.resumed_from = self.last_state_step = s.step
        self.loss_history = [list(x) for x in s.loss_history]
        self.samples = list(s.extra.get("samples", []))
        self.intermediate = list(s.extra.get("intermediate", []))

    def save_state(self) -> Path:
        self._check_finite_weights()
        s = st.TrainState(
            step=self.step, network=self.network.network_state(), optimizer=self.optimizer.state_dict(),
            scheduler=self.lr_scheduler.state_dict(), scaler=self.scaler.state_dict() if self.scaler else None,
            rng=st.rng_states(),
            data={"micro_batch": self.step * self.spec.grad_accum,
                  "epoch": self.data.order.epoch_of(self.step * self.spec.grad_accum)},
            loss_history=self.loss_history,
            extra={"optimizer_layout": st.optimizer_layout(self.optimizer), "samples": self.samples,
                   "intermediate": self.intermediate},
            spec_fingerprint=self.spec_fp, data_fingerprint=self.data_fp,
        )
        path = st.save_state(self.job_dir, s)
        self.last_state_step = self.step
        self.emit(event("file", kind="state", path=str(path), step=self.step))
        return path

    # -- caching --

    def cache(self) -> None:
        spec = self.spec
        if spec.data.cache_latents:
            self.data.cache_latents(self.base.vae, self._phase_progress("caching latents"))
            if self.device.type == "cuda" and not spec.sample.prompts:
                self.base.vae.to("cpu")  # not needed again; give its memory to training
        else:
            self.data.check_images(self._phase_progress("checking images"))
        want = spec.data.cache_text_encoder_outputs
        if want is None:  # auto: whenever it applies, quietly
            if not self.train_te and not self.data.captions_vary:
                self.emit(event("phase", name="caching text encoder outputs"))
                with self._autocast():
                    self.data.cache_text(self.base, self.device)
        elif want:
            if self.train_te:
                self.log("cache_text_encoder_outputs is ignored while the text encoder trains", "warning")
            elif self.data.captions_vary:
                # kohya refuses this combination; presets turn caching on, so explain and train without it.
                self.log("cache_text_encoder_outputs is turned off: shuffle_tags / caption_dropout change the "
                         "captions every step, so their text-encoder outputs cannot be cached (the text encoders "
                         "run each step instead: a little slower, more memory)", "warning")
            else:
                self.emit(event("phase", name="caching text encoder outputs"))
                with self._autocast():
                    self.data.cache_text(self.base, self.device)

    def _phase_progress(self, name: str) -> Callable[[int, int], None]:
        """A counter for a phase: the first, then at most ~2 a second, and the last.

        Caching a big dataset takes minutes, so a stop is honoured here too, but asked at most once a second:
        a phase that takes less than a second adds no should_stop() calls (callers count on one per step).
        """
        last = [-1.0]
        checked = [time.monotonic()]

        def report(current: int, total: int) -> None:
            now = time.monotonic()
            if now - checked[0] >= 1.0:
                checked[0] = now
                if self.should_stop():
                    self.cancel()
            if current in (0, 1, total) or now - last[0] >= PROGRESS_EVERY_S:
                last[0] = now
                self.emit(event("phase", name=name, current=current, total=total))

        return report

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- one step --

    def micro_step_loss(self, step: int, micro: int) -> torch.Tensor:
        spec = self.spec
        m = step * spec.grad_accum + micro
        b = self.data.batch(m)
        gen = generator(spec.seed, "step", step, micro)
        latents = batch_latents(b, self.base, self.device, gen)
        noise = make_noise(latents.shape, gen, spec.noise_offset).to(self.device)
        ts = sample_timesteps(len(b), self.noise_scheduler.config.num_train_timesteps, gen).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, ts)
        target = target_for(self.noise_scheduler, latents, noise, ts, self.prediction_type)
        with self._autocast():
            if b.encoder_hidden_states is not None:
                hidden = b.encoder_hidden_states.to(self.device)
                pooled = b.pooled.to(self.device) if b.pooled is not None else None
            else:
                with torch.set_grad_enabled(self.train_te):
                    hidden, pooled = encode_text(self.base, b.captions, self.device)
            pred = unet_forward(self.base, noisy, ts, hidden, pooled, b.add_time_ids)
        per = per_sample_loss(pred, target, spec.loss_type, spec.huber_c)
        return weighted_loss(per, ts, self.noise_scheduler, self.prediction_type, spec.min_snr_gamma,
                             b.loss_weight)

    def train_step(self) -> float:
        spec = self.spec
        torch.manual_seed(derive_seed(spec.seed, "global", self.step))  # dropout and anything else global
        total = 0.0
        for micro in range(spec.grad_accum):
            loss = self.micro_step_loss(self.step, micro)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise JobFailed(
                    f"loss became NaN at step {self.step + 1}; lower the learning rate (now "
                    f"{spec.optimizer.lr:g}) or use bf16/fp32 instead of fp16. Nothing was saved after this step.",
                    reason="nan",
                )
            total += value
            scaled = loss / spec.grad_accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        if spec.optimizer.max_grad_norm:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, spec.optimizer.max_grad_norm)
        self.last_lr = current_lrs(self.optimizer)[0]  # the rate this step used (the schedule moves on below)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total / spec.grad_accum

    def _check_finite_weights(self) -> None:
        for p in self.params:
            if not torch.isfinite(p.detach()).all():
                raise JobFailed(
                    f"the LoRA weights became NaN/inf at step {self.step}; lower the learning rate (now "
                    f"{self.spec.optimizer.lr:g}) or use bf16/fp32 instead of fp16. Nothing was saved.",
                    reason="nan",
                )

    # -- outputs --

    def metadata(self, step: int) -> dict[str, str]:
        from trainer.format.metadata import build_metadata

        spec, net, opt = self.spec, self.spec.network, self.spec.optimizer
        training = {
            "learning_rate": opt.lr, "text_encoder_lr": net.text_encoder_lr if net.train_text_encoder else None,
            "unet_lr": opt.lr, "optimizer": opt.name, "lr_scheduler": opt.scheduler,
            "lr_warmup_steps": opt.warmup_steps, "max_train_steps": spec.steps, "steps": step,
            "train_batch_size": spec.batch_size, "gradient_accumulation_steps": spec.grad_accum,
            "mixed_precision": self.mixed_precision, "seed": spec.seed, "min_snr_gamma": spec.min_snr_gamma,
            "noise_offset": spec.noise_offset or None, "loss_type": spec.loss_type,
            "huber_c": spec.huber_c if spec.loss_type == "huber" else None,
            "gradient_checkpointing": self.gradient_checkpointing, "max_grad_norm": opt.max_grad_norm,
            "network_dropout": net.dropout or None, "cache_latents": spec.data.cache_latents,
            "num_train_images": sum(1 for it in self.items if not it.is_class),
            "num_reg_images": sum(1 for it in self.items if it.is_class) or None,
            "prior_loss_weight": spec.prior_loss_weight if any(it.is_class for it in self.items) else None,
            "enable_bucket": spec.data.bucketing, "prediction_type": self.prediction_type,
            "training_comment": f"trained with loraforge; preset {spec.preset}" if spec.preset else None,
        }
        return build_metadata(
            self.base.arch, net.dim, net.resolved_alpha, net.conv_dim, net.resolved_conv_alpha,
            base_model_name=Path(spec.base_model).name, output_name=spec.output_name, resolution=spec.data.resolution,
            training=training, v_parameterization=self.prediction_type == "v_prediction",
            train_unet=net.train_unet, train_text_encoder=net.train_text_encoder,
        )

    def save_lora(self, name: str) -> Path:
        self._check_finite_weights()
        path = self.out_dir / f"{name}.safetensors"
        save_lora(self.network, path, self.metadata(self.step), SAVE_DTYPES[self.spec.save_precision])
        self.emit(event("file", kind="lora", path=str(path), step=self.step))
        return path

    def save_loss(self) -> dict[str, str]:
        if not self.loss_history:
            return {}
        js = _write_json(self.out_dir / "loss.json", {"steps": [int(s) for s, _ in self.loss_history],
                                                       "loss": [v for _, v in self.loss_history]})
        png = draw_loss_plot(self.loss_history, self.out_dir / "loss.png", f"{self.spec.output_name}: loss")
        self.emit(event("file", kind="plot", path=str(png), step=self.step))
        return {"plot": str(png), "loss_history": str(js)}

    def run_samples(self) -> None:
        hook = self.sample_hook or self._default_sample_hook()
        if hook is None:
            return
        modes = {id(m): m.training for m in [self.base.unet, *self.base.text_encoders]}
        try:
            if hasattr(self.network, "set_multiplier"):
                self.network.set_multiplier(1.0)
            with torch.no_grad(), self._autocast():
                paths = [str(p) for p in hook(self.step, self.network)]
        finally:
            for m in [self.base.unet, *self.base.text_encoders]:
                m.train(modes[id(m)])
        prompts = [p.prompt for p in self.spec.sample.prompts]
        for i, p in enumerate(paths):
            self.samples.append(p)
            self.emit(event("sample", path=p, step=self.step, prompt=prompts[i] if len(paths) == len(prompts) else ""))

    def _default_sample_hook(self) -> SampleHook | None:
        if not self.spec.sample.prompts:
            return None
        try:
            from trainer.infer.sample import render_with_network
        except ImportError:
            return None
        out = self.job_dir / "samples"
        return lambda step, network: render_with_network(self.base, network, self.spec.sample.prompts, out, step)

    def outputs(self, lora: Path | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if lora is not None:
            out["lora"] = str(lora)
        out.update(self.save_loss())
        if self.samples:
            out["samples"] = list(self.samples)
        if self.intermediate:
            out["intermediate"] = list(self.intermediate)
        return out

    def cancel(self) -> None:
        outputs: dict[str, Any] = {}
        if self.step > 0:  # at step 0 there is nothing worth a file
            lora = self.save_lora(f"{self.spec.output_name}-step{self.step:08d}")
            if self.last_state_step != self.step:
                self.save_state()
            outputs = self.outputs(lora)
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
        self.emit(event("phase", name="training", current=self.step, total=spec.steps))
        t0, s0, last_emit = time.monotonic(), self.step, 0.0
        while self.step < spec.steps:
            if self.should_stop():
                self.cancel()
            loss = self.train_step()
            self.loss_history.append([self.step, loss])
            now = time.monotonic()
            if now - last_emit >= PROGRESS_EVERY_S or self.step == spec.steps:
                last_emit = now
                sps = (self.step - s0) / max(now - t0, 1e-9)
                window = [v for _, v in self.loss_history[-SMOOTH_WINDOW:]]
                self.emit(event("progress", step=self.step, total=spec.steps, loss=sum(window) / len(window),
                                loss_raw=loss, lr=self.last_lr, steps_per_s=sps,
                                eta_s=(spec.steps - self.step) / sps if sps > 0 else None))
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
        outputs = self.outputs(lora)
        losses = [v for _, v in self.loss_history]
        summary = {
            "steps": self.step, "resumed_from": self.resumed_from, "elapsed_s": time.monotonic() - t_start,
            "steps_per_s": (self.step - s0) / max(time.monotonic() - t0, 1e-9),
            "first_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-SMOOTH_WINDOW:]) / len(losses[-SMOOTH_WINDOW:]) if losses else None,
            "device": str(self.device), "prediction_type": self.prediction_type,
            "lora_bytes": lora.stat().st_size,
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
                   class_cache=class_cache).run()
