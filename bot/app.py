"""The Discord bot: a ``commands.Bot`` holding the Service (repo, files, scheduler).

Start-up (``setup_hook``): open the database, hook the progress hub to the scheduler (before the
scheduler starts, so restart-recovery events are seen), load the cogs, register the persistent
Cancel button, start the file server, then start the scheduler and its workers in the background
(the gateway connection does not wait for worker processes to import torch). The slash commands are
published on start only when they changed since the last publish (bot/publish.py); ``python -m bot sync``
and ``/admin sync`` publish on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.ext import commands

from bot.ackgate import AckGate, mark_answered
from bot.config import DISCORD_API, Config
from bot.delivery import FileServer, LinkSigner, load_secret
from bot.errors import PermissionDenied, UserError, install_redaction, report
from bot.interactions import Access, maybe_await, set_download_limit
from bot.options import check_raw_options
from bot.progress import ProgressHub
from bot.publish import publish_if_changed
from bot.service import Service
from bot.views import CancelButton

log = logging.getLogger("loraforge.bot")

REFUSED_TOKEN = ("Discord refused the token: reset it in the Developer Portal (Bot > Reset Token) and set "
                 "LORAFORGE_TOKEN")
PUBLISH_WAIT_S = 20.0  # how long a start waits for the commands to be published before going on
HTTP_CONNECTIONS = 100  # concurrent requests to Discord; more wait for a free kept-alive connection
COGS = ("cogs.datasets", "cogs.train", "cogs.jobs", "cogs.models", "cogs.admin", "cogs.me", "cogs.merge",
        "cogs.preview")


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
        serve: bool = True,
        **kwargs: Any,
    ) -> None:
        # The bot never joins voice: no "PyNaCl/davey is not installed" warning on every start.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
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
        self.serve = serve  # False: the command tree only (python -m bot sync): no file server, no jobs
        self.service_ready = asyncio.Event()
        self.ack_gate = AckGate()
        self._remove_listener: Any = None
        self._service_task: asyncio.Task[None] | None = None
        self._publish_task: asyncio.Task[None] | None = None

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

    async def queue_info(self, job_id: int, *, until_start: bool = False) -> tuple[int | None, float | None]:
        """(position, seconds until it finishes, or with ``until_start`` until it starts) for a queued job;
        Nones when unknown."""
        try:
            pos = await maybe_await(self.scheduler.queue_position(job_id))
            starts, done = await maybe_await(self.scheduler.estimate(job_id))
        except Exception:  # noqa: BLE001 - a cosmetic figure must never fail a command
            log.debug("queue info for job %s unavailable", job_id, exc_info=True)
            return None, None
        return pos, starts if until_start else done

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
        if not self.serve:
            return
        if self.config.discord.api_url != DISCORD_API:
            await self._follow_gateway()
        if self.config.discord.publish_commands_on_start:
            # Usually one quick request; a rate-limited one must not hold the start up.
            self._publish_task = asyncio.create_task(self._publish(), name="publish-commands")
            _, pending = await asyncio.wait({self._publish_task}, timeout=PUBLISH_WAIT_S)
            if pending:
                log.warning("publishing the slash commands is slow (rate limited?); the bot starts meanwhile")
        self.add_dynamic_items(CancelButton)
        d = self.config.discord
        secret = self.config.link_secret() or await asyncio.to_thread(load_secret, None, None, self.files.root)
        self.file_server = FileServer(
            LinkSigner(secret, ttl_s=d.link_ttl_s), self.progress.results.resolve_artifact,
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

    async def _publish(self) -> None:
        try:
            await publish_if_changed(self)
        except Exception:  # noqa: BLE001 - the bot serves the commands Discord already has
            log.exception("publishing the slash commands failed; run `python -m bot sync` to try again")

    async def _follow_gateway(self) -> None:
        """A Discord-compatible server names its own gateway; discord.py would dial Discord's."""
        from discord.gateway import DiscordWebSocket
        from discord.http import Route

        data = await self.http.request(Route("GET", "/gateway"))
        DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(data["url"])

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
        if self._publish_task is not None and not self._publish_task.done():
            self._publish_task.cancel()
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


def event_loop_factory() -> Any:
    """uvloop's loop where uvloop is installed (a dependency on Linux and macOS), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def use_api(config: Config) -> None:
    """Point discord.py at the configured REST API (Discord itself unless a compatible server is named)."""
    discord.http.Route.BASE = config.discord.api_url


def run(config: Config) -> int:
    """Entry point of ``python -m bot run``: reads the token from the env var named in the config.
    Logging is set up by the caller (bot/__main__.py): one handler, so every line shows once."""
    token = config.token()
    if not token:
        raise SystemExit(
            f"No Discord bot token: set the environment variable {config.discord.token_env} to your bot's token "
            "(Discord developer portal -> your application -> Bot -> Reset Token), or name another variable "
            "with discord.token_env in the config file."
        )
    install_redaction(token, config.link_secret() or "")
    use_api(config)
    bot = LoraforgeBot(config)

    async def runner() -> None:
        async with bot:
            await bot.start(token)

    try:
        # discord.py's Client.run, on uvloop where it is installed: a burst of 500 commands is parsed, deferred
        # and answered on one event loop, and uvloop's faster sockets and callbacks shorten that queue
        with asyncio.Runner(loop_factory=event_loop_factory()) as r:
            r.run(runner())
    except KeyboardInterrupt:
        return 0
    except discord.LoginFailure:
        print(REFUSED_TOKEN.replace("LORAFORGE_TOKEN", config.discord.token_env), file=sys.stderr)
        return 2
    return 0
