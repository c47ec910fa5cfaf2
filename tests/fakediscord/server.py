"""A local fake Discord (REST + gateway + CDN) that the real discord.py client talks to, fully offline.

See README.md next to this file for the usage guide.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import discord
import discord.asset
import discord.gateway
import discord.http
import yarl
from aiohttp import WSMsgType, web

from . import payloads as P

API_PREFIX = "/api/v10"
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7

# Interaction callback types
CB_PONG = 1
CB_MESSAGE = 4
CB_DEFERRED_MESSAGE = 5
CB_DEFERRED_UPDATE = 6
CB_UPDATE_MESSAGE = 7
CB_AUTOCOMPLETE = 8
CB_MODAL = 9


@dataclass
class Call:
    """One request the fake received. ``path`` has the ``/api/v10`` prefix stripped (CDN/gateway paths
    are kept as they are). ``json`` is the JSON body or the multipart ``payload_json``."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: list[tuple[str, bytes]]
    headers: dict[str, str]
    ts: float
    status: int = 0
    response: Any = None

    @property
    def file_names(self) -> list[str]:
        return [f[0] for f in self.files]


@dataclass
class StoredMessage:
    id: int
    channel_id: int
    data: dict  # current Discord message object (what GET returns)
    history: list[dict]  # snapshots: history[0] is the message as created, then one per edit
    files: dict[str, tuple[str, bytes]]  # attachment id -> (filename, bytes), current attachments
    via: str  # "bot" (bot token REST), "interaction" (callback response), "followup", "webhook"
    token: str | None = None  # interaction/webhook token for via != "bot"
    deleted: bool = False
    reactions: list[str] = field(default_factory=list)

    @property
    def content(self) -> str:
        return self.data.get("content") or ""

    @property
    def embeds(self) -> list[dict]:
        return self.data.get("embeds") or []

    @property
    def components(self) -> list[dict]:
        return self.data.get("components") or []

    @property
    def flags(self) -> int:
        return int(self.data.get("flags") or 0)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & FLAG_EPHEMERAL)

    @property
    def edit_count(self) -> int:
        return len(self.history) - 1

    @property
    def attachments(self) -> list[tuple[str, bytes]]:
        return list(self.files.values())

    @property
    def file_names(self) -> list[str]:
        return [name for name, _ in self.files.values()]

    def file(self, filename: str) -> bytes:
        for name, data in self.files.values():
            if name == filename:
                return data
        raise KeyError(f"no attachment {filename!r} on message {self.id}; have {self.file_names}")

    def custom_ids(self) -> list[str]:
        out: list[str] = []

        def walk(items: list) -> None:
            for c in items or []:
                if "custom_id" in c:
                    out.append(c["custom_id"])
                walk(c.get("components") or [])
                if isinstance(c.get("component"), dict):
                    walk([c["component"]])
                if isinstance(c.get("accessory"), dict):
                    walk([c["accessory"]])

        walk(self.components)
        return out


@dataclass
class InteractionRecord:
    id: int
    token: str
    type: int
    channel_id: int | None
    guild_id: int | None
    payload: dict | None
    callback_type: int | None = None
    callback_data: Any = None
    original: StoredMessage | None = None
    followups: list[StoredMessage] = field(default_factory=list)
    expired: bool = False

    @property
    def responded(self) -> bool:
        return self.callback_type is not None

    @property
    def deferred(self) -> bool:
        return self.callback_type in (CB_DEFERRED_MESSAGE, CB_DEFERRED_UPDATE)

    @property
    def autocomplete_choices(self) -> list[dict] | None:
        if self.callback_type != CB_AUTOCOMPLETE:
            return None
        return (self.callback_data or {}).get("choices", [])

    @property
    def modal(self) -> dict | None:
        return self.callback_data if self.callback_type == CB_MODAL else None


@dataclass
class Hold:
    """``fake.hold_reply(...)``: the next matching message is created, but the reply to the create call
    waits until ``release`` is set (a bot killed meanwhile never learns the message id)."""

    channel_id: int | None
    contains: str
    created: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    message: StoredMessage | None = None

    def matches(self, channel_id: int, msg: StoredMessage) -> bool:
        return (self.channel_id in (None, channel_id)) and self.contains in (msg.data.get("content") or "")


@dataclass
class _Fault:
    path_contains: str
    method: str | None
    remaining: int
    respond: Callable[[], web.Response]

    def matches(self, method: str, path: str) -> bool:
        return self.path_contains in path and (self.method is None or self.method == method)


class _GatewayConn:
    def __init__(self, ws: web.WebSocketResponse, session_id: str):
        self.ws = ws
        self.seq = 0
        self.session_id = session_id
        self.identify: dict | None = None
        self.ready = asyncio.Event()
        self.received: list[dict] = []

    async def send(self, payload: dict) -> None:
        await self.ws.send_str(json.dumps(payload))

    async def dispatch(self, event: str, data: Any) -> None:
        self.seq += 1
        await self.send({"op": 0, "t": event, "s": self.seq, "d": data})


class HTTPError(Exception):
    def __init__(self, status: int, code: int, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """JSON with Content-Type exactly ``application/json`` (discord.py ignores ``; charset=utf-8``)."""
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    return web.Response(body=json.dumps(body).encode(), status=status, headers=h)


def error_response(status: int, code: int, message: str) -> web.Response:
    return json_response({"message": message, "code": code}, status=status)


Handler = Callable[..., Awaitable[Any]]


class FakeDiscord:
    """Fake Discord API v10 + gateway + CDN on 127.0.0.1:<random port>.

    ``async with FakeDiscord() as fake:`` starts the server and points discord.py at it
    (``discord.http.Route.BASE``, ``DiscordWebSocket.DEFAULT_GATEWAY``, ``Asset.BASE``); leaving restores them.

    A default guild is created: ``fake.guild_id``, text channel ``fake.channel_id`` ("general"), roles
    ``fake.roles["admin"|"trainer"|"everyone"|"bot"]`` and users ``fake.users["alice"|"bob"|"carol"]``
    (alice: admin role, bob: trainer role, carol: no role). ``fake.bot_user`` is the bot; ``fake.token``
    the bot token the fake accepts (any token is accepted unless ``strict_token``).
    """

    def __init__(
        self,
        *,
        token: str = "fake-bot-token",
        bot_name: str = "loraforge",
        heartbeat_interval_ms: int = 41250,
        strict_token: bool = False,
        premium_tier: int = 0,
    ) -> None:
        self.token = token
        self.strict_token = strict_token
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.application_id = P.snowflake()
        self.bot_user = P.user(self.application_id, bot_name, bot=True)
        self.owner = P.user(None, "owner")

        self.calls_log: list[Call] = []
        self.unknown_calls: list[Call] = []
        self.commands: dict[int | None, list[dict]] = {}  # guild id (None: global) -> synced commands
        self.guilds: dict[int, dict] = {}
        self.channels: dict[int, dict] = {}
        self.users: dict[str, dict] = {}
        self.messages: dict[int, list[StoredMessage]] = {}
        self._message_index: dict[int, StoredMessage] = {}
        self.threads: dict[int, dict] = {}
        self.dm_channels: dict[int, dict] = {}  # recipient user id -> DM channel payload
        self.interactions: dict[str, InteractionRecord] = {}
        self.cdn: dict[str, tuple[str, bytes]] = {}  # attachment id -> (filename, bytes)
        self.upload_limit = P.DEFAULT_ATTACHMENT_SIZE_LIMIT
        self.upload_limits: dict[int, int] = {}  # channel or guild id -> per-file limit in bytes
        self.gateway_conns: list[_GatewayConn] = []
        self.gateway_sessions = 0
        self.expired_tokens: set[str] = set()
        self._faults: list[_Fault] = []
        # enforce_nonce: a create with a nonce the same author used within this many seconds returns that
        # message instead of a new one (Discord: "a few minutes"; a test sets 0 to see what a restart does later)
        self.nonce_window_s = 300.0
        self._nonces: dict[str, tuple[float, StoredMessage]] = {}
        self.holds: list[Hold] = []
        self._routes: list[tuple[str, re.Pattern, Handler]] = []
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = 0
        self._saved: dict[str, Any] = {}
        self._ws_tasks: set[asyncio.Task] = set()
        self._echo_tasks: set[asyncio.Task] = set()
        # Like Discord, tell identified gateway clients about what REST calls changed (THREAD_CREATE,
        # MESSAGE_CREATE/UPDATE/DELETE), so discord.py's caches (guild.get_thread, ...) fill as in production.
        self.echo_events = True

        self._install_routes()
        self._make_default_guild(premium_tier)

    # ------------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return self.base_url + API_PREFIX

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway/ws"

    async def start(self) -> FakeDiscord:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._saved = {
            "route": discord.http.Route.BASE,
            "gateway": discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY,
            "asset": discord.asset.Asset.BASE,
        }
        discord.http.Route.BASE = self.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)
        discord.asset.Asset.BASE = self.base_url + "/cdn"
        return self

    async def stop(self) -> None:
        for conn in list(self.gateway_conns):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(code=1001), 1)
        for task in list(self._ws_tasks) + list(self._echo_tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._saved:
            discord.http.Route.BASE = self._saved["route"]
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._saved["gateway"]
            discord.asset.Asset.BASE = self._saved["asset"]
            self._saved = {}

    async def __aenter__(self) -> FakeDiscord:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # ------------------------------------------------------------------ world set-up

    def _make_default_guild(self, premium_tier: int) -> None:
        gid = P.snowflake()
        self.roles = {
            "everyone": P.role(gid, "@everyone", P.PERM_MEMBER_DEFAULT, position=0),
            "admin": P.role(P.snowflake(), "Admin", P.PERM_ADMINISTRATOR | P.PERM_MEMBER_DEFAULT, position=3),
            "trainer": P.role(P.snowflake(), "Trainer", P.PERM_MEMBER_DEFAULT, position=1),
            "bot": P.role(P.snowflake(), "loraforge", P.PERM_ALL, position=2, managed=True),
        }
        self.role_ids = {k: int(v["id"]) for k, v in self.roles.items()}
        for name in ("alice", "bob", "carol"):
            self.users[name] = P.user(None, name)
        member_roles = {"alice": [self.role_ids["admin"]], "bob": [self.role_ids["trainer"]], "carol": []}
        self.guild = self.add_guild(
            "loraforge test guild",
            guild_id=gid,
            roles=list(self.roles.values()),
            members={self.users[n]["id"]: r for n, r in member_roles.items()},
            bot_roles=[self.role_ids["bot"]],
            premium_tier=premium_tier,
        )
        self.guild_id = gid
        self.channel_id = int(self.guild["channels"][0]["id"])

    def add_guild(
        self,
        name: str,
        *,
        guild_id: int | None = None,
        roles: list[dict] | None = None,
        members: dict[str, list[int]] | None = None,
        bot_roles: list[int] | None = None,
        channel_names: tuple[str, ...] = ("general", "training"),
        premium_tier: int = 0,
    ) -> dict:
        """Add a guild (sent on IDENTIFY). ``members``: user id -> role ids (users must be known via
        ``add_user`` or the defaults). Returns the GUILD_CREATE payload (kept live in ``fake.guilds``)."""
        gid = guild_id or P.snowflake()
        roles = roles or [P.role(gid, "@everyone", P.PERM_MEMBER_DEFAULT, position=0)]
        channels = [P.text_channel(P.snowflake(), gid, n, position=i) for i, n in enumerate(channel_names)]
        by_id = {u["id"]: u for u in self.users.values()}
        member_list = [P.member(self.bot_user, bot_roles or [])]
        for uid, rids in (members or {}).items():
            member_list.append(P.member(by_id[str(uid)], rids))
        g = P.guild(
            gid,
            name,
            owner_id=int(self.owner["id"]),
            roles=roles,
            channels=channels,
            members=member_list,
            premium_tier=premium_tier,
        )
        self.guilds[gid] = g
        for ch in channels:
            self.channels[int(ch["id"])] = ch
        return g

    def add_user(self, name: str, *, guild_id: int | None = None, roles: list[int] | None = None) -> dict:
        """A new user; added as a member of ``guild_id`` (default guild unless 0) with ``roles``."""
        u = P.user(None, name)
        self.users[name] = u
        gid = self.guild_id if guild_id is None else guild_id
        if gid:
            g = self.guilds[gid]
            g["members"].append(P.member(u, roles or []))
            g["member_count"] = len(g["members"])
        return u

    def add_channel(self, name: str, *, guild_id: int | None = None) -> int:
        gid = guild_id or self.guild_id
        g = self.guilds[gid]
        ch = P.text_channel(P.snowflake(), gid, name, position=len(g["channels"]))
        g["channels"].append(ch)
        self.channels[int(ch["id"])] = ch
        return int(ch["id"])

    def member_of(self, user: str | dict, guild_id: int | None = None) -> dict:
        uid = (self.users[user] if isinstance(user, str) else user)["id"]
        for m in self.guilds[guild_id or self.guild_id]["members"]:
            if m["user"]["id"] == uid:
                return m
        raise KeyError(uid)

    def set_upload_limit(
        self, limit: int, *, channel_id: int | None = None, guild_id: int | None = None
    ) -> None:
        """Per-file upload limit (bytes) for a channel, a guild, or the default (neither given)."""
        if channel_id is not None:
            self.upload_limits[channel_id] = limit
        elif guild_id is not None:
            self.upload_limits[guild_id] = limit
        else:
            self.upload_limit = limit

    def upload_limit_for(self, channel_id: int | None) -> int:
        if channel_id in self.upload_limits:
            return self.upload_limits[channel_id]  # type: ignore[index]
        ch = self.channels.get(channel_id or 0)
        gid = int(ch["guild_id"]) if ch and ch.get("guild_id") else None
        if gid in self.upload_limits:
            return self.upload_limits[gid]  # type: ignore[index]
        if gid in self.guilds:
            tier = self.guilds[gid].get("premium_tier", 0)
            tier_limit = {2: 50 * 1024 * 1024, 3: 100 * 1024 * 1024}.get(tier, 0)
            return max(tier_limit, self.upload_limit)
        return self.upload_limit

    def add_attachment(
        self, filename: str, data: bytes, *, content_type: str | None = None, **extra: Any
    ) -> dict:
        """Register bytes on the fake CDN; returns a Discord attachment object (for slash command options)
        whose url/proxy_url download these bytes through ``Attachment.read()``."""
        aid = P.snowflake()
        self.cdn[str(aid)] = (filename, data)
        url = f"{self.base_url}/cdn/attachments/0/{aid}/{filename}"
        return P.attachment(
            filename, len(data), url, attachment_id=aid, content_type=content_type, ephemeral=True, **extra
        )

    # ------------------------------------------------------------------ payload helpers bound to this world

    def _who(self, user: str | dict) -> dict:
        return self.users[user] if isinstance(user, str) else user

    def _ctx(self, user: str | dict, guild_id: int | None, channel_id: int | None, dm: bool) -> dict:
        u = self._who(user)
        if dm:
            ch = self._dm_channel_for(u)
            return {"user": u, "guild_id": None, "channel": ch, "application_id": self.application_id}
        gid = guild_id or self.guild_id
        cid = channel_id or self.channel_id
        roles: list[int | str] = []
        with contextlib.suppress(KeyError):
            roles = self.member_of(u, gid)["roles"]
        ch = self.channels.get(cid) or P.text_channel(cid, gid)
        return {
            "user": u,
            "guild_id": gid,
            "channel": ch,
            "roles": roles,
            "application_id": self.application_id,
            "attachment_size_limit": self.upload_limit_for(cid),
        }

    def slash_command(
        self,
        name: str,
        options: dict | list | None = None,
        *,
        user: str | dict = "alice",
        guild_id: int | None = None,
        channel_id: int | None = None,
        dm: bool = False,
        **kwargs: Any,
    ) -> dict:
        """``payloads.slash_command`` with ids, member roles, channel and application id filled in from this
        fake (user by name or dict; ``dm=True`` for a DM interaction). Member permissions: admin users get
        ADMINISTRATOR unless ``permissions=`` is given."""
        ctx = self._ctx(user, guild_id, channel_id, dm)
        self._default_perms(ctx, kwargs)
        ctx.update(kwargs)
        return P.slash_command(name, options, **ctx)

    def autocomplete(
        self,
        name: str,
        options: dict | list | None,
        *,
        focused: str,
        user: str | dict = "alice",
        guild_id: int | None = None,
        channel_id: int | None = None,
        dm: bool = False,
        **kwargs: Any,
    ) -> dict:
        ctx = self._ctx(user, guild_id, channel_id, dm)
        self._default_perms(ctx, kwargs)
        ctx.update(kwargs)
        return P.autocomplete(name, options, focused=focused, **ctx)

    def button_press(
        self, custom_id: str, message_id: int, *, user: str | dict = "alice", **kwargs: Any
    ) -> dict:
        """A click on a button of a stored message (the message dict is taken from the fake's store)."""
        return self._component(custom_id, message_id, user, 2, None, kwargs)

    def select_menu(
        self, custom_id: str, message_id: int, values: list[str], *, user: str | dict = "alice", **kwargs: Any
    ) -> dict:
        return self._component(custom_id, message_id, user, 3, values, kwargs)

    def modal_submit(
        self,
        custom_id: str,
        values: dict[str, str],
        *,
        user: str | dict = "alice",
        channel_id: int | None = None,
        dm: bool = False,
        **kwargs: Any,
    ) -> dict:
        ctx = self._ctx(user, None, channel_id, dm)
        ctx.pop("attachment_size_limit", None)
        self._default_perms(ctx, kwargs)
        ctx.update(kwargs)
        return P.modal_submit(custom_id, values, **ctx)

    def _component(
        self, custom_id: str, message_id: int, user: str | dict, ctype: int, values: Any, kwargs: dict
    ) -> dict:
        msg = self.message(message_id)
        ch = self.channels.get(msg.channel_id)
        dm = bool(ch and ch.get("type") == 1)
        ctx = self._ctx(user, None, msg.channel_id if not dm else None, dm)
        self._default_perms(ctx, kwargs)
        ctx.update(kwargs)
        return P.component(custom_id, dict(msg.data), component_type=ctype, values=values, **ctx)

    def _default_perms(self, ctx: dict, kwargs: dict) -> None:
        if "permissions" not in kwargs and ctx.get("guild_id"):
            if str(self.role_ids["admin"]) in [str(r) for r in ctx.get("roles", [])]:
                ctx["permissions"] = P.PERM_ALL
        if ctx.get("guild_id") is None:
            ctx.pop("roles", None)

    def register_interaction(self, payload: dict) -> InteractionRecord:
        """Remember an interaction so its callback/followups land in the right channel.
        Done automatically by ``dispatch("INTERACTION_CREATE")`` and ``feed``."""
        ch = payload.get("channel") or {}
        cid = ch.get("id") or payload.get("channel_id")
        rec = InteractionRecord(
            id=int(payload["id"]),
            token=payload["token"],
            type=int(payload["type"]),
            channel_id=int(cid) if cid else None,
            guild_id=int(payload["guild_id"]) if payload.get("guild_id") else None,
            payload=payload,
        )
        if rec.channel_id and rec.channel_id not in self.channels and ch:
            self.channels[rec.channel_id] = ch
        self.interactions[rec.token] = rec
        return rec

    def feed(self, bot: discord.Client, payload: dict) -> InteractionRecord:
        """Direct path: hand an INTERACTION_CREATE payload to a logged-in bot without a websocket.
        The bot's HTTP session must exist (``await bot.login(token)``)."""
        rec = self.register_interaction(payload)
        bot._connection.parse_interaction_create(payload)  # type: ignore[arg-type]
        return rec

    def interaction(self, token_or_payload: str | dict) -> InteractionRecord:
        token = token_or_payload["token"] if isinstance(token_or_payload, dict) else token_or_payload
        return self.interactions[token]

    async def wait_for_response(
        self, token_or_payload: str | dict, timeout: float = 5.0
    ) -> InteractionRecord:
        """Wait until the interaction has been answered (any callback type)."""
        token = token_or_payload["token"] if isinstance(token_or_payload, dict) else token_or_payload
        await self.wait_for(
            lambda: token in self.interactions and self.interactions[token].responded, timeout
        )
        return self.interactions[token]

    # ------------------------------------------------------------------ fault injection

    def rate_limit_next(
        self,
        path_contains: str,
        retry_after: float = 0.05,
        *,
        method: str | None = None,
        count: int = 1,
        is_global: bool = False,
    ) -> None:
        """The next ``count`` requests whose path contains ``path_contains`` get a 429 that discord.py
        honours (sleeps ``retry_after`` then retries)."""

        def respond() -> web.Response:
            headers = {
                "Via": "1.1 google",
                "Retry-After": str(max(1, int(retry_after + 0.999))),
                "X-RateLimit-Limit": "5",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
                "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                "X-RateLimit-Bucket": "fakebucket",
                "X-RateLimit-Scope": "user",
            }
            if is_global:
                headers["X-RateLimit-Global"] = "true"
            body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": is_global}
            return json_response(body, 429, headers)

        self._faults.append(_Fault(path_contains, method, count, respond))

    def hold_reply(self, contains: str, channel_id: int | None = None) -> Hold:
        """Hold the reply to the next bot message create whose content contains ``contains``."""
        hold = Hold(channel_id, contains)
        self.holds.append(hold)
        return hold

    def fail_next(
        self,
        path_contains: str,
        status: int = 500,
        code: int = 0,
        message: str = "Injected failure",
        *,
        method: str | None = None,
        count: int = 1,
    ) -> None:
        """The next ``count`` matching requests answer ``status`` with a Discord error body. Note discord.py
        retries 500/502/504 itself after sleeping 1s, 3s, ... (slow): prefer 4xx or ``count=1``."""
        self._faults.append(
            _Fault(path_contains, method, count, lambda: error_response(status, code, message))
        )

    def expire_interaction_token(self, token_or_payload: str | dict) -> None:
        """After this, webhook calls with the token answer 401/50027 and the callback 404/10062,
        like a token older than 15 minutes."""
        token = token_or_payload["token"] if isinstance(token_or_payload, dict) else token_or_payload
        self.expired_tokens.add(token)

    # ------------------------------------------------------------------ inspection

    def calls(self, method: str | None = None, path_contains: str | None = None) -> list[Call]:
        return [
            c
            for c in self.calls_log
            if (method is None or c.method == method.upper())
            and (path_contains is None or path_contains in c.path)
        ]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` is true: re-checked after every request and gateway frame, and every
        50 ms (so it may also look at the bot's own state). Raises TimeoutError."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"condition not met within {timeout}s")
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(0.05, remaining))

    async def wait_for_call(self, predicate: Callable[[Call], bool] | str, timeout: float = 5.0) -> Call:
        """First recorded call matching ``predicate`` (a callable, or a string 'METHOD path-substring' /
        'path-substring'); waits for it if none yet. Raises TimeoutError listing the calls seen."""
        if isinstance(predicate, str):
            parts = predicate.split(" ", 1)
            if len(parts) == 2 and parts[0].isupper():
                m, sub = parts

                def pred(c: Call) -> bool:
                    return c.method == m and sub in c.path
            else:

                def pred(c: Call) -> bool:
                    return predicate in c.path  # type: ignore[operator]
        else:
            pred = predicate
        found: list[Call] = []

        def check() -> bool:
            for c in self.calls_log:
                if c.status and pred(c):
                    found.append(c)
                    return True
            return False

        try:
            await self.wait_for(check, timeout)
        except TimeoutError:
            seen = "\n".join(f"  {c.method} {c.path} -> {c.status}" for c in self.calls_log)
            raise TimeoutError(f"no matching call within {timeout}s; calls so far:\n{seen}") from None
        return found[0]

    def channel_messages(
        self, channel_id: int | None = None, *, include_deleted: bool = False
    ) -> list[StoredMessage]:
        msgs = self.messages.get(channel_id or self.channel_id, [])
        return [m for m in msgs if include_deleted or not m.deleted]

    def message(self, message_id: int | str) -> StoredMessage:
        return self._message_index[int(message_id)]

    def all_messages(self) -> list[StoredMessage]:
        return list(self._message_index.values())

    # ------------------------------------------------------------------ gateway

    async def wait_for_gateway(self, timeout: float = 5.0) -> _GatewayConn:
        """Wait until a client has identified and received READY + GUILD_CREATEs."""
        await self.wait_for(lambda: any(c.ready.is_set() for c in self.gateway_conns), timeout)
        return next(c for c in self.gateway_conns if c.ready.is_set())

    async def dispatch(self, event: str, data: dict) -> None:
        """Send a DISPATCH (op 0) event to every identified gateway connection."""
        if event == "INTERACTION_CREATE":
            self.register_interaction(data)
        conns = [c for c in self.gateway_conns if c.ready.is_set() and not c.ws.closed]
        if not conns:
            raise RuntimeError("no identified gateway connection (await fake.wait_for_gateway() first)")
        for c in conns:
            await c.dispatch(event, data)

    def _echo(self, event: str, data: dict) -> None:
        if not self.echo_events:
            return
        conns = [c for c in self.gateway_conns if c.ready.is_set() and not c.ws.closed]
        if not conns:
            return
        payload = json.loads(json.dumps(data))

        async def send() -> None:
            for c in conns:
                with contextlib.suppress(Exception):
                    await c.dispatch(event, payload)

        task = asyncio.get_running_loop().create_task(send())
        self._echo_tasks.add(task)
        task.add_done_callback(self._echo_tasks.discard)

    @contextlib.asynccontextmanager
    async def running(
        self, bot: discord.Client, *, gateway: bool = True, timeout: float = 10.0, fast_ready: bool = True
    ) -> AsyncIterator[discord.Client]:
        """Run ``bot`` against this fake for the block, then close it.

        ``gateway=True``: ``bot.start(token)`` in a task; waits until ``bot.is_ready()`` (READY, GUILD_CREATEs,
        member chunks, setup_hook done). ``fast_ready`` shortens discord.py's guild_ready_timeout (2 s by
        default) to 0.05 s. ``gateway=False`` (direct path): only ``bot.login(token)`` (HTTP session, app info,
        setup_hook); feed interactions with ``fake.feed(bot, payload)``.
        """
        if not gateway:
            await bot.login(self.token)
            try:
                yield bot
            finally:
                await bot.close()
            return
        if fast_ready:
            bot._connection.guild_ready_timeout = min(bot._connection.guild_ready_timeout, 0.05)
        task = asyncio.create_task(bot.start(self.token))
        try:
            await self.wait_for(lambda: bot.is_ready() or task.done(), timeout)
            if task.done():
                task.result()  # startup failed: raise its error here
                raise RuntimeError("bot.start() returned before the bot was ready")
            yield bot
        finally:
            await bot.close()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)

    async def disconnect_all(self, code: int = 4000) -> None:
        """Drop every gateway socket. 4000 (default) makes discord.py RESUME; 4004 etc. are fatal for it."""
        for c in list(self.gateway_conns):
            await c.ws.close(code=code)

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT: discord.py closes and resumes."""
        for c in list(self.gateway_conns):
            if not c.ws.closed:
                await c.send({"op": 7, "d": None})

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(request)
        self.gateway_sessions += 1
        conn = _GatewayConn(ws, f"fake-session-{self.gateway_sessions}")
        self.gateway_conns.append(conn)
        task = asyncio.current_task()
        if task is not None:
            self._ws_tasks.add(task)
        try:
            await conn.send({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                frame = json.loads(msg.data)
                conn.received.append(frame)
                await self._gateway_frame(conn, frame)
                await self._notify()
        finally:
            if task is not None:
                self._ws_tasks.discard(task)
            with contextlib.suppress(ValueError):
                self.gateway_conns.remove(conn)
            await self._notify()
        return ws

    async def _gateway_frame(self, conn: _GatewayConn, frame: dict) -> None:
        op, d = frame.get("op"), frame.get("d")
        if op == 1:  # heartbeat
            await conn.send({"op": 11})
        elif op == 2:  # identify
            conn.identify = d
            await conn.dispatch(
                "READY",
                {
                    "v": 10,
                    "user": {**self.bot_user, "verified": True, "mfa_enabled": False, "email": None},
                    "guilds": [{"id": str(gid), "unavailable": True} for gid in self.guilds],
                    "session_id": conn.session_id,
                    "resume_gateway_url": self.gateway_url,
                    "application": {"id": str(self.application_id), "flags": 0},
                    "private_channels": [],
                    "relationships": [],
                    "presences": [],
                    "shard": [0, 1],
                },
            )
            members_intent = bool(int((d or {}).get("intents", 0)) & (1 << 1))
            for g in self.guilds.values():
                await conn.dispatch("GUILD_CREATE", self._guild_create_payload(g, members_intent))
            conn.ready.set()
        elif op == 6:  # resume
            conn.identify = {"resumed": d}
            conn.seq = int(d.get("seq") or 0)
            await conn.dispatch("RESUMED", {})
            conn.ready.set()
        elif op == 8:  # request guild members
            gid = int(d["guild_id"])
            g = self.guilds.get(gid)
            members = g["members"] if g else []
            ids = d.get("user_ids")
            if ids:
                ids = {str(i) for i in (ids if isinstance(ids, list) else [ids])}
                members = [m for m in members if m["user"]["id"] in ids]
            chunk = {"guild_id": str(gid), "members": members, "chunk_index": 0, "chunk_count": 1}
            if d.get("nonce"):
                chunk["nonce"] = d["nonce"]
            await conn.dispatch("GUILD_MEMBERS_CHUNK", chunk)

    def _guild_create_payload(self, g: dict, members_intent: bool) -> dict:
        """Like Discord: without the GUILD_MEMBERS intent only the bot's own member is included."""
        gid = g["id"]
        data = dict(g)
        if not members_intent:
            data["members"] = [m for m in g["members"] if m["user"]["id"] == self.bot_user["id"]]
        data["channels"] = [c for c in g["channels"]]
        data["threads"] = [t for t in self.threads.values() if t.get("guild_id") == gid]
        return data

    # ------------------------------------------------------------------ HTTP plumbing

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/gateway/ws":
            return await self._gateway(request)
        api_path = path[len(API_PREFIX) :] if path.startswith(API_PREFIX) else path
        body_json: Any = None
        files: list[tuple[str, bytes, str]] = []
        ctype = request.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                name = part.name or ""
                if name == "payload_json":
                    body_json = json.loads(await part.text())  # type: ignore[union-attr]
                elif part.filename is not None:  # type: ignore[union-attr]
                    files.append((part.filename, bytes(await part.read(decode=False)), name))  # type: ignore[union-attr]
                else:
                    body_json = body_json or {}
        elif request.can_read_body:
            raw = await request.read()
            if raw:
                try:
                    body_json = json.loads(raw)
                except ValueError:
                    body_json = raw.decode(errors="replace")
        call = Call(
            method=request.method,
            path=api_path,
            query=dict(request.query),
            json=body_json,
            files=[(f[0], f[1]) for f in files],
            headers=dict(request.headers),
            ts=time.monotonic(),
        )
        self.calls_log.append(call)
        try:
            resp = await self._respond(request, call, files)
        except HTTPError as e:
            resp = error_response(e.status, e.code, e.message)
        except Exception as e:  # a bug in the fake: make it loud in the test, not a hang
            call.response = repr(e)
            # 500s make discord.py retry with sleeps; answer 400 instead so the test fails fast
            resp = error_response(400, 0, f"fakediscord internal error: {type(e).__name__}: {e}")
        call.status = resp.status
        if call.response is None and isinstance(resp, web.Response) and resp.body is not None:
            with contextlib.suppress(Exception):
                call.response = json.loads(resp.body)  # type: ignore[arg-type]
        await self._notify()
        return resp

    async def _respond(self, request: web.Request, call: Call, files: list) -> web.StreamResponse:
        for fault in self._faults:
            if fault.remaining > 0 and fault.matches(call.method, call.path):
                fault.remaining -= 1
                if fault.remaining == 0:
                    self._faults.remove(fault)
                return fault.respond()
        if call.path.startswith("/cdn/"):
            return self._cdn(call)
        if self.strict_token and call.headers.get("Authorization", "").startswith("Bot "):
            if call.headers["Authorization"] != f"Bot {self.token}":
                raise HTTPError(401, 0, "401: Unauthorized")
        for method, pattern, handler in self._routes:
            if method != call.method:
                continue
            m = pattern.fullmatch(call.path)
            if m:
                result = await handler(call, files, **m.groupdict())
                if isinstance(result, web.StreamResponse):
                    return result
                if result is None:
                    return web.Response(status=204)
                return json_response(result)
        self.unknown_calls.append(call)
        return error_response(404, 0, f"404: Not Found (fakediscord has no route {call.method} {call.path})")

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        """Add/override a route (checked before the built-in ones). ``pattern`` is a regex over the path
        without /api/v10; named groups become keyword arguments. The handler is
        ``async def h(call, files, **groups)`` returning a JSON-able body, None (204) or a web.Response."""

        def deco(fn: Handler) -> Handler:
            self._routes.insert(0, (method.upper(), re.compile(pattern), fn))
            return fn

        return deco

    def _cdn(self, call: Call) -> web.Response:
        m = re.fullmatch(r"/cdn/attachments/\d+/(\d+)/[^/]+", call.path)
        if m and m.group(1) in self.cdn:
            name, data = self.cdn[m.group(1)]
            return web.Response(body=data, headers={"Content-Type": P.guess_content_type(name)})
        return web.Response(status=404, text="Not Found")

    def _install_routes(self) -> None:
        r = self._routes

        def named(pattern: str) -> str:
            return re.sub(r"\{(\w+)\}", lambda mm: f"(?P<{mm.group(1)}>[^/]+)", pattern)

        def a(method: str, pattern: str) -> Callable[[Handler], Handler]:
            def deco(fn: Handler) -> Handler:
                r.append((method, re.compile(named(pattern)), fn))
                return fn

            return deco

        @a("GET", "/users/@me")
        async def me(call: Call, files: list) -> Any:
            return self.bot_user

        @a("GET", "/oauth2/applications/@me")
        async def appinfo(call: Call, files: list) -> Any:
            return self._app_info()

        @a("GET", "/applications/@me")
        async def appinfo2(call: Call, files: list) -> Any:
            return self._app_info()

        @a("GET", "/gateway")
        async def gateway(call: Call, files: list) -> Any:
            return {"url": self.gateway_url}

        @a("GET", "/gateway/bot")
        async def gateway_bot(call: Call, files: list) -> Any:
            return {
                "url": self.gateway_url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }

        @a("GET", "/users/{user_id}")
        async def get_user(call: Call, files: list, user_id: str) -> Any:
            for u in [self.bot_user, *self.users.values()]:
                if u["id"] == user_id:
                    return u
            raise HTTPError(404, 10013, "Unknown User")

        # application commands
        @a("PUT", "/applications/{app}/commands")
        async def put_global(call: Call, files: list, app: str) -> Any:
            return self._sync_commands(None, call.json or [])

        @a("PUT", "/applications/{app}/guilds/{gid}/commands")
        async def put_guild(call: Call, files: list, app: str, gid: str) -> Any:
            return self._sync_commands(int(gid), call.json or [])

        @a("GET", "/applications/{app}/commands")
        async def get_global(call: Call, files: list, app: str) -> Any:
            return self.commands.get(None, [])

        @a("GET", "/applications/{app}/guilds/{gid}/commands")
        async def get_guild_cmds(call: Call, files: list, app: str, gid: str) -> Any:
            return self.commands.get(int(gid), [])

        # interactions
        @a("POST", "/interactions/{iid}/{token}/callback")
        async def callback(call: Call, files: list, iid: str, token: str) -> Any:
            return self._interaction_callback(call, files, int(iid), token)

        @a("POST", "/webhooks/{app}/{token}")
        async def followup(call: Call, files: list, app: str, token: str) -> Any:
            rec = self._webhook_rec(token)
            self._check_upload(files, rec.channel_id)
            msg = self._create_message(
                rec.channel_id or 0,
                call.json or {},
                files,
                via="followup" if rec.payload else "webhook",
                token=token,
                webhook=True,
            )
            rec.followups.append(msg)
            return msg.data

        @a("GET", "/webhooks/{app}/{token}/messages/{mid}")
        async def wh_get(call: Call, files: list, app: str, token: str, mid: str) -> Any:
            return self._webhook_msg(token, mid).data

        @a("PATCH", "/webhooks/{app}/{token}/messages/{mid}")
        async def wh_edit(call: Call, files: list, app: str, token: str, mid: str) -> Any:
            msg = self._webhook_msg(token, mid)
            self._check_upload(files, msg.channel_id)
            self._edit_message(msg, call.json or {}, files)
            return msg.data

        @a("DELETE", "/webhooks/{app}/{token}/messages/{mid}")
        async def wh_delete(call: Call, files: list, app: str, token: str, mid: str) -> Any:
            self._delete_message(self._webhook_msg(token, mid))
            return None

        # channels
        @a("GET", "/channels/{cid}")
        async def get_channel(call: Call, files: list, cid: str) -> Any:
            return self._channel(cid)

        @a("POST", "/channels/{cid}/messages")
        async def send(call: Call, files: list, cid: str) -> Any:
            self._channel(cid)
            self._check_upload(files, int(cid))
            body = call.json or {}
            nonce = str(body["nonce"]) if body.get("nonce") is not None else None
            if nonce and body.get("enforce_nonce"):
                seen = self._nonces.get(nonce)
                if seen is not None and time.monotonic() - seen[0] <= self.nonce_window_s:
                    return seen[1].data  # deduplicated: the message made the first time
            msg = self._create_message(int(cid), body, files, via="bot")
            if nonce:
                self._nonces[nonce] = (time.monotonic(), msg)
            reply = {**msg.data, "nonce": nonce} if nonce else msg.data  # the nonce comes back only here
            for hold in list(self.holds):
                if hold.matches(int(cid), msg):
                    self.holds.remove(hold)
                    hold.message = msg
                    hold.created.set()
                    await hold.release.wait()  # the message exists; the reply waits (the client may die)
            return reply

        @a("GET", "/channels/{cid}/messages")
        async def history(call: Call, files: list, cid: str) -> Any:
            self._channel(cid)
            limit = int(call.query.get("limit", 50))
            msgs = [m.data for m in reversed(self.channel_messages(int(cid)))]
            return msgs[:limit]

        @a("GET", "/channels/{cid}/messages/{mid}")
        async def get_msg(call: Call, files: list, cid: str, mid: str) -> Any:
            return self._channel_msg(cid, mid).data

        @a("PATCH", "/channels/{cid}/messages/{mid}")
        async def edit_msg(call: Call, files: list, cid: str, mid: str) -> Any:
            msg = self._channel_msg(cid, mid)
            self._check_upload(files, int(cid))
            self._edit_message(msg, call.json or {}, files)
            return msg.data

        @a("DELETE", "/channels/{cid}/messages/{mid}")
        async def del_msg(call: Call, files: list, cid: str, mid: str) -> Any:
            self._delete_message(self._channel_msg(cid, mid))
            return None

        @a("POST", "/channels/{cid}/typing")
        async def typing(call: Call, files: list, cid: str) -> Any:
            self._channel(cid)
            return None

        @a("PUT", "/channels/{cid}/messages/{mid}/reactions/{emoji}/@me")
        async def react(call: Call, files: list, cid: str, mid: str, emoji: str) -> Any:
            self._channel_msg(cid, mid).reactions.append(emoji)
            return None

        @a("DELETE", "/channels/{cid}/messages/{mid}/reactions/{emoji}/@me")
        async def unreact(call: Call, files: list, cid: str, mid: str, emoji: str) -> Any:
            msg = self._channel_msg(cid, mid)
            with contextlib.suppress(ValueError):
                msg.reactions.remove(emoji)
            return None

        @a("POST", "/channels/{cid}/threads")
        async def thread(call: Call, files: list, cid: str) -> Any:
            return self._create_thread(cid, call.json or {}, None)

        @a("POST", "/channels/{cid}/messages/{mid}/threads")
        async def thread_from_msg(call: Call, files: list, cid: str, mid: str) -> Any:
            self._channel_msg(cid, mid)
            return self._create_thread(cid, call.json or {}, int(mid))

        @a("PUT", "/channels/{cid}/thread-members/{uid}")
        async def thread_member(call: Call, files: list, cid: str, uid: str) -> Any:
            self._channel(cid)
            return None

        @a("PATCH", "/channels/{cid}")
        async def edit_channel(call: Call, files: list, cid: str) -> Any:
            ch = self._channel(cid)
            body = call.json or {}
            for k in ("name", "topic", "rate_limit_per_user"):
                if k in body:
                    ch[k] = body[k]
            if "thread_metadata" in ch:
                for k in ("archived", "locked", "auto_archive_duration"):
                    if k in body:
                        ch["thread_metadata"][k] = body[k]
            return ch

        # DMs, guilds
        @a("POST", "/users/@me/channels")
        async def open_dm(call: Call, files: list) -> Any:
            rid = str((call.json or {}).get("recipient_id"))
            u = next((u for u in self.users.values() if u["id"] == rid), None)
            if u is None:
                raise HTTPError(400, 50007, "Cannot send messages to this user")
            return self._dm_channel_for(u)

        @a("GET", "/guilds/{gid}")
        async def get_guild(call: Call, files: list, gid: str) -> Any:
            g = self._guild(gid)
            rest = {k: v for k, v in g.items() if k not in _GATEWAY_ONLY_GUILD_KEYS}
            if call.query.get("with_counts") in ("1", "true"):
                rest["approximate_member_count"] = len(g["members"])
                rest["approximate_presence_count"] = 0
            return rest

        @a("GET", "/guilds/{gid}/channels")
        async def guild_channels(call: Call, files: list, gid: str) -> Any:
            return self._guild(gid)["channels"]

        @a("GET", "/guilds/{gid}/roles")
        async def guild_roles(call: Call, files: list, gid: str) -> Any:
            return self._guild(gid)["roles"]

        @a("GET", "/guilds/{gid}/members/{uid}")
        async def guild_member(call: Call, files: list, gid: str, uid: str) -> Any:
            for m in self._guild(gid)["members"]:
                if m["user"]["id"] == uid:
                    return m
            raise HTTPError(404, 10007, "Unknown Member")

        @a("GET", "/guilds/{gid}/members")
        async def guild_members(call: Call, files: list, gid: str) -> Any:
            return self._guild(gid)["members"][: int(call.query.get("limit", 1000))]

        @a("GET", "/guilds/{gid}/threads/active")
        async def active_threads(call: Call, files: list, gid: str) -> Any:
            ts = [t for t in self.threads.values() if t["guild_id"] == gid]
            return {"threads": ts, "members": []}

    # ------------------------------------------------------------------ state helpers

    def _app_info(self) -> dict:
        return {
            "id": str(self.application_id),
            "name": self.bot_user["username"],
            "description": "",
            "icon": None,
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": self.owner,
            "team": None,
            "verify_key": "0" * 64,
            "flags": 0,
            "bot": self.bot_user,
            "interactions_endpoint_url": None,
            "redirect_uris": [],
            "tags": [],
        }

    def _sync_commands(self, guild_id: int | None, cmds: list[dict]) -> list[dict]:
        out = []
        old = {c["name"]: c for c in self.commands.get(guild_id, [])}
        for c in cmds:
            d = {
                "id": old.get(c["name"], {}).get("id") or str(P.snowflake()),
                "application_id": str(self.application_id),
                "version": str(P.snowflake()),
                "type": 1,
                "description": "",
                "options": [],
                "default_member_permissions": None,
                "dm_permission": True,
                "nsfw": False,
                **c,
            }
            if guild_id is not None:
                d["guild_id"] = str(guild_id)
            out.append(d)
        self.commands[guild_id] = out
        return out

    def command(self, name: str, guild_id: int | None = None) -> dict:
        """A synced command by name (global unless ``guild_id``)."""
        for c in self.commands.get(guild_id, []):
            if c["name"] == name:
                return c
        raise KeyError(
            f"command {name!r} not synced (have {[c['name'] for c in self.commands.get(guild_id, [])]})"
        )

    def _guild(self, gid: str | int) -> dict:
        g = self.guilds.get(int(gid))
        if g is None:
            raise HTTPError(404, 10004, "Unknown Guild")
        return g

    def _channel(self, cid: str | int) -> dict:
        ch = self.channels.get(int(cid))
        if ch is None:
            raise HTTPError(404, 10003, "Unknown Channel")
        return ch

    def _channel_msg(self, cid: str, mid: str) -> StoredMessage:
        self._channel(cid)
        msg = self._message_index.get(int(mid))
        if msg is None or msg.deleted or msg.channel_id != int(cid):
            raise HTTPError(404, 10008, "Unknown Message")
        return msg

    def _dm_channel_for(self, u: dict) -> dict:
        uid = int(u["id"])
        if uid not in self.dm_channels:
            ch = P.dm_channel(P.snowflake(), u)
            self.dm_channels[uid] = ch
            self.channels[int(ch["id"])] = ch
        return self.dm_channels[uid]

    def dm_messages(self, user: str | dict) -> list[StoredMessage]:
        uid = int(self._who(user)["id"])
        ch = self.dm_channels.get(uid)
        return self.channel_messages(int(ch["id"])) if ch else []

    def _webhook_rec(self, token: str) -> InteractionRecord:
        if token in self.expired_tokens:
            raise HTTPError(401, 50027, "Invalid Webhook Token")
        rec = self.interactions.get(token)
        if rec is None:  # an interaction the test did not register: keep going, messages go to channel 0
            rec = InteractionRecord(id=0, token=token, type=0, channel_id=None, guild_id=None, payload=None)
            self.interactions[token] = rec
        return rec

    def _webhook_msg(self, token: str, mid: str) -> StoredMessage:
        rec = self._webhook_rec(token)
        if mid == "@original":
            if rec.original is None or rec.original.deleted:
                raise HTTPError(404, 10008, "Unknown Message")
            return rec.original
        msg = self._message_index.get(int(mid))
        if msg is None or msg.deleted or msg.token != token:
            raise HTTPError(404, 10008, "Unknown Message")
        return msg

    def _check_upload(self, files: list, channel_id: int | None) -> None:
        if len(files) > 10:
            raise HTTPError(400, 50035, "Invalid Form Body (files: Must be 10 or fewer in length.)")
        limit = self.upload_limit_for(channel_id)
        for _name, data, _field in files:
            if len(data) > limit:
                raise HTTPError(413, 40005, "Request entity too large")

    def _attachments_from(
        self, channel_id: int, body: dict, files: list, existing: dict | None
    ) -> tuple[list, dict]:
        """Build attachment objects: kept existing ones (edit) plus uploaded files."""
        meta = {str(a.get("id")): a for a in body.get("attachments") or []}
        atts: list[dict] = []
        store: dict[str, tuple[str, bytes]] = {}
        if existing is not None:
            old_atts = {a["id"]: a for a in existing["data"].get("attachments", [])}
            if "attachments" in body:
                keep = [str(a.get("id")) for a in body.get("attachments") or []]
                keep = [k for k in keep if k in old_atts]
            else:
                keep = list(old_atts)
            for k in keep:
                atts.append(old_atts[k])
                store[k] = existing["files"][k]
        for index, (name, data, fieldname) in enumerate(files):
            m = re.fullmatch(r"files\[(\d+)\]", fieldname)
            idx = m.group(1) if m else str(index)
            extra = meta.get(idx, {})
            aid = P.snowflake()
            fname = extra.get("filename") or name
            self.cdn[str(aid)] = (fname, data)
            url = f"{self.base_url}/cdn/attachments/{channel_id}/{aid}/{fname}"
            att = P.attachment(fname, len(data), url, attachment_id=aid)
            if extra.get("description"):
                att["description"] = extra["description"]
            atts.append(att)
            store[str(aid)] = (fname, data)
        return atts, store

    def _create_message(
        self,
        channel_id: int,
        body: dict,
        files: list,
        *,
        via: str,
        token: str | None = None,
        webhook: bool = False,
        flags: int = 0,
        interaction: InteractionRecord | None = None,
    ) -> StoredMessage:
        mid = P.snowflake()
        atts, store = self._attachments_from(channel_id, body, files, None)
        ch = self.channels.get(channel_id)
        data: dict[str, Any] = {
            "id": str(mid),
            "channel_id": str(channel_id),
            "type": 0,
            "content": body.get("content") or "",
            "author": self.bot_user,
            "timestamp": P.iso_now(),
            "edited_timestamp": None,
            "tts": bool(body.get("tts", False)),
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": atts,
            "embeds": body.get("embeds") or [],
            "components": body.get("components") or [],
            "pinned": False,
            "flags": int(body.get("flags") or 0) | flags,
        }
        if body.get("poll"):
            data["poll"] = body["poll"]
        if ch and ch.get("guild_id"):
            data["guild_id"] = ch["guild_id"]
        if body.get("message_reference"):
            data["message_reference"] = body["message_reference"]
            data["type"] = 19
        if webhook:
            data["webhook_id"] = str(self.application_id)
            data["application_id"] = str(self.application_id)
        if interaction is not None and interaction.payload is not None:
            p = interaction.payload
            u = p.get("member", {}).get("user") or p.get("user")
            data["type"] = 20
            data["interaction_metadata"] = {
                "id": str(interaction.id),
                "type": interaction.type,
                "user": u,
                "authorizing_integration_owners": p.get("authorizing_integration_owners", {}),
            }
        msg = StoredMessage(
            id=mid,
            channel_id=channel_id,
            data=data,
            history=[json.loads(json.dumps(data))],
            files=store,
            via=via,
            token=token,
        )
        self.messages.setdefault(channel_id, []).append(msg)
        self._message_index[mid] = msg
        self._echo("MESSAGE_CREATE", data)
        if ch is not None:
            ch["last_message_id"] = str(mid)
            if "message_count" in ch:
                ch["message_count"] += 1
                ch["total_message_sent"] = ch.get("total_message_sent", 0) + 1
        return msg

    def _edit_message(self, msg: StoredMessage, body: dict, files: list) -> None:
        data = msg.data
        for key in ("content", "embeds", "components", "poll"):
            if key in body:
                data[key] = body[key] if body[key] is not None else ([] if key != "content" else "")
        if "flags" in body and body["flags"] is not None:
            data["flags"] = int(body["flags"])
        if "attachments" in body or files:
            atts, store = self._attachments_from(
                msg.channel_id, body, files, {"data": data, "files": msg.files}
            )
            data["attachments"] = atts
            msg.files = store
        data["flags"] = int(data.get("flags") or 0) & ~FLAG_LOADING
        data["edited_timestamp"] = P.iso_now()
        msg.history.append(json.loads(json.dumps(data)))
        self._echo("MESSAGE_UPDATE", data)

    def _delete_message(self, msg: StoredMessage) -> None:
        msg.deleted = True
        event = {"id": str(msg.id), "channel_id": str(msg.channel_id)}
        if msg.data.get("guild_id"):
            event["guild_id"] = msg.data["guild_id"]
        self._echo("MESSAGE_DELETE", event)

    def _create_thread(self, cid: str, body: dict, message_id: int | None) -> dict:
        parent = self._channel(cid)
        if parent.get("type") not in (0, 5, 15):
            raise HTTPError(400, 50024, "Cannot execute action on this channel type")
        tid = message_id or P.snowflake()
        private = body.get("type") == 12
        t = P.thread_channel(
            tid,
            int(parent["guild_id"]),
            int(cid),
            self.application_id,
            body.get("name") or "thread",
            private=private,
            auto_archive_duration=int(body.get("auto_archive_duration") or 1440),
        )
        self.threads[tid] = t
        self._echo("THREAD_CREATE", {**t, "newly_created": True})
        self.channels[tid] = t
        if message_id is not None:
            self._message_index[message_id].data["thread"] = t
        return t

    def _interaction_callback(self, call: Call, files: list, iid: int, token: str) -> Any:
        rec = self.interactions.get(token)
        if token in self.expired_tokens or (rec is not None and rec.expired):
            raise HTTPError(404, 10062, "Unknown interaction")
        if rec is None:
            rec = InteractionRecord(id=iid, token=token, type=2, channel_id=None, guild_id=None, payload=None)
            self.interactions[token] = rec
        if rec.responded:
            raise HTTPError(400, 40060, "Interaction has already been acknowledged.")
        body = call.json or {}
        cb_type = int(body.get("type", 0))
        data = body.get("data") or {}
        rec.callback_type = cb_type
        rec.callback_data = data
        channel_id = rec.channel_id or 0
        resp_interaction: dict[str, Any] = {"id": str(iid), "type": rec.type}
        resource: dict[str, Any] = {"type": cb_type}
        if cb_type == CB_MESSAGE:
            self._check_upload(files, channel_id)
            rec.original = self._create_message(
                channel_id, data, files, via="interaction", token=token, webhook=True, interaction=rec
            )
            resource["message"] = rec.original.data
        elif cb_type == CB_DEFERRED_MESSAGE:
            rec.original = self._create_message(
                channel_id,
                {"flags": data.get("flags", 0)},
                [],
                via="interaction",
                token=token,
                webhook=True,
                flags=FLAG_LOADING,
                interaction=rec,
            )
            resource["message"] = rec.original.data
            resp_interaction["response_message_loading"] = True
        elif cb_type in (CB_UPDATE_MESSAGE, CB_DEFERRED_UPDATE):
            mid = (rec.payload or {}).get("message", {}).get("id")
            target = self._message_index.get(int(mid)) if mid else None
            if target is not None:
                rec.original = target
                if cb_type == CB_UPDATE_MESSAGE:
                    self._check_upload(files, target.channel_id)
                    self._edit_message(target, data, files)
                    resource["message"] = target.data
        if rec.original is not None:
            resp_interaction["response_message_id"] = str(rec.original.id)
            resp_interaction["response_message_ephemeral"] = rec.original.ephemeral
        out: dict[str, Any] = {"interaction": resp_interaction}
        if cb_type not in (CB_PONG, CB_DEFERRED_UPDATE, CB_AUTOCOMPLETE):
            out["resource"] = resource
        return out


_GATEWAY_ONLY_GUILD_KEYS = {
    "joined_at",
    "large",
    "unavailable",
    "member_count",
    "voice_states",
    "members",
    "channels",
    "threads",
    "presences",
    "stage_instances",
    "guild_scheduled_events",
    "soundboard_sounds",
}
