"""Errors users see, and how every failure becomes a short message.

Two kinds of failure:
- expected ones (bad option, no permission, quota, unknown id): raise ``UserError`` (or a subclass)
  with what happened and what to do; the text is shown as is.
- unexpected ones: logged with the traceback under a short error id; the user sees only the id.

Replies go through ``reply``: it picks response vs followup, and when the interaction token is dead
(401 / 50027, or 10062 for the callback) it posts in the channel with the bot token instead, because
a 15-minute-old interaction cannot be answered any more (facts.md section 2).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from typing import Any

import discord
from discord import app_commands

from bot.ackgate import mark_answered

log = logging.getLogger("loraforge.errors")

# Discord error codes we act on.
CODE_INVALID_WEBHOOK_TOKEN = 50027  # interaction token older than 15 minutes
CODE_UNKNOWN_INTERACTION = 10062  # callback after 3 s / token expired
CODE_ALREADY_ACKNOWLEDGED = 40060
CODE_ENTITY_TOO_LARGE = 40005  # upload over the limit (HTTP 413)
CODE_EDIT_CAP = 30046  # message older than an hour: edits are capped


class UserError(Exception):
    """A failure the user can act on. ``what``: what happened; ``todo``: what to do about it."""

    def __init__(self, what: str, todo: str = "") -> None:
        super().__init__(what)
        self.what = what
        self.todo = todo

    def render(self) -> str:
        return f"{self.what}\n{self.todo}".strip() if self.todo else self.what


class PermissionDenied(UserError):
    pass


class NotFound(UserError):
    pass


class InvalidInput(UserError):
    pass


class LimitReached(UserError):
    """A quota or size limit (message says which limit and when it resets, where known)."""


def new_error_id() -> str:
    # Short enough to read out, random enough to grep the log for one occurrence.
    return secrets.token_hex(4)


def token_expired(exc: BaseException) -> bool:
    """True when a Discord error means the interaction token can no longer be used."""
    if not isinstance(exc, discord.HTTPException):
        return False
    return exc.status == 401 or exc.code in (CODE_INVALID_WEBHOOK_TOKEN, CODE_UNKNOWN_INTERACTION)


def too_large(exc: BaseException) -> bool:
    return isinstance(exc, discord.HTTPException) and (exc.status == 413 or exc.code == CODE_ENTITY_TOO_LARGE)


def unwrap(exc: BaseException) -> BaseException:
    """discord.py wraps callback exceptions (CommandInvokeError, ...): get at the real one."""
    seen = 0
    while seen < 5 and isinstance(exc, app_commands.CommandInvokeError | discord.app_commands.TransformerError):
        inner = getattr(exc, "original", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
        seen += 1
    return exc


def describe(exc: BaseException) -> tuple[str, bool]:
    """(message for the user, expected?). Unexpected errors get an id from the caller.

    Known exception types of other rooms are matched by class name so this module does not import
    them (and keeps working when one of them moves)."""
    exc = unwrap(exc)
    name = type(exc).__name__
    if isinstance(exc, UserError):
        return exc.render(), True
    if name == "SpecError":
        problems = getattr(exc, "problems", None)
        if problems:
            lines = [f"- `{f}`: {m}" if f else f"- {m}" for f, m in problems[:15]]
            return "These settings are not valid:\n" + "\n".join(lines) + "\nFix them and run the command again.", True
        return f"These settings are not valid: {exc}\nFix them and run the command again.", True
    if name in ("QuotaError", "QuotaExceeded"):
        return str(exc), True  # the scheduler's text already says which limit and what to do
    if name == "IntakeError":
        return f"{exc}", True
    if name == "DuplicateNameError":
        return f"{exc}. Pick another name, or add images to it with `/dataset add`.", True
    if name == "NotFoundError":
        return f"{exc}. Check the id with `/jobs` or `/dataset list`.", True
    if name == "IllegalTransitionError":
        return "That job has already moved on (it finished or was cancelled). See `/job show`.", True
    if isinstance(exc, PermissionError) and exc.errno is None:
        return f"Not allowed: {exc}.", True
    if isinstance(exc, app_commands.CommandOnCooldown):  # a CheckFailure too: test it first
        return f"Slow down: try again in {max(1, math.ceil(exc.retry_after))} s.", True
    if isinstance(exc, app_commands.CheckFailure):
        return "You are not allowed to use this command here.", True
    if isinstance(exc, discord.Forbidden):
        return (
            "Discord refused: the bot lacks a permission in this channel (send messages, attach files or "
            "create threads). Ask an admin to check the bot's role.",
            True,
        )
    return "", False


def log_unexpected(exc: BaseException, where: str) -> str:
    """Log with the traceback; returns the id the user is shown."""
    eid = new_error_id()
    exc = unwrap(exc)
    log.error("error %s in %s: %s", eid, where, type(exc).__name__, exc_info=(type(exc), exc, exc.__traceback__))
    return eid


def user_message(exc: BaseException, where: str) -> str:
    text, expected = describe(exc)
    if expected:
        return text
    eid = log_unexpected(exc, where)
    return (
        f"Something went wrong on our side (error id `{eid}`). Try again in a moment; if it keeps "
        "happening, tell an admin the error id."
    )


async def reply(
    interaction: discord.Interaction,
    content: str | None = None,
    *,
    ephemeral: bool = False,
    embed: discord.Embed | None = None,
    files: Sequence[discord.File] = (),
    view: discord.ui.View | None = None,
    mention_user: bool = False,
) -> discord.Message | None:
    """Answer an interaction however far it has got (fresh, deferred, responded). If the token has
    expired, post in the channel with the bot token (never ephemeral there, so sensitive replies
    should say little), mentioning the user so they see it."""
    kwargs: dict[str, Any] = {}
    if embed is not None:
        kwargs["embed"] = embed
    if files:
        kwargs["files"] = list(files)
    if view is not None:
        kwargs["view"] = view
    try:
        if not interaction.response.is_done():
            await interaction.response.send_message(content, ephemeral=ephemeral, **kwargs)
            mark_answered(interaction)
            return None
        return await interaction.followup.send(content or discord.utils.MISSING, ephemeral=ephemeral, wait=True, **kwargs)
    except discord.HTTPException as e:
        if not token_expired(e):
            raise
        log.info("interaction token expired for %s; posting with the bot token", interaction.id)
        return await post_in_channel(interaction, content, mention_user=True, **_reopen(kwargs))


def _reopen(kwargs: dict[str, Any]) -> dict[str, Any]:
    # A discord.File that was already sent has been read; rewind it so the fallback can send it again.
    for f in kwargs.get("files", []):
        try:
            f.reset()
        except Exception:  # noqa: BLE001 - a non-seekable file simply cannot be resent
            pass
    return kwargs


async def post_in_channel(
    interaction: discord.Interaction,
    content: str | None,
    *,
    mention_user: bool = True,
    **kwargs: Any,
) -> discord.Message | None:
    """Post with the bot token in the interaction's channel (the fallback for a dead token)."""
    channel_id = interaction.channel_id
    if channel_id is None:
        log.warning("no channel to fall back to for interaction %s", interaction.id)
        return None
    channel = interaction.client.get_partial_messageable(channel_id)  # type: ignore[union-attr]
    text = content or ""
    if mention_user:
        text = f"{interaction.user.mention} {text}".strip()
    return await channel.send(
        text, allowed_mentions=discord.AllowedMentions(users=True, roles=False, everyone=False), **kwargs
    )


async def report(interaction: discord.Interaction, exc: BaseException, where: str = "") -> None:
    """Tell the user what went wrong (ephemeral), whatever state the interaction is in. Never raises."""
    where = where or _where(interaction)
    text = user_message(exc, where)
    try:
        await reply(interaction, text, ephemeral=True)
    except Exception as e:  # noqa: BLE001 - the last line of defence must not throw
        log.warning("could not tell the user about an error in %s: %s", where, type(e).__name__)


def _where(interaction: discord.Interaction) -> str:
    cmd = interaction.command
    return f"/{cmd.qualified_name}" if cmd is not None else f"interaction type {interaction.type}"


class RedactFilter(logging.Filter):
    """Replaces secrets (the bot token, the link secret) in every log record. Installed on the root
    handlers by ``bot.app.run`` so neither discord.py nor our code can ever print the token."""

    def __init__(self, secrets_: Sequence[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets_ if s and len(s) >= 6]

    def _clean(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "[redacted]")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        clean = self._clean(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            # Format the traceback now so the cleaned text is what handlers print.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        return True


def install_redaction(*secrets_: str) -> RedactFilter:
    f = RedactFilter(secrets_)
    root = logging.getLogger()
    for h in root.handlers:
        h.addFilter(f)
    root.addFilter(f)
    return f
