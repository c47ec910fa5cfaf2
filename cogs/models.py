"""/models: the base models a job can start from."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.errors import reply
from bot.interactions import bullet_list, clip, list_base_models

if TYPE_CHECKING:
    from bot.app import LoraforgeBot


class Models(commands.Cog):
    def __init__(self, bot: LoraforgeBot) -> None:
        self.bot = bot

    @app_commands.command(name="models", description="Base models you can train on")
    async def models(self, interaction: discord.Interaction) -> None:
        models = await asyncio.to_thread(list_base_models, self.bot.config.models_dir)
        text = "**Base models** (use the name as `base_model`):\n" + bullet_list(
            [f"`{name}`: {desc}" for name, desc in models], limit=40
        )
        if all(desc.startswith("built-in") for _, desc in models):
            text += ("\nNo models in the models folder yet: an admin can put single-file `.safetensors` "
                     "checkpoints or diffusers folders there.")
        await reply(interaction, clip(text), ephemeral=True)


async def setup(bot: LoraforgeBot) -> None:
    await bot.add_cog(Models(bot))
