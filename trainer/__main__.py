"""The engine on its own, without Discord or a database.

  python -m trainer run job.toml [--set network.dim=32 ...] [--job-dir DIR] [--models-dir DIR] [--device cuda]
  python -m trainer validate job.toml [--set ...]     print the fully resolved spec, or what is wrong
  python -m trainer presets                           list the presets
  python -m trainer inspect file.safetensors          check a LoRA file and summarise it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer.spec import SpecError, list_presets, load_job_file, to_toml  # noqa: E402


def parse_set(items: list[str]) -> dict[str, Any]:
    """`a.b=3` pairs into a nested dict; values are read as TOML scalars when they parse, else strings."""
    import tomllib

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SpecError([("--set", f"{item!r} is not KEY=VALUE")])
        key, raw = item.split("=", 1)
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def describe_lora(lora: Any, path: Path) -> str:
    """A short human summary of a checked kohya LoRA: what it is for, what it trains, at which ranks."""
    from collections import Counter

    from trainer.kohya import file_model_hash

    mods = lora.modules.values()
    parts = Counter(name.split("_", 2)[1] if name.startswith("lora_te") else "unet" for name in lora.modules)
    ranks = Counter((m.kind, m.rank, float(m.alpha)) for m in mods)
    meta = lora.metadata or {}
    lines = [
        f"{path}: kohya-format LoRA for {lora.arch or 'an unknown architecture'}",
        "modules: " + ", ".join(f"{n} {p}" for p, n in sorted(parts.items())) + f" ({len(lora.modules)} in all)",
        "rank/alpha: " + ", ".join(f"{k} r{r} a{a:g} x{n}" for (k, r, a), n in sorted(ranks.items())),
    ]
    for key in ("ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_dim",
                "ss_network_alpha", "ss_network_args", "ss_max_train_steps", "ss_optimizer", "ss_learning_rate"):
        if key in meta:
            lines.append(f"{key}: {meta[key]}")
    stored = meta.get("sshs_model_hash")
    if stored:
        ok = stored == file_model_hash(path)
        lines.append(f"sshs_model_hash: {stored} ({'matches the file' if ok else 'DOES NOT match the file'})")
    return "\n".join(lines)


def _print_event(ev: dict[str, Any]) -> None:
    t = ev.get("type")
    if t == "progress":
        print(f"step {ev['step']}/{ev['total']}  loss {ev.get('loss', float('nan')):.4f}  lr {ev.get('lr', 0):.2e}"
              f"  {ev.get('steps_per_s', 0):.2f} it/s  eta {ev.get('eta_s', 0):.0f}s", flush=True)
    elif t in ("file", "sample"):
        print(f"{t}: {ev.get('kind', '')} {ev['path']}", flush=True)
    elif t == "phase":
        print(f"== {ev.get('name')}", flush=True)
    elif t == "report":
        print(ev.get("text", ""), flush=True)
    elif t in ("failed", "cancelled", "finished", "started", "log"):
        print(json.dumps(ev, default=str), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "validate"):
        sp = sub.add_parser(name)
        sp.add_argument("job", type=Path)
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        if name == "run":
            sp.add_argument("--job-dir", type=Path, default=None)
            sp.add_argument("--models-dir", type=Path, default=None)
            sp.add_argument("--device", default=None)
    sub.add_parser("presets")
    sp = sub.add_parser("inspect")
    sp.add_argument("file", type=Path)
    args = p.parse_args(argv)

    try:
        if args.cmd == "presets":
            for name, desc in list_presets().items():
                print(f"{name:20s} {desc}")
            return 0
        if args.cmd == "inspect":
            from trainer.kohya import LoraFileError, read_kohya

            try:
                lora = read_kohya(args.file)
            except LoraFileError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(describe_lora(lora, args.file))
            return 0
        spec = load_job_file(args.job, parse_set(args.set))
        if args.cmd == "validate":
            print(to_toml(spec), end="")
            return 0
        from trainer.events import JobCancelled, JobFailed
        from trainer.runner import run_job

        job_dir = args.job_dir or Path("runs") / f"{spec.output_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            out = run_job(spec, job_dir, on_event=_print_event, models_dir=args.models_dir, device=args.device)
        except JobCancelled:
            print("cancelled", file=sys.stderr)
            return 130
        except JobFailed as e:
            print(f"failed: {e}", file=sys.stderr)
            return 1
        print(json.dumps(out, indent=2, default=str))
        return 0
    except SpecError as e:
        print("the job spec is invalid:", file=sys.stderr)
        for field, msg in e.problems:
            print(f"  {field or '(file)'}: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
