"""The CLI's smaller commands and option helpers: `plan`, `import-kohya`, `docs`, and --epochs (see trainer/jobs/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from trainer.jobs.preflight import PreflightError, read_job_text
from trainer.spec import SpecError, deep_merge, load_toml_text, resolve_job


def apply_epochs(spec: Any, args: argparse.Namespace) -> None:
    """--epochs / --save-every-n-epochs -> steps / save_every_n_steps, from the images the concepts hold."""
    import math

    from trainer.data.dataset import list_images

    if getattr(spec, "kind", "train") != "train" or spec.mode != "standard":
        raise SpecError([("--epochs", "epochs apply to standard train jobs (a difference job trains on its pairs)")])
    if args.epochs is not None and args.steps is not None:
        raise SpecError([("--epochs", "give --steps or --epochs, not both")])
    for opt, n in (("--epochs", args.epochs), ("--save-every-n-epochs", args.save_every_n_epochs)):
        if n is not None and n < 1:
            raise SpecError([(opt, "must be at least 1")])
    images = 0
    for c in spec.concepts:
        folder = Path(c.image_dir).expanduser()
        images += (len(list_images(folder)) if folder.is_dir() else 0) * c.repeats
    if not images:
        raise SpecError([("--epochs", "no images to count in the concepts' folders; give --steps")])
    per_epoch = math.ceil(images / (spec.batch_size * spec.grad_accum))
    try:
        if args.epochs is not None:
            spec.steps = args.epochs * per_epoch
        if args.save_every_n_epochs is not None:
            spec.save_every_n_steps = args.save_every_n_epochs * per_epoch
    except ValueError as e:  # validate_assignment: e.g. more steps than the spec allows
        raise SpecError([("--epochs", str(e).splitlines()[-1].strip())]) from None


def import_kohya_command(args: argparse.Namespace) -> int:
    import tomli_w

    from trainer.kohya_import import import_kohya
    from trainer.kohya_read import KohyaImportError

    if not args.file.is_file():
        raise PreflightError(f"{args.file} is not a file: give a kohya config (.toml/.json) or a command line "
                             "(.txt/.sh)")
    try:
        result = import_kohya(args.file)
    except KohyaImportError as e:
        raise PreflightError(f"{args.file}: {e}") from None
    try:
        resolve_job(result.values)
        problem = ""
    except SpecError as e:  # translated values outside the spec's ranges: said, and the file still written
        problem = f"the translated job does not validate yet: {e}"
    header = "".join(f"# {line}\n" for line in
                     [f"Imported from the kohya settings in {args.file.name} by `python -m trainer import-kohya`.",
                      *result.report().splitlines(), *([problem] if problem else [])])
    text = header + tomli_w.dumps(result.values)
    if args.out is None:
        print(result.report(), file=sys.stderr)
        print(text, end="")
    else:
        args.out.write_text(text, encoding="utf-8")
        print(result.report())
        print(f"wrote {args.out}; check it with `python -m trainer validate {args.out}`, "
              f"train with `python -m trainer run {args.out}`")
    if problem:
        print(problem, file=sys.stderr)
    return 0


def docs_command(args: argparse.Namespace) -> int:
    from trainer.spec_doc import DOC_PATH, job_file_markdown, write_doc

    if args.check:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.is_file() else ""
        if current != job_file_markdown():
            print(f"{DOC_PATH} is out of date: run `python -m trainer docs`", file=sys.stderr)
            return 1
        print(f"{DOC_PATH} is up to date")
        return 0
    print(f"wrote {write_doc()}")
    return 0


def plan_command(args: argparse.Namespace) -> int:
    from trainer.jobs.cli import parse_set
    from trainer.plan import PlanError, parse_size, plan_job
    from trainer.spec import TrainSpec, preset_values

    try:
        card = parse_size(args.vram) if args.vram else _local_card_bytes()
        values: dict[str, Any] = {}
        if args.job is not None:
            values = load_toml_text(read_job_text(args.job), source=str(args.job))
        elif args.preset is None:
            raise SpecError([("", "give a job file or --preset NAME")])
        values = deep_merge(values, parse_set(args.set))
        preset = args.preset or values.get("preset")
        probe = deep_merge(preset_values(preset), values) if preset else values
        if probe.get("mode") == "difference" and not (probe.get("difference") or {}).get("pairs"):
            # The images do not change the plan: a preset or a job without its pairs yet is planned as one pair.
            values = deep_merge(values, {"difference": {"pairs": [{"original": "-", "target": "-"}]}})
        spec = resolve_job(values, preset)
        if not isinstance(spec, TrainSpec):
            raise SpecError([("kind", f"plan is for train jobs; this is a {spec.kind} job")])
        plan = plan_job(spec, arch=args.arch, card_bytes=card)
    except (PlanError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(plan.message())
    print(plan.table_text())
    for note in plan.notes:
        print(f"note: {note}")
    return 1 if plan.fits is False else 0


def _local_card_bytes() -> int | None:
    """This machine's first GPU's memory, None without one (the plan then says nothing about fitting)."""
    try:
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.get_device_properties(0).total_memory)
    except Exception:  # noqa: BLE001 - no usable torch/CUDA: no card to compare with
        pass
    return None
