"""The shared inputs of the peer benchmark, written once under a work folder (run by run.py in the engine's venv).

- ``base/<name>.safetensors``: the base as an A1111 single-file checkpoint (what the engine and kohya load), and
  ``base/<name>-diffusers/``: the same weights as a diffusers folder with a tokenizer (what the diffusers example
  loads). ``sd15`` is the full-size SD1.5 architecture from trainer/configs/sd15 with random weights (seed 0; speed
  does not depend on the weights), ``tiny-sd15`` the built-in tiny model.
- ``tokenizers/openai_clip-vit-large-patch14/``: the engine's offline tokenizer saved where kohya's
  ``--tokenizer_cache_dir`` looks, so kohya downloads nothing.
- ``data/``: the same images and captions laid out three ways: ``ours/`` (image + same-name .txt),
  ``kohya/1_scs/`` (kohya's <repeats>_<name> folder, .txt captions) and ``hf/`` (an imagefolder with metadata.jsonl).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CAPTIONS = ["chibi scs girl, red dress", "chibi scs girl, blue hair", "chibi scs girl, smiling", "chibi scs girl, green"]
KOHYA_TOKENIZER = "openai_clip-vit-large-patch14"  # kohya: tokenizer_cache_dir / TOKENIZER_PATH.replace("/", "_")


def build_base(name: str) -> Any:
    """The base model: the full-size SD1.5 architecture with random weights, or the built-in tiny model."""
    import torch

    from trainer.models.base import BaseModel, arch_of_config_dir
    from trainer.models.tokenizers import build_local_tokenizer

    if name.startswith("tiny-"):
        from trainer.models.load import load_base
        return load_base(name)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.format.checkpoint import CONFIGS_DIR

    folder = CONFIGS_DIR / name
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    te = CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json"))
    sched = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "scheduler"))
    return BaseModel(arch=arch_of_config_dir(folder), name=f"{name}-random", unet=unet, vae=vae, text_encoders=[te],
                     tokenizers=[build_local_tokenizer()], noise_scheduler=sched, source=folder, config_dir=folder)


def write_base(name: str, out: Path) -> tuple[Path, Path]:
    """``out/<name>.safetensors`` and ``out/<name>-diffusers/`` from one build of the weights (skipped when present)."""
    single, folder = out / f"{name}.safetensors", out / f"{name}-diffusers"
    if single.exists() and (folder / "model_index.json").exists():
        return single, folder
    from trainer.models.single_file import save_single_file

    model = build_base(name)
    out.mkdir(parents=True, exist_ok=True)
    save_single_file(model, single, keep_source_keys=False)
    tmp = folder.with_name(folder.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.unet.save_pretrained(tmp / "unet")
    model.vae.save_pretrained(tmp / "vae")
    model.text_encoders[0].save_pretrained(tmp / "text_encoder")
    save_tokenizer(tmp / "tokenizer")
    model.noise_scheduler.save_pretrained(tmp / "scheduler")
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.32.1",
        "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False}, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return single, folder


def save_tokenizer(dest: Path) -> None:
    """The engine's offline CLIP tokenizer as the plain vocab.json + merges.txt every transformers version reads
    (transformers 5's save_pretrained writes only tokenizer.json, which kohya's transformers 4 cannot load)."""
    from trainer.models.tokenizers import build_local_tokenizer

    tok = build_local_tokenizer()
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps(tok.get_vocab()))
    (dest / "merges.txt").write_text("#version: 0.2\n")
    (dest / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer"}))


def write_tokenizer(out: Path) -> Path:
    dest = out / KOHYA_TOKENIZER
    if not (dest / "merges.txt").exists():
        save_tokenizer(dest)
    return out


def write_data(out: Path, n: int, size: int) -> dict[str, Path]:
    from trainer.jobs.demo import make_images

    ours, kohya, hf = out / "ours", out / "kohya" / "1_scs", out / "hf"
    if (hf / "metadata.jsonl").exists():
        return {"ours": ours, "kohya": kohya.parent, "hf": hf}
    for d in (ours, kohya, hf):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    rows = []
    for i, img in enumerate(make_images(ours, n=n, size=size)):
        caption = CAPTIONS[i % len(CAPTIONS)]
        img.with_suffix(".txt").write_text(caption)
        for d in (kohya, hf):
            shutil.copy(img, d / img.name)
        (kohya / img.name).with_suffix(".txt").write_text(caption)
        rows.append(json.dumps({"file_name": img.name, "text": caption}))
    (hf / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return {"ours": ours, "kohya": kohya.parent, "hf": hf}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--base", action="append", default=None, help="sd15 and/or tiny-sd15 (default: both)")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--size", type=int, default=512, help="source image side (cropped/resized to the resolution)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    for name in args.base or ["sd15", "tiny-sd15"]:
        print("base", *write_base(name, args.work / "base"))
    print("tokenizer", write_tokenizer(args.work / "tokenizers"))
    print("data", write_data(args.work / "data", args.images, args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
