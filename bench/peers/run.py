"""Peer benchmark (issue 15): this engine vs kohya sd-scripts and the diffusers LoRA example, interleaved in one run.

    bash bench/peers/setup.sh ~/src/sd-scripts ~/src/diffusers peers-venv          # once: the peers' venvs
    OMP_NUM_THREADS=1 python bench/peers/run.py --kohya ~/src/sd-scripts --diffusers ~/src/diffusers \
        --venvs peers-venv --work /tmp/peers --model sd15 --resolution 256 --steps 50 --rounds 3 \
        --out bench-results/peers-sd15-256.json

Every run is a whole training job in its own process (``--steps`` optimizer steps, LoRA saved at the end), started
fresh; the sides' runs are interleaved (each round rotates the order) so that a change in the machine's load hits
all sides alike. Nothing in the peers is changed: ``probe/sitecustomize.py`` times every optimizer step through a
torch optimizer hook; wall time and peak RSS come from this runner (``os.wait4``). See stats.py for the figures.

Sides (``--sides``, comma-separated):
- ``ours``: ``python -m trainer train job.toml`` (the job file is written into the results);
- ``kohya``: ``train_network.py --network_module networks.lora`` with matched settings (cached latents, SDPA);
- ``kohya-defaults``: the same job with kohya's own defaults for everything that is not the job itself (rank 4,
  alpha 1, no latent cache, its own attention), plus ``--enable_bucket``, without which kohya refuses uncached
  images larger than the resolution (a plain resize here: square images, square resolution);
- ``diffusers``: ``examples/text_to_image/train_text_to_image_lora.py`` at the matched rank (it cannot cache
  latents: it encodes every step; it trains the attention projections only: its target modules are fixed in code);
- ``diffusers-defaults``: the same at its own rank (4).
- ``ours-compile`` / ``ours-channels-last``: the engine's job with ``compile = true`` / ``channels_last = true``
  (what those options buy on this machine; their "auto" is what ``ours`` runs).
- ``ours-attn``: the engine's job with ``unet_modules = "attention"``: the diffusers example's module set (q/k/v/out
  of every attention), so that pair trains the same modules; ``ours`` trains kohya's set, matched with kohya.
Matched everywhere: the same base weights (single file for ours and kohya, the same weights as a diffusers folder
for the example), images and captions, resolution (center crop), batch 1, rank = alpha, AdamW (lr 1e-4, weight
decay 0.01, constant schedule, gradient clipping 1.0), fp32 (``mixed_precision no``; CPU), UNet-only LoRA.
kohya cannot load the tiny model (its SD1.5 loader builds the full-size architecture): ``--model tiny-sd15``
runs ours and the diffusers example only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import stats  # noqa: E402 - bench/peers is not a package

ALL_SIDES = ("ours", "kohya", "kohya-defaults", "diffusers", "diffusers-defaults")
# the engine with a speed option forced on (to measure what it buys here; "ours" is the job at its defaults)
OURS_VARIANTS = {"ours-compile": "compile = true", "ours-channels-last": "channels_last = true",
                 "ours-attn": 'unet_modules = "attention"'}
NETWORK_OPTIONS = ("unet_modules",)  # variant lines that belong in the job file's [network] table
VERSIONS = ("import json, importlib.metadata as m; out = {}\n"
            "for p in ('torch', 'diffusers', 'transformers', 'accelerate', 'peft', 'safetensors', 'numpy'):\n"
            "    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps(out))")


def ours_job(a: argparse.Namespace, base: Path, images: Path, extra: str = "") -> str:
    """The engine's job file: matched settings, spelled out (no auto value left to the machine but the speed
    options compile / channels_last, which do not change the maths; `extra` forces one for a variant side)."""
    return "\n".join([
        f'base_model = "{base}"', 'output_name = "lora"', f"steps = {a.steps}", "batch_size = 1", "seed = 1",
        *([extra] if extra and not extra.startswith(NETWORK_OPTIONS) else []),
        'mixed_precision = "no"', "gradient_checkpointing = false", f"state_every_n_steps = {10**6}",
        'save_precision = "fp16"',
        "[[concepts]]", f'image_dir = "{images}"', 'instance_prompt = "chibi scs girl"', 'caption_mode = "caption_only"',
        "[network]", f"dim = {a.dim}", f"alpha = {a.dim}", "train_text_encoder = false",
        *([extra] if extra.startswith(NETWORK_OPTIONS) else []),
        "[optimizer]", 'name = "AdamW"', "lr = 1e-4", "weight_decay = 0.01", 'scheduler = "constant"',
        "max_grad_norm = 1.0",
        "[data]", f"resolution = {a.resolution}", "bucketing = false", "random_flip = false", "cache_latents = true",
        "cache_text_encoder_outputs = true", "",
    ])


def side_command(side: str, a: argparse.Namespace, run_dir: Path) -> tuple[list[str], Path, str]:
    """(argv, cwd, venv name or '' for the engine's own) of one run of a side."""
    w = a.work
    single, folder = w / "base" / f"{a.model}.safetensors", w / "base" / f"{a.model}-diffusers"
    if side == "ours" or side in OURS_VARIANTS:
        job = run_dir / "job.toml"
        job.write_text(ours_job(a, single, w / "data" / "ours", OURS_VARIANTS.get(side, "")))
        return ([sys.executable, "-m", "trainer", "train", str(job), "--out", str(run_dir / "job"),
                 "--device", a.device], ROOT, "")
    if side.startswith("kohya"):
        argv = [str(a.venvs / "kohya" / "bin" / "python"), "train_network.py",
                "--pretrained_model_name_or_path", str(single), "--train_data_dir", str(w / "data" / "kohya"),
                "--caption_extension", ".txt", "--resolution", str(a.resolution), "--train_batch_size", "1",
                "--max_train_steps", str(a.steps), "--network_module", "networks.lora", "--network_train_unet_only",
                "--learning_rate", "1e-4", "--optimizer_type", "AdamW", "--lr_scheduler", "constant",
                "--mixed_precision", "no", "--save_precision", "fp16", "--save_model_as", "safetensors",
                "--output_dir", str(run_dir / "out"), "--output_name", "lora", "--seed", "1",
                "--max_data_loader_n_workers", "0", "--tokenizer_cache_dir", str(w / "tokenizers")]
        if side == "kohya":
            argv += ["--network_dim", str(a.dim), "--network_alpha", str(a.dim), "--cache_latents", "--sdpa"]
        else:
            # Without cached latents kohya refuses images larger than the resolution unless bucketing or a crop is
            # on; bucketing square images at a square resolution is a plain resize: what every other side does.
            argv += ["--enable_bucket"]
        return argv, a.kohya, "kohya"
    if side.startswith("diffusers"):
        argv = [str(a.venvs / "diffusers" / "bin" / "python"),
                str(a.diffusers / "examples" / "text_to_image" / "train_text_to_image_lora.py"),
                "--pretrained_model_name_or_path", str(folder), "--train_data_dir", str(w / "data" / "hf"),
                "--caption_column", "text", "--resolution", str(a.resolution), "--center_crop",
                "--train_batch_size", "1", "--max_train_steps", str(a.steps), "--learning_rate", "1e-4",
                "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--mixed_precision", "no",
                "--output_dir", str(run_dir / "out"), "--seed", "1", "--dataloader_num_workers", "0"]
        if side == "diffusers":
            argv += ["--rank", str(a.dim)]
        return argv, run_dir, "diffusers"
    raise SystemExit(f"unknown side {side!r}; sides are {', '.join((*ALL_SIDES, *OURS_VARIANTS))}")


def venv_python(a: argparse.Namespace, venv: str) -> str:
    return sys.executable if not venv else str(a.venvs / venv / "bin" / "python")


def needs_standin(python: str) -> bool:
    return subprocess.run([python, "-c", "import torchvision.transforms"], capture_output=True).returncode != 0


def run_once(side: str, a: argparse.Namespace, rnd: int, standin: dict[str, bool]) -> dict[str, Any]:
    run_dir = (a.work / "runs" / f"{a.model}-{a.resolution}" / f"{side}-r{rnd}").resolve()
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    argv, cwd, venv = side_command(side, a, run_dir)
    probe = run_dir / "probe.jsonl"
    paths = [str(HERE / "probe")] + ([str(HERE / "standins")] if venv and standin[venv] else [])
    if not venv:
        paths.append(str(ROOT))
    env = dict(os.environ, PEERS_PROBE_OUT=str(probe), PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(run_dir / "hf_home"),
               OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.pop("VIRTUAL_ENV", None)
    log = run_dir / "log.txt"
    load_before = os.getloadavg()[0]
    with log.open("w") as fh:
        t0 = time.time()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        deadline, rusage, status = t0 + a.timeout, None, 0
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                proc.kill()
            time.sleep(0.05)
        t1 = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    recs = stats.parse_probe(probe.read_text().splitlines() if probe.exists() else [])
    fig = stats.run_figures(recs, t0, t1, rusage.ru_maxrss)
    ok = proc.returncode == 0 and fig["steps"] >= a.steps
    out = {"side": side, "round": rnd, "ok": ok, "returncode": proc.returncode, "load_before": load_before,
           "load_after": os.getloadavg()[0], "cwd": str(cwd), "command": shlex.join(argv), **fig}
    if not ok:
        out["log_tail"] = log.read_text(errors="replace")[-3000:]
    return out


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kohya", type=Path, required=True, help="a kohya-ss/sd-scripts checkout")
    ap.add_argument("--diffusers", type=Path, required=True, help="a huggingface/diffusers checkout")
    ap.add_argument("--venvs", type=Path, required=True, help="the folder setup.sh filled (kohya/, diffusers/)")
    ap.add_argument("--work", type=Path, required=True, help="bases, data and runs go here")
    ap.add_argument("--model", default="sd15", choices=("sd15", "tiny-sd15"))
    ap.add_argument("--sides", default=None, help=f"comma-separated, of {', '.join(ALL_SIDES)} "
                    "(default: all; tiny-sd15: ours, diffusers, diffusers-defaults)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per job (>= 30 for steady steps/s)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dim", type=int, default=16, help="matched LoRA rank (= alpha)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed")
    ap.add_argument("--out", type=Path, default=Path("bench-results/peers.json"))
    a = ap.parse_args(argv)
    a.work, a.kohya, a.diffusers, a.venvs = (p.resolve() for p in (a.work, a.kohya, a.diffusers, a.venvs))
    default = (*ALL_SIDES, "ours-attn") if a.model == "sd15" else ("ours", "ours-attn", "diffusers", "diffusers-defaults")
    sides = [s.strip() for s in a.sides.split(",")] if a.sides else list(default)
    if a.model != "sd15" and any(s.startswith("kohya") for s in sides):
        ap.error("kohya's SD1.5 loader builds the full-size architecture: use --model sd15 for kohya sides")

    prep = [sys.executable, str(HERE / "prepare.py"), "--work", str(a.work), "--base", a.model]
    subprocess.run(prep, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    venvs = sorted({side_command(s, a, a.work)[2] for s in sides} - {""})
    (a.work / "job.toml").unlink(missing_ok=True)
    standin = {v: needs_standin(venv_python(a, v)) for v in venvs}
    versions = {v or "ours": json.loads(subprocess.check_output([venv_python(a, v), "-c", VERSIONS]))
                for v in ["", *venvs]}
    result: dict[str, Any] = {
        "machine": machine(), "versions": versions, "torchvision_standin": standin, "model": a.model,
        "settings": {"resolution": a.resolution, "steps": a.steps, "rounds": a.rounds, "dim": a.dim,
                     "threads": a.threads, "device": a.device, "batch": 1},
        "prepare": shlex.join(prep), "ours_job": ours_job(a, a.work / "base" / f"{a.model}.safetensors",
                                                         a.work / "data" / "ours"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "runs": [],
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    # each engine side against each peer; ours-attn (the example's module set) against the diffusers example only
    pairs = [(o, s) for o in ("ours", *OURS_VARIANTS) if o in sides for s in sides
             if s not in ("ours", *OURS_VARIANTS) and (o != "ours-attn" or s.startswith("diffusers"))]
    pairs += [("ours", s) for s in sides if s in OURS_VARIANTS and "ours" in sides]
    for rnd in range(a.rounds):
        order = sides[rnd % len(sides):] + sides[:rnd % len(sides)]
        for side in order:
            run = run_once(side, a, rnd, standin)
            result["runs"].append(run)
            print(f"round {rnd} {side}: ok={run['ok']} steps/s={run.get('steps_per_s')} "
                  f"first={run.get('first_step_s')} tail={run.get('tail_s')} wall={run['wall_s']:.1f} rss={run['rss_mib']:.0f} MiB "
                  f"params={run.get('trained_params')} load={run['load_before']:.2f}", flush=True)
            if not run["ok"]:
                print(run.get("log_tail", ""), flush=True)
            result["summary"] = stats.summarize(result["runs"])
            result["ratios"] = {f"{o} vs {p}": stats.ratios(result["summary"], o, p) for o, p in pairs}
            result["table"] = stats.markdown(result["summary"], pairs)
            a.out.write_text(json.dumps(result, indent=1))
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    a.out.write_text(json.dumps(result, indent=1))
    print(result.get("table", ""))
    return 0 if all(r["ok"] for r in result["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
