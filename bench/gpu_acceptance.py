"""GPU acceptance: the engine on emulated user cards, in one command (under 9 minutes on one big GPU).

    python bench/gpu_acceptance.py [--out bench-results/gpu_acceptance.json] [--work DIR] [--only NAME ...]
    python bench/gpu_acceptance.py --dry-run      # the same cases on CPU, tiny models, 2 steps (CI)

Each case is one real training job through ``trainer.jobs.runner.run_job`` (the worker's own entry point), in its
own process, on full-size SD1.5 / SDXL built from the shipped configs with random weights (saved once as a
diffusers folder under --work; nothing is downloaded). A user's card is emulated on a big GPU with
``torch.cuda.set_per_process_memory_fraction`` (the card's size less the CUDA context). Every case checks:

- the job finishes under the cap, and its LoRA file holds only finite numbers;
- samples and class images are decoded without NaN/black (an all-black PNG is what a NaN decode leaves);
- the memory plan (``trainer.plan``) against the measured ``torch.cuda.max_memory_allocated()``;
- the fp16 case with a forced inf loss: the step is skipped by the GradScaler, the job is not failed;
- with more than one GPU: two real workers (``trainer.jobs.worker``), each pinned to its own device.

It prints a table and writes JSON. Exit 0 when every case passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass
class Case:
    name: str
    arch: str  # sd15 / sdxl (tiny-sd15 / tiny-sdxl in a dry run)
    card_gib: int
    preset: str | None
    resolution: int
    over: dict[str, Any] = field(default_factory=dict)
    steps: int = 30
    class_images: bool = False
    samples: bool = False
    inf_at_call: int = 0  # > 0: the loss of this micro-step is +inf (fp16: the scaler must skip the step)


CASES = [
    Case("sd15-512-fp16-adamw8bit-8gb", "sd15", 8, "sd15-8gb", 512, {"mixed_precision": "fp16"},
         class_images=True, samples=True),
    Case("sd15-512-bf16-adamw8bit-8gb", "sd15", 8, "sd15-8gb", 512, {"mixed_precision": "bf16"}),
    Case("sd15-512-fp16-inf-step-8gb", "sd15", 8, "sd15-8gb", 512, {"mixed_precision": "fp16"}, steps=10,
         inf_at_call=2),
    Case("sd15-512-bf16-batch4-12gb", "sd15", 12, None, 512,
         {"mixed_precision": "bf16", "batch_size": 4, "optimizer": {"name": "AdamW8bit"}}, steps=15),
    Case("sdxl-1024-sdxl-10gb-preset-10gb", "sdxl", 10, "sdxl-10gb", 1024, {}, steps=15, samples=True),
]


# --- inside one case's process ------------------------------------------------------------------------------

def build_random_base(config: str, work: Path, device: str) -> Path:
    """A diffusers folder of a shipped full-size config with random weights (seed 0, fp16 on disk)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trainer.format.checkpoint import CONFIGS_DIR
    from trainer.models.tokenizers import build_local_tokenizer

    src, out = CONFIGS_DIR / config, work / "bases" / config
    if (out / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tok = build_local_tokenizer()
    index = json.loads((src / "model_index.json").read_text())
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU takes seconds, on CPU minutes
        for te_name in ("text_encoder", "text_encoder_2"):
            if te_name not in index:
                continue
            cfg = json.loads((src / te_name / "config.json").read_text())
            cfg.update(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
            cls = CLIPTextModelWithProjection if "Projection" in cfg["architectures"][0] else CLIPTextModel
            cls(CLIPTextConfig(**cfg)).half().save_pretrained(tmp / te_name)
            tok.save_pretrained(tmp / te_name.replace("text_encoder", "tokenizer"))
        unet = UNet2DConditionModel.from_config(json.loads((src / "unet" / "config.json").read_text()))
        unet.half().save_pretrained(tmp / "unet")
        del unet
        AutoencoderKL.from_config(json.loads((src / "vae" / "config.json").read_text())).save_pretrained(tmp / "vae")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def make_images(folder: Path, n: int, size: int) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (40 * i % 255, 90, 160))
        d = ImageDraw.Draw(img)
        d.ellipse([size * 0.2, size * 0.2, size * 0.7, size * 0.8], fill=(230, 200 - 30 * i, 60))
        img.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"zxq shape {i}")
    return folder


def image_ok(path: Path) -> str | None:
    """None when the image has content; else what is wrong (all black is what a NaN decode leaves)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    if not np.isfinite(a).all():
        return "non-finite pixels"
    if a.max() < 8:
        return "all black"
    return None


def lora_finite(path: Path) -> bool:
    import torch
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return all(bool(torch.isfinite(f.get_tensor(k).float()).all()) for k in f.keys())  # noqa: SIM118


def inject_inf(at_call: int) -> Any:
    """Make the `at_call`-th per-sample loss of the run +inf, wherever the loop imports the loss from.
    Returns the function that undoes it."""
    import torch

    import trainer.train.loop  # noqa: F401 - loads the loop's modules

    calls = {"n": 0}
    patched: list[tuple[Any, Any]] = []
    for name, mod in list(sys.modules.items()):
        if not name.startswith("trainer.train") or not hasattr(mod, "per_sample_loss"):
            continue
        orig = mod.per_sample_loss

        def wrapped(*a: Any, _orig: Any = orig, **kw: Any) -> torch.Tensor:
            calls["n"] += 1
            out = _orig(*a, **kw)
            return out * float("inf") if calls["n"] == at_call else out

        mod.per_sample_loss = wrapped
        patched.append((mod, orig))
    if not patched:
        raise RuntimeError("no per_sample_loss found in trainer.train: update the bench's inf injection")

    def undo() -> None:
        for mod, orig in patched:
            mod.per_sample_loss = orig

    return undo


def run_case(case: Case, work: Path, dry: bool) -> dict[str, Any]:
    import torch

    from trainer.events import JobFailed
    from trainer.jobs.runner import run_job
    from trainer.plan import CUDA_CONTEXT, GiB, plan_job
    from trainer.spec import deep_merge, resolve_job

    device = "cpu" if dry else "cuda"
    res = 64 if dry else case.resolution
    cdir = work / "cases" / case.name
    shutil.rmtree(cdir, ignore_errors=True)
    os.environ["LORAFORGE_CACHE"] = str(work / "cache")  # never the user's cache
    base = f"tiny-{case.arch}" if dry else str(build_random_base(case.arch, work, device))
    concept: dict[str, Any] = {"image_dir": str(make_images(cdir / "images", 4, res)), "instance_prompt": "zxq"}
    if case.class_images:
        concept.update(class_prompt="a photo of a shape", class_count=1 if dry else 2, class_dir=str(cdir / "class"))
    values: dict[str, Any] = {
        "base_model": base, "output_name": "acceptance", "seed": 7,
        "steps": (case.inf_at_call + 1 if case.inf_at_call else 2) if dry else case.steps,
        "concepts": [concept], "data": {"resolution": res},
        "sample": {"prompts": [{"prompt": "zxq shape", "steps": 2 if dry else 8}] if case.samples else []},
        "state_every_n_steps": 1000,
    }
    if dry:
        values["data"].update(bucket_min_side=64, bucket_max_side=128)
    spec = resolve_job(deep_merge(values, case.over), case.preset)
    card = case.card_gib * GiB
    plan = plan_job(spec, card_bytes=card)
    row: dict[str, Any] = {"case": case.name, "card_gib": case.card_gib, "plan_gib": round(plan.allocated / GiB, 2),
                           "plan_total_gib": round(plan.total / GiB, 2), "plan_fits": plan.fits,
                           "plan_peak_phase": plan.peak_phase, "measured_gib": None, "problems": []}
    if not dry:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, (card - CUDA_CONTEXT) / total), 0)
        torch.cuda.reset_peak_memory_stats()
    undo = inject_inf(case.inf_at_call) if case.inf_at_call else None
    events: list[dict[str, Any]] = []
    t0 = time.monotonic()
    try:
        out = run_job(spec, cdir / "job", on_event=events.append, device=device)
    except JobFailed as e:
        out = {}
        row["problems"].append(f"job failed: {e}")
    finally:
        if undo is not None:
            undo()
    row["seconds"] = round(time.monotonic() - t0, 1)
    if not dry:
        measured = torch.cuda.max_memory_allocated()
        row["measured_gib"] = round(measured / GiB, 2)
        row["plan_error"] = round(plan.allocated / measured - 1, 3) if measured else None
    if out:
        lora = out.get("lora")
        if not lora or not Path(lora).is_file() or not lora_finite(Path(lora)):
            row["problems"].append("the LoRA file is missing or holds non-finite numbers")
        samples = [Path(p) for p in out.get("samples", [])]
        if case.samples and not samples:
            row["problems"].append("no samples were rendered")
        classes = sorted((cdir / "class").glob("*.png")) if case.class_images else []
        if case.class_images and len(classes) < spec.concepts[0].class_count:
            row["problems"].append(f"{len(classes)} class images were generated, {spec.concepts[0].class_count} "
                                   "expected")
        for p in samples + classes:
            bad = image_ok(p)
            if bad:
                row["problems"].append(f"{p.name}: {bad}")
        row["images_checked"] = len(samples) + len(classes)
    if case.inf_at_call:
        row["skip_logs"] = [e.get("message") for e in events if e.get("type") == "log"
                            and "skip" in str(e.get("message", "")).lower()]
    row["ok"] = not row["problems"]
    return row


# --- two pinned workers ----------------------------------------------------------------------------------------

def check_pinned_workers(work: Path) -> dict[str, Any]:
    """Two real workers started the way the bot starts them (``bot.workers.WorkerHandle`` on cuda:0 and cuda:1),
    each with a tiny job; each process must sit on its own GPU only (nvidia-smi's compute apps)."""
    import torch

    row: dict[str, Any] = {"case": "two-workers-pinned", "problems": []}
    if torch.cuda.device_count() < 2:
        return {**row, "ok": None, "skipped": f"{torch.cuda.device_count()} GPU(s)"}
    return asyncio.run(_pinned_workers(work, row))


def _gpu_of_processes() -> dict[int, set[str]]:
    """pid -> the bus ids of the GPUs it holds a context on (nvidia-smi's compute apps)."""
    smi = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_bus_id", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout
    where: dict[int, set[str]] = {}
    for line in smi.splitlines():
        pid, bus = (x.strip() for x in line.split(","))
        where.setdefault(int(pid), set()).add(bus)
    return where


async def _pinned_workers(work: Path, row: dict[str, Any], devices: tuple[str, str] = ("cuda:0", "cuda:1"),
                          gpus: Any = _gpu_of_processes) -> dict[str, Any]:
    from bot.workers import WorkerHandle
    from trainer.spec import to_json

    done = {1: asyncio.Event(), 2: asyncio.Event()}

    async def on_message(_w: Any, msg: dict[str, Any]) -> None:
        if msg.get("type") == "done":
            done[int(msg["job_id"])].set()

    async def on_exit(_w: Any, _reason: str) -> None:
        return None

    cmd = [sys.executable, "-m", "trainer.jobs.worker"]
    handles = [WorkerHandle(i, d, cmd, work / "models", work / "logs", on_message, on_exit)
               for i, d in enumerate(devices)]
    try:
        for i, h in enumerate(handles):
            await h.start()
            spec = json.loads(to_json(_tiny_spec(work / f"pin{i}")))
            await h.run(i + 1, spec, work / f"pin{i}" / "job")
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in done.values())), 300)
        where = gpus()
        buses = [where.get(h.pid or -1, set()) for h in handles]
        row["gpus_per_worker"] = [sorted(b) for b in buses]
        if any(len(b) != 1 for b in buses) or buses[0] == buses[1]:
            row["problems"].append(f"workers are not pinned one device each: {buses}")
    finally:
        for h in handles:
            await h.kill()
    return {**row, "ok": not row["problems"]}


def _tiny_spec(folder: Path) -> Any:
    from trainer.spec import resolve_job

    imgs = make_images(folder / "images", 2, 64)
    return resolve_job({"base_model": "tiny-sd15", "steps": 3, "concepts": [{"image_dir": str(imgs)}],
                        "data": {"resolution": 64}})


# --- the driver --------------------------------------------------------------------------------------------------

def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'case':36s} {'card':>5s} {'plan':>7s} {'measured':>9s} {'error':>7s} {'time':>7s}  result"
    print(head)
    print("-" * len(head))
    for r in rows:
        meas = "-" if r.get("measured_gib") is None else f"{r['measured_gib']:.2f}"
        err = "-" if r.get("plan_error") is None else f"{r['plan_error']:+.0%}"
        result = "skipped: " + r["skipped"] if r.get("skipped") else ("ok" if r["ok"] else "; ".join(r["problems"]))
        card = f"{r['card_gib']}G" if "card_gib" in r else "-"
        plan = f"{r['plan_gib']:.2f}" if "plan_gib" in r else "-"
        print(f"{r['case']:36s} {card:>5s} {plan:>7s} {meas:>9s} {err:>7s} {r.get('seconds', 0):>6.0f}s  {result}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 2 steps: checks the bench itself")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "gpu_acceptance.json")
    ap.add_argument("--work", type=Path, default=None, help="random bases and job folders (default: a temp dir)")
    ap.add_argument("--only", nargs="*", default=None, help="case names to run")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, in this process (internal)
    args = ap.parse_args(argv)
    work = args.work or Path(os.environ.get("TMPDIR", "/tmp")) / ("loraforge-acceptance" + ("-dry" if args.dry_run
                                                                                             else ""))
    work.mkdir(parents=True, exist_ok=True)
    if args.case:
        case = next(c for c in CASES if c.name == args.case)
        print("RESULT " + json.dumps(run_case(case, work, args.dry_run)), flush=True)
        return 0
    rows: list[dict[str, Any]] = []
    for case in CASES:
        if args.only and case.name not in args.only:
            continue
        if args.dry_run:  # CPU: one process is enough (no allocator state to keep apart) and much faster
            rows.append(run_case(case, work, True))
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case.name, "--work", str(work)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            rows.append({"case": case.name, "card_gib": case.card_gib, "ok": False,
                         "problems": [f"the case process died (exit {r.returncode}): {r.stderr[-600:]}"]})
        else:
            rows.append(json.loads(line[len("RESULT "):]))
        print(f"{case.name}: {'ok' if rows[-1]['ok'] else 'FAILED'}", file=sys.stderr, flush=True)
    if args.dry_run:
        for r in rows:
            print(f"{r['case']}: {'ok' if r['ok'] else 'FAILED'}", file=sys.stderr, flush=True)
    if not args.dry_run and not args.only:
        try:
            rows.append(check_pinned_workers(work))
        except Exception as e:  # noqa: BLE001 - a worker that did not start is a failed case, not a lost report
            rows.append({"case": "two-workers-pinned", "ok": False, "problems": [f"{type(e).__name__}: {e}"]})
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"dry_run": args.dry_run, "cases": [asdict(c) for c in CASES], "results": rows,
              "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    if not args.dry_run:
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0 if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
