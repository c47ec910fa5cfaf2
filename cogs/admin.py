"""/admin sync|status: operator commands (admins only).

Commands are synced on request, never on start: every sync counts against a small daily limit.
Guild sync is instant (good while testing); global sync reaches every server but can take a while.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.errors import reply
from bot.interactions import clip, ensure_deferred
from bot.publish import publish

if TYPE_CHECKING:
    from bot.app import LoraforgeBot


@app_commands.default_permissions(administrator=True)
class Admin(commands.GroupCog, group_name="admin", group_description="Bot administration"):
    def __init__(self, bot: LoraforgeBot) -> None:
        self.bot = bot
        super().__init__()

    @app_commands.command(name="sync", description="Publish the slash commands to Discord")
    @app_commands.describe(scope="configured: the config's guild_ids (global when empty); guild: this server "
                                 "only, at once; global: every server")
    async def sync(self, interaction: discord.Interaction,
                   scope: Literal["configured", "guild", "global"] = "configured") -> None:
        bot = self.bot
        bot.access.require_admin(interaction)
        await ensure_deferred(interaction, ephemeral=True)
        if scope == "guild" and interaction.guild_id is None:
            await reply(interaction, "Run a guild sync inside a server (or use `scope: global`).", ephemeral=True)
            return
        targets = ([interaction.guild_id] if scope == "guild" else
                   list(dict.fromkeys(bot.config.discord.guild_ids)) if scope == "configured" else [])
        synced: list[app_commands.AppCommand] = []
        if not targets:  # global, or no guilds configured
            synced = await publish(bot, None)  # recorded: the next start does not publish it again
            where = "every server (may take up to an hour to show)"
        else:
            refused = []
            for gid in targets:
                try:
                    synced = await publish(bot, gid)
                except discord.Forbidden:  # the bot was not invited with the applications.commands scope
                    refused.append(gid)
            where = "this server" if scope == "guild" else f"{len(targets) - len(refused)} configured server(s)"
            if refused:
                where += (" (refused by " + ", ".join(f"`{g}`" for g in refused) + ": invite the bot there "
                          "with the `applications.commands` scope, or remove the id from `discord.guild_ids`)")
        await reply(interaction, clip(f"Synced {len(synced)} command(s) to {where}: "
                                      + ", ".join(f"`/{c.name}`" for c in synced)), ephemeral=True)

    @app_commands.command(name="status", description="Workers and the queue")
    async def status(self, interaction: discord.Interaction) -> None:
        bot = self.bot
        bot.access.require_admin(interaction)
        await ensure_deferred(interaction, ephemeral=True)
        lines = ["**Workers**"]
        try:
            for w in bot.scheduler.worker_status():
                state = f"busy with #{w['job_id']}" if w.get("job_id") else ("ready" if w.get("ready") else "starting/down")
                where = f" on node {w['node']}" if w.get("node") and w.get("job_id") else ""
                lines.append(f"- `{w['id']}` on {w['device']}: {state}{where}"
                             + (f" (last exit: {w['last_exit']})" if w.get("last_exit") else ""))
        except Exception:  # noqa: BLE001 - status must show what it can
            lines.append("- (scheduler not started)")
        try:
            if cluster := await bot.scheduler.cluster_lines():
                lines += ["**Ray cluster**", *cluster]
        except Exception as e:  # noqa: BLE001 - an unreachable cluster is itself the news
            lines.append(f"**Ray cluster**: unreachable ({type(e).__name__}: {str(e)[:200]})")
        with contextlib.suppress(Exception):
            if notice := bot.scheduler.disk.check():
                lines.insert(0, f"**{notice}**")
        queued = await bot.repo.list_jobs(states=["queued"])
        running = await bot.repo.list_jobs(states=["running"])
        lines.append(f"**Queue**: {len(running)} running, {len(queued)} waiting")
        for j in (running + queued)[:15]:
            lines.append(f"- #{j.id} {j.kind} {j.state} <@{j.owner_id}>")
        await reply(interaction, clip("\n".join(lines)), ephemeral=True)


async def setup(bot: LoraforgeBot) -> None:
    await bot.add_cog(Admin(bot))
