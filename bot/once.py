"""Exactly-once posts: a job's result, its progress messages and its samples appear once, even when the bot
dies between Discord creating the message and the bot reading the reply.

Each post has a key (job + what it is: ``final``, ``progress:<n>``, ``sample:<file>``) and a nonce derived from
it. Before posting, the intent (key, channel, how the text starts, time) is recorded in ``job_events``;
after, the message id. The post itself carries ``nonce`` + ``enforce_nonce`` (discord.py sets the latter with
the former): within Discord's window of a few minutes a repeat returns the first message instead of a second.
A restart that finds an intent without an id first looks for the message in the channel's recent history
(by the nonce where Discord returns it, else by author and how the text starts, after the intent's time), and only
when it is not there posts again, with the same nonce.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import discord

log = logging.getLogger("loraforge.once")

INTENT_EVENT = "post_intent"
DONE_EVENT = "post_done"
HISTORY_LIMIT = 100  # recent messages searched for a post whose reply was lost
CLOCK_SLACK_S = 120.0  # the intent is recorded before the post; allow for clock differences with Discord


def nonce_for(job_id: int, key: str) -> str:
    """Discord takes up to 25 characters; the same job and key always give the same nonce."""
    return "lf" + hashlib.sha256(f"{int(job_id)}:{key}".encode()).hexdigest()[:22]


class PostLedger:
    """The intents and message ids of one job's posts (rows of ``job_events``)."""

    def __init__(self, repo: Any) -> None:
        self.repo = repo

    async def lookup(self, job_id: int, key: str) -> tuple[dict[str, Any] | None, int | None]:
        """(the last intent for ``key``, the id of its message if it is known)."""
        intent: dict[str, Any] | None = None
        mid: int | None = None
        for ev in await self.repo.list_events(job_id, types=[INTENT_EVENT, DONE_EVENT]):
            p = ev.payload
            if p.get("key") != key:
                continue
            if ev.type == INTENT_EVENT:
                intent, mid = p, None
            elif p.get("message_id"):
                mid = int(p["message_id"])
        return intent, mid


async def find_posted(
    dest: Any, me: int | None, nonce: str, marker: str, since: float, skip_id: int | None = None
) -> discord.Message | None:
    """The bot's own message with this nonce (or starting with ``marker``) posted after ``since`` (Unix s),
    other than ``skip_id`` (the message a new one replaces)."""
    try:
        async for m in dest.history(limit=HISTORY_LIMIT):
            if m.created_at.timestamp() < since - CLOCK_SLACK_S:
                break  # newest first: older ones cannot be ours
            if (me is not None and m.author.id != me) or m.id == skip_id:
                continue
            if (m.nonce is not None and str(m.nonce) == nonce) or (m.content or "").startswith(marker):
                return m
    except discord.HTTPException as e:  # no read access to history: posting again is all that is left
        log.info("could not read the history of %s to find an earlier post (%s)", getattr(dest, "id", "?"), e.status)
    return None


async def post_once(
    bot: Any, job_id: int, key: str, dest: Any, marker: str, send: Callable[[str], Awaitable[discord.Message]],
    *, replaces: int | None = None,
) -> tuple[int | None, bool]:
    """Post through ``send(nonce)`` unless this job's ``key`` was posted already. Returns (the message id when
    known, whether it was posted now). ``marker``: how the post's content starts (found again by it)."""
    ledger = PostLedger(bot.repo)
    nonce = nonce_for(job_id, key)
    intent, mid = await ledger.lookup(job_id, key)
    if mid is not None:
        return mid, False
    same_place = intent is not None and int(intent.get("channel_id") or 0) == int(dest.id)
    if intent is not None and same_place:
        me = bot.user.id if bot.user else None
        found = await find_posted(dest, me, nonce, str(intent.get("marker") or marker), float(intent.get("at") or 0),
                                  replaces)
        if found is not None:
            log.info("job %s: %s was posted before the bot stopped (message %s); not posting it again",
                     job_id, key, found.id)
            await bot.repo.add_event(job_id, DONE_EVENT, {"key": key, "message_id": found.id})
            return found.id, False
    if not same_place:
        await bot.repo.add_event(job_id, INTENT_EVENT, {"key": key, "channel_id": int(dest.id), "marker": marker,
                                                        "at": time.time()})
    msg = await send(nonce)
    await bot.repo.add_event(job_id, DONE_EVENT, {"key": key, "message_id": msg.id})
    return msg.id, True
