"""The strength x seed check grid after every successful /train, posted by itself.

A scheduler listener: when a ``train`` job reaches ``succeeded`` it queues a follow-up ``preview``
job for the same owner with the trained LoRA and ``GridSpec`` defaults (strengths -1..2 x seeds
1111/2222/3333), prompted with what the LoRA was trained on. The follow-up reports into the train
job's thread: it is submitted with that thread as its channel, its ``thread_id`` is set, and the
train job's META event (upload limit, destination kind) is copied, so the progress hub posts the
grid there with the bot token like any other result. /merge jobs render their grid themselves.

Copy-machine (difference) jobs write several LoRAs (artifact meta ``role``): the grid is of the merged
LoRA when there is one, else of each pair's pass-2 LoRA (at most ``MAX_GRIDS``); copiers never get one.
Their grid prompt is the difference prompt (often empty: the LoRA was trained without words).

Once per job: a marker event on the train job means a second ``succeeded`` (or a replayed event)
queues nothing more, and a train job that already produced a ``grid`` artifact (an engine that
renders it at the end of training) gets no second one.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.interactions import META_EVENT
from trainer.spec import GridSpec, LoraRef, PreviewSpec

if TYPE_CHECKING:
    from bot.app import LoraforgeBot

log = logging.getLogger("loraforge.autogrid")

AUTOGRID_EVENT = "discord.autogrid"  # on the train job: {"preview_job_id": id}
MAX_GRIDS = 3  # a difference job with many pairs: grids of the first three


def train_prompt(spec: dict[str, Any]) -> str:
    """The user's sample prompt, else the instance prompt (trigger word + class), else the trigger
    word: what the LoRA should respond to. A difference LoRA: the sample prompt, else its training
    prompt. "" when the job trained without words (then ``caption_prompt`` may find some); never the
    file name, which the LoRA never saw."""
    for p in (spec.get("sample") or {}).get("prompts") or []:
        if isinstance(p, dict) and str(p.get("prompt", "")).strip():
            return str(p["prompt"]).strip()
    if spec.get("mode") == "difference":
        return str((spec.get("difference") or {}).get("prompt") or "").strip()
    for c in spec.get("concepts") or []:
        if isinstance(c, dict) and str(c.get("instance_prompt", "")).strip():
            return str(c["instance_prompt"]).strip()
    trig = (spec.get("data") or {}).get("trigger_word")
    return str(trig or "").strip()


def caption_prompt(spec: dict[str, Any], max_files: int = 2000) -> str:
    """The most frequent caption tag (comma-separated part) of a train job's images: what a LoRA trained
    without a trigger word responds to. Reads the dataset snapshot's .txt files (blocking: call it in a
    thread). "" when there are none."""
    counts: Counter[str] = Counter()
    seen = 0
    for c in spec.get("concepts") or []:
        folder = Path(str(c.get("image_dir") or "")) if isinstance(c, dict) else None
        if folder is None or not str(folder) or not folder.is_dir():
            continue
        for txt in sorted(folder.glob("*.txt")):
            seen += 1
            if seen > max_files:
                break
            try:
                text = txt.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            counts.update({t.strip() for t in text.split(",") if t.strip()})
    return counts.most_common(1)[0][0][:200] if counts else ""


class AutoGrid:
    """Registered by ``cogs/preview.py`` with ``bot.scheduler.add_listener(autogrid.on_event)``."""

    def __init__(self, bot: LoraforgeBot, grid_overrides: dict[str, Any] | None = None) -> None:
        self.bot = bot
        # GridSpec fields applied over the defaults (tests use fewer steps; a server could too).
        self.grid_overrides: dict[str, Any] = dict(grid_overrides or {})
        self.enabled = True

    async def on_event(self, job: Any, ev: dict[str, Any]) -> None:
        if not self.enabled or ev.get("type") != "state" or ev.get("state") != "succeeded":
            return
        if getattr(job, "kind", None) != "train":
            return
        try:
            await self.submit_for(job)
        except Exception:  # noqa: BLE001 - a missing grid must never disturb the job's own delivery
            log.exception("could not queue the check grid of job %s", getattr(job, "id", "?"))

    def _path(self, stored: str) -> Path:
        path = Path(stored)
        return path if path.is_absolute() else self.bot.files.resolve(stored)

    async def grid_targets(self, job: Any) -> list[tuple[Path, str]]:
        """(LoRA, output name of its grid job): the final LoRA of a standard job; for a difference job the
        merged LoRA, else each pair's pass-2 LoRA (never a copier: it only reproduces the original)."""
        arts = await self.bot.repo.list_artifacts(job.id, "lora")
        if not arts:
            return []
        name = str(job.spec.get("output_name") or "lora")
        if job.spec.get("mode") != "difference":
            return [(self._path(arts[-1].path), f"{name}-check")]
        merged = [a for a in arts if a.meta.get("role") == "merged"]
        if merged:
            return [(self._path(merged[-1].path), f"{name}-merged-check")]
        out: dict[Path, str] = {}
        for a in arts:
            if a.meta.get("role") == "difference":
                pair = "_".join(str(a.meta.get("pair") or "pair").split())
                out.setdefault(self._path(a.path), f"{name}-{pair}-check")
        return list(out.items())[:MAX_GRIDS]

    async def submit_for(self, job: Any) -> Any | None:
        """Queue the grid job(s) for a succeeded train job; returns the first one (None when there is
        nothing to do)."""
        repo = self.bot.repo
        if await repo.list_events(job.id, types=[AUTOGRID_EVENT], limit=1):
            return None  # already queued once
        if await repo.list_artifacts(job.id, "grid"):
            return None  # the train job rendered its grid itself: one grid per job is enough
        targets = await self.grid_targets(job)
        if not targets:
            return None
        spec = job.spec
        prompt = train_prompt(spec) or await asyncio.to_thread(caption_prompt, spec)
        grid = GridSpec(**{"prompt": prompt, **self.grid_overrides})
        previews = [PreviewSpec(base_model=str(spec.get("base_model") or "tiny-sd15"),
                                loras=[LoraRef(path=str(path), strength=1.0)], grid=grid, output_name=out_name)
                    for path, out_name in targets]
        dest = job.thread_id or job.channel_id
        # The marker goes first: if the submit below fails, no retry loop can queue grids twice.
        await repo.add_event(job.id, AUTOGRID_EVENT, {"state": "submitting"})
        meta = await repo.list_events(job.id, types=[META_EVENT])
        first = None
        for preview in previews:
            # Part of the job the user already ran: queue it past the per-user queue limit (is_admin only
            # lifts quotas here; the priority stays 0).
            # The train job's delivery facts (upload limit, destination) travel with the grid job from the
            # start: recorded before it can be dispatched, so even an instant grid job reads them.
            events = [(META_EVENT, {**meta[-1].payload, "follows_job": job.id})] if meta else []
            new = await self.bot.scheduler.submit(job.owner_id, "preview", preview, job.guild_id, dest,
                                                  is_admin=True, events=events, thread_id=job.thread_id)
            await repo.add_event(job.id, AUTOGRID_EVENT, {"preview_job_id": new.id})
            log.info("job %s: check grid queued as job %s", job.id, new.id)
            first = first or new
        return first
