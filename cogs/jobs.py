"""/jobs, /job show, /job delete, /cancel, /retrain, /resume: looking after queued, running and finished jobs.

Only the owner or an admin sees a job's details, cancels, deletes or retrains it; for anyone else a job
id looks like one that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands
from discord.ext import commands

from bot import resume
from bot.errors import InvalidInput, reply
from bot.interactions import announce_job, cancel_job, clip, ensure_deferred, format_duration, spec_summary
from bot.options import JobId
from bot.plan import submit_plan_line
from bot.specs import TrainSpec

if TYPE_CHECKING:
    from bot.app import LoraforgeBot

STATE_ICON = {"queued": "\u23f3", "running": "\u25b6\ufe0f", "succeeded": "\u2705", "failed": "\u274c",
              "cancelled": "\u23f9\ufe0f"}


def _when(ts: float | None) -> str:
    return f"<t:{int(ts)}:R>" if ts else "-"


def _progress_bit(job: Any) -> str:
    p = job.progress or {}
    if job.state == "running" and p.get("step") is not None and p.get("total"):
        return f" {int(100 * float(p['step']) / float(p['total']))}% (step {p['step']}/{p['total']})"
    return ""


async def _job_ac(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[int]]:
    bot: LoraforgeBot = interaction.client  # type: ignore[assignment]
    admin = bot.access.is_admin(interaction)
    try:
        # Filter a wider window than the 25 choices Discord shows, so typing finds older jobs too;
        # admins look up everyone's jobs (cancel, show and retrain accept them).
        jobs = await bot.repo.list_jobs(owner_id=None if admin else interaction.user.id, newest_first=True,
                                        limit=500)
    except Exception:  # noqa: BLE001 - autocomplete must answer, even with nothing
        return []
    out = []
    needle = current.strip().lstrip("#").lower()
    for j in jobs:
        owner = f" (user {j.owner_id})" if admin and j.owner_id != interaction.user.id else ""
        label = f"#{j.id} {j.kind} {j.state} {j.spec.get('output_name', '')}{owner}"
        if needle and needle not in label.lower():
            continue
        out.append(app_commands.Choice(name=label[:100], value=j.id))
    return out[:25]


class Jobs(commands.Cog):
    job = app_commands.Group(name="job", description="One job")

    def __init__(self, bot: LoraforgeBot) -> None:
        self.bot = bot

    @app_commands.command(name="jobs", description="Your jobs (admins: everyone's with all=True)")
    @app_commands.describe(all="Admins: show every user's jobs", active="Only queued and running jobs")
    async def jobs(self, interaction: discord.Interaction, all: bool = False, active: bool = False) -> None:  # noqa: A002
        await ensure_deferred(interaction, ephemeral=True)
        bot = self.bot
        everyone = all and bot.access.is_admin(interaction)
        states = ("queued", "running") if active else None
        rows = await bot.repo.list_jobs(owner_id=None if everyone else interaction.user.id, states=states,
                                        newest_first=True, limit=25)
        note = "(Only admins can see everyone's jobs; these are yours.)\n" if all and not everyone else ""
        if not rows:
            owner = None if everyone else interaction.user.id
            if active and await bot.repo.list_jobs(owner_id=owner, newest_first=True, limit=1):
                text = ("Nothing is queued or running" + (" for anyone." if everyone else " for you.")
                        + " See finished jobs with `/jobs`, or start one with `/train`.")
            else:
                text = "No jobs yet. Start one with `/train`."
            await reply(interaction, note + text, ephemeral=True)
            return
        lines = []
        for j in rows:
            extra = ""
            if j.state == "queued":
                pos, _ = await bot.queue_info(j.id)
                extra = f" position {pos}" if pos else ""
            who = f" <@{j.owner_id}>" if everyone else ""
            where = f" <#{j.thread_id}>" if j.thread_id else ""
            lines.append(f"{STATE_ICON.get(j.state, '')} **#{j.id}** {j.kind} `{j.spec.get('output_name', '')}` "
                         f"{j.state}{_progress_bit(j)}{extra} · {_when(j.created_at)}{who}{where}")
        await reply(interaction, clip(note + "\n".join(lines)), ephemeral=True)

    @job.command(name="show", description="Details of one of your jobs")
    @app_commands.autocomplete(id=_job_ac)
    async def show(self, interaction: discord.Interaction, id: JobId) -> None:  # noqa: A002
        await ensure_deferred(interaction, ephemeral=True)
        bot = self.bot
        job = await bot.repo.get_job(id)
        bot.access.require_job_access(interaction, job)
        lines = [f"{STATE_ICON.get(job.state, '')} **Job #{job.id}** · {job.kind} · {job.state}{_progress_bit(job)}"]
        lines.append(f"Owner: <@{job.owner_id}> · created {_when(job.created_at)}"
                     + (f" · started {_when(job.started_at)}" if job.started_at else "")
                     + (f" · finished {_when(job.finished_at)}" if job.finished_at else ""))
        if job.state == "queued":
            pos, eta = await bot.queue_info(job.id)
            if pos:
                lines.append(f"Position in queue: {pos}" + (f", done in about {format_duration(eta)}" if eta else ""))
        elif job.state == "running":
            _, eta = await bot.queue_info(job.id)
            if eta:
                lines.append(f"About {format_duration(eta)} left.")
        if job.error:
            lines.append(f"Error: {clip(job.error, 500)}")
        lines.append(f"Settings: {spec_summary(job.spec_json)}")
        if job.gpu_seconds:
            lines.append(f"Device time: {format_duration(job.gpu_seconds)}")
        arts = [a for a in await bot.repo.list_artifacts(job.id) if a.kind in ("lora", "checkpoint", "grid", "plot")]
        if arts:
            lines.append("Files: " + ", ".join(f"{a.kind} `{a.path.rsplit('/', 1)[-1]}`" for a in arts[-6:]))
            if bot.file_server is not None:
                main = [a for a in arts if a.kind in ("lora", "checkpoint")]
                if main:
                    lines.append(f"Download: <{bot.file_server.url_for(job.id, main[-1].id)}>")
        if job.thread_id:
            lines.append(f"Progress: <#{job.thread_id}>")
        await reply(interaction, clip("\n".join(lines)), ephemeral=True)

    @app_commands.command(name="cancel", description="Cancel one of your queued or running jobs")
    @app_commands.autocomplete(id=_job_ac)
    async def cancel(self, interaction: discord.Interaction, id: JobId) -> None:  # noqa: A002
        await ensure_deferred(interaction, ephemeral=True)
        text = await cancel_job(interaction, id)
        await reply(interaction, text, ephemeral=True)

    @job.command(name="delete", description="Delete one of your finished jobs and its files")
    @app_commands.autocomplete(id=_job_ac)
    @app_commands.describe(id="The job's number", confirm="Set to True: its LoRA, samples and logs cannot be recovered")
    async def delete(self, interaction: discord.Interaction, id: JobId, confirm: bool = False) -> None:  # noqa: A002
        await ensure_deferred(interaction, ephemeral=True)
        bot = self.bot
        job = await bot.repo.get_job(id)
        bot.access.require_job_access(interaction, job)  # others' jobs look like missing ones
        if not job.is_terminal:
            raise InvalidInput(f"Job #{job.id} is {job.state}; only finished jobs can be deleted.",
                               f"Cancel it first with `/cancel {job.id}`.")
        if not confirm:
            await reply(interaction, f"This deletes job **#{job.id}** ({job.kind} `{job.spec.get('output_name', '')}`)"
                        " with its files and download links for good. Run the command again with `confirm: True` "
                        "to do it.", ephemeral=True)
            return
        await bot.service.delete_job(job.id)
        await reply(interaction, f"Deleted job #{job.id} and its files.", ephemeral=True)

    @app_commands.command(name="retrain", description="Run one of your jobs again with exactly the same settings")
    @app_commands.autocomplete(id=_job_ac)
    async def retrain(self, interaction: discord.Interaction, id: JobId) -> None:  # noqa: A002
        bot = self.bot
        bot.access.require_trainer(interaction)
        await ensure_deferred(interaction, ephemeral=True)
        old = await bot.repo.get_job(id)
        bot.access.require_job_access(interaction, old)
        checkpoint = old.kind == "merge" and bool(old.spec.get("into_checkpoint"))
        if checkpoint:
            # The same rules as /merge into_checkpoint: admins only, delivered by link (gigabytes).
            bot.access.require_admin(interaction)
        plan = ""
        if old is not None and old.kind == "train":
            # The card may have changed since the first run (another worker, a new gpu_memory_gib): check again.
            try:
                spec = TrainSpec.model_validate(old.spec)
            except ValueError:
                spec = None  # a spec this version no longer reads: the engine says what is wrong with it
            if spec is not None:
                plan = submit_plan_line(bot, spec)
        job = await bot.scheduler.retrain(id, interaction.user.id, bot.access.is_admin(interaction),
                                          guild_id=interaction.guild_id, channel_id=interaction.channel_id)
        await announce_job(interaction, job, title=f"{job.spec.get('output_name', job.kind)} (retrain of #{id})",
                           summary=plan.strip(),
                           meta={"link_only": True} if checkpoint else None)

    @app_commands.command(name="resume", description="Continue a cancelled training job from the step it saved")
    @app_commands.autocomplete(id=_job_ac)
    @app_commands.describe(id="The job's number",
                           steps="A new total number of steps (to train a finished job further)")
    async def resume(self, interaction: discord.Interaction, id: JobId,  # noqa: A002
                     steps: app_commands.Range[int, 1, 100000] | None = None) -> None:
        bot = self.bot
        bot.access.require_trainer(interaction)
        await ensure_deferred(interaction, ephemeral=True)
        old = await bot.repo.get_job(id)
        bot.access.require_job_access(interaction, old)
        saved = await asyncio.to_thread(resume.saved_step, bot.files, old.id)
        spec = resume.continued_spec(old, saved, steps)
        plan = ""
        with contextlib.suppress(ValueError):  # a spec this version no longer reads: the engine says what is wrong
            plan = submit_plan_line(bot, TrainSpec.model_validate(spec))
        job = await bot.scheduler.submit(interaction.user.id, "train", spec, interaction.guild_id,
                                         interaction.channel_id, is_admin=bot.access.is_admin(interaction),
                                         events=[(resume.CONTINUES_EVENT, {"job_id": old.id, "step": saved})])
        await announce_job(interaction, job, summary=plan.strip(),
                           title=f"{spec.get('output_name', 'train')} (continues #{id} from step {saved})")


async def setup(bot: LoraforgeBot) -> None:
    await bot.add_cog(Jobs(bot))
