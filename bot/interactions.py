"""Helpers every cog uses: permission checks, attachment download, job submission.

A cog for a new job kind (``/merge``, ``/preview``) needs only:
    access = bot.access; access.require_trainer(interaction)
    files  = await download_attachments([...], max_bytes=...)
    spec   = <validate into a trainer.spec model>          (SpecError -> shown by bot.errors)
    await submit_job(interaction, kind="merge", spec=spec, title="merge: my-lora")
``submit_job`` defers if needed, queues the job, opens its thread (or DM), hooks up the progress
message and the final delivery, and answers with the queue position and ETA.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import discord

from bot.ackgate import wait_turn
from bot.config import BUILTIN_MODELS, list_base_models
from bot.errors import InvalidInput, NotFound, PermissionDenied, UserError, reply
from bot.humanize import format_duration
from storage.names import display_file_name

if TYPE_CHECKING:
    from bot.app import LoraforgeBot

log = logging.getLogger("loraforge.interactions")

MiB = 1024 * 1024
META_EVENT = "discord.meta"  # job event holding where the job reports and its upload limit
DELIVERED_EVENT = "discord.delivered"  # job event marking the final post as done (no double posts)


async def maybe_await(value: Any) -> Any:
    """Other rooms' APIs may be sync or async; accept both."""
    if inspect.isawaitable(value):
        return await value
    return value


# ---------------------------------------------------------------------------------- permissions


def _role_ids(user: discord.abc.User) -> set[int]:
    # Member._roles holds the raw ids from the interaction payload; Member.roles drops ids whose
    # Role objects are not cached (interactions without the gateway guild cache).
    raw = getattr(user, "_roles", None)
    if raw is not None:
        return {int(r) for r in raw}
    return {r.id for r in getattr(user, "roles", [])}


@dataclass
class Access:
    """Who may do what. Admins: listed users, listed roles, or members with the Administrator
    permission. Trainers: admins, and members of a trainer role (everyone when none is set)."""

    admin_user_ids: set[int] = field(default_factory=set)
    admin_role_ids: set[int] = field(default_factory=set)
    trainer_role_ids: set[int] = field(default_factory=set)
    allow_dms: bool = False

    @classmethod
    def from_config(cls, config: Any) -> Access:
        d = config.discord
        return cls(
            admin_user_ids=set(d.admin_user_ids),
            admin_role_ids=set(d.admin_role_ids),
            trainer_role_ids=set(d.trainer_role_ids),
            allow_dms=bool(d.allow_dms),
        )

    def is_admin(self, interaction: discord.Interaction) -> bool:
        user = interaction.user
        if user.id in self.admin_user_ids:
            return True
        if self.admin_role_ids & _role_ids(user):
            return True
        perms = interaction.permissions
        return interaction.guild_id is not None and perms.administrator

    def is_admin_user(self, user: discord.abc.User) -> bool:
        """For places without an interaction (a button's owner check uses ``is_admin``)."""
        return user.id in self.admin_user_ids or bool(self.admin_role_ids & _role_ids(user))

    def can_train(self, interaction: discord.Interaction) -> bool:
        if self.is_admin(interaction):
            return True
        if not self.trainer_role_ids:
            return True
        return bool(self.trainer_role_ids & _role_ids(interaction.user))

    def check_context(self, interaction: discord.Interaction) -> None:
        if interaction.guild_id is None and not self.allow_dms and not self.is_admin(interaction):
            raise PermissionDenied(
                "This bot does not take commands in direct messages.", "Use it in a server channel instead."
            )

    def require_trainer(self, interaction: discord.Interaction) -> None:
        self.check_context(interaction)
        if not self.can_train(interaction):
            raise PermissionDenied(
                "You do not have a role that may start training jobs.",
                "Ask an admin to give you the trainer role.",
            )

    def require_admin(self, interaction: discord.Interaction) -> None:
        if not self.is_admin(interaction):
            raise PermissionDenied("Only admins can do that.")

    def owns_or_admin(self, interaction: discord.Interaction, owner_id: int) -> bool:
        return interaction.user.id == owner_id or self.is_admin(interaction)

    def require_job_access(self, interaction: discord.Interaction, job: Any) -> None:
        if job is None or not self.owns_or_admin(interaction, job.owner_id):
            # Same answer for "missing" and "not yours": ids of others' jobs are not revealed.
            raise NotFound("No job of yours has that id.", "See your jobs with `/jobs`.")

    def can_read_dataset(self, interaction: discord.Interaction, ds: Any) -> bool:
        return ds is not None and (ds.visibility == "shared" or self.owns_or_admin(interaction, ds.owner_id))

    def require_dataset_read(self, interaction: discord.Interaction, ds: Any) -> None:
        if not self.can_read_dataset(interaction, ds):
            raise NotFound("No dataset of yours (or shared with you) has that name.", "See `/dataset list`.")

    def require_dataset_write(self, interaction: discord.Interaction, ds: Any) -> None:
        if ds is None or not self.owns_or_admin(interaction, ds.owner_id):
            if ds is not None and ds.visibility == "shared":
                raise PermissionDenied("That dataset is shared with you, but only its owner can change it.")
            raise NotFound("No dataset of yours has that name.", "See `/dataset list`.")


# ---------------------------------------------------------------------------------- attachments


# Attachments downloaded at once, over all commands of this process: a flood of uploads queues here
# instead of holding hundreds of MiB in memory and hammering Discord's CDN (limits.max_parallel_downloads).
MAX_PARALLEL_DOWNLOADS = 4
_download_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def set_download_limit(n: int) -> None:
    global MAX_PARALLEL_DOWNLOADS
    MAX_PARALLEL_DOWNLOADS = max(1, int(n))
    _download_slots.clear()


def download_slots() -> asyncio.Semaphore:
    """This event loop's download semaphore (one per loop: a Semaphore is bound to the loop it first waits on)."""
    loop = asyncio.get_running_loop()
    sem = _download_slots.get(loop)
    if sem is None:
        sem = _download_slots[loop] = asyncio.Semaphore(MAX_PARALLEL_DOWNLOADS)
    return sem


async def download_attachments(
    attachments: Iterable[discord.Attachment | None],
    *,
    max_bytes: int,
    max_total: int | None = None,
) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]]]:
    """Download slash-command attachments now (Discord deletes ephemeral attachments soon after the
    command). Returns (files, refused) where refused holds (name, reason) for files that are too big
    (checked from the declared size, before downloading) or could not be fetched. Names come back
    cleaned for display (storage.names): a user's file name is stored and echoed only that way."""
    todo = [(display_file_name(a.filename), a) for a in attachments if a is not None]
    refused: list[tuple[str, str]] = []
    ok: list[tuple[str, discord.Attachment]] = []
    total = 0
    for name, a in todo:
        if a.size > max_bytes:
            refused.append((name, f"is {a.size / MiB:.1f} MiB; files may be at most {max_bytes / MiB:.0f} MiB"))
        elif max_total is not None and total + a.size > max_total:
            refused.append((name, f"would bring this upload over {max_total / MiB:.0f} MiB; send it separately"))
        else:
            ok.append((name, a))
            total += a.size

    async def get(name: str, a: discord.Attachment) -> tuple[str, bytes] | tuple[str, Exception]:
        try:
            async with download_slots():
                return name, await a.read()
        except (TimeoutError, discord.HTTPException, OSError) as e:
            return name, e

    files: list[tuple[str, bytes]] = []
    for name, result in await asyncio.gather(*(get(n, a) for n, a in ok)):
        if isinstance(result, Exception):
            refused.append((name, "could not be downloaded from Discord; attach it again"))
        else:
            files.append((name, result))
    return files, refused


# ---------------------------------------------------------------------------------- job submission


@dataclass
class Submitted:
    job: Any
    destination_id: int | None
    position: int | None
    eta_s: float | None


async def ensure_deferred(interaction: discord.Interaction, *, ephemeral: bool = False, thinking: bool = True) -> None:
    """Defer (Discord's 3 s) if not answered yet, then wait while other commands of a burst are still
    unanswered (bot.ackgate): acknowledgements first, work after."""
    if not interaction.response.is_done():
        await interaction.response.defer(ephemeral=ephemeral, thinking=thinking)
    await wait_turn(interaction)


async def open_destination(
    bot: LoraforgeBot, interaction: discord.Interaction, title: str
) -> tuple[int | None, str]:
    """Where a job reports: a private thread in the command's channel (config progress_mode "thread"),
    else the user's DMs; falls back to the channel itself. Returns (channel id, "thread"|"dm"|"channel")."""
    mode = bot.config.discord.progress_mode
    if mode == "thread" and interaction.guild_id is not None and interaction.channel_id is not None:
        try:
            # A private thread: only the owner (added below) and moderators (admins) see the job's
            # progress and its files, as jobs are private to their owner.
            data = await bot.http.start_thread_without_message(
                interaction.channel_id,
                name=title[:100],
                auto_archive_duration=1440,
                type=discord.ChannelType.private_thread.value,  # type: ignore[arg-type]
                invitable=False,
                reason=f"job for {interaction.user}",
            )
            thread_id = int(data["id"])
            try:
                await bot.http.add_user_to_thread(thread_id, interaction.user.id)
            except discord.HTTPException:
                pass  # they can still open it from the channel
            return thread_id, "thread"
        except discord.HTTPException as e:
            log.info("could not create a thread in %s (%s); trying DMs", interaction.channel_id, e.status)
    try:
        dm = await interaction.user.create_dm()
        return dm.id, "dm"
    except discord.HTTPException:
        return interaction.channel_id, "channel"


async def submit_job(
    interaction: discord.Interaction,
    *,
    kind: str,
    spec: Any,
    title: str,
    summary: str = "",
    meta: dict[str, Any] | None = None,
) -> Submitted:
    """Queue a validated spec for the user, open its thread/DM, start its progress message and
    answer the interaction. The caller has checked permissions and validated the spec; quota
    refusals (QuotaError) propagate to the caller's error handler. ``meta`` is merged into the
    job's META event (e.g. ``{"link_only": True}``: deliver every file by link)."""
    bot: LoraforgeBot = interaction.client  # type: ignore[assignment]
    await ensure_deferred(interaction, ephemeral=True)
    job = await bot.submit(kind=kind, spec=spec, owner_id=interaction.user.id,
                           is_admin=bot.access.is_admin(interaction), guild_id=interaction.guild_id,
                           channel_id=interaction.channel_id)
    return await announce_job(interaction, job, title=title, summary=summary, meta=meta)


async def announce_job(
    interaction: discord.Interaction,
    job: Any,
    *,
    title: str,
    summary: str = "",
    meta: dict[str, Any] | None = None,
) -> Submitted:
    """For a job just queued (``submit_job``, ``/retrain``): open its thread/DM, hand it to the
    progress hub and tell the user where to look, with the queue position and ETA. ``meta`` goes
    into the job's one META event, written before the progress hub is bound to the job, so the
    final delivery always sees it (however fast the job is)."""
    bot: LoraforgeBot = interaction.client  # type: ignore[assignment]
    job_id = int(job.id)
    hub = bot.progress
    hub.expect(job_id)  # progress waits for the destination below instead of racing it
    dest_id: int | None = None
    dest_kind = "channel"
    try:
        dest_id, dest_kind = await open_destination(bot, interaction, f"#{job_id} {title}")
        await bot.repo.set_job_message(job_id, thread_id=dest_id)
        await bot.repo.add_event(job_id, META_EVENT, {
            "attachment_size_limit": int(getattr(interaction, "filesize_limit", 0) or 0),
            "destination": dest_kind,
            "interaction_channel_id": interaction.channel_id,
            **(meta or {}),
        })
    finally:
        hub.bind(job_id)
    position, eta = await bot.queue_info(job_id)
    where = f"<#{dest_id}>" if dest_kind in ("thread", "channel") and dest_id else "your DMs"
    lines = [f"Queued job **#{job_id}** ({title})."]
    if position is not None:
        lines.append(f"Position in queue: **{position}**" + (f", done in about {format_duration(eta)}" if eta else ""))
    else:
        now_job = await bot.repo.get_job(job_id)
        if now_job is not None and now_job.state == "running":
            lines.append("A worker was free: it is running now.")
    lines.append(f"Progress and results: {where}.")
    if summary:
        lines.append(summary)
    await reply(interaction, clip("\n".join(lines)), ephemeral=True)
    return Submitted(job, dest_id, position, eta)


def _attachment_text(name: str, data: bytes) -> str:
    if len(data) > 256 * 1024:
        raise InvalidInput(f"`{name}` is too big for a job file (256 KiB at most).")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"`{name}` is not UTF-8 text.", "Save it as UTF-8 and attach it again.") from None


def parse_toml_attachment(name: str, data: bytes) -> dict[str, Any]:
    """A job file attached to a command. Size and encoding problems are the user's to fix."""
    from trainer.spec import load_toml_text  # torch-free

    return load_toml_text(_attachment_text(name, data), source=name)


def read_job_attachment(name: str, data: bytes) -> tuple[dict[str, Any], str]:
    """A job file attached to /train, or a kohya config (TOML/JSON) or command line (.txt/.sh), translated:
    (spec values, a note saying what was imported and what was not; "" for a job file)."""
    from trainer.kohya_import import import_kohya_text  # torch-free
    from trainer.kohya_read import KohyaImportError, is_kohya_text

    text = _attachment_text(name, data)
    if not is_kohya_text(name, text):
        return parse_toml_attachment(name, data), ""
    try:
        result = import_kohya_text(name, text, for_bot=True)
    except KohyaImportError as e:
        raise InvalidInput(f"`{name}` looks like a kohya config, but: {e}.") from None
    # Names only (a Discord message is short); `python -m trainer import-kohya` gives the reasons.
    skipped = list(dict.fromkeys(u.split(" ", 1)[0].rstrip(":") for u in result.untranslated))
    note = f"\nImported {len(result.translated)} settings from the kohya config `{name}`"
    note += f"; not translated: {clip(', '.join(skipped), 300)}." if skipped else "."
    return result.values, note


def spec_summary(spec_json: str | dict[str, Any]) -> str:
    """A few lines of the settings that matter, for the result post and /job show."""
    s = json.loads(spec_json) if isinstance(spec_json, str) else spec_json
    kind = s.get("kind", "train")
    if kind == "preview":
        return _preview_summary(s)
    if kind != "train":
        keys = {k: v for k, v in s.items() if k in ("base_model", "rank", "output_name")}
        return ", ".join(f"{k} `{v}`" for k, v in keys.items())
    net, opt, data = s.get("network", {}), s.get("optimizer", {}), s.get("data", {})
    parts = [
        f"base `{s.get('base_model')}`",
        f"steps `{s.get('steps')}`",
        f"batch `{s.get('batch_size')}`",
        f"res `{data.get('resolution')}`",
        f"dim/alpha `{net.get('dim')}/{net.get('alpha') if net.get('alpha') is not None else net.get('dim')}`",
    ]
    if net.get("conv_dim"):
        parts.append(f"conv `{net.get('conv_dim')}/{net.get('conv_alpha') or net.get('conv_dim')}`")
    parts += [
        f"{opt.get('name')} lr `{opt.get('lr')}`",
        f"sched `{opt.get('scheduler')}`",
        f"seed `{s.get('seed')}`",
    ]
    if data.get("trigger_word"):
        parts.append(f"trigger `{data['trigger_word']}`")
    if s.get("preset"):
        parts.append(f"preset `{s['preset']}`")
    if s.get("mode") == "difference":
        parts += _difference_summary(s.get("difference") or {}, net)
    return " · ".join(parts)


def _preview_summary(s: dict[str, Any]) -> str:
    """A preview or check grid: which LoRA(s), on which base, with which prompt and axes."""
    from pathlib import PurePath

    grid = s.get("grid") or {}
    loras = [f"`{PurePath(str(r.get('path', ''))).name}`" + (f" x{r['strength']:g}" if isinstance(
        r.get("strength"), int | float) and r["strength"] != 1 else "") for r in s.get("loras") or [] if isinstance(r, dict)]
    parts = [("LoRA " + ", ".join(loras)) if loras else "no LoRA", f"base `{s.get('base_model')}`"]
    prompt = str(grid.get("prompt") or "").strip()
    parts.append(f"prompt *{clip(prompt, 100)}*" if prompt else "empty prompt")
    strengths, seeds = grid.get("strengths") or [], grid.get("seeds") or []
    if len(strengths) * len(seeds) > 1:
        parts.append("strengths " + ", ".join(f"{x:g}" for x in strengths) + " x seeds "
                     + ", ".join(str(x) for x in seeds))
    elif seeds:
        parts.append(f"seed {seeds[0]}")
    return " \u00b7 ".join(parts)


def _difference_summary(diff: dict[str, Any], net: dict[str, Any]) -> list[str]:
    """Copy-machine jobs: the pairs and what pass 2 changes (the fields above are pass 1's, the copier's)."""
    names = [str(p.get("name")) for p in diff.get("pairs") or [] if isinstance(p, dict)]
    parts = [f"difference pairs `{', '.join(names)}`"]
    p2 = diff.get("pass2") or {}
    p2net = {**net, **(p2.get("network") or {})}
    alpha = p2net.get("alpha") if p2net.get("alpha") is not None else p2net.get("dim")
    pass2 = f"dim/alpha `{p2net.get('dim')}/{alpha}`"
    if p2.get("steps"):
        pass2 += f" steps `{p2['steps']}`"
    if (p2.get("optimizer") or {}).get("lr"):
        pass2 += f" lr `{p2['optimizer']['lr']}`"
    parts.append(f"pass 2 {pass2}")
    if diff.get("prompt"):
        parts.append(f"prompt `{clip(str(diff['prompt']), 60)}`")
    if diff.get("merge_rank"):
        parts.append(f"merge rank `{diff['merge_rank']}`")
    return parts


def clip(text: str, n: int = 1900) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def bullet_list(items: Sequence[str], limit: int = 15) -> str:
    out = [f"- {x}" for x in items[:limit]]
    if len(items) > limit:
        out.append(f"- ... and {len(items) - limit} more")
    return "\n".join(out)


def now() -> float:
    return time.time()


__all__ = [
    "BUILTIN_MODELS",
    "announce_job",
    "cancel_job",
    "list_base_models",
    "Access",
    "DELIVERED_EVENT",
    "META_EVENT",
    "Submitted",
    "UserError",
    "bullet_list",
    "clip",
    "download_attachments",
    "ensure_deferred",
    "format_duration",
    "maybe_await",
    "open_destination",
    "parse_toml_attachment",
    "read_job_attachment",
    "spec_summary",
    "submit_job",
]


async def cancel_job(interaction: discord.Interaction, job_id: int) -> str:
    """Shared by ``/cancel`` and the Cancel button: only the owner or an admin may cancel."""
    bot: LoraforgeBot = interaction.client  # type: ignore[assignment]
    job = await bot.repo.get_job(int(job_id))
    bot.access.require_job_access(interaction, job)
    if job.is_terminal:
        return f"Job #{job.id} has already {'finished' if job.state == 'succeeded' else job.state}; nothing to cancel."
    await bot.cancel(job.id, by=interaction.user.id, is_admin=bot.access.is_admin(interaction))
    after = await bot.repo.get_job(job.id)
    if after is not None and after.state == "cancelled":
        return f"Cancelled job #{job.id}."
    return f"Cancelling job #{job.id}: it stops at the next step and keeps what was saved."
