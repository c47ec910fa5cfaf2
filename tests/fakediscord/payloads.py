"""Builders for raw Discord payloads (users, members, channels, guilds, messages, interactions).

Everything here returns plain dicts shaped like what Discord sends on the wire (API v10), so they can be
fed to discord.py through the fake gateway (``await fake.dispatch("INTERACTION_CREATE", p)``) or directly
(``bot._connection.parse_interaction_create(p)``).  They do not need a running FakeDiscord.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from datetime import UTC, datetime
from typing import Any

DISCORD_EPOCH_MS = 1420070400000
DEFAULT_ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024

# Permission bits used by the defaults below.
PERM_ADMINISTRATOR = 1 << 3
PERM_MEMBER_DEFAULT = (
    (1 << 6)  # add reactions
    | (1 << 10)  # view channel
    | (1 << 11)  # send messages
    | (1 << 14)  # embed links
    | (1 << 15)  # attach files
    | (1 << 16)  # read message history
    | (1 << 31)  # use application commands
    | (1 << 35)  # create public threads
    | (1 << 38)  # send messages in threads
)
PERM_ALL = (1 << 53) - 1

_lock = threading.Lock()
_last_snowflake = 0


def snowflake() -> int:
    """A unique, monotonically increasing, realistic snowflake (its timestamp is now)."""
    global _last_snowflake
    with _lock:
        now = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        _last_snowflake = max(_last_snowflake + 1, now)
        return _last_snowflake


def iso_now() -> str:
    return datetime.now(UTC).isoformat()


def user(user_id: int | None = None, username: str = "alice", *, bot: bool = False, **extra: Any) -> dict:
    data = {
        "id": str(user_id or snowflake()),
        "username": username,
        "global_name": username.capitalize(),
        "discriminator": "0",
        "avatar": None,
        "bot": bot,
        "public_flags": 0,
        "flags": 0,
    }
    data.update(extra)
    return data


def member(
    user_data: dict,
    roles: list[int | str] | None = None,
    *,
    nick: str | None = None,
    permissions: int | None = None,
    joined_at: str | None = None,
) -> dict:
    """A guild member object. ``permissions`` is only present in interaction payloads (computed perms)."""
    data = {
        "user": user_data,
        "nick": nick,
        "avatar": None,
        "banner": None,
        "roles": [str(r) for r in (roles or [])],
        "joined_at": joined_at or iso_now(),
        "premium_since": None,
        "deaf": False,
        "mute": False,
        "pending": False,
        "flags": 0,
        "communication_disabled_until": None,
    }
    if permissions is not None:
        data["permissions"] = str(permissions)
    return data


def role(role_id: int, name: str, permissions: int, *, position: int = 1, managed: bool = False) -> dict:
    return {
        "id": str(role_id),
        "name": name,
        "color": 0,
        "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
        "hoist": False,
        "icon": None,
        "unicode_emoji": None,
        "position": position,
        "permissions": str(permissions),
        "managed": managed,
        "mentionable": False,
        "flags": 0,
    }


def text_channel(
    channel_id: int, guild_id: int, name: str = "general", *, position: int = 0, parent_id: int | None = None
) -> dict:
    return {
        "id": str(channel_id),
        "type": 0,
        "guild_id": str(guild_id),
        "name": name,
        "position": position,
        "permission_overwrites": [],
        "nsfw": False,
        "topic": None,
        "last_message_id": None,
        "rate_limit_per_user": 0,
        "parent_id": str(parent_id) if parent_id else None,
        "default_auto_archive_duration": 1440,
        "flags": 0,
    }


def thread_channel(
    thread_id: int,
    guild_id: int,
    parent_id: int,
    owner_id: int,
    name: str,
    *,
    private: bool = False,
    auto_archive_duration: int = 1440,
) -> dict:
    return {
        "id": str(thread_id),
        "type": 12 if private else 11,
        "guild_id": str(guild_id),
        "parent_id": str(parent_id),
        "owner_id": str(owner_id),
        "name": name,
        "last_message_id": None,
        "rate_limit_per_user": 0,
        "message_count": 0,
        "member_count": 1,
        "total_message_sent": 0,
        "flags": 0,
        "thread_metadata": {
            "archived": False,
            "auto_archive_duration": auto_archive_duration,
            "archive_timestamp": iso_now(),
            "locked": False,
            "invitable": True,
            "create_timestamp": iso_now(),
        },
        "member": {"id": str(thread_id), "user_id": str(owner_id), "join_timestamp": iso_now(), "flags": 0},
    }


def dm_channel(channel_id: int, recipient: dict) -> dict:
    return {"id": str(channel_id), "type": 1, "last_message_id": None, "recipients": [recipient], "flags": 0}


def guild(
    guild_id: int,
    name: str,
    *,
    owner_id: int,
    roles: list[dict],
    channels: list[dict],
    members: list[dict],
    premium_tier: int = 0,
) -> dict:
    """A full GUILD_CREATE payload (REST GET /guilds/{id} returns the same minus the gateway-only keys)."""
    return {
        "id": str(guild_id),
        "name": name,
        "icon": None,
        "splash": None,
        "discovery_splash": None,
        "banner": None,
        "description": None,
        "owner_id": str(owner_id),
        "afk_channel_id": None,
        "afk_timeout": 300,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "mfa_level": 0,
        "nsfw_level": 0,
        "application_id": None,
        "system_channel_id": channels[0]["id"] if channels else None,
        "system_channel_flags": 0,
        "rules_channel_id": None,
        "public_updates_channel_id": None,
        "safety_alerts_channel_id": None,
        "vanity_url_code": None,
        "premium_tier": premium_tier,
        "premium_subscription_count": 0,
        "premium_progress_bar_enabled": False,
        "preferred_locale": "en-US",
        "features": [],
        "roles": roles,
        "emojis": [],
        "stickers": [],
        "max_members": 500000,
        "max_video_channel_users": 25,
        # gateway-only (GUILD_CREATE) keys
        "joined_at": iso_now(),
        "large": False,
        "unavailable": False,
        "member_count": len(members),
        "voice_states": [],
        "members": members,
        "channels": channels,
        "threads": [],
        "presences": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "soundboard_sounds": [],
    }


def attachment(
    filename: str,
    size: int,
    url: str,
    *,
    attachment_id: int | None = None,
    content_type: str | None = None,
    ephemeral: bool = False,
    **extra: Any,
) -> dict:
    data = {
        "id": str(attachment_id or snowflake()),
        "filename": filename,
        "size": size,
        "url": url,
        "proxy_url": url,
        "content_type": content_type or guess_content_type(filename),
    }
    if ephemeral:
        data["ephemeral"] = True
    data.update(extra)
    return data


def guess_content_type(filename: str) -> str:
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    return {
        "png": "image/png",
        "jpg": "image/jpeg",
        "jpeg": "image/jpeg",
        "webp": "image/webp",
        "gif": "image/gif",
        "txt": "text/plain; charset=utf-8",
        "json": "application/json",
        "toml": "application/toml",
        "zip": "application/zip",
    }.get(ext, "application/octet-stream")


# --------------------------------------------------------------------------------------------- interactions

_OPTION_TYPES = {
    "subcommand": 1,
    "group": 2,
    "string": 3,
    "str": 3,
    "integer": 4,
    "int": 4,
    "boolean": 5,
    "bool": 5,
    "user": 6,
    "channel": 7,
    "role": 8,
    "mentionable": 9,
    "number": 10,
    "float": 10,
    "attachment": 11,
}


def option(name: str, value: Any, type: int | str | None = None, *, focused: bool = False) -> dict:
    """One raw command option. ``type`` may be a number or a name ("string", "integer", "number",
    "attachment", ...); inferred from the value when omitted (attachment dicts -> 11, user dicts -> 6)."""
    if isinstance(type, str):
        type = _OPTION_TYPES[type]
    if type is None:
        if isinstance(value, dict) and "filename" in value:
            type = 11
        elif isinstance(value, dict) and "username" in value:
            type = 6
        elif isinstance(value, bool):
            type = 5
        elif isinstance(value, int):
            type = 4
        elif isinstance(value, float):
            type = 10
        else:
            type = 3
    if isinstance(value, dict) and "id" in value:
        value = value["id"]
    data = {"name": name, "type": type, "value": value}
    if focused:
        data["focused"] = True
    return data


def _build_options(options: dict | list | None, focused: str | None, resolved: dict) -> list[dict]:
    if options is None:
        return []
    items: list[dict] = []
    if isinstance(options, dict):
        for name, value in options.items():
            if isinstance(value, tuple):  # (type, value)
                items.append(option(name, value[1], value[0]))
            else:
                items.append(option(name, value))
            raw = value[1] if isinstance(value, tuple) else value
            if isinstance(raw, dict) and "filename" in raw:
                resolved.setdefault("attachments", {})[str(raw["id"])] = raw
            elif isinstance(raw, dict) and "username" in raw:
                resolved.setdefault("users", {})[str(raw["id"])] = raw
    else:
        items = [dict(o) for o in options]
    if focused is not None:
        for o in items:
            if o["name"] == focused:
                o["focused"] = True
    return items


def _base_interaction(
    *,
    type: int,
    user: dict,
    guild_id: int | None,
    channel: dict | None,
    channel_id: int | None,
    application_id: int,
    roles: list[int | str] | None,
    permissions: int,
    app_permissions: int,
    attachment_size_limit: int,
    locale: str,
    guild_locale: str,
    interaction_id: int | None,
    token: str | None,
) -> dict:
    iid = interaction_id or snowflake()
    if channel is None and channel_id is not None:
        channel = text_channel(channel_id, guild_id) if guild_id else dm_channel(channel_id, user)
    data: dict[str, Any] = {
        "id": str(iid),
        "application_id": str(application_id),
        "type": type,
        "token": token or f"itoken-{iid}-{secrets.token_hex(8)}",
        "version": 1,
        "locale": locale,
        "app_permissions": str(app_permissions),
        "entitlements": [],
        "entitlement_sku_ids": [],
        "attachment_size_limit": attachment_size_limit,
        "authorizing_integration_owners": {"0": str(guild_id)} if guild_id else {"1": str(user["id"])},
        "context": 0 if guild_id else 1,
    }
    if channel is not None:
        data["channel"] = channel
        data["channel_id"] = channel["id"]
    if guild_id:
        data["guild_id"] = str(guild_id)
        data["guild_locale"] = guild_locale
        data["guild"] = {"id": str(guild_id), "locale": guild_locale, "features": []}
        data["member"] = member(user, roles or [], permissions=permissions)
    else:
        data["user"] = user
    return data


def slash_command(
    name: str,
    options: dict | list | None = None,
    *,
    user: dict,
    application_id: int,
    guild_id: int | None = None,
    channel_id: int | None = None,
    channel: dict | None = None,
    subcommand: str | None = None,
    roles: list[int | str] | None = None,
    permissions: int = PERM_MEMBER_DEFAULT,
    app_permissions: int = PERM_ALL,
    attachment_size_limit: int = DEFAULT_ATTACHMENT_SIZE_LIMIT,
    locale: str = "en-US",
    guild_locale: str = "en-US",
    command_id: int | None = None,
    command_guild_id: int | None = None,
    interaction_id: int | None = None,
    token: str | None = None,
    _type: int = 2,
    _focused: str | None = None,
) -> dict:
    """An INTERACTION_CREATE payload for a chat-input (slash) command.

    ``options``: ``{"name": value}`` (types inferred: str 3, int 4, bool 5, float 10, attachment dict 11,
    user dict 6; force one with ``{"name": ("number", 3)}``) or a list of raw option dicts.
    Attachment values must be dicts from :func:`attachment` / ``fake.add_attachment``; they are put into
    ``data.resolved.attachments`` automatically.  ``subcommand="create"`` nests the options under a type 1
    option; ``subcommand="dataset create"`` nests them under group (2) then subcommand (1).
    ``command_guild_id``: set it when the command was synced to a guild (``data.guild_id``).
    """
    resolved: dict = {}
    opts = _build_options(options, _focused, resolved)
    if subcommand:
        parts = subcommand.split()
        if len(parts) == 1:
            opts = [{"name": parts[0], "type": 1, "options": opts}]
        elif len(parts) == 2:
            opts = [
                {"name": parts[0], "type": 2, "options": [{"name": parts[1], "type": 1, "options": opts}]}
            ]
        else:
            raise ValueError("subcommand must be 'sub' or 'group sub'")
    data: dict[str, Any] = {
        "id": str(command_id or snowflake()),
        "name": name,
        "type": 1,
        "options": opts,
    }
    if resolved:
        data["resolved"] = resolved
    if command_guild_id:
        data["guild_id"] = str(command_guild_id)
    payload = _base_interaction(
        type=_type,
        user=user,
        guild_id=guild_id,
        channel=channel,
        channel_id=channel_id,
        application_id=application_id,
        roles=roles,
        permissions=permissions,
        app_permissions=app_permissions,
        attachment_size_limit=attachment_size_limit,
        locale=locale,
        guild_locale=guild_locale,
        interaction_id=interaction_id,
        token=token,
    )
    payload["data"] = data
    return payload


def autocomplete(name: str, options: dict | list | None, *, focused: str, **kwargs: Any) -> dict:
    """An autocomplete interaction (type 4): same arguments as :func:`slash_command` plus the focused option
    name; the focused option's value is the partial text typed so far."""
    return slash_command(name, options, _type=4, _focused=focused, **kwargs)


def component(
    custom_id: str,
    message: dict,
    *,
    user: dict,
    application_id: int,
    component_type: int = 2,
    values: list[str] | None = None,
    guild_id: int | None = None,
    channel: dict | None = None,
    channel_id: int | None = None,
    roles: list[int | str] | None = None,
    permissions: int = PERM_MEMBER_DEFAULT,
    app_permissions: int = PERM_ALL,
    attachment_size_limit: int = DEFAULT_ATTACHMENT_SIZE_LIMIT,
    locale: str = "en-US",
    guild_locale: str = "en-US",
    interaction_id: int | None = None,
    token: str | None = None,
) -> dict:
    """A message component interaction (type 3). ``message`` is the full message dict carrying the component
    (``fake.message(mid).data``); discord.py routes non-persistent views by that message id."""
    if channel_id is None and channel is None:
        channel_id = int(message["channel_id"])
    payload = _base_interaction(
        type=3,
        user=user,
        guild_id=guild_id,
        channel=channel,
        channel_id=channel_id,
        application_id=application_id,
        roles=roles,
        permissions=permissions,
        app_permissions=app_permissions,
        attachment_size_limit=attachment_size_limit,
        locale=locale,
        guild_locale=guild_locale,
        interaction_id=interaction_id,
        token=token,
    )
    data: dict[str, Any] = {"custom_id": custom_id, "component_type": component_type}
    if values is not None:
        data["values"] = values
    payload["data"] = data
    payload["message"] = message
    return payload


def button_press(custom_id: str, message: dict, **kwargs: Any) -> dict:
    """A button click (type 3, component_type 2)."""
    return component(custom_id, message, component_type=2, **kwargs)


def select_menu(custom_id: str, message: dict, values: list[str], **kwargs: Any) -> dict:
    """A string select (type 3, component_type 3)."""
    return component(custom_id, message, component_type=3, values=values, **kwargs)


def modal_submit(
    custom_id: str,
    values: dict[str, str],
    *,
    user: dict,
    application_id: int,
    guild_id: int | None = None,
    channel_id: int | None = None,
    channel: dict | None = None,
    roles: list[int | str] | None = None,
    permissions: int = PERM_MEMBER_DEFAULT,
    app_permissions: int = PERM_ALL,
    attachment_size_limit: int = DEFAULT_ATTACHMENT_SIZE_LIMIT,
    token: str | None = None,
) -> dict:
    """A modal submit (type 5) with text inputs ``{custom_id: value}``, each wrapped in a Label (type 18)
    as the current Discord client sends them."""
    payload = _base_interaction(
        type=5,
        user=user,
        guild_id=guild_id,
        channel=channel,
        channel_id=channel_id,
        application_id=application_id,
        roles=roles,
        permissions=permissions,
        app_permissions=app_permissions,
        attachment_size_limit=attachment_size_limit,
        locale="en-US",
        guild_locale="en-US",
        interaction_id=None,
        token=token,
    )
    counter = itertools.count(1)
    payload["data"] = {
        "custom_id": custom_id,
        "components": [
            {
                "type": 18,
                "id": next(counter),
                "component": {"type": 4, "id": next(counter), "custom_id": k, "value": v},
            }
            for k, v in values.items()
        ],
    }
    return payload
