"""Benchmark: SVD merge of three SDXL-shaped rank-32 LoRAs to rank 8, our low-rank method vs a dense reference.

    OMP_NUM_THREADS=2 python bench/bench_merge.py                  # all 986 SDXL linear modules (slow: dense side)
    OMP_NUM_THREADS=2 python bench/bench_merge.py --modules 100    # an evenly spaced subset, for a quick run
    OMP_NUM_THREADS=2 python bench/bench_merge.py --only lowrank   # ours alone on all 986 modules

Module shapes come from trainer/configs/sdxl via trainer.network.targets (models built on the meta device: no weights).
Each method runs in its own subprocess, so its peak RSS (ru_maxrss) is its own; both build the same random
fp16 factors from the same seed first, and the table shows the peak above that common baseline too.
The dense reference is the straightforward algorithm: W = sum c_i up_i @ down_i in float32, full SVD of W
(economy-size U/Vh; kohya calls the full_matrices=True variant and also keeps every dense W until the end,
so kohya itself is slower and heavier than this reference), truncate to rank 8, kohya's clamp.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_INPUTS, IN_RANK, OUT_RANK, RATIO, SEED = 3, 32, 8, 0.6, 1234


def sdxl_linear_shapes() -> list[tuple[str, int, int]]:
    """(kohya name, out, in) of the 986 modules kohya's LoRA trains on SDXL (UNet + both text encoders)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.format.checkpoint import CONFIGS_DIR
    from trainer.network.targets import lora_targets

    d = CONFIGS_DIR / "sdxl"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((d / "unet" / "config.json").read_text()))
        tes = [CLIPTextModel(CLIPTextConfig(**json.loads((d / "text_encoder" / "config.json").read_text()))),
               CLIPTextModelWithProjection(CLIPTextConfig(**json.loads((d / "text_encoder_2" / "config.json")
                                                                       .read_text())))]
    targets = lora_targets(unet, tes, "sdxl", conv=False, train_te=True)
    return [(t.kohya_name, t.out_features, t.in_features) for t in targets]


def subsample(shapes: list, n: int | None) -> list:
    if not n or n >= len(shapes):
        return shapes
    step = len(shapes) / n  # evenly spaced: keeps the mix of 640/1280/2048/5120/10240-wide layers
    return [shapes[int(i * step)] for i in range(n)]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_inputs(shapes):
    import torch

    g = torch.Generator().manual_seed(SEED)
    loras = []
    for i in range(N_INPUTS):
        mods = {}
        for name, out, inn in shapes:
            down = (torch.randn(IN_RANK, inn, generator=g) * 0.02).half()
            up = (torch.randn(out, IN_RANK, generator=g) * 0.02).half()
            mods[name] = (down, up, float(IN_RANK // 2 + 4 * i))  # different alphas per input
        loras.append(mods)
    return loras


def dense_reference(terms, k: int, q: float = 0.99):
    """The straightforward way: dense W, full SVD, truncate, kohya's clamp."""
    import torch

    w = None
    for c, up, down in terms:
        d = c * (up.float() @ down.float())
        w = d if w is None else w + d
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u, s, vh = u[:, :k], s[:k], vh[:k]
    # The same canonical sign per singular pair as ours, so the signed-quantile clamp is comparable.
    sign = torch.sign(u[u.abs().argmax(0), torch.arange(k)])
    up, down = (u * sign) @ torch.diag(s), vh * sign[:, None]
    hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]), q)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def worker(method: str, n_modules: int | None) -> dict:
    import torch

    from trainer.network.svd_merge import merge_module

    shapes = subsample(sdxl_linear_shapes(), n_modules)
    loras = build_inputs(shapes)
    baseline_now = current_rss_mib()
    baseline_peak = rss_mib()
    checks = []
    t0 = time.perf_counter()
    for j, (name, out, inn) in enumerate(shapes):
        terms = [(RATIO * alpha / IN_RANK, up, down) for lo in loras for down, up, alpha in [lo[name]]]
        k = min(OUT_RANK, out, inn)
        if method == "lowrank":
            up, down = merge_module(terms, k, 0.99)
        else:
            up, down = dense_reference(terms, k, 0.99)
        if j % max(1, len(shapes) // 8) == 0:  # a few products to check the two methods agree
            checks.append(float(torch.linalg.matrix_norm(up @ down)))
    elapsed = time.perf_counter() - t0
    return {"method": method, "modules": len(shapes), "seconds": elapsed, "peak_rss_mib": rss_mib(),
            "baseline_rss_mib": max(baseline_now, baseline_peak), "threads": torch.get_num_threads(),
            "checks": checks}


def run_child(method: str, n_modules: int | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method]
    if n_modules:
        cmd += ["--modules", str(n_modules)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(low: dict, dense: dict) -> str:
    def row(label: str, a: float, b: float, fmt: str) -> str:
        return f"| {label} | {a:{fmt}} | {b:{fmt}} | {b / a:.1f}x |"

    low_extra = low["peak_rss_mib"] - low["baseline_rss_mib"]
    dense_extra = dense["peak_rss_mib"] - dense["baseline_rss_mib"]
    lines = [
        "| | low-rank (ours) | dense full SVD | dense / ours |",
        "| --- | ---: | ---: | ---: |",
        row("time (s)", low["seconds"], dense["seconds"], ".2f"),
        row("ms per module", 1000 * low["seconds"] / low["modules"], 1000 * dense["seconds"] / dense["modules"], ".1f"),
        row("peak RSS (MiB)", low["peak_rss_mib"], dense["peak_rss_mib"], ".0f"),
        row("peak RSS above inputs (MiB)", max(low_extra, 1.0), max(dense_extra, 1.0), ".0f"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", type=int, default=None, help="merge only N evenly spaced modules of the 986")
    p.add_argument("--only", choices=["lowrank", "dense"], default=None,
                   help="run one method only (e.g. ours on all 986 modules, where the dense side takes hours)")
    p.add_argument("--worker", choices=["lowrank", "dense"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help="also write the results as markdown to this file")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.modules)))
        return
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
    command = " ".join(filter(None, [env, "python", "bench/bench_merge.py",
                                     *(["--modules", str(args.modules)] if args.modules else []),
                                     *(["--only", args.only] if args.only else []),
                                     *(["--out", shlex.quote(str(args.out))] if args.out else [])]))

    import torch

    results = {m: run_child(m, args.modules) for m in ("lowrank", "dense") if args.only in (None, m)}
    first = next(iter(results.values()))
    head = [
        f"Command: `{command}`",
        "",
        f"Merging {N_INPUTS} SDXL-shaped rank-{IN_RANK} LoRAs (random fp16 factors, ratio {RATIO} each) to rank "
        f"{OUT_RANK}: {first['modules']} linear modules"
        f"{' (all of them)' if first['modules'] == 986 else ' (evenly spaced subset of the 986)'}, CPU, "
        f"{first['threads']} torch thread(s), torch {torch.__version__}, {os.cpu_count()} CPU(s).",
        "",
    ]
    if len(results) == 2:
        low, dense = results["lowrank"], results["dense"]
        agree = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(low["checks"], dense["checks"], strict=True))
        body = [table(low, dense), "",
                f"Inputs alone (both runs build the same ones first): {low['baseline_rss_mib']:.0f} MiB RSS. "
                f"Largest relative difference of ||up @ down|| between the methods on sampled modules: {agree:.1e}."]
    else:
        r = first
        body = ["| method | time (s) | ms per module | peak RSS (MiB) | peak RSS above inputs (MiB) |",
                "| --- | ---: | ---: | ---: | ---: |",
                f"| {r['method']} | {r['seconds']:.2f} | {1000 * r['seconds'] / r['modules']:.1f} | "
                f"{r['peak_rss_mib']:.0f} | {max(r['peak_rss_mib'] - r['baseline_rss_mib'], 1.0):.0f} |"]
    text = "\n".join(head + body)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
