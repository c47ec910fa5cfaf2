"""/me: what you have here and what you may still use (storage, today's GPU quota, jobs)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.errors import reply
from bot.interactions import ensure_deferred
from storage import usage

if TYPE_CHECKING:
    from bot.app import LoraforgeBot

MiB = 1024 * 1024
DAY_S = 24 * 3600.0


def _size(n: float) -> str:
    if n >= 1024 * MiB:
        return f"{n / (1024 * MiB):.1f} GiB"
    return f"{n / MiB:.1f} MiB"


class Me(commands.Cog):
    def __init__(self, bot: LoraforgeBot) -> None:
        self.bot = bot

    @app_commands.command(name="me", description="Your datasets, storage, jobs and today's GPU quota")
    async def me(self, interaction: discord.Interaction) -> None:
        await ensure_deferred(interaction, ephemeral=True)
        bot, uid = self.bot, interaction.user.id
        lim = bot.config.limits
        st = await usage.storage_usage(bot.repo.db, uid)
        gpu_s = await bot.repo.gpu_seconds_since(uid, time.time() - DAY_S)
        queued = await bot.repo.count_jobs(uid, ["queued"])
        running = await bot.repo.count_jobs(uid, ["running"])
        quota_mib = lim.max_storage_mib_per_user
        storage = f"**Storage**: {_size(st.total_bytes)}"
        storage += f" of {_size(quota_mib * MiB)}" if quota_mib > 0 else " (no quota)"
        storage += f" (images {_size(st.image_bytes)}, results {_size(st.result_bytes)})"
        gpu = f"**GPU time, last 24 h**: {gpu_s / 60:.1f} min"
        if bot.access.is_admin(interaction):
            gpu += " (admin: no quota)"
        elif lim.daily_gpu_minutes_per_user > 0:
            gpu += f" of {lim.daily_gpu_minutes_per_user:.0f} min"
        lines = [
            f"**Datasets**: {st.datasets} with {st.images} image(s)",
            storage,
            f"**Jobs**: {st.jobs} in all; {running} running, {queued} waiting (limit {lim.max_queued_per_user})",
            gpu,
        ]
        await reply(interaction, "\n".join(lines), ephemeral=True)


async def setup(bot: LoraforgeBot) -> None:
    await bot.add_cog(Me(bot))
