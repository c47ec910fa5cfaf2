"""The memory plan: a job's peak GPU memory, predicted from its spec before it runs (torch-free: the bot uses it).

``plan_job(spec, arch=..., card_bytes=...)`` -> ``MemoryPlan``: the peak of each phase of a job (caching latents and
text-encoder outputs, generating class images, training, rendering samples) with a per-part breakdown of the
training phase, its total, whether it fits a card, and ``message()`` in a user's words.
``choose_auto(spec, card_bytes)`` resolves the ``auto`` settings to the cheapest that fit.

What the plan assumes the engine does on a GPU (the fixed loop of issue 11): frozen weights are cast to the compute
dtype (bf16/fp16; fp32 for ``mixed_precision = "no"``) before they move; the VAE stays fp32 (decoding in fp16
overflows on SDXL); latents are cached with the VAE on the GPU, which then leaves unless samples need it; text
encoders leave the GPU once their outputs are cached, and come back only to encode sample or class-image prompts
(then leave again before the UNet denoises and the VAE decodes: an SDXL 1024 px fp32 decode alone takes ~3 GiB);
the LoRA weights, their gradients and the optimizer state are fp32.

Where the numbers come from: ``trainer/plan_table.json``, counted on the meta device by ``trainer.plan_count``
(parameter counts of the shipped configs; peak live bytes of one UNet forward+backward with a LoRA, with and without
gradient checkpointing, per latent pixel with flash/memory-efficient attention; VAE encode/decode; sampling).
Measured peaks on a GPU differ from counted live bytes by what the counter cannot see: the caching allocator's
rounding and fragmentation, autocast's fp32 copies around normalisations, cuBLAS/cuDNN workspaces. The two scale
factors below absorb that; they were fitted to the VRAM floors in shared/facts.md s.4 (SD1.5 512 and SDXL 1024,
batch 1, bf16, with and without checkpointing) and tests/trainer/test_plan.py keeps every figure within 15%.
``bench/gpu_acceptance.py`` prints the plan next to the measured peak when a GPU is lent.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.format.checkpoint import (
    FULL_CONFIGS,
    TINY_CONFIGS,
    TOY_BASES,
    builtin_arch,
    file_arch,
    folder_arch,
)
from trainer.models.refs import find_model
from trainer.spec import TrainSpec

GiB = 1024**3
TABLE_PATH = Path(__file__).resolve().parent / "plan_table.json"
# The CUDA context, cuBLAS/cuDNN workspaces and kernels: memory the card loses that torch's allocator never reports.
CUDA_CONTEXT = int(0.45 * GiB)
# Calibration (see the module docstring): counted live activation bytes -> measured peak.
ACT_SCALE = 0.76  # without gradient checkpointing
ACT_SCALE_GC = 1.07  # with it (recomputation keeps a block's activations and their gradients at once)
# Optimizer state bytes per trainable parameter (fp32 unless 8-bit).
OPTIMIZER_STATE_BYTES = {"AdamW": 8, "AdamW8bit": 2, "Lion": 4, "Lion8bit": 1, "Prodigy": 16, "Adafactor": 1}
ARCH_LABEL = {"sd1": "SD1.5", "sd2": "SD2", "sdxl": "SDXL"}
# Names `plan` accepts for a full-size architecture without a model file.
ARCH_ALIASES = {"sd15": "sd1", "sd1": "sd1", "sd1.5": "sd1", "sd2": "sd2", "sd21": "sd2", "sdxl": "sdxl"}


class PlanError(ValueError):
    """The plan cannot be made (e.g. the base model's architecture cannot be told); the message says what to do."""


@functools.cache
def table() -> dict[str, Any]:
    return json.loads(TABLE_PATH.read_text())  # type: ignore[no-any-return]


def gb(n: float) -> str:
    """Bytes as a user reads card sizes ("10 GB" cards hold 10 GiB)."""
    return f"{n / GiB:.1f} GB"


def parse_size(text: str) -> int:
    """'10', '10GB', '10GiB', '10240MiB', '9.5g' -> bytes (GB and GiB both mean GiB, as card names do)."""
    t = text.strip().lower().replace(" ", "")
    for suffix, mul in (("gib", GiB), ("gb", GiB), ("g", GiB), ("mib", 1024**2), ("mb", 1024**2), ("m", 1024**2)):
        if t.endswith(suffix):
            t, unit = t[: -len(suffix)], mul
            break
    else:
        unit = GiB
    try:
        value = float(t)
    except ValueError:
        raise PlanError(f"{text!r} is not a memory size; write e.g. 10GiB or 8") from None
    if not (value > 0 and math.isfinite(value)):
        raise PlanError(f"{text!r} is not a memory size; write a positive number, e.g. 10GiB")
    return int(value * unit)


def model_config_name(base_model: str, arch: str | None = None, models_dir: Path | None = None) -> str:
    """Which counted config a base model is planned with: the tiny config of a built-in tiny model, else the
    full-size config of its architecture (told from the file/folder, or given as ``arch``)."""
    if arch is not None:
        key = ARCH_ALIASES.get(arch.lower())
        if key is None:
            raise PlanError(f"unknown architecture {arch!r}; use sd15, sd2 or sdxl")
        return FULL_CONFIGS[key]  # type: ignore[index]
    if base_model in TOY_BASES:  # the toy bases have their own configs (a 4x VAE: 4x the latent cells)
        return base_model
    tiny = builtin_arch(base_model)
    if tiny is not None:
        return TINY_CONFIGS[tiny]
    if base_model.lower() in ARCH_ALIASES:
        return FULL_CONFIGS[ARCH_ALIASES[base_model.lower()]]  # type: ignore[index]
    found: str | None = None
    c = find_model(base_model, models_dir)  # the loader's rule (trainer.models.refs)
    try:
        if c is not None and c.is_dir():
            found = folder_arch(c)
        elif c is not None and c.is_file():
            found = file_arch(c)
    except (OSError, ValueError):
        found = None
    if found is None:
        raise PlanError(f"cannot tell the architecture of base model {base_model!r}; name it (sd15, sd2 or sdxl)")
    return FULL_CONFIGS[found]  # type: ignore[index]


@dataclass
class Settings:
    """The memory-relevant settings of a job as they will run on a GPU."""

    resolution: int
    batch: int
    weight_bytes: int  # frozen weights: 2 (bf16/fp16) or 4 (fp32)
    gradient_checkpointing: bool
    cache_latents: bool
    cache_text: bool
    train_te: bool
    train_unet: bool
    samples: bool
    sample_pixels: int
    class_images: bool

    @staticmethod
    def of(spec: TrainSpec, gradient_checkpointing: bool | None = None) -> Settings:
        d = spec.data
        varies = d.shuffle_tags or d.caption_dropout > 0
        cache_text = d.cache_text_encoder_outputs is not False and not spec.network.train_text_encoder and not varies
        gc = spec.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        sample_px = max([(p.width or d.resolution) * (p.height or d.resolution) for p in spec.sample.prompts],
                        default=0)
        return Settings(
            resolution=d.resolution, batch=spec.batch_size,
            weight_bytes=4 if spec.mixed_precision == "no" else 2,
            gradient_checkpointing=bool(gc), cache_latents=d.cache_latents, cache_text=cache_text,
            train_te=spec.network.train_text_encoder, train_unet=spec.network.train_unet,
            samples=bool(spec.sample.prompts), sample_pixels=sample_px,
            class_images=any((c.class_prompt or "").strip() and (c.class_count or 0) + d.class_images_per_image > 0
                             and c.class_count != 0 for c in spec.concepts),
        )


@dataclass
class MemoryPlan:
    arch: str
    config: str
    settings: Settings
    parts: dict[str, int]  # the training phase, part by part (bytes)
    phases: dict[str, int]  # peak bytes of each phase, CUDA context excluded
    card_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    with_checkpointing: MemoryPlan | None = None  # the same job with gradient checkpointing, when it is off

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k])

    @property
    def allocated(self) -> int:
        """What torch.cuda.max_memory_allocated() should show."""
        return max(self.phases.values())

    @property
    def total(self) -> int:
        """What the card must hold: the peak plus the CUDA context."""
        return self.allocated + CUDA_CONTEXT

    @property
    def fits(self) -> bool | None:
        return None if self.card_bytes is None else self.total <= self.card_bytes

    def describe_job(self) -> str:
        s = self.settings
        label = ARCH_LABEL.get(self.arch, self.arch) + (f" ({self.config})" if self.config.startswith(("tiny", "toy")) else "")
        return f"{label} {s.resolution} batch {s.batch}"

    def summary(self) -> str:
        """One line: the peak, and the card when known."""
        s = self.settings
        gc = "with" if s.gradient_checkpointing else "without"
        line = f"Memory plan: ~{gb(self.total)} peak ({self.describe_job()}, {gc} gradient checkpointing)"
        if self.card_bytes is not None:
            line += f"; fits the {gb(self.card_bytes)} card" if self.fits else f"; the card has {gb(self.card_bytes)}"
        return line

    def advice(self) -> list[str]:
        """Settings to change, each with what it would need, cheapest first (only when the job does not fit)."""
        if self.fits is not False:
            return []
        out = []
        alt = self.with_checkpointing
        if alt is not None:
            out.append(f"turn gradient checkpointing on (~{gb(alt.total)})")
        s = self.settings
        if s.batch > 1:
            out.append("lower the batch size (gradient accumulation keeps the effective batch)")
        if not s.cache_latents:
            out.append("cache latents")
        if s.train_te:
            out.append("stop training the text encoder")
        if self.peak_phase == "samples":
            out.append("render samples at a lower resolution, or none")
        out.append("lower the resolution")
        return out

    def message(self) -> str:
        """The plan in a user's words, e.g. "SDXL 1024 batch 2 needs ~13 GB here; with gradient checkpointing ~9 GB;
        your card has 10 GB"."""
        parts = [f"{self.describe_job()} needs ~{gb(self.total)} here"]
        if self.with_checkpointing is not None:
            parts.append(f"with gradient checkpointing ~{gb(self.with_checkpointing.total)}")
        if self.card_bytes is not None:
            parts.append(f"your card has {gb(self.card_bytes)}")
        text = "; ".join(parts)
        if self.fits is False:
            text += ". To fit: " + "; or ".join(self.advice()) + "."
        return text

    def table_text(self) -> str:
        """The breakdown, one part a line (for `python -m trainer plan`)."""
        rows = [f"{name:28s} {n / GiB:7.2f} GiB" for name, n in self.parts.items() if n]
        rows.append(f"{'CUDA context':28s} {CUDA_CONTEXT / GiB:7.2f} GiB")
        rows.append("peak by phase: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.phases.items()) + " GiB")
        return "\n".join(rows)


def _lora_params(spec: TrainSpec, t: dict[str, Any]) -> tuple[int, int]:
    """(UNet LoRA params, text-encoder LoRA params). Block selection is ignored: an upper bound."""
    net = spec.network
    unet = 0
    if net.train_unet:
        for lin, conv_lin, conv3 in t["lora"]["unet_blocks"].values():
            unet += net.dim * lin
            if net.conv_dim:
                unet += net.dim * conv_lin + net.conv_dim * conv3
    te = net.dim * sum(t["lora"]["text_encoders"]) if net.train_text_encoder else 0
    return unet, te


def plan_settings(spec: TrainSpec, config: str, s: Settings) -> MemoryPlan:
    t = table()[config]
    arch = t["arch"]
    p = t["params"]
    wb = s.weight_bytes
    act_bytes = 2 if wb == 2 else 4  # activations follow the compute dtype
    latent_px = (s.resolution // t["vae_factor"]) ** 2  # 8 pixels per latent cell, 4 for the toy bases
    unet_w = p["unet"] * wb
    te_w = sum(p["text_encoders"]) * wb
    vae_w = p["vae"] * 4
    lora_unet, lora_te = _lora_params(spec, t)
    lora_n = lora_unet + lora_te
    per_px = t["unet_train_gc_per_pixel"] * ACT_SCALE_GC if s.gradient_checkpointing else \
        t["unet_train_per_pixel"] * ACT_SCALE
    unet_act = int(per_px * latent_px * s.batch * act_bytes / 2) if s.train_unet or s.train_te else 0
    te_act = int(sum(t["te_train_per_sample"]) * s.batch * act_bytes / 2) if s.train_te else 0
    vae_live = not s.cache_latents or s.samples
    encode_live = int(t["vae_encode_per_pixel"] * latent_px * s.batch) if not s.cache_latents else 0
    parts = {
        "UNet weights": unet_w,
        "text encoder weights": 0 if s.cache_text else te_w,
        "VAE weights (fp32)": vae_w if vae_live else 0,
        "LoRA weights (fp32)": lora_n * 4,
        "LoRA gradients": lora_n * 4,
        f"optimizer state ({spec.optimizer.name})": lora_n * OPTIMIZER_STATE_BYTES[spec.optimizer.name],
        "activations" + (" (checkpointed)" if s.gradient_checkpointing else ""): unet_act + te_act,
        "VAE encode (uncached latents)": encode_live,
    }
    train = sum(parts.values())
    # Caching, before the UNet moves in: latents with only the VAE on the GPU (one image at a time), then the
    # text encoders' outputs with only the text encoders there.
    phases: dict[str, int] = {}
    if s.cache_latents:
        phases["caching latents"] = vae_w + int(t["vae_encode_per_pixel"] * latent_px)
    if s.cache_text:
        phases["caching text"] = te_w + int(sum(t["te_train_per_sample"]))  # a grad pass bounds a no-grad one
    if s.class_images:  # the plain base renders at the training resolution, batch 1, guidance doubles the batch
        phases["class images"] = unet_w + vae_w + max(te_w, int(t["unet_infer_per_pixel"] * latent_px * 2),
                                                      int(t["vae_decode_per_pixel"] * latent_px))
    phases["training"] = train
    if s.samples:
        sample_latent = s.sample_pixels // t["vae_factor"] ** 2
        keep = unet_w + lora_n * (4 + OPTIMIZER_STATE_BYTES[spec.optimizer.name]) + vae_w
        phases["samples"] = keep + max(te_w, int(t["unet_infer_per_pixel"] * sample_latent * 2),
                                       int(t["vae_decode_per_pixel"] * sample_latent))
    notes = []
    if spec.network.blocks:
        notes.append("block selection is not counted: the LoRA part is an upper bound")
    if spec.network.unet_modules == "attention":
        notes.append("the attention-only module set is counted as kohya's full set: the LoRA part is an upper bound")
    if spec.network.type != "lora":  # LyCORIS rebuilds each layer's full weight change in every forward
        notes.append(f"a {spec.network.type} network keeps a full-size weight change per trained layer for the "
                     "backward pass, which this plan does not count: expect a higher peak than shown")
    return MemoryPlan(arch=arch, config=config, settings=s, parts=parts, phases=phases, notes=notes)


def plan_job(spec: TrainSpec, *, arch: str | None = None, card_bytes: int | None = None,
             models_dir: Path | None = None, gradient_checkpointing: bool | None = None) -> MemoryPlan:
    """The plan of a train job as it would run on a GPU (``auto`` settings resolved by ``choose_auto`` when the card
    is known, else the engine's defaults). A difference job is planned for its larger pass."""
    config = model_config_name(spec.base_model, arch, models_dir)
    specs = [spec]
    if spec.mode == "difference" and spec.difference is not None:
        specs.append(spec.pass2_spec())
    plans = []
    for sp in specs:
        gc = gradient_checkpointing
        if gc is None and sp.gradient_checkpointing is None:
            gc = _auto_gc(sp, config, card_bytes)
        plan = plan_settings(sp, config, Settings.of(sp, gc))
        if not plan.settings.gradient_checkpointing:
            plan.with_checkpointing = plan_settings(sp, config, Settings.of(sp, True))
            plan.with_checkpointing.card_bytes = card_bytes
        plan.card_bytes = card_bytes
        plans.append(plan)
    return max(plans, key=lambda p: p.total)


def _auto_gc(spec: TrainSpec, config: str, card_bytes: int | None) -> bool:
    arch = table()[config]["arch"]
    if card_bytes is None:  # the engine's default without a plan: on for SDXL, off otherwise
        return arch == "sdxl"
    off = plan_settings(spec, config, Settings.of(spec, False))
    return off.total > card_bytes


def choose_auto(spec: TrainSpec, card_bytes: int, *, arch: str | None = None,
                models_dir: Path | None = None) -> dict[str, Any]:
    """The cheapest settings that fit for the job's ``auto`` values: gradient checkpointing only when the job does
    not fit without it (it costs ~35% more compute); text-encoder outputs cached whenever they can be (faster and
    smaller). Returns {"gradient_checkpointing": bool, "cache_text_encoder_outputs": bool, "plan": MemoryPlan}."""
    config = model_config_name(spec.base_model, arch, models_dir)
    gc = spec.gradient_checkpointing
    if gc is None:
        gc = _auto_gc(spec, config, card_bytes)
    plan = plan_job(spec, arch=arch, card_bytes=card_bytes, models_dir=models_dir, gradient_checkpointing=gc)
    return {"gradient_checkpointing": gc, "cache_text_encoder_outputs": plan.settings.cache_text, "plan": plan}
