"""The Discord bot: a ``commands.Bot`` holding the Service (repo, files, scheduler).

Start-up (``setup_hook``): open the database, hook the progress hub to the scheduler (before the
scheduler starts, so restart-recovery events are seen), load the cogs, register the persistent
Cancel button, start the file server, then start the scheduler and its workers in the background
(the gateway connection does not wait for worker processes to import torch). Application commands
are NOT synced here: syncing on every start hits Discord's rate limits; ``/admin sync`` does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from bot.ackgate import AckGate, mark_answered
from bot.config import Config
from bot.delivery import FileServer, LinkSigner, load_secret
from bot.errors import PermissionDenied, UserError, install_redaction, report
from bot.interactions import Access, maybe_await, set_download_limit
from bot.options import check_raw_options
from bot.progress import ProgressHub
from bot.service import Service
from bot.views import CancelButton

log = logging.getLogger("loraforge.bot")

HTTP_CONNECTIONS = 100  # concurrent requests to Discord; more wait for a free kept-alive connection
COGS = ("cogs.datasets", "cogs.train", "cogs.jobs", "cogs.models", "cogs.admin", "cogs.me")
# Cogs written by others later (/merge, /preview): loaded when present.
OPTIONAL_COGS = ("cogs.merge", "cogs.preview")


class LoraforgeTree(app_commands.CommandTree["LoraforgeBot"]):
    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        # Autocomplete must answer fast and needs no checks; buttons check their own job rights.
        if interaction.type is not discord.InteractionType.application_command:
            return True
        bot: LoraforgeBot = interaction.client  # type: ignore[assignment]
        bot.ack_gate.arrived(interaction.id)  # until its first answer, others' work waits (bot.ackgate)
        try:
            bot.access.check_context(interaction)
            # Raw values are checked against the declared options before discord.py converts them:
            # other clients send anything (bot.options).
            check_raw_options(self, interaction)
        except (PermissionDenied, UserError) as e:
            await report(interaction, e)
            return False
        return True

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await report(interaction, error)
        mark_answered(interaction)


class LoraforgeBot(commands.Bot):
    def __init__(
        self,
        config: Config,
        service: Service | None = None,
        *,
        cogs: tuple[str, ...] = COGS,
        start_workers: bool = True,
        **kwargs: Any,
    ) -> None:
        intents = discord.Intents.none()
        intents.guilds = True  # channels, threads, roles in cache; no privileged intents needed
        super().__init__(
            command_prefix=commands.when_mentioned, intents=intents, help_command=None,
            tree_cls=LoraforgeTree, **kwargs,
        )
        self.config = config
        self.service = service or Service(config)
        self.access = Access.from_config(config)
        set_download_limit(config.limits.max_parallel_downloads)
        self.progress = ProgressHub(self, config.discord.progress_interval_s)
        self.file_server: FileServer | None = None
        self.cog_names = cogs
        self.start_workers = start_workers
        self.service_ready = asyncio.Event()
        self.ack_gate = AckGate()
        self._remove_listener: Any = None
        self._service_task: asyncio.Task[None] | None = None

    # -- the parts cogs use

    @property
    def repo(self) -> Any:
        return self.service.repo

    @property
    def files(self) -> Any:
        return self.service.files

    @property
    def scheduler(self) -> Any:
        return self.service.scheduler

    async def submit(self, *, kind: str, spec: Any, owner_id: int, is_admin: bool,
                     guild_id: int | None, channel_id: int | None) -> Any:
        return await self.scheduler.submit(owner_id, kind, spec, guild_id, channel_id, is_admin=is_admin)

    async def cancel(self, job_id: int, *, by: int, is_admin: bool) -> Any:
        job = await self.scheduler.cancel(job_id, by, is_admin=is_admin)
        self.progress.nudge(job_id)
        return job

    async def queue_info(self, job_id: int) -> tuple[int | None, float | None]:
        """(position, seconds until it finishes) for a queued job; Nones when unknown."""
        try:
            pos = await maybe_await(self.scheduler.queue_position(job_id))
            eta = await maybe_await(self.scheduler.eta(job_id))
        except Exception:  # noqa: BLE001 - a cosmetic figure must never fail a command
            log.debug("queue info for job %s unavailable", job_id, exc_info=True)
            return None, None
        return pos, eta

    # -- lifecycle

    async def login(self, token: str) -> None:
        # A bounded pool of kept-alive connections to Discord. discord.py's default opens a new connection
        # for every concurrent request: the first burst of 500 commands meant 500 TCP (TLS) handshakes before
        # the 500 deferrals (docs/benchmarks-ack.md). Made here, inside the running loop, as aiohttp requires.
        if self.http.connector is discord.utils.MISSING:
            self.http.connector = aiohttp.TCPConnector(limit=HTTP_CONNECTIONS)
        await super().login(token)

    async def setup_hook(self) -> None:
        await self.service.open()
        self._remove_listener = self.service.add_listener(self.progress.on_event)
        for name in self.cog_names:
            await self.load_extension(name)
        for name in OPTIONAL_COGS:
            with contextlib.suppress(commands.ExtensionNotFound):
                if name not in self.extensions:
                    await self.load_extension(name)
        self.add_dynamic_items(CancelButton)
        d = self.config.discord
        secret = self.config.link_secret() or await asyncio.to_thread(load_secret, None, None, self.files.root)
        self.file_server = FileServer(
            LinkSigner(secret, ttl_s=d.link_ttl_s), self.progress.resolve_artifact,
            host=d.http_host, port=d.http_port, public_base_url=d.public_base_url,
        )
        try:
            await self.file_server.start()
        except OSError as e:
            # Without it big files cannot be linked; attachments still work. Say so loudly.
            log.error("file server could not listen on %s:%s (%s); big files will not be downloadable",
                      d.http_host, d.http_port, e)
            self.file_server = None
        self._service_task = asyncio.create_task(self._start_service(), name="service-start")

    async def _start_service(self) -> None:
        try:
            if self.start_workers:
                await self.service.start()
            await self.progress.track_open_jobs()
        except Exception:  # noqa: BLE001
            log.exception("the job scheduler failed to start; commands work, jobs stay queued")
        finally:
            self.service_ready.set()

    async def close(self) -> None:
        await self.progress.close()
        if self._service_task is not None and not self._service_task.done():
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._service_task), 30)
        if self._remove_listener is not None:
            with contextlib.suppress(Exception):
                self._remove_listener()
        if self.file_server is not None:
            await self.file_server.stop()
        with contextlib.suppress(Exception):
            await self.service.stop()
        await super().close()

    async def on_app_command_completion(self, interaction: discord.Interaction, command: Any) -> None:
        mark_answered(interaction)  # a command that ended without answering holds nobody up

    async def on_ready(self) -> None:
        log.info("logged in as %s (%s) in %d guild(s)", self.user, getattr(self.user, "id", "?"), len(self.guilds))


def run(config: Config) -> None:
    """Entry point of ``python -m bot run``: reads the token from the env var named in the config."""
    token = config.token()
    if not token:
        raise SystemExit(
            f"No Discord bot token: set the environment variable {config.discord.token_env} to your bot's token "
            "(Discord developer portal -> your application -> Bot -> Reset Token), or name another variable "
            "with discord.token_env in the config file."
        )
    discord.utils.setup_logging(level=logging.INFO)
    install_redaction(token, config.link_secret() or "")
    bot = LoraforgeBot(config)
    bot.run(token, log_handler=None)
