"""Progress fan-out: one live message per job, sample images as they come, and the final post.

The scheduler calls ``ProgressHub.on_event(job, event)`` for every engine event. Each job gets a
``JobReporter`` with a small loop that keeps only the newest state (coalescing: a burst of 100
progress events costs one edit) and edits the job's progress message at most once per
``progress_interval_s``. Discord caps edits of messages older than an hour (30046), so a fresh
progress message is started when the current one is older than ``fresh_after_s`` (50 min) or an
edit is refused. Everything is posted with the BOT token into the job's thread/DM (interaction
tokens die after 15 minutes). The job row is the source of truth for state; events only add detail,
so after a restart a reporter picks up from the database (message id included).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord

from bot import resume
from bot.delivery import ResultFiles, send_files, upload_limit
from bot.errors import CODE_EDIT_CAP
from bot.humanize import summary_text
from bot.interactions import DELIVERED_EVENT, META_EVENT, clip, spec_summary
from bot.once import post_once
from bot.progress_text import (  # the texts; render is re-exported for its callers
    COPIER_CHECK,
    DEFAULT_ADVICE,
    FAILURE_ADVICE,
    TERMINAL,
    best_lora_note,
    check_text,
    copier_check_caption,
    difference_lines,
    render,
)
from bot.views import job_view

if TYPE_CHECKING:
    from bot.app import LoraforgeBot

log = logging.getLogger("loraforge.progress")

__all__ = ["JobReporter", "ProgressHub", "render"]

FRESH_AFTER_S = 50 * 60
# A final post that fails is tried again after RETRY_BASE_S, doubling up to RETRY_MAX_S, FINAL_TRIES times
# in all; a job whose result never got out is posted again on the next start within REDELIVER_WINDOW_S.
RETRY_BASE_S = 5.0
RETRY_MAX_S = 300.0
FINAL_TRIES = 8
REDELIVER_WINDOW_S = 3 * 24 * 3600
class JobReporter:
    """One job's message loop. State is coalesced; samples and the final post are queued in order."""

    def __init__(self, hub: ProgressHub, job_id: int) -> None:
        self.hub = hub
        self.job_id = job_id
        self.state: dict[str, Any] = {}
        self.samples: list[dict[str, Any]] = []
        self.outputs: dict[str, Any] = {}
        self.terminal: dict[str, Any] | None = None  # set when the job row reached a final state
        self.final: dict[str, Any] = {}  # the engine's finished/failed/cancelled event
        self.dirty = True
        self.wake = asyncio.Event()
        self.wake.set()
        self.ended = asyncio.Event()  # set on the terminal event: cuts the throttle wait short
        self.edits = 0
        self.live_shown: tuple[Any, ...] | None = None  # the live preview now attached to the progress message
        self.failures = 0  # consecutive failed passes of the loop (retried with backoff)
        self.task: asyncio.Task[None] | None = None

    def feed(self, event: dict[str, Any]) -> None:
        t = event.get("type")
        st = self.state
        if t == "started":
            st["total_steps"] = event.get("total_steps")
            st["total"] = event.get("total_steps") or st.get("total")
            st["resumed_from"] = event.get("resumed_from") or 0
            st.pop("resumed", None)
            if event.get("mode") == "difference":
                st["difference"] = True
                st["pair_names"] = [str(n) for n in event.get("pairs") or []]
                st["overall_total"] = event.get("total_steps")
                st["overall_step"] = event.get("resumed_from") or 0
        elif t == "phase":
            st["phase"] = event.get("name")
            st["phase_current"], st["phase_total"] = event.get("current"), event.get("total")
            if st.get("difference"):
                # pair/pass come with every phase of a pass; a phase without them (merging) is job-wide
                if (event.get("pair"), event.get("pass")) != (st.get("progress_pair"), st.get("progress_pass")):
                    for k in ("loss", "lr", "steps_per_s"):  # the last pass's numbers are not this one's
                        st.pop(k, None)
                st["pair"], st["pass"] = event.get("pair"), event.get("pass")
                if "pair_index" in event:
                    st["pair_index"], st["pairs"] = event.get("pair_index"), event.get("pairs")
        elif t == "progress":
            for k in ("step", "total", "loss", "lr", "steps_per_s", "eta_s", "overall_step", "overall_total"):
                if k in event:
                    st[k] = event[k]
            if "pair" in event:
                st["progress_pair"], st["progress_pass"] = event.get("pair"), event.get("pass")
        elif t == "quota_wait":  # bot/quotas.py: held in the queue by the daily quota, and until when
            st["quota_wait"] = event.get("message")
        elif t == "sample":
            self.samples.append(event)
        elif t == "preview":  # a live preview of the image being sampled (trainer.infer.live)
            st["live"] = {k: event.get(k) for k in ("path", "step", "total", "label")}
        elif t == "file" and event.get("kind") == "image" and event.get("phase") == COPIER_CHECK:
            # posted between the passes, not kept for the final post
            self.samples.append({**event, "type": COPIER_CHECK})
            st.setdefault("checks", {})[str(event.get("pair", "?"))] = check_text(event)
        elif t == "file":
            self.outputs.setdefault(str(event.get("kind")), []).append(event.get("path"))
        elif t in ("finished", "cancelled", "failed"):
            # The engine's last word: outputs and the reason. The job row changes state right
            # after (a "state" event); that is what ends the reporter.
            self.final = event
            if isinstance(event.get("outputs"), dict):
                for k, v in event["outputs"].items():
                    if isinstance(v, dict):  # difference jobs: {"loras": {pair: path}}
                        v = list(v.values())
                    self.outputs.setdefault(str(k), []).extend(v if isinstance(v, list) else [v])
            if t == "failed":
                st["error"] = event.get("error")
        elif t == "state":
            state = event.get("state")
            if state == "queued":
                st["resumed"] = bool(event.get("reason"))  # restart recovery / worker lost
            elif state == "running":
                st.pop("resumed", None)
            elif state in TERMINAL:
                self.terminal = {"state": state, "error": event.get("error")}
        else:
            return  # log lines, reports: not shown in the progress message
        if self.terminal is not None:
            self.ended.set()
        self.dirty = True
        self.wake.set()

    def start(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._loop(), name=f"progress-{self.job_id}")

    async def _loop(self) -> None:
        try:
            await self._run()
        finally:
            if self.hub.reporters.get(self.job_id) is self and self.terminal is not None:
                del self.hub.reporters[self.job_id]  # finished jobs hold no memory

    async def _run(self) -> None:
        hub, bot = self.hub, self.hub.bot
        await hub.wait_bound(self.job_id)
        while not hub.closed:
            await self.wake.wait()
            self.wake.clear()
            if (gate := getattr(bot, "ack_gate", None)) is not None:
                await gate.wait_turn()  # commands waiting for their first answer go first (bot.ackgate)
            try:
                job = await bot.repo.get_job(self.job_id)
                if job is None:
                    return
                if job.is_terminal and self.terminal is None:
                    # The row says it ended but we saw no event (restart, or the scheduler only
                    # changed the state): finish from the row.
                    self.terminal = {"state": job.state, "error": job.error}
                    self.ended.set()
                while self.samples:
                    await self._post_sample(job, self.samples.pop(0))
                if self.terminal is not None:
                    try:  # the last edit of the progress message must not hold the result back
                        await self._flush(await bot.repo.get_job(self.job_id) or job)
                    except discord.HTTPException as e:
                        log.info("could not show the end of job %s in its progress message (%s %s)",
                                 self.job_id, e.status, e.code)
                elif self.dirty:
                    self.dirty = False
                    await self._flush(job)
                if self.terminal is not None:
                    await self._finish()
                    return
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - progress must never take the bot down; retry later
                self.failures += 1
                log.exception("progress update for job %s failed (try %d)", self.job_id, self.failures)
                if self.terminal is not None and self.failures >= FINAL_TRIES:
                    # Not marked delivered: the next start of the bot tries again (track_open_jobs).
                    log.error("giving up posting the result of job %s after %d tries; it is tried again on the "
                              "next start, and its files stay in the job folder", self.job_id, self.failures)
                    return
                # Nothing else would wake us for a job that has ended: retry on a timer (a running job's
                # end cuts the wait short).
                self.dirty = True
                delay = min(hub.retry_max_s, hub.retry_base_s * 2 ** (self.failures - 1))
                if self.terminal is None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.ended.wait(), delay)
                else:
                    await asyncio.sleep(delay)
                self.wake.set()
                continue
            self.failures = 0
            # Throttle: at most one edit per interval, but a job's end is shown at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), hub.interval_s)

    def _destination(self, job: Any) -> discord.PartialMessageable | None:
        cid = job.thread_id or job.channel_id
        return self.hub.bot.get_partial_messageable(int(cid)) if cid else None

    async def _final_destinations(self, job: Any) -> AsyncIterator[tuple[Any, bool, bool]]:
        """Where the result may go, in order, as (destination, private, last): the job's thread (or DM),
        the owner's DMs, then the channel the command ran in. A result must reach its owner even when the
        thread was deleted or the bot lost access to it, but the files stay private: the channel only gets
        a notice. The DM channel is only opened when the thread failed."""
        bot = self.hub.bot
        thread = int(job.thread_id or 0)
        channel = int(job.channel_id or 0) if int(job.channel_id or 0) != thread else 0
        if thread:
            yield bot.get_partial_messageable(thread), True, False
        try:
            dm = await bot.create_dm(discord.Object(id=int(job.owner_id)))
        except discord.HTTPException as e:
            log.info("no DM channel with the owner of job %s (%s)", job.id, e.status)
        else:
            if dm.id != thread:
                yield dm, True, not channel
        if channel:
            yield bot.get_partial_messageable(channel), False, True

    async def _flush(self, job: Any) -> None:
        bot = self.hub.bot
        dest = self._destination(job)
        if dest is None:
            return
        if job.state == "queued":
            pos, starts = await bot.queue_info(job.id, until_start=True)  # the message says "starts in"
            self.state["position"], self.state["queue_eta_s"] = pos, starts
        if "difference" not in self.state and job.spec.get("mode") == "difference":
            # after a restart, before the engine's "started": still render as a pair/pass job
            self.state["difference"] = True
            self.state["pair_names"] = [str(p.get("name")) for p in (job.spec.get("difference") or {}).get(
                "pairs") or [] if isinstance(p, dict)]
        if job.progress and "step" not in self.state:
            # After a restart the last persisted progress seeds the message.
            for k, v in job.progress.items():
                self.state.setdefault(k, v)
        text = render(job, self.state)
        view = job_view(job.id) if not job.is_terminal else None
        mid = job.message_id
        if mid and time.time() - discord.utils.snowflake_time(int(mid)).timestamp() < self.hub.fresh_after_s:
            try:
                live = self._live_attachment(job)
                extra: dict[str, Any] = {} if live is False else {"attachments": [] if live is None else [live]}
                await dest.get_partial_message(int(mid)).edit(content=text, view=view, **extra)
                self.edits += 1
                return
            except discord.NotFound:
                log.info("progress message of job %s is gone; starting a new one", job.id)
            except discord.HTTPException as e:
                if e.code != CODE_EDIT_CAP:
                    raise
                log.info("progress message of job %s hit the edit cap; starting a new one", job.id)
        kwargs: dict[str, Any] = {"view": view} if view is not None else {}
        # Keyed by the message it replaces: a restart after Discord made it, before we read the id, finds it.
        new_id, posted = await post_once(bot, job.id, f"progress:{mid or 0}", dest, f"**Job #{job.id}**",
                                         lambda nonce: dest.send(text, nonce=nonce, **kwargs), replaces=mid)
        if new_id is not None:
            await bot.repo.set_job_message(job.id, message_id=new_id)
            if not posted:  # made before a restart: show what is current now
                await dest.get_partial_message(int(new_id)).edit(content=text, view=view)

    def _live_attachment(self, job: Any) -> discord.File | None | bool:
        """What the progress message's attachments become: a new live preview (File), none (None: the job ended or
        moved on, so the preview goes), or unchanged (False)."""
        live = self.state.get("live")
        if job.is_terminal or job.state != "running" or not live:
            if self.live_shown is None:
                return False
            self.live_shown = None
            self.state.pop("live", None)
            return None
        key = (live.get("path"), live.get("step"), live.get("label"))
        path = self.hub.results.resolve_path(job.id, live.get("path"))
        if key == self.live_shown or path is None:
            return False
        try:
            data = path.read_bytes()  # read now: the engine replaces the file with the next preview
        except OSError:
            return False
        self.live_shown = key
        return discord.File(io.BytesIO(data), filename="live-preview.png")

    async def _post_sample(self, job: Any, ev: dict[str, Any]) -> None:
        path = self.hub.results.resolve_path(job.id, ev.get("path"))
        dest = self._destination(job)
        if path is None or dest is None:
            return
        if ev.get("type") == COPIER_CHECK:
            caption = copier_check_caption(ev)
        else:
            caption = f"Sample at step {ev.get('step', '?')}"
            if ev.get("pair") is not None:
                caption += f" (pair {ev['pair']}, pass {ev.get('pass', '?')})"
        if ev.get("prompt") and ev.get("type") != COPIER_CHECK:
            caption += f": *{clip(str(ev['prompt']), 300)}*"
        try:
            await post_once(self.hub.bot, job.id, f"sample:{ev.get('type')}:{path.name}", dest, caption,
                            lambda nonce: dest.send(caption, file=discord.File(path, filename=path.name), nonce=nonce))
        except discord.HTTPException as e:
            log.info("could not post sample %s of job %s: %s", path.name, job.id, e.status)

    async def _finish(self) -> None:
        hub, bot = self.hub, self.hub.bot
        if await hub.already_delivered(self.job_id):
            return
        job = await bot.repo.get_job(self.job_id)
        if job is None:
            return
        if not (job.thread_id or job.channel_id):
            log.warning("job %s finished but has nowhere to post", job.id)
            return
        posted = False
        async for dest, private, last in self._final_destinations(job):
            try:
                # Every final post starts so; once per job, even across a crash between post and reply.
                post = self._post_final if private or job.state != "succeeded" else self._post_notice
                await post_once(bot, job.id, "final", dest, f"<@{job.owner_id}> job **#{job.id}** ",
                                functools.partial(post, job, dest))
                posted = True
                break
            except (discord.NotFound, discord.Forbidden) as e:
                if last:
                    raise
                log.warning("could not post the result of job %s in %s (%s %s); trying the next place",
                            job.id, dest.id, e.status, e.code)
        if not posted:
            raise RuntimeError(f"nowhere could take the result of job {job.id}")  # retried by the loop
        await bot.repo.add_event(job.id, DELIVERED_EVENT, {"state": job.state})

    async def _post_notice(self, job: Any, dest: Any, nonce: str) -> discord.Message:
        """A finished job's files are private: where others can read, only say where to get them."""
        allowed = discord.AllowedMentions(users=[discord.Object(job.owner_id)], roles=False, everyone=False)
        return await dest.send(f"<@{job.owner_id}> job **#{job.id}** finished, but its thread is gone and your DMs are "
                        f"closed to this bot. Run `/job show {job.id}` for a private download link.",
                               allowed_mentions=allowed, nonce=nonce)

    async def _post_final(self, job: Any, dest: Any, nonce: str) -> discord.Message:
        mention = f"<@{job.owner_id}>"
        allowed = discord.AllowedMentions(users=[discord.Object(job.owner_id)], roles=False, everyone=False)
        if job.state == "succeeded":
            return await self._deliver_success(job, dest, mention, allowed, nonce)
        elif job.state == "failed":
            reason = self.final.get("reason") or ""
            error = job.error or (self.terminal or {}).get("error") or self.final.get("error") or "unknown error"
            advice = FAILURE_ADVICE.get(str(reason), DEFAULT_ADVICE)
            return await dest.send(clip(f"{mention} job **#{job.id}** failed: {error}\n{advice}"),
                                   allowed_mentions=allowed, nonce=nonce)
        saved = resume.saved_step(self.hub.bot.files, job.id) if job.kind == "train" else None
        again = (f"Its training state at step {saved} is saved: `/resume {job.id}` continues from there, "
                 f"`/retrain {job.id}` starts over." if saved else f"`/retrain {job.id}` starts it again.")
        return await dest.send(f"{mention} job **#{job.id}** was cancelled. {again}", allowed_mentions=allowed,
                               nonce=nonce)

    async def _deliver_success(
        self, job: Any, dest: discord.PartialMessageable, mention: str, allowed: discord.AllowedMentions, nonce: str
    ) -> discord.Message:
        hub, bot = self.hub, self.hub.bot
        difference = job.spec.get("mode") == "difference"
        if difference:
            files, roles = await hub.results.difference_files(job.id, self.outputs)
        else:
            (files, best), roles = await hub.results.result_files(job.id, self.outputs), {}
        meta = await hub.job_meta(job.id)
        guild = bot.get_guild(job.guild_id) if job.guild_id else None
        # link_only (checkpoints: gigabytes): every file goes out as a signed link, never attached.
        limit = 0 if meta.get("link_only") else upload_limit(meta.get("attachment_size_limit"), guild)
        summary = self.final.get("summary") or {}
        lines = [f"{mention} job **#{job.id}** finished."]
        lines.append(f"Settings: {spec_summary(job.spec_json)}")
        if isinstance(summary, dict) and summary and (extra := summary_text(summary)):
            lines.append(f"Summary: {extra}")
        if difference:
            lines += difference_lines(roles, summary)
        elif best is not None:  # keep_best: say which file is which, or drop the copy of the final one
            files, note = best_lora_note(files, best, summary if isinstance(summary, dict) else {})
            lines.append(note)
        if not files:
            lines.append("The engine reported no output files; ask an admin to look at the job folder.")

        async def make_link(p: Path) -> str | None:
            return await hub.results.link_for(job.id, p)

        names = {p: n for p, n in files}
        msg, _ = await send_files(dest, clip("\n".join(lines)), [p for p, _ in files], limit=limit,
                                  make_link=make_link, names=names, allowed_mentions=allowed, nonce=nonce)
        return msg


class ProgressHub:
    """Scheduler listener; owns one reporter per job that is being reported on."""

    def __init__(self, bot: LoraforgeBot, interval_s: float, fresh_after_s: float = FRESH_AFTER_S) -> None:
        self.bot = bot
        self.interval_s = float(interval_s)
        self.fresh_after_s = float(fresh_after_s)
        self.reporters: dict[int, JobReporter] = {}
        self._bound: dict[int, asyncio.Event] = {}
        self.closed = False
        self.retry_base_s = RETRY_BASE_S
        self.retry_max_s = RETRY_MAX_S
        self.results = ResultFiles(bot)  # which files a job delivers, and their download links

    # -- the scheduler side

    def on_event(self, job: Any, event: dict[str, Any]) -> None:
        """Called by the scheduler for each event (``job``: row or id). Never blocks, never raises."""
        try:
            job_id = int(job if isinstance(job, int) else job.id)
            rep = self._reporter(job_id)
            rep.feed(dict(event))
            if event.get("type") in ("started", "state"):
                self.refresh_queued(except_id=job_id)  # the queue moved
        except Exception:  # noqa: BLE001
            log.exception("progress listener failed on %r", event)

    def _reporter(self, job_id: int) -> JobReporter:
        rep = self.reporters.get(job_id)
        if rep is None or (rep.task is not None and rep.task.done()):
            rep = JobReporter(self, job_id)
            self.reporters[job_id] = rep
        if not self.closed:
            rep.start()
        return rep

    def nudge(self, job_id: int) -> None:
        """Re-render a job's message soon (e.g. after a cancel request)."""
        rep = self._reporter(job_id)
        rep.dirty = True
        rep.wake.set()

    def refresh_queued(self, except_id: int | None = None) -> None:
        for jid, rep in list(self.reporters.items()):
            if jid != except_id and rep.terminal is None and "step" not in rep.state:
                rep.dirty = True
                rep.wake.set()

    async def track_open_jobs(self) -> None:
        """On start-up: resume the messages of every queued/running job (after a restart), and post the
        results of jobs that ended while nobody could post them (the bot was stopping, or Discord kept
        refusing), if they ended within REDELIVER_WINDOW_S."""
        repo = self.bot.repo
        for job in await repo.list_jobs(states=("queued", "running")):
            rep = self._reporter(job.id)
            if job.state == "queued" and job.attempts:
                rep.state["resumed"] = True
            rep.dirty = True
            rep.wake.set()
        since = time.time() - REDELIVER_WINDOW_S
        for job in await repo.list_jobs(states=TERMINAL, newest_first=True, limit=500):
            if not (job.thread_id or job.channel_id) or (job.finished_at or 0) < since:
                continue
            if job.id in self.reporters or await self.already_delivered(job.id):
                continue
            log.info("job %s ended without its result posted; posting it now", job.id)
            self.bind(job.id)  # its destination was set up long ago

    # -- the submitter side: the destination is set up right after the job is queued

    def expect(self, job_id: int) -> None:
        self._bound.setdefault(job_id, asyncio.Event())

    def bind(self, job_id: int) -> None:
        self._bound.setdefault(job_id, asyncio.Event()).set()
        self.nudge(job_id)

    async def wait_bound(self, job_id: int, timeout: float = 30.0) -> None:
        ev = self._bound.get(job_id)
        if ev is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ev.wait(), timeout)

    async def close(self) -> None:
        self.closed = True
        tasks = [r.task for r in self.reporters.values() if r.task is not None and not r.task.done()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def wait_idle(self, job_id: int, timeout: float = 30.0) -> None:
        """Tests and tools: wait until the job's reporter has made its final post."""
        rep = self.reporters.get(job_id)
        if rep is not None and rep.task is not None:
            await asyncio.wait_for(asyncio.shield(rep.task), timeout)

    async def job_meta(self, job_id: int) -> dict[str, Any]:
        events = await self.bot.repo.list_events(job_id, types=[META_EVENT])
        return events[-1].payload if events else {}

    async def already_delivered(self, job_id: int) -> bool:
        return bool(await self.bot.repo.list_events(job_id, types=[DELIVERED_EVENT], limit=1))
