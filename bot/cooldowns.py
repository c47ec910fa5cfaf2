"""Per-user cooldowns for the expensive commands (/preview, /merge, /dataset create), with discord.py's own
cooldown checks: ``limits.cooldown_uses`` uses per ``limits.cooldown_s`` seconds per user and command.
Admins have none. Going over answers privately "Slow down: try again in N s" (bot/errors.describe)."""

from __future__ import annotations

from typing import TypeVar

import discord
from discord import app_commands

T = TypeVar("T")


def _expensive(interaction: discord.Interaction) -> app_commands.Cooldown | None:
    bot = interaction.client
    lim = bot.config.limits  # type: ignore[attr-defined]
    if lim.cooldown_s <= 0 or bot.access.is_admin(interaction):  # type: ignore[attr-defined]
        return None
    return app_commands.Cooldown(lim.cooldown_uses, lim.cooldown_s)


def expensive_cooldown(func: T) -> T:
    """The decorator. Each command gets its own buckets (one shared ``dynamic_cooldown`` would make /preview
    use up /merge); keyed by user, not channel or guild: one person cannot flood from many places at once."""
    return app_commands.checks.dynamic_cooldown(_expensive, key=lambda i: i.user.id)(func)
