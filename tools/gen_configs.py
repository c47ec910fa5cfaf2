"""Regenerate trainer/configs/: the component configs loading needs, so nothing is fetched from a hub.

Full-size configs mirror the public SD1.5, SD2.1-768-v and SDXL-base-1.0 diffusers repos; tiny ones keep the
same block structure at small widths (tests and the demo). Run: python tools/gen_configs.py
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "trainer" / "configs"

SCHED = {
    "_class_name": "DDPMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

SD15_UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "sample_size": 64,
}

CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "vocab_size": 49408,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
    "layer_norm_eps": 1e-05,
    "torch_dtype": "float32",
}


def sd15() -> dict:
    return {
        "arch": "sd1",
        "model_index": {
            "_class_name": "StableDiffusionPipeline",
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
        "unet": SD15_UNET,
        "vae": VAE,
        "text_encoder": CLIP_L,
        "scheduler": SCHED,
    }


def sd2() -> dict:
    cfg = sd15()
    cfg["arch"] = "sd2"
    unet = copy.deepcopy(SD15_UNET)
    unet.update(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True, sample_size=96)
    te = copy.deepcopy(CLIP_L)
    te.update(hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
              num_hidden_layers=23, projection_dim=512, pad_token_id=0)
    vae = copy.deepcopy(VAE)
    vae["sample_size"] = 768
    cfg.update(unet=unet, text_encoder=te, vae=vae, scheduler={**SCHED, "prediction_type": "v_prediction"})
    return cfg


def sdxl() -> dict:
    unet = copy.deepcopy(SD15_UNET)
    unet.update(
        attention_head_dim=[5, 10, 20],
        block_out_channels=[320, 640, 1280],
        cross_attention_dim=2048,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        transformer_layers_per_block=[1, 2, 10],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        sample_size=128,
    )
    te2 = copy.deepcopy(CLIP_L)
    te2.update(architectures=["CLIPTextModelWithProjection"], hidden_act="gelu", hidden_size=1280,
               intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32, projection_dim=1280, pad_token_id=0)
    vae = copy.deepcopy(VAE)
    vae.update(sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    return {
        "arch": "sdxl",
        "model_index": {
            "_class_name": "StableDiffusionXLPipeline",
            "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "force_zeros_for_empty_prompt": True,
        },
        "unet": unet,
        "vae": vae,
        "text_encoder": copy.deepcopy(CLIP_L),
        "text_encoder_2": te2,
        "scheduler": SCHED,
    }


TINY_VAE = {**VAE, "block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 64}


def _tiny_te(hidden: int, layers: int, act: str, proj: int, cls: str = "CLIPTextModel") -> dict:
    te = copy.deepcopy(CLIP_L)
    te.update(architectures=[cls], hidden_act=act, hidden_size=hidden, intermediate_size=hidden * 2,
              num_attention_heads=4, num_hidden_layers=layers, projection_dim=proj, vocab_size=0)
    return te  # vocab_size is filled from the locally built tokenizer


def tiny_sd15() -> dict:
    cfg = sd15()
    cfg["unet"] = {**SD15_UNET, "block_out_channels": [32, 32, 64, 64], "attention_head_dim": 4,
                   "cross_attention_dim": 32, "norm_num_groups": 8, "sample_size": 8}
    cfg["vae"] = TINY_VAE
    cfg["text_encoder"] = _tiny_te(32, 2, "quick_gelu", 32)
    return cfg


def tiny_sd2() -> dict:
    cfg = sd2()
    cfg["unet"] = {**cfg["unet"], "block_out_channels": [32, 32, 64, 64], "attention_head_dim": [2, 2, 4, 4],
                   "cross_attention_dim": 48, "norm_num_groups": 8, "sample_size": 8}
    cfg["vae"] = TINY_VAE
    cfg["text_encoder"] = _tiny_te(48, 2, "gelu", 32)
    return cfg


def tiny_sdxl() -> dict:
    cfg = sdxl()
    cfg["unet"] = {**cfg["unet"], "block_out_channels": [32, 64, 64], "attention_head_dim": [2, 4, 4],
                   "transformer_layers_per_block": [1, 1, 2], "cross_attention_dim": 80, "norm_num_groups": 8,
                   "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 40 + 6 * 8,
                   "sample_size": 8}
    cfg["vae"] = {**TINY_VAE, "scaling_factor": 0.13025}
    # Different widths for the two encoders: from_single_file tells them apart by shape.
    cfg["text_encoder"] = _tiny_te(32, 2, "quick_gelu", 32)
    cfg["text_encoder_2"] = _tiny_te(48, 2, "gelu", 40, cls="CLIPTextModelWithProjection")
    return cfg


def _toy(cfg: dict) -> dict:
    # The toy bases (trainer/toy): tiny layouts whose VAE normalises all channels together. With 2 channels per
    # GroupNorm group the tiny VAE cannot keep the absolute colour of the toy world's flat regions.
    cfg["vae"] = {**cfg["vae"], "norm_num_groups": 1}
    return cfg


def toy_sd15() -> dict:
    return _toy(tiny_sd15())


def toy_sdxl() -> dict:
    return _toy(tiny_sdxl())


ALL = {"sd15": sd15, "sd2": sd2, "sdxl": sdxl, "tiny-sd15": tiny_sd15, "tiny-sd2": tiny_sd2, "tiny-sdxl": tiny_sdxl,
       "toy-sd15": toy_sd15, "toy-sdxl": toy_sdxl}


def main() -> None:
    for name, fn in ALL.items():
        cfg = fn()
        out = ROOT / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "model_index.json").write_text(json.dumps(cfg.pop("model_index"), indent=2) + "\n")
        (out / "loraforge.json").write_text(json.dumps({"arch": cfg.pop("arch")}, indent=2) + "\n")
        for comp, conf in cfg.items():
            (out / comp).mkdir(exist_ok=True)
            fname = "scheduler_config.json" if comp == "scheduler" else "config.json"
            (out / comp / fname).write_text(json.dumps(conf, indent=2) + "\n")


if __name__ == "__main__":
    main()
