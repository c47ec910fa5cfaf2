"""Copy-machine (Difference) training: a LoRA that learns only what changed between two images.

sd-webui-traintrain's Difference mode, per pair (original, target):
- pass 1 trains a "copier" LoRA on the original until the model reproduces it (the spec's own settings);
- the copier check measures the denoising loss on the original at fixed noise and timesteps with and without
  the copier and stops the job when the copier did not learn the image (plus a side-by-side image);
- pass 2 trains a NEW network (`spec.pass2_spec()` settings) on the target with the copier applied at strength
  1.0 and frozen; only that network is saved, so the file holds the difference alone.
Several pairs (front / left / right) give one LoRA each and, with `merge_rank`, their SVD merge.

Each pass is an ordinary `trainer.train.loop` run on a derived single-image spec in its own folder
(`job_dir/difference/<pair>/pass1|pass2`), so the loop's exact resume applies inside a pass, and
`job_dir/difference/progress.json` records finished passes so a restarted job skips them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from trainer import atomic
from trainer.data.dataset import TrainData, scan_dataset
from trainer.events import EventSink, JobCancelled, JobFailed, StopCheck, event, never_stop, null_sink
from trainer.spec import TrainSpec
from trainer.train.copier_check import (
    CopierCheck,
    apply_copier,
    base_for_check,
    copier_check,
    not_converged_message,
)
from trainer.train.pairs import (
    PairPlan,
    check_pairs,
    copier_original,
    pass_specs,
    role_metadata,
    sha256,
    stage_images,
)

DIFF_DIR = "difference"
PROGRESS_FILE = "progress.json"
PROGRESS_VERSION = 1


def _read_progress(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {"version": PROGRESS_VERSION, "pairs": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"version": PROGRESS_VERSION, "pairs": {}}  # unreadable: redo (each pass still resumes from state)
    if data.get("version") != PROGRESS_VERSION:
        return {"version": PROGRESS_VERSION, "pairs": {}}
    return data


def _write_progress(path: Path, data: dict[str, Any]) -> None:
    atomic.write_text(path, json.dumps(data, indent=1, sort_keys=True))


def _pass_sink(on_event: EventSink, pair: str, pass_no: int, label: str, done_before: int,
               total_all: int) -> EventSink:
    """Forward a pass's events as part of the whole job: pair/pass fields, overall progress, one start/finish."""

    def sink(e: dict[str, Any]) -> None:
        t = e.get("type")
        if t in ("started", "finished"):
            return  # the difference job reports one of each
        if t == "file" and e.get("kind") == "lora":
            return  # the pass's own file lives in its folder; the job announces the files users get
        e = {**e, "pair": pair, "pass": pass_no}
        if t == "phase":
            e["name"] = label if e.get("name") == "training" else f"{label}: {e.get('name')}"
        elif t == "progress":
            e["overall_step"] = done_before + int(e.get("step", 0))
            e["overall_total"] = total_all
        on_event(e)

    return sink


def _copier_hook(copier: Path, emit: EventSink) -> Callable[[Any], None]:
    """Pass 2's base preparation: the copier goes on after the base is loaded and the new network created,
    before latents/text are cached and before the first step (the order of peft adapters on a layer does not
    change the sum). It is a separate, non-trainable peft adapter: not in the optimizer and not in
    network_state(), so neither states nor files contain it."""

    def prepare(base: Any) -> None:
        apply_copier(base, copier)
        emit(event("log", level="info", message=f"copier {copier.name} applied at strength 1.0, frozen"))

    return prepare


def train_difference(spec: TrainSpec, job_dir: Path, on_event: EventSink = null_sink,
                     should_stop: StopCheck = never_stop, models_dir: Path | None = None,
                     device: str | None = None, resize_pairs: bool | None = None,
                     context: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a copy-machine job; returns outputs (kind -> path or paths). Raises JobFailed / JobCancelled.

    Outputs: "lora" (the pass-2 LoRA, a list with several pairs), "loras" {pair: path}, "copier" (with
    save_copier), "merged" (several pairs and merge_rank), "image" (copier-check pictures), "plot" (loss curves).
    `resize_pairs` lets pairs of different sizes through (the target is fitted to the original's size, then
    both take the same crop); None reads `spec.difference.resize_pairs` when the spec has that field.
    Calling it again with the same job_dir resumes: finished passes are skipped, an unfinished pass continues
    from its last state.
    """
    from trainer.train.loop import Trainer
    from trainer.train.precision import resolve_device
    from trainer.train.state import spec_fingerprint

    del context  # accepted like train(); nothing to share across jobs yet
    job_dir = Path(job_dir)
    if resize_pairs is None:
        resize_pairs = bool(getattr(spec.difference, "resize_pairs", False))
    plans = check_pairs(spec, resize_pairs)
    assert spec.difference is not None
    diff = spec.difference
    dev = resolve_device(device)
    out_dir = job_dir / "outputs"
    root = job_dir / DIFF_DIR
    progress_path = root / PROGRESS_FILE
    progress = _read_progress(progress_path)
    reused = Path(diff.copier).expanduser() if diff.copier else None
    if reused is not None:
        if not reused.is_file():
            raise JobFailed(f"the copier to reuse, {reused}, was not found; upload it again or fix "
                            "difference.copier", reason="bad_input")
        if len({p.original_sha for p in plans}) > 1:
            raise JobFailed("difference.copier reuses one copier, which fits one original image, but these pairs "
                            "have different originals; run them as separate jobs or drop difference.copier",
                            reason="bad_input")
        made_from = copier_original(reused)
        if made_from and made_from[0] != plans[0].original_sha:
            raise JobFailed(f"the saved copier {reused.name} was trained on {made_from[1]}, not on this job's "
                            f"original {plans[0].original.name}; a copier only reproduces its own original. Give "
                            "the copier made from this original, or leave difference.copier empty to train a new "
                            "one", reason="bad_input")

    staged = {p.key: stage_images(p, root / p.key, diff.prompt) for p in plans}
    specs = {p.key: pass_specs(spec, p, *staged[p.key]) for p in plans}
    p1_total = 0 if reused else sum(s[0].steps for s in specs.values())
    total = p1_total + sum(s[1].steps for s in specs.values())

    reused_sha = sha256(reused) if reused is not None else ""

    def copier_fp(p: PairPlan, s1: TrainSpec) -> str:
        # what the copier depends on: its settings and the original, or the reused file and the original
        if reused is not None:
            return f"reused:{reused_sha}:{p.original_sha}"
        return f"{spec_fingerprint(s1)}:{p.original_sha}"

    def record(key: str) -> dict[str, Any]:
        return progress["pairs"].setdefault(key, {})

    def finished(rec: dict[str, Any] | None, fp: str, path_key: str) -> bool:
        if not rec or not rec.get("done"):
            return False
        if rec.get("fp") != fp:
            raise JobFailed(f"the saved progress in {root} belongs to different settings or images; resume with "
                            "the original settings, or start over with a new job", reason="bad_state")
        return Path(rec.get(path_key, "")).is_file()

    done_steps = 0
    for p in plans:
        s1, s2 = specs[p.key]
        rec = progress["pairs"].get(p.key, {})
        fp1 = f"{spec_fingerprint(s1)}:{p.original_sha}"
        fp2 = f"{spec_fingerprint(s2)}:{p.target_sha}:{copier_fp(p, s1)}"
        if not reused and finished(rec.get("pass1"), fp1, "copier"):
            done_steps += s1.steps
        if finished(rec.get("pass2"), fp2, "lora"):
            done_steps += s2.steps
    on_event(event("started", kind="train", mode="difference", total_steps=total, resumed_from=done_steps,
                   pairs=[p.pair.name for p in plans]))
    if spec.data.random_flip:
        on_event(event("log", level="warning", message="data.random_flip is ignored in difference mode: the copier "
                       "must reproduce the original as it is"))

    outputs: dict[str, Any] = {"loras": {}, "image": [], "plot": []}
    summary: dict[str, Any] = {"pairs": {}}
    copiers: list[str] = []
    offset = 0
    for idx, p in enumerate(plans):
        s1, s2 = specs[p.key]
        rec = record(p.key)
        fp1 = f"{spec_fingerprint(s1)}:{p.original_sha}"
        name = p.pair.name
        pair_info = {"pair": name, "pair_index": idx + 1, "pairs": len(plans)}
        pair_summary: dict[str, Any] = {}

        # pass 1: the copier
        label1 = f"pair {name}: pass 1 of 2 (copier)"
        check_base = None
        data1 = TrainData.from_spec(s1, scan_dataset(s1))
        if reused is not None:
            copier_path = reused
            on_event(event("phase", name=f"pair {name}: pass 1 of 2 (copier reused from {reused.name})",
                           **pair_info, **{"pass": 1}))
            on_event(event("log", level="info", message=f"pair {name}: reusing the copier {reused.name}; pass 1 "
                           "skipped (the copier check still runs)", pair=name))
        elif finished(rec.get("pass1"), fp1, "copier"):
            copier_path = Path(rec["pass1"]["copier"])
            offset += s1.steps
            on_event(event("log", level="info", message=f"pair {name}: pass 1 already finished, copier kept",
                           pair=name))
        else:
            on_event(event("phase", name=label1, **pair_info, **{"pass": 1}))
            tr = Trainer(s1, root / p.key / "pass1", _pass_sink(on_event, name, 1, label1, offset, total),
                         should_stop, models_dir, device, extra_metadata=role_metadata("copier", p, diff.prompt, None))
            res = tr.run()
            copier_path = Path(res["lora"])
            if res.get("plot"):
                outputs["plot"].append(res["plot"])
            rec["pass1"] = {"done": True, "fp": fp1, "copier": str(copier_path)}
            _write_progress(progress_path, progress)
            offset += s1.steps
            # reuse the loaded base for the check, without the trained network on it
            tr.network.remove()
            tr.text_encoders_to(dev)  # the check runs them
            check_base = tr.base
            del tr
        fp2_extra = copier_fp(p, s1)
        fp2 = f"{spec_fingerprint(s2)}:{p.target_sha}:{fp2_extra}"

        # the copier check
        chk_rec = rec.get("check")
        if chk_rec and chk_rec.get("copier_fp") == fp2_extra and Path(chk_rec.get("image") or "").is_file():
            check = CopierCheck(**{k: chk_rec[k] for k in ("loss_without", "loss_with", "improvement", "required",
                                                            "image")})
            check.required = diff.copier_min_improvement
        else:
            if should_stop():
                on_event(event("cancelled", outputs={}, pair=name, **{"pass": 1}))
                raise JobCancelled(f"stopped before the copier check of pair {name}")
            on_event(event("phase", name=f"pair {name}: checking the copier", **pair_info, **{"pass": 1}))
            if check_base is None:
                check_base = base_for_check(s1, models_dir, dev)
            pt = s1.prediction_type if s1.prediction_type != "auto" else check_base.prediction_type
            check = copier_check(check_base, data1, copier_path, pt, dev, s1.seed, diff.copier_min_improvement,
                                 out_dir / f"{spec.output_name}-{p.key}-copier-check.png",
                                 f"pair {name}: copier check")
            arch = check_base.arch
            del check_base
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            if check.passed:  # a failed check is redone on a retry (it may run with other settings)
                rec["check"] = {**asdict(check), "copier_fp": fp2_extra}
                _write_progress(progress_path, progress)
            on_event(event("file", kind="image", path=check.image, pair=name, **{"pass": 1},
                           phase="copier check", loss_without=check.loss_without, loss_with=check.loss_with,
                           improvement=check.improvement))
            if not check.passed:
                if reused is not None:  # not a training problem: a copier only knows its own original
                    raise JobFailed(
                        f"pair {name!r}: the saved copier {reused.name} does not reproduce this pair's original "
                        f"(denoising loss {check.loss_without:.4f} without it, {check.loss_with:.4f} with it). A "
                        "copier only works for the original image it was trained on: give the copier made from "
                        f"{Path(p.original).name}, or leave difference.copier empty to train a new one.",
                        reason="copier_not_converged")
                raise JobFailed(not_converged_message(name, check, s1, arch), reason="copier_not_converged")
        outputs["image"].append(check.image)
        on_event(event("log", level="info", pair=name, message=(
            f"pair {name}: copier check passed, denoising loss on the original {check.loss_without:.4f} -> "
            f"{check.loss_with:.4f} ({check.improvement:.0%} lower)")))
        pair_summary["copier_check"] = asdict(check)

        if diff.save_copier and reused is None:
            dest = out_dir / f"{spec.output_name}-{p.key}-copier.safetensors"
            if not dest.is_file() or dest.stat().st_size != copier_path.stat().st_size:
                atomic.write_with(dest, lambda tmp, src=copier_path: shutil.copyfile(src, tmp))
            copiers.append(str(dest))
            on_event(event("file", kind="lora", path=str(dest), pair=name, role="copier"))

        # pass 2: the difference, on top of the frozen copier
        final = out_dir / f"{spec.output_name}-{p.key}.safetensors"
        if finished(rec.get("pass2"), fp2, "lora") and final.is_file():
            on_event(event("log", level="info", message=f"pair {name}: pass 2 already finished", pair=name))
        else:
            label2 = f"pair {name}: pass 2 of 2 (difference)"
            on_event(event("phase", name=label2, **pair_info, **{"pass": 2}))
            sink2 = _pass_sink(on_event, name, 2, label2, offset, total)
            tr = Trainer(s2, root / p.key / "pass2", sink2, should_stop, models_dir, device,
                         prepare_base=_copier_hook(copier_path, sink2),
                         extra_metadata=role_metadata("difference", p, diff.prompt, check))
            res = tr.run()
            pair_summary["final_loss"] = (sum(v for _, v in tr.loss_history[-25:]) / len(tr.loss_history[-25:])
                                          if tr.loss_history else None)
            del tr
            if res.get("plot"):
                outputs["plot"].append(res["plot"])
            for k in ("samples",):
                if res.get(k):
                    outputs.setdefault(k, []).extend(res[k])
            atomic.write_with(final, lambda tmp, src=res["lora"]: shutil.copyfile(src, tmp))
            rec["pass2"] = {"done": True, "fp": fp2, "lora": str(final)}
            _write_progress(progress_path, progress)
        offset += s2.steps
        outputs["loras"][name] = str(final)
        on_event(event("file", kind="lora", path=str(final), pair=name, role="difference"))
        summary["pairs"][name] = pair_summary

    loras = list(outputs["loras"].values())
    if diff.merge_rank:
        if len(loras) < 2:
            on_event(event("log", level="warning", message="merge_rank is set but there is only one pair: "
                           "nothing to merge"))
        else:
            try:
                outputs["merged"] = str(_merge(spec, loras, out_dir, on_event, should_stop))
            except JobCancelled:
                on_event(event("cancelled", outputs={"lora": loras, "loras": dict(outputs["loras"])}))
                raise
    outputs["lora"] = loras[0] if len(loras) == 1 else loras
    if copiers:
        outputs["copier"] = copiers[0] if len(copiers) == 1 else copiers
    for k in ("image", "plot"):
        if not outputs[k]:
            del outputs[k]
    summary.update({"steps": total, "resumed_from": done_steps, "mode": "difference"})
    on_event(event("finished", outputs=outputs, summary=summary))
    return outputs


def _merge(spec: TrainSpec, loras: list[str], out_dir: Path, on_event: EventSink, should_stop: StopCheck) -> Path:
    from trainer.network.svd_merge import MergeError, svd_merge_to_file

    assert spec.difference is not None
    diff = spec.difference
    dest = out_dir / f"{spec.output_name}-merged.safetensors"
    on_event(event("phase", name=f"merging {len(loras)} pair LoRAs (SVD, rank {diff.merge_rank})"))
    try:
        svd_merge_to_file([(p, diff.merge_ratio) for p in loras], dest, rank=diff.merge_rank,
                          conv_rank=diff.merge_rank, output_name=f"{spec.output_name}-merged",
                          should_stop=should_stop)
    except MergeError as e:
        raise JobFailed(f"the pair LoRAs could not be merged: {e}", reason="bad_input") from None
    on_event(event("file", kind="lora", path=str(dest), role="merged"))
    return dest


__all__ = ["CopierCheck", "PairPlan", "check_pairs", "copier_check", "pass_specs", "train_difference"]
