"""What a training job writes besides its state: the LoRA file with its kohya metadata, the loss history
(loss.json) and curve (loss.png), all atomically."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer import atomic

if TYPE_CHECKING:
    from trainer.data.dataset import ImageItem
    from trainer.spec import TrainSpec


def save_lora(network: Any, path: Path, metadata: dict[str, str], dtype: torch.dtype) -> Path:
    if hasattr(network, "save"):
        network.save(path, metadata, dtype)
    else:  # adapter: write through the kohya module directly
        from trainer.format.kohya import export_state, save_kohya

        save_kohya(path, export_state(network, dtype), metadata)
    return path


def kohya_loss_metadata(spec: TrainSpec) -> dict[str, Any]:
    """The loss/noise options as kohya's train_network.py records them (Huber fields and flags always, like kohya;
    the options it does not record only when they are set)."""
    md: dict[str, Any] = {
        "huber_schedule": spec.huber_schedule, "huber_c": spec.huber_c, "huber_scale": spec.huber_scale,
        "noise_offset_random_strength": spec.noise_offset_random_strength,
        "multires_noise_iterations": spec.multires_noise_iterations,
        "multires_noise_discount": spec.multires_noise_discount if spec.multires_noise_iterations else None,
        "adaptive_noise_scale": spec.adaptive_noise_scale, "zero_terminal_snr": spec.zero_terminal_snr,
        "ip_noise_gamma": spec.ip_noise_gamma, "ip_noise_gamma_random_strength": spec.ip_noise_gamma_random_strength,
        "debiased_estimation": spec.debiased_estimation_loss,
        "min_timestep": spec.min_timestep, "max_timestep": spec.max_timestep,
        "v_pred_like_loss": spec.v_pred_like_loss,
        "scale_v_pred_loss_like_noise_pred": spec.scale_v_pred_loss_like_noise_pred or None,
        "masked_loss": spec.masked_loss or None,
    }
    return md


def training_metadata(spec: TrainSpec, arch: str, step: int, items: Sequence[ImageItem], mixed_precision: str,
                      gradient_checkpointing: bool, prediction_type: str) -> dict[str, str]:
    """The kohya `ss_*` / modelspec metadata of a LoRA trained by `spec` up to `step`, with what really ran."""
    from trainer.format.metadata import build_metadata

    net, opt = spec.network, spec.optimizer
    has_class = any(it.is_class for it in items)
    training = {
        # kohya records the text encoder's rate always; here the rate it trains (or would train) at
        "learning_rate": opt.lr, "text_encoder_lr": net.text_encoder_lr or opt.lr,
        "unet_lr": opt.lr, "optimizer": opt.name, "lr_scheduler": opt.scheduler,
        "lr_warmup_steps": opt.warmup_steps, "max_train_steps": spec.steps, "steps": step,
        "train_batch_size": spec.batch_size, "gradient_accumulation_steps": spec.grad_accum,
        "mixed_precision": mixed_precision, "seed": spec.seed, "min_snr_gamma": spec.min_snr_gamma,
        "noise_offset": spec.noise_offset or None, "loss_type": spec.loss_type,
        **kohya_loss_metadata(spec),
        "gradient_checkpointing": gradient_checkpointing, "max_grad_norm": opt.max_grad_norm,
        "network_dropout": net.dropout or None, "cache_latents": spec.data.cache_latents,
        "num_train_images": sum(1 for it in items if not it.is_class),
        "num_reg_images": sum(1 for it in items if it.is_class) or None,
        "prior_loss_weight": spec.prior_loss_weight if has_class else None,
        "prior_loss_form": spec.resolved_prior_loss_form if has_class else None,
        "enable_bucket": spec.data.bucketing, "prediction_type": prediction_type,
        "validation_split": spec.validation_split or None,
        "validation_seed": spec.validation_seed if spec.validation_split else None,
        "validate_every_n_steps": spec.validate_every_n_steps if spec.validation_split else None,
        "training_comment": f"trained with loraforge; preset {spec.preset}" if spec.preset else None,
    }
    return build_metadata(
        arch, net.dim, net.resolved_alpha, net.conv_dim, net.resolved_conv_alpha,
        base_model_name=Path(spec.base_model).name, output_name=spec.output_name, resolution=spec.data.resolution,
        training=training, v_parameterization=prediction_type == "v_prediction",
        train_unet=net.train_unet, train_text_encoder=net.train_text_encoder,
        network_args={"rank_dropout": net.rank_dropout, "module_dropout": net.module_dropout,
                      "factor": net.factor if net.factor != -1 else 0,
                      # LyCORIS' name for the attention-only module set, so its users read what trained
                      "preset": "attn-only" if net.unet_modules == "attention" else ""},
        network_type=net.type,
    )


def save_loss(history: Sequence[Sequence[float]], out_dir: Path, title: str,
              validation: Sequence[Sequence[float]] | None = None) -> tuple[Path, Path]:
    """loss.json ({"steps": [...], "loss": [...]}, plus "validation": {"steps", "loss"} with a held-out split)
    and loss.png; returns (json, png)."""
    from trainer.infer.loss_plot import draw_loss_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"steps": [int(s) for s, _ in history], "loss": [v for _, v in history]}
    if validation:
        data["validation"] = {"steps": [int(s) for s, _ in validation], "loss": [v for _, v in validation]}
    js = atomic.write_text(out_dir / "loss.json", json.dumps(data))
    png = draw_loss_plot(history, out_dir / "loss.png", title, validation)
    return js, png
