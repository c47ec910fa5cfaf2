"""Speed probe (issue 2 item 9): training steps/s and peak memory of the real training loop.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/bench_train.py                       # tiny-sd15 + tiny-sdxl, CPU
    HF_HUB_OFFLINE=1 python bench/bench_train.py --full sd15 --device cuda                # 512 px, gc off/on
    HF_HUB_OFFLINE=1 python bench/bench_train.py --full sdxl --device cuda                # 1024 px, gc off/on
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/bench_train.py --full sd15 --resolution 256 --steps 2  # CPU smoke

Every variant runs in its own subprocess through trainer.train.loop.Trainer (setup, caching, then timed train_step()
calls after warm-up steps), so what is measured is the engine itself: the spec's auto precision, gradient
checkpointing as asked, SDPA (or xformers when installed on a GPU), cached latents and text-encoder outputs.
Peers run in the same invocation and are reported as ratios to the first variant of their model.

Tiny models (CPU): baseline LoRA dim 4 with cached latents and text-encoder outputs vs uncached latents, uncached
text-encoder outputs, gradient checkpointing on,
LoCon (conv_dim 4), and text-encoder training. Full size (--full): the FULL SD1.5 or SDXL architecture built
from trainer/configs/<sd15|sdxl> with random weights (no download; speed does not depend on the weights),
batch 1, LoRA dim 16, with and without gradient checkpointing; achieved TFLOP/s use the FLOPs per step of
../shared/facts.md section 4 (SD1.5 @512: 1.73 / 2.32 TFLOP without / with checkpointing; SDXL @1024: 14.2 / 19.3),
scaled by pixel count at other resolutions (marked ~). Peak memory: torch.cuda.max_memory_allocated over the
timed steps on a GPU (weights included), and the subprocess's peak RSS (ru_maxrss) everywhere.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# facts.md section 4: TFLOP per LoRA training step, batch 1, frozen base (without, with gradient checkpointing).
FLOPS_PER_STEP = {"sd15": (512, 1.73, 2.32), "sdxl": (1024, 14.2, 19.3)}
# dense bf16 peak TFLOP/s (facts.md section 4), matched against torch.cuda.get_device_name()
PEAK_TFLOPS = {"H100": 990.0, "H200": 990.0, "A100": 312.0, "4090": 165.0, "3080": 59.5}

TINY_VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "uncached latents": {"data": {"cache_latents": False}},
    "uncached TE outputs": {"data": {"cache_text_encoder_outputs": False}},
    "grad checkpointing": {"gradient_checkpointing": True},
    "LoCon conv_dim 4": {"network": {"conv_dim": 4, "conv_alpha": 4}},
    "+ text encoder": {"network": {"train_text_encoder": True}},
}
FULL_VARIANTS: dict[str, dict[str, Any]] = {
    "gc off": {"gradient_checkpointing": False},
    "gc on": {"gradient_checkpointing": True},
}


# --- one measurement (runs in a subprocess) ---------------------------------------------------------

def build_full_base(name: str, device: str) -> Any:
    """The full-size architecture from the shipped configs with random weights (nothing is downloaded)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.format.checkpoint import CONFIGS_DIR
    from trainer.models.base import BaseModel, arch_of_config_dir
    from trainer.models.tokenizers import build_local_tokenizer

    folder = CONFIGS_DIR / name
    arch = arch_of_config_dir(folder)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU directly: minutes faster for SDXL
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        tes: list[Any] = [CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json"))]
        if arch == "sdxl":
            tes.append(CLIPTextModelWithProjection(
                CLIPTextConfig.from_json_file(folder / "text_encoder_2" / "config.json")))
    tok = build_local_tokenizer()
    sched = DDPMScheduler.from_config(DDPMScheduler.load_config(folder / "scheduler"))
    for m in [unet, vae, *tes]:
        m.requires_grad_(False)
        m.eval()
    return BaseModel(arch=arch, name=f"{name}-random", unet=unet, vae=vae, text_encoders=tes,
                     tokenizers=[tok] * len(tes), noise_scheduler=sched, source=folder, config_dir=folder)


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from trainer.jobs.demo import make_images
    from trainer.spec import TrainSpec, deep_merge
    from trainer.train.loop import Trainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = cfg["device"]
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    make_images(work / "images", n=2, size=max(96, cfg["resolution"]))
    values = deep_merge({
        "base_model": cfg["model"], "steps": cfg["warmup"] + cfg["steps"], "seed": 1,
        "concepts": [{"image_dir": str(work / "images"), "instance_prompt": "chibi scs girl"}],
        "network": {"dim": cfg["dim"], "alpha": cfg["dim"]},
        "optimizer": {"name": "AdamW", "lr": 1e-4, "scheduler": "constant"},
        "data": {"resolution": cfg["resolution"]}, "state_every_n_steps": 10**6,
    }, cfg["overrides"])
    spec = TrainSpec.model_validate(values)
    logs: list[str] = []
    base = build_full_base(cfg["full"], device) if cfg.get("full") else None
    t0 = time.perf_counter()
    tr = Trainer(spec, work / "job", on_event=lambda ev: logs.append(ev.get("message", "")) if ev["type"] == "log"
                 else None, device=device, base=base)
    tr.setup()
    tr.cache()
    setup_s = time.perf_counter() - t0
    cuda = tr.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(cfg["warmup"]):
        tr.train_step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = []
    t1 = time.perf_counter()
    for _ in range(cfg["steps"]):
        losses.append(tr.train_step())
    sync()
    dt = time.perf_counter() - t1
    out = {
        "steps_per_s": cfg["steps"] / dt, "s_per_step": dt / cfg["steps"], "setup_s": setup_s,
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "precision": tr.mixed_precision, "gradient_checkpointing": tr.gradient_checkpointing,
        "attention": tr.attention, "text_cached": tr.data.text_cached, "final_loss": losses[-1],
        "trainable_params": sum(p.numel() for p in tr.params),
        "device_name": torch.cuda.get_device_name(tr.device) if cuda else platform.processor() or "cpu",
    }
    if cuda:
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(tr.device) / 2**20
    return out


# --- the driver ---------------------------------------------------------------------------------------

def run_variant(cfg: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(cfg)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit {r.returncode}"}
    return json.loads(lines[-1][len("RESULT "):])


def tflops(full: str, resolution: int, gc: bool, steps_per_s: float) -> tuple[float, bool]:
    ref_res, flop, flop_gc = FLOPS_PER_STEP[full]
    per_step = (flop_gc if gc else flop) * (resolution / ref_res) ** 2
    return steps_per_s * per_step, resolution == ref_res


def peak_for(name: str) -> float | None:
    for key, v in PEAK_TFLOPS.items():
        if key in name:
            return v
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--full", choices=("sd15", "sdxl"), help="the full-size architecture with random weights")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu for tiny models, cuda when --full "
                                                  "and a GPU is there)")
    p.add_argument("--models", default="tiny-sd15,tiny-sdxl", help="tiny models to probe (without --full)")
    p.add_argument("--resolution", type=int, default=None, help="default 64 tiny, 512 sd15, 1024 sdxl")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 tiny, 10 full)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 tiny, 2 full)")
    p.add_argument("--dim", type=int, default=None, help="network dim (default 4 tiny, 16 full)")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variant names")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    if args.one:
        print("RESULT " + json.dumps(measure(json.loads(args.one))), flush=True)
        return 0

    import torch

    full = args.full
    device = args.device or ("cuda" if full and torch.cuda.is_available() else "cpu")
    variants = FULL_VARIANTS if full else TINY_VARIANTS
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",")]
        variants = {k: v for k, v in variants.items() if k in wanted}
    models = [f"full-{full}"] if full else [m.strip() for m in args.models.split(",") if m.strip()]
    res = args.resolution or (FLOPS_PER_STEP[full][0] if full else 64)
    steps = args.steps or (10 if full else 30)
    warmup = args.warmup if args.warmup is not None else (2 if full else 3)
    dim = args.dim or (16 if full else 4)
    print(f"# command: {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"# device {device}; torch {torch.__version__}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"{os.cpu_count()} CPUs; resolution {res}; batch 1; dim {dim}; {warmup} warm-up + {steps} timed steps")
    if device == "cpu" and full:
        print("# full-size architecture on CPU: a smoke run of the path; absolute CPU numbers are not meaningful")
    results: list[dict[str, Any]] = []
    for model in models:
        ref: float | None = None
        for vname, over in variants.items():
            cfg = {"model": model if not full else "tiny-sd15", "full": full, "device": device, "resolution": res,
                   "steps": steps, "warmup": warmup, "dim": dim, "overrides": over}
            r = run_variant(cfg)
            r.update(model=model, variant=vname)
            results.append(r)
            if "error" in r:
                print(f"{model:10s} {vname:20s} ERROR {r['error']}", flush=True)
                continue
            ref = ref or r["steps_per_s"]
            line = (f"{model:10s} {vname:20s} {r['steps_per_s']:8.3f} steps/s  x{r['steps_per_s'] / ref:5.2f}  "
                    f"rss {r['rss_peak_mib']:7.0f} MiB")
            if "cuda_peak_mib" in r:
                line += f"  cuda peak {r['cuda_peak_mib'] / 1024:6.2f} GiB"
            if full:
                tf, exact = tflops(full, res, r["gradient_checkpointing"], r["steps_per_s"])
                r["tflops"] = tf
                line += f"  {'' if exact else '~'}{tf:7.2f} TFLOP/s"
                peak = peak_for(r.get("device_name", ""))
                if peak and device != "cpu":
                    r["mfu"] = tf / peak
                    line += f" ({100 * tf / peak:.1f}% of {peak:g} bf16 peak)"
            line += f"  [{r['precision']}, gc {'on' if r['gradient_checkpointing'] else 'off'}, {r['attention']}" \
                    f"{', TE outputs cached' if r['text_cached'] else ''}]"
            print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
