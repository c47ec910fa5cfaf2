"""The engine on its own, without Discord or a database.

  python -m trainer train [JOB.toml] [--set network.dim=32 ...] [options]   train a LoRA (progress bar)
      options map onto the spec, so no job file is needed:
      --images DIR --prompt "chibi scs girl" --base tiny-sd15 --steps 500 --dim 16 --alpha 8 --lr 1e-4
      --optimizer AdamW8bit --resolution 512 --preset sd15-8gb --name my_lora --out DIR [--device cuda]
      --epochs 10 --save-every-n-epochs 2 (instead of --steps)  --sample-prompt "..." (repeatable) --sample-every 100
  python -m trainer run JOB.toml [--set ...] [options] the same; also runs merge and preview job files
  python -m trainer demo [--out DIR] [--steps 300]     a LoRA of a new concept on the toy base + before/after grid (CPU)
  python -m trainer validate JOB.toml [--set ...]      print the fully resolved spec, or what is wrong
  python -m trainer presets                            list the presets
  python -m trainer import-kohya FILE [--out job.toml]  translate a kohya sd-scripts config or command line
  python -m trainer docs [--check]                     write docs/job-file.md (every job-file setting) from the spec
  python -m trainer inspect file.safetensors           check a LoRA file and summarise it
  python -m trainer plan [JOB.toml] [--preset P] [--arch sdxl] [--vram 10GiB]
                                                       predict the job's peak GPU memory (exit 1: does not fit)

Precedence: preset < job file < options < --set. Exit codes: 0 done, 1 failed, 2 invalid spec or option, 130 stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from trainer import bnb_gate  # noqa: E402
from trainer.jobs.preflight import PreflightError, preflight, read_job_text  # noqa: E402
from trainer.spec import SpecError, deep_merge, list_presets, load_toml_text, resolve_job, to_toml  # noqa: E402


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

    from trainer.format.metadata import file_model_hash

    mods = lora.modules.values()
    parts = Counter(name.split("_", 2)[1] if name.startswith("lora_te") else "unet" for name in lora.modules)
    ranks = Counter((m.kind, m.rank, float(m.alpha if m.alpha is not None else m.rank)) for m in mods)
    meta = lora.metadata or {}
    names = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "dora": "DoRA"}
    kind = "kohya-format LoRA" if lora.is_plain else \
        "LyCORIS " + "+".join(names[a] for a in sorted(lora.algos) if a != "lora" or "dora" not in lora.algos)
    lines = [
        f"{path}: {kind} for {lora.arch or 'an unknown architecture'}",
        "modules: " + ", ".join(f"{n} {p}" for p, n in sorted(parts.items())) + f" ({len(lora.modules)} in all)",
        "rank/alpha: " + ", ".join(f"{k} r{r} a{a:g} x{n}" for (k, r, a), n in sorted(ranks.items())),
    ]
    for key in ("ss_output_name", "ss_sd_model_name", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                "ss_network_alpha", "ss_network_args", "ss_max_train_steps", "ss_optimizer", "ss_learning_rate"):
        if key in meta:
            lines.append(f"{key}: {meta[key]}")
    stored = meta.get("sshs_model_hash")
    if stored:
        ok = stored == file_model_hash(path)
        lines.append(f"sshs_model_hash: {stored} ({'matches the file' if ok else 'DOES NOT match the file'})")
    return "\n".join(lines)


def _fmt_time(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class ProgressPrinter:
    """Prints engine events. Training progress is one tqdm bar redrawn in place when the stream is a terminal
    (other lines are printed above it), and plain `step N/M ...` lines otherwise (logs, pipes, CI)."""

    BAR = 24

    def __init__(self, stream: Any = None, tty: bool | None = None):
        self._stream = stream
        self.tty = tty
        self._bar: Any = None  # the open tqdm bar
        self._phase: str | None = None

    @property
    def stream(self) -> Any:
        return self._stream if self._stream is not None else sys.stdout

    def _is_tty(self) -> bool:
        if self.tty is not None:
            return self.tty
        try:
            return bool(self.stream.isatty())
        except (AttributeError, ValueError):
            return False

    def _line(self, text: str) -> None:
        if self._bar is not None:  # print above the bar, which is redrawn below
            with self._bar.external_write_mode(file=self.stream):
                self.stream.write(text + "\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _progress_bar(self, ev: dict[str, Any], text: str) -> None:
        from tqdm import tqdm

        total, step = max(int(ev["total"]), 1), min(int(ev["step"]), max(int(ev["total"]), 1))
        if self._bar is None:  # drawn once on creation, with this event's numbers
            self._bar = tqdm(total=total, initial=step, desc=text, file=self.stream, ascii="-#",
                             bar_format=f"[{{bar:{self.BAR}}}] {{desc}}", mininterval=0, dynamic_ncols=False)
        else:
            self._bar.total, self._bar.n = total, step
            self._bar.set_description_str(text, refresh=False)
            if step < total:
                self._bar.refresh()
        if step >= total:  # close() draws the final state once and ends the line
            self._bar.close()
            self._bar = None

    @staticmethod
    def progress_text(ev: dict[str, Any]) -> str:
        raw = ev.get("loss_raw", ev.get("loss", float("nan")))
        return (f"step {ev['step']}/{ev['total']}  loss {raw:.4f}  smoothed {ev.get('loss', float('nan')):.4f}"
                f"  lr {ev.get('lr') or 0:.2e}  {ev.get('steps_per_s') or 0:.2f} steps/s"
                f"  eta {_fmt_time(ev.get('eta_s'))}")

    def __call__(self, ev: dict[str, Any]) -> None:
        t = ev.get("type")
        if t == "progress":
            text = self.progress_text(ev)
            if self._is_tty():
                self._progress_bar(ev, text)
            else:
                self._line(text)
        elif t == "file":
            if ev.get("kind") != "state":
                self._line(f"file: {ev.get('kind', '')} {ev['path']}")
        elif t == "sample":
            self._line(f"rendered sample (step {ev.get('step', '?')}): {ev['path']}")
        elif t == "phase":
            if ev.get("name") != self._phase:  # a phase's counters would flood a log
                self._phase = ev.get("name")
                self._line(f"== {ev.get('name')}")
        elif t == "report":
            self._line(ev.get("text", ""))
        elif t == "log":
            self._line(f"[{ev.get('level', 'info')}] {ev.get('message', '')}")
        elif t == "failed":
            pass  # main() prints it once, on stderr, with the exit status
        elif t == "started":
            resumed = f" (resuming from step {ev['resumed_from']})" if ev.get("resumed_from") else ""
            self._line(f"started {ev.get('kind', 'train')} job: {ev.get('total_steps')} steps{resumed}")
        elif t == "finished":
            sm = ev.get("summary") or {}
            if "steps" in sm:
                ran = sm.get("steps_this_run", sm["steps"])
                steps = (f"{ran} steps in this run (resumed at step {sm['resumed_from']}; {sm['steps']} in total)"
                         if sm.get("resumed_from") else f"{sm['steps']} steps")
                self._line(f"finished: {steps} in {_fmt_time(sm.get('elapsed_s'))} "
                           f"({sm.get('steps_per_s') or 0:.2f} steps/s on {sm.get('device', '?')})")
            else:
                self._line("finished")
        elif t == "cancelled":
            self._line(f"stopped at step {ev.get('step', '?')}; saved: {json.dumps(ev.get('outputs', {}))}")


def _print_event(ev: dict[str, Any]) -> None:
    """Plain-line printing of one event (kept for callers of the old name)."""
    ProgressPrinter(tty=False)(ev)


# option -> (spec field path, what --help says); --images/--prompt build the concept list.
OPTION_FIELDS: dict[str, tuple[str, str]] = {
    "base": ("base_model", "base model: tiny-sd15, a models-dir name, a .safetensors file or a diffusers folder"),
    "steps": ("steps", "optimizer steps"),
    "init_lora": ("init_lora", "start from this LoRA (kohya's network_weights): a .safetensors path or a models-dir "
                               "name; its ranks must match --dim"),
    "dim": ("network.dim", "network rank"),
    "alpha": ("network.alpha", "network alpha (default: dim)"),
    "conv_dim": ("network.conv_dim", "LoCon conv rank (0: plain LoRA)"),
    "lr": ("optimizer.lr", "learning rate"),
    "optimizer": ("optimizer.name", "AdamW, AdamW8bit, Lion, Lion8bit, Prodigy, Adafactor"),
    "scheduler": ("optimizer.scheduler", "constant, constant_with_warmup, linear, cosine, ..."),
    "resolution": ("data.resolution", "training resolution in px (multiple of 8)"),
    "batch_size": ("batch_size", "images per step"),
    "seed": ("seed", "random seed"),
    "mixed_precision": ("mixed_precision", "auto, no, fp16, bf16"),
    "name": ("output_name", "LoRA file name (without .safetensors)"),
}
_TYPES: dict[str, Any] = {"steps": int, "dim": int, "alpha": float, "conv_dim": int, "lr": float,
                          "resolution": int, "batch_size": int, "seed": int}


def _set_path(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def option_values(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec values the train options give (a nested dict for deep_merge)."""
    out: dict[str, Any] = {}
    for opt, (field, _) in OPTION_FIELDS.items():
        v = getattr(args, opt, None)
        if v is not None:
            _set_path(out, field, v)
    if getattr(args, "sample_prompt", None):
        _set_path(out, "sample.prompts", [{"prompt": p} for p in args.sample_prompt])
    if getattr(args, "sample_every", None) is not None:
        _set_path(out, "sample.every_n_steps", args.sample_every)
    if getattr(args, "images", None) is not None:
        out["concepts"] = [{"image_dir": str(args.images), "instance_prompt": args.prompt or ""}]
    elif getattr(args, "prompt", None) is not None:
        concepts = [dict(c) for c in (base or {}).get("concepts", [])]
        if not concepts:
            raise SpecError([("--prompt", "needs --images DIR (or a job file with [[concepts]])")])
        for c in concepts:
            c["instance_prompt"] = args.prompt
        out["concepts"] = concepts
    return out


def _option_hint(field: str) -> str:
    for opt, (f, _) in OPTION_FIELDS.items():
        if field == f or field.startswith(f + "."):
            return f" (--{opt.replace('_', '-')})"
    if field.startswith("concepts"):
        return " (--images/--prompt)"
    return ""


def _add_train_options(sp: argparse.ArgumentParser, job_required: bool) -> None:
    if job_required:
        sp.add_argument("job", type=Path, help="a TOML job file (train, merge or preview)")
    else:
        sp.add_argument("job", type=Path, nargs="?", help="a TOML job file (optional when --images is given)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any spec field, e.g. --set network.conv_dim=4 (repeatable)")
    g = sp.add_argument_group("spec options (shortcuts for --set)")
    g.add_argument("--images", type=Path, default=None, help="the training images (optional same-name .txt captions)")
    g.add_argument("--prompt", default=None, help='the instance prompt with its trigger word, e.g. "chibi scs girl"')
    g.add_argument("--preset", default=None, help="start from a preset (python -m trainer presets)")
    for opt, (_, helptext) in OPTION_FIELDS.items():
        g.add_argument(f"--{opt.replace('_', '-')}", dest=opt, type=_TYPES.get(opt, str), default=None, help=helptext)
    g.add_argument("--sample-prompt", action="append", default=None, metavar="PROMPT",
                   help="render this prompt while training and at the end (repeatable); files samples/stepN_I.png")
    g.add_argument("--sample-every", type=int, default=None, metavar="N", help="render the samples every N steps")
    g.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="train N epochs instead of --steps (an epoch: every image x its repeats once)")
    g.add_argument("--save-every-n-epochs", type=int, default=None, metavar="N",
                   help="also save the LoRA every N epochs")
    sp.add_argument("--out", "--job-dir", dest="job_dir", type=Path, default=None,
                    help="the job folder: outputs/ (the LoRA, loss curve), samples/, state/ (default runs/NAME-TIME)")
    sp.add_argument("--models-dir", type=Path, default=None)
    sp.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    sp.add_argument("--json", action="store_true", help="print the outputs as JSON at the end")


def _build_spec(args: argparse.Namespace) -> Any:
    values: dict[str, Any] = {}
    if args.job is not None:
        values = load_toml_text(read_job_text(args.job), source=str(args.job))
    elif args.images is None and args.cmd == "train":
        raise SpecError([("concepts", "nothing to train on: give a job file or --images DIR (with --prompt)")])
    opts = option_values(args, values)
    if opts and values.get("kind", "train") != "train":
        raise SpecError([("", f"spec options apply to train jobs; this is a {values['kind']} job (use --set)")])
    values = deep_merge(deep_merge(values, opts), parse_set(args.set))
    spec = resolve_job(values, args.preset)
    if args.cmd == "train" and getattr(spec, "kind", "train") != "train":
        raise SpecError([("kind", f"`train` runs train jobs; run this {spec.kind} job with `python -m trainer run`")])
    if args.epochs is not None or args.save_every_n_epochs is not None:
        from trainer.jobs.cli_tools import apply_epochs

        apply_epochs(spec, args)
    return spec


def _print_outputs(out: dict[str, Any]) -> None:
    labels = {"lora": "LoRA", "samples": "sample", "plot": "loss curve", "intermediate": "intermediate LoRA",
              "grid": "grid", "checkpoint": "checkpoint", "merged": "merged LoRA"}
    for key, value in out.items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str | Path):
                print(f"{labels.get(key, key)}: {v}")


def main(argv: list[str] | None = None) -> int:
    bnb_gate.defer()  # before anything imports peft / diffusers
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    _add_train_options(sub.add_parser("train", help="train a LoRA from a job file and/or options"), False)
    _add_train_options(sub.add_parser("run", help="run any job file (train, merge, preview)"), True)
    sp = sub.add_parser("validate", help="print the fully resolved spec")
    sp.add_argument("job", type=Path)
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp = sub.add_parser("demo", help="train a LoRA of a concept the built-in toy base never saw and render a "
                                      "before/after grid (a few minutes on CPU)")
    sp.add_argument("--out", type=Path, default=None, help="where the images, LoRA and samples go")
    sp.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    sp.add_argument("--device", default="cpu")
    sub.add_parser("presets", help="list the presets")
    sp = sub.add_parser("inspect", help="check and summarise a LoRA file")
    sp.add_argument("file", type=Path)
    sp = sub.add_parser("plan", help="predict a train job's peak GPU memory and whether it fits a card")
    sp.add_argument("job", type=Path, nargs="?", help="a TOML train job file (optional with --preset)")
    sp.add_argument("--preset", default=None, help="plan a preset (python -m trainer presets)")
    sp.add_argument("--arch", default=None, help="plan on this full-size architecture: sd15, sd2, sdxl "
                    "(default: the base model's)")
    sp.add_argument("--vram", default=None, help="the card's memory, e.g. 10GiB (default: this machine's GPU)")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    sp = sub.add_parser("import-kohya", help="translate a kohya sd-scripts config or command line into a job file")
    sp.add_argument("file", type=Path, help="a --config_file/dataset TOML, a kohya_ss JSON, or a .txt/.sh/.bat "
                    "holding an `accelerate launch train_network.py --...` command line")
    sp.add_argument("--out", type=Path, default=None, help="write the job file here (default: print it)")
    sp = sub.add_parser("docs", help="write docs/job-file.md, the job-file reference, from the spec")
    sp.add_argument("--check", action="store_true", help="only check that the file is up to date (exit 1 if not)")
    args = p.parse_args(argv)
    if args.cmd in ("train", "run", "demo"):
        _quiet_library_bars()

    try:
        if args.cmd == "presets":
            for name, desc in list_presets().items():
                print(f"{name:20s} {desc}")
            return 0
        if args.cmd == "inspect":
            from trainer.format.kohya import LoraFileError, read_kohya

            try:
                lora = read_kohya(args.file)
            except LoraFileError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            print(describe_lora(lora, args.file))
            return 0
        if args.cmd == "demo":
            return _demo(args)
        if args.cmd in ("docs", "import-kohya"):
            from trainer.jobs.cli_tools import docs_command, import_kohya_command

            return docs_command(args) if args.cmd == "docs" else import_kohya_command(args)
        if args.cmd == "plan":
            from trainer.jobs.cli_tools import plan_command

            return plan_command(args)
        if args.cmd == "validate":
            spec = resolve_job(deep_merge(load_toml_text(read_job_text(args.job), source=str(args.job)),
                                          parse_set(args.set)))
            print(to_toml(spec), end="")
            return 0
        spec = _build_spec(args)
        preflight(spec, args.models_dir, args.device)  # before anything is loaded or written
        from trainer.events import JobCancelled, JobFailed
        from trainer.jobs.runner import run_job

        job_dir = args.job_dir or Path("runs") / f"{spec.output_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        print(f"job folder: {job_dir}", flush=True)
        resume = f"run the same command with --out {job_dir} to resume"
        try:
            with StopOnSignal() as stop:
                out = run_job(spec, job_dir, on_event=ProgressPrinter(), should_stop=stop, models_dir=args.models_dir,
                              device=args.device)
        except JobCancelled as e:
            print(f"{e}; {resume}", file=sys.stderr)
            return 130
        except JobFailed as e:
            print(f"failed: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # a second Ctrl-C: nothing more was saved
            print(f"\naborted; {resume} from the last saved state", file=sys.stderr)
            return 130
        if args.json:
            print(json.dumps(out, indent=2, default=str))
        else:
            _print_outputs(out)
        return 0
    except PreflightError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SpecError as e:
        print("the job spec is invalid:", file=sys.stderr)
        for field, msg in e.problems:
            print(f"  {field or '(file)'}{_option_hint(field)}: {msg}", file=sys.stderr)
        return 2


class StopOnSignal:
    """Ctrl-C / SIGTERM during `train`: the engine finishes the current step, saves the LoRA and the full state
    (so a rerun resumes from exactly that step) and stops; a second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving the state (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (main() called from a thread)
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _quiet_library_bars() -> None:
    """transformers/diffusers draw their own tqdm bars while loading weights: they would break our progress bar.
    And libraries print notices a user can do nothing about on every run: silence those at their source."""
    import logging
    import warnings

    # bitsandbytes tries an optional CPU 4-bit kernel package at import and warns when it is missing; we never use
    # 4-bit layers (its optimizers work without it). Its errors still show.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # torchvision (pulled in by transformers' image utilities, which we do not use) warns about its own build.
    warnings.filterwarnings("ignore", module=r"torchvision(\.|$)")
    warnings.filterwarnings("ignore", message=r"(?i).*torchvision", module=r"transformers(\.|$)")
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        dlog.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _demo(args: argparse.Namespace) -> int:
    from trainer.events import JobFailed
    from trainer.jobs.demo import DEMO_STEPS, run_demo

    steps = args.steps if args.steps is not None else DEMO_STEPS
    if steps < 1:
        print("the job spec is invalid:\n  steps (--steps): must be at least 1", file=sys.stderr)
        return 2
    out = args.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"demo folder: {out}", flush=True)
    try:
        run_demo(out, steps=steps, device=args.device, on_event=ProgressPrinter())
    except JobFailed as e:
        print(f"failed: {e}", file=sys.stderr)
        return 1
    return 0

