"""Fixtures for the cog tests (helpers live in cogkit.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cogkit import make_config

from bot.app import LoraforgeBot


@pytest.fixture
def bot_factory(tmp_path: Path, fake_discord: Any) -> Callable[..., LoraforgeBot]:
    """make(**config sections) -> a new LoraforgeBot on tmp_path's data dir (same dir each call,
    so a second bot is 'the bot after a restart')."""
    configs: dict[str, Any] = {}

    def make(**sections: Any) -> LoraforgeBot:
        if "cfg" not in configs or sections:
            configs["cfg"] = make_config(tmp_path, fake_discord, **sections)
        return LoraforgeBot(configs["cfg"])

    return make


@pytest.fixture
async def bot(bot_factory: Callable[..., LoraforgeBot], fake_discord: Any) -> AsyncIterator[LoraforgeBot]:
    """A logged-in bot (direct path: interactions are fed, no websocket), scheduler started."""
    b = bot_factory()
    async with fake_discord.running(b, gateway=False):
        await asyncio.wait_for(b.service_ready.wait(), 60)
        yield b


