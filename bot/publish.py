"""First run: publishing the slash commands, and the invite link.

A new Discord application has no commands, so ``/admin sync`` cannot exist until something publishes them:
``python -m bot sync [--guild ID]`` does it from the shell, and every start publishes by itself when the
command tree differs from what was last published. What was published (a hash of the exact payload
discord.py uploads, per target) is kept in ``<data_dir>/published_commands.json``, written atomically,
so a start with the same tree never calls Discord (application command writes are rate limited).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import discord

from storage.files import write_bytes_atomic

if TYPE_CHECKING:
    from discord import app_commands

log = logging.getLogger("loraforge.publish")

RECORD_FILE = "published_commands.json"
SCOPES = ("bot", "applications.commands")
# What the bot does in a server: post progress and results (with files and links) in a thread per job,
# and find its own earlier messages after a restart (exactly-once delivery reads the channel history).
PERMISSIONS = discord.Permissions(
    send_messages=True, attach_files=True, create_public_threads=True, send_messages_in_threads=True,
    embed_links=True, read_message_history=True,
)
GLOBAL = "global"


def invite_url(application_id: int) -> str:
    """The link a server admin opens to add the bot with the scopes and permissions it needs."""
    return discord.utils.oauth_url(application_id, permissions=PERMISSIONS, scopes=SCOPES)


def tree_hash(tree: app_commands.CommandTree[Any]) -> str:
    """A hash of the commands as uploaded (names, descriptions, options, choices, permissions)."""
    payload = sorted((c.to_dict(tree) for c in tree.get_commands()), key=lambda c: (c.get("type", 1), c["name"]))
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _target(guild_id: int | None) -> str:
    return GLOBAL if guild_id is None else str(guild_id)


class PublishRecord:
    """What was last published where: ``{"global" | "<guild id>": tree hash}``."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / RECORD_FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # missing or damaged: publishing again is the safe answer
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def is_current(self, guild_id: int | None, digest: str) -> bool:
        return self.load().get(_target(guild_id)) == digest

    def mark(self, guild_id: int | None, digest: str) -> None:
        data = self.load()
        data[_target(guild_id)] = digest
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(self.path, json.dumps(data, indent=1, sort_keys=True).encode())


async def publish(bot: Any, guild_id: int | None) -> list[app_commands.AppCommand]:
    """Upload the command tree (one bulk overwrite) to one guild (at once) or globally, and record it."""
    tree = bot.tree
    if guild_id is None:
        synced = await tree.sync()
    else:
        guild = discord.Object(guild_id)
        tree.copy_global_to(guild=guild)
        synced = await tree.sync(guild=guild)
    PublishRecord(bot.files.root).mark(guild_id, tree_hash(tree))
    return synced


def where(guild_id: int | None) -> str:
    return ("every server the bot is in (Discord may take a few minutes to show them)" if guild_id is None
            else f"server {guild_id} (they show at once)")


async def publish_if_changed(bot: Any) -> None:
    """On start: publish to the configured guilds (or globally) where the tree changed since last time.
    A refusal is logged, never fatal: the bot still serves whatever commands Discord already has."""
    record = PublishRecord(bot.files.root)
    first = not record.exists()
    digest = tree_hash(bot.tree)
    targets: list[int | None] = list(dict.fromkeys(bot.config.discord.guild_ids)) or [None]
    for gid in targets:
        if record.is_current(gid, digest):
            continue
        try:
            synced = await publish(bot, gid)
        except discord.HTTPException as e:
            log.error("could not publish the slash commands to %s (%s %s); run `python -m bot sync` later, "
                      "or check that the bot was invited with the applications.commands scope", where(gid),
                      e.status, e.text or e.code)
            continue
        log.info("published %d slash command(s) to %s", len(synced), where(gid))
    if first and bot.application_id:
        print(f"Invite the bot to your server with this link (scopes bot + applications.commands):\n"
              f"  {invite_url(bot.application_id)}", flush=True)


async def sync_from_shell(config: Any, token: str, guild_id: int | None) -> int:
    """``python -m bot sync [--guild ID]``: log in over REST only, publish, say where. Exit status."""
    from bot.app import REFUSED_TOKEN, LoraforgeBot, use_api

    use_api(config)
    bot = LoraforgeBot(config, start_workers=False, serve=False)
    async with bot:
        try:
            await bot.login(token)
        except discord.LoginFailure:
            print(REFUSED_TOKEN.replace("LORAFORGE_TOKEN", config.discord.token_env), file=sys.stderr)
            return 2
        targets = [guild_id] if guild_id is not None else list(dict.fromkeys(config.discord.guild_ids)) or [None]
        status = 0
        for gid in targets:
            try:
                synced = await publish(bot, gid)
            except discord.HTTPException as e:
                print(f"Discord refused the commands for {where(gid)} ({e.status} {e.text or e.code}): is the bot "
                      f"in that server, invited with the applications.commands scope? {invite_url(bot.application_id)}",
                      file=sys.stderr)
                status = 1
                continue
            print(f"Published {len(synced)} slash command(s) to {where(gid)}: "
                  + ", ".join(f"/{c.name}" for c in synced), flush=True)
        print(f"Invite link (scopes bot + applications.commands): {invite_url(bot.application_id)}", flush=True)
    return status
