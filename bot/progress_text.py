"""What a job's messages say: the live progress message (``render``), copier-check captions, the lines of a
copy-machine job's result, and the advice for each failure. Pure functions of the job row and the reporter's
state (no Discord, no I/O); bot/progress.py posts them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bot.humanize import format_duration, sig
from bot.interactions import clip

BAR_WIDTH = 20
TERMINAL = ("succeeded", "failed", "cancelled")
# What to tell a user for each failure reason code (trainer.events "failed".reason).
FAILURE_ADVICE = {
    "oom": "Try a smaller batch size or resolution, turn on gradient checkpointing, or pick a preset for a smaller card.",
    "nan": "The loss became NaN: lower the learning rate, or use fp32/bf16 instead of fp16.",
    "bad_input": "Check the dataset and settings named above, fix them and run `/retrain` or `/train` again.",
    "not_converged": "Try more steps or a higher learning rate.",
    "copier_not_converged": ("The copier check image above shows what the copier made of the original. Change what "
                             "the message suggests and run `/train` again."),
}
TRAINING_PHASE = "training"  # the engine's step loop (trainer/train/loop.py): its count is the step line
COPIER_CHECK = "copier check"  # the phase of the engine's copier-check image event (trainer/train/difference.py)
PASS_LABELS = {1: "pass 1 of 2 (copier)", 2: "pass 2 of 2 (difference)"}
DEFAULT_ADVICE = "Run `/retrain` to try again; if it fails the same way, tell an admin the job id."


def progress_bar(done: float, total: float, width: int = BAR_WIDTH) -> str:
    frac = 0.0 if total <= 0 else max(0.0, min(1.0, done / total))
    full = int(round(frac * width))
    return "\u2588" * full + "\u2591" * (width - full)


def _num(v: Any, fmt: str) -> str | None:
    try:
        return format(float(v), fmt)
    except (TypeError, ValueError):
        return None


def pass_label(st: dict[str, Any]) -> tuple[str, str]:
    """(what the pass is, sub-phase) of a difference job from the last phase name, which reads
    "pair front: pass 1 of 2 (copier)[: caching latents]" (or "pair front: checking the copier")."""
    pair, phase = st.get("pair"), str(st.get("phase") or "")
    prefix = f"pair {pair}: "
    if pair is not None and phase.startswith(prefix):
        label, _, sub = phase[len(prefix):].partition(": ")
        return label, sub
    return PASS_LABELS.get(st.get("pass"), ""), ""  # type: ignore[arg-type]


def _render_difference(state: str, st: dict[str, Any], lines: list[str]) -> None:
    """Copy-machine jobs: which pair and pass, the step in the pass, the bar over the whole job."""
    active = state in ("running", "cancelling")
    step, total = st.get("step"), st.get("total")
    overall, overall_total = st.get("overall_step"), st.get("overall_total") or st.get("total_steps")
    label, sub = pass_label(st)
    if active and st.get("pair") is not None:
        names = st.get("pair_names") or []
        idx, n = st.get("pair_index"), st.get("pairs") or len(names) or None
        if idx is None and st["pair"] in names:
            idx = names.index(st["pair"]) + 1
        head = f"Pair **{st['pair']}**" + (f" ({idx}/{n})" if idx and n else "")
        if label:
            head += f" \u00b7 {label}"
        if step is not None and total and label.startswith("pass") and st.get("progress_pass") == st.get("pass") \
                and st.get("progress_pair") == st.get("pair"):
            head += f" \u00b7 step {step}/{total}"
        lines.append(head)
    if state == "succeeded" and overall_total:
        overall = overall_total
    if state != "queued" and overall_total:
        done = float(overall or 0)
        pct = 100.0 * done / float(overall_total)
        lines.append(f"`{progress_bar(done, float(overall_total))}` {pct:.0f}% \u00b7 overall step "
                     f"{int(done)}/{overall_total}")
        parts = []
        if active and (x := _num(st.get("loss"), ".4f")) is not None:
            parts.append(f"loss {x}")
        if active and (x := _num(st.get("lr"), ".2e")) is not None:
            parts.append(f"lr {x}")
        if active and (x := sig(st.get("steps_per_s"))) is not None:
            parts.append(f"{x} steps/s")
        if parts:
            lines.append(" \u00b7 ".join(parts))
    if active and st.get("phase"):
        if st.get("pair") is None:
            lines.append(f"Phase: {st['phase']}")  # merging, loading: not about one pair
        elif sub:
            ph = f"Phase: {sub}"
            if st.get("phase_total"):
                ph += f" ({st.get('phase_current', 0)}/{st['phase_total']})"
            lines.append(ph)
    for name, chk in (st.get("checks") or {}).items():
        if active:
            lines.append(f"Copier check, pair {name}: loss on the original {chk}")


def check_text(ev: dict[str, Any]) -> str:
    """ "0.1234 without the copier -> 0.0456 with it (63% lower)" from a copier-check event."""
    without, with_ = _num(ev.get("loss_without"), ".4f"), _num(ev.get("loss_with"), ".4f")
    if without is None or with_ is None:
        return "measured"
    text = f"{without} without the copier -> {with_} with it"
    try:
        text += f" ({float(ev['improvement']):.0%} lower)"
    except (KeyError, TypeError, ValueError):
        pass
    return text


def copier_check_caption(ev: dict[str, Any]) -> str:
    pair = ev.get("pair", "?")
    return (f"Copier check, pair **{pair}** (original \u00b7 base alone \u00b7 with the copier). Denoising loss "
            f"on the original: {check_text(ev)}. The copier must reproduce the original before pass 2 learns "
            "the difference on top of it.")


def render(job: Any, st: dict[str, Any]) -> str:
    """The progress message text. ``job``: the row; ``st``: newest detail from events."""
    state = job.state
    if state == "running" and job.cancel_requested:
        state = "cancelling"
    head = f"**Job #{job.id}** \u00b7 {job.kind} \u00b7 {state}"
    lines = [head]
    if state == "queued":
        pos = st.get("position")
        eta = st.get("queue_eta_s")
        if st.get("resumed"):
            lines.append("Back in the queue after a restart; it resumes from its last saved state.")
        if pos is not None:
            lines.append(f"Position in queue: **{pos}**" + (f" \u00b7 starts in ~{format_duration(eta)}" if eta else ""))
        else:
            lines.append("Waiting for a free worker.")
        if st.get("quota_wait"):
            lines.append(str(st["quota_wait"]))
    step, total = st.get("step"), st.get("total") or st.get("total_steps")
    if st.get("difference"):
        _render_difference(state, st, lines)
    elif state != "queued" and step is not None and total:
        pct = 100.0 * float(step) / float(total)
        lines.append(f"`{progress_bar(float(step), float(total))}` {pct:.0f}% \u00b7 step {step}/{total}")
        parts = []
        if (x := _num(st.get("loss"), ".4f")) is not None:
            parts.append(f"loss {x}")
        if (x := _num(st.get("lr"), ".2e")) is not None:
            parts.append(f"lr {x}")
        if (x := sig(st.get("steps_per_s"))) is not None:
            parts.append(f"{x} steps/s")
        if state in ("running", "cancelling") and st.get("eta_s") is not None:
            parts.append(f"ETA {format_duration(st.get('eta_s'))}")
        if parts:
            lines.append(" \u00b7 ".join(parts))
    elif state == "running" and st.get("total_steps"):
        lines.append(f"`{progress_bar(0, 1)}` 0% \u00b7 step 0/{st['total_steps']}")
    if st.get("phase") and state in ("running", "cancelling") and not st.get("difference"):
        if st["phase"] != TRAINING_PHASE:  # training: the bar and step line above count the steps
            ph = f"Phase: {st['phase']}"
            if st.get("phase_total"):
                ph += f" ({st.get('phase_current', 0)}/{st['phase_total']})"
            lines.append(ph)
    if (live := st.get("live")) and state == "running":  # the picture forming, attached to this message
        what = f" \u00b7 {live['label']}" if live.get("label") else ""
        lines.append(f"Live preview: sampling step {live.get('step')}/{live.get('total')}{what}")
    if st.get("resumed_from"):
        lines.append(f"Resumed from step {st['resumed_from']}.")
    if state == "succeeded":
        lines.append("Finished. Results are posted below.")
    elif state == "failed":
        lines.append(f"Failed: {clip(job.error or st.get('error') or 'unknown error', 300)}")
    elif state == "cancelled":
        lines.append("Cancelled.")
    return "\n".join(lines)


def difference_lines(roles: dict[Path, tuple[str, str]], summary: Any) -> list[str]:
    """What each file of a copy-machine job is, and how well each copier did."""
    lines = []
    what = {"difference": "difference LoRA, pair {pair}: use it without the copier",
            "merged": "all pairs merged (SVD)", "copier": "copier, pair {pair}: reproduces the original"}
    for p, (role, pair) in roles.items():
        if role in what:
            lines.append(f"- `{p.name}`: {what[role].format(pair=pair)}")
    pairs = summary.get("pairs") if isinstance(summary, dict) else None
    for name, info in (pairs or {}).items():
        chk = info.get("copier_check") if isinstance(info, dict) else None
        if isinstance(chk, dict):
            lines.append(f"Copier check, pair {name}: {check_text(chk)}")
    return lines


def best_lora_note(files: list[tuple[Path, str]], best: Path, summary: dict[str, Any]
                   ) -> tuple[list[tuple[Path, str]], str]:
    """keep_best: (the files to post, a line saying which LoRA is which). When the last step had the lowest
    validation loss the best file holds the final weights: it is left out and the line says so."""
    step, last = summary.get("best_validation_step"), summary.get("steps")
    best_loss, last_loss = sig(summary.get("best_validation_loss"), 3), sig(summary.get("validation_loss"), 3)
    final = next((name for p, name in files if p != best and name.endswith(".safetensors")), None)
    best_name = next((name for p, name in files if p == best), best.name)
    where = f"step {step}" if step is not None else "the step it was saved"
    if best_loss is not None:
        where += f", validation loss {best_loss}"
    if final is not None and step is not None and step == last:
        return ([f for f in files if f[0] != best],
                f"The lowest validation loss was at the last step ({where}): `{final}` is also the best LoRA.")
    text = f"`{best_name}`: the LoRA with the lowest validation loss ({where})"
    if final is not None:
        after = f"step {last}" if last is not None else "the last step"
        if last_loss is not None:
            after += f", validation loss {last_loss}"
        text += f"; `{final}`: the LoRA after the last step ({after}). Try both."
    return files, text
