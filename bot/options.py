"""Slash-command options: one declaration of each range, used by Discord and checked here.

Discord's min/max, choices and option types are enforced only by the official clients; a raw
interaction can carry anything (``number: -5``, ``page: 0``, ``strength: 100``, an id past SQLite's
64 bits, text where a number belongs). The commands declare their options once, with the aliases
below (or ``app_commands.Range``/``choices``/``Literal`` in place), and ``check_raw_options`` checks
every raw option of an incoming command against what the command declared, before discord.py
converts it and before the command runs. A bad value gets one private line naming the option, and
nothing is done.

Ranges that Discord cannot express (a list of strengths typed as text) read the same declaration
through ``bounds``, so ``strength: 100`` and ``strengths: "99,1"`` are refused by one rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import discord
from discord import AppCommandOptionType as T
from discord import app_commands

from bot.errors import InvalidInput, NotFound

# Discord's own limits: integer options are doubles on its side, text options at most 6000 characters.
DISCORD_INT_MAX = 2**53
DISCORD_TEXT_MAX = 6000

# ---------------------------------------------------------------------------------- the declarations

JobId = app_commands.Range[int, 1, DISCORD_INT_MAX]
Strength = app_commands.Range[float, -10.0, 10.0]  # /preview strength and every value of strengths
Ratio = app_commands.Range[float, -10.0, 10.0]  # /merge ratios
Seed = app_commands.Range[int, 0, 2**32 - 1]
SampleSteps = app_commands.Range[int, 1, 150]
Guidance = app_commands.Range[float, 0.0, 30.0]
ImageSide = app_commands.Range[int, 64, 2048]
Page = app_commands.Range[int, 1, 1000]
ImageNumber = app_commands.Range[int, 1, 100_000]
MAX_STRENGTHS = 12  # GridSpec's limits
MAX_SEEDS = 8

# What an out-of-range value of these options means to the user: the thing does not exist.
NOT_FOUND = {"id": ("No job of yours has the `id` {value}.", "See your jobs with `/jobs`.")}


def bounds(declared: Any) -> tuple[float, float]:
    """(min, max) of a ``Range`` alias above, for values Discord cannot check (lists typed as text)."""
    lo, hi = declared.min_value, declared.max_value
    return (-math.inf if lo is None else lo), (math.inf if hi is None else hi)


# ---------------------------------------------------------------------------------- the check

_KIND = {
    T.string: "text", T.integer: "a whole number", T.number: "a number", T.boolean: "True or False",
    T.attachment: "an attached file", T.user: "a user", T.channel: "a channel", T.role: "a role",
    T.mentionable: "a user or role",
}
_RESOLVED = {T.attachment: "attachments", T.user: "users", T.channel: "channels", T.role: "roles"}


def find_command(tree: app_commands.CommandTree, data: dict[str, Any]) -> tuple[Any, list[dict[str, Any]]]:
    """The Command a raw chat-input payload names and its raw options; (None, []) when unknown (discord.py
    then answers it as an unknown command)."""
    gid = data.get("guild_id")
    name = str(data.get("name", ""))
    cmd: Any = None
    if gid and str(gid).isdigit():
        cmd = tree.get_command(name, guild=discord.Object(int(gid)))
    if cmd is None:
        cmd = tree.get_command(name)
    options: list[dict[str, Any]] = list(data.get("options") or [])
    while isinstance(cmd, app_commands.Group):
        sub = next((o for o in options if isinstance(o, dict) and o.get("type") in (1, 2)), None)
        if sub is None:
            return None, []
        cmd = cmd.get_command(str(sub.get("name", "")))
        options = list(sub.get("options") or [])
    return cmd, options


def _fmt(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


MISSING = "missing"  # check_value's answer for an id outside its range


def check_value(param: app_commands.Parameter, raw_type: Any, value: Any, resolved: dict[str, Any]) -> str | None:
    """Why this raw value does not fit the declared option (one sentence naming it), ``MISSING`` for an
    id that cannot exist, or None."""
    name = f"`{param.name}`"
    kind = param.type
    if raw_type != kind.value:
        return f"{name} must be {_KIND.get(kind, kind.name)}."
    if kind is T.boolean:
        return None if isinstance(value, bool) else f"{name} must be True or False."
    if kind in _RESOLVED:
        items = resolved.get(_RESOLVED[kind]) or {}
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value) in items:
            return None
        return f"{name}: the {_KIND[kind].split(' ', 1)[-1]} did not arrive with the command; give it again."
    choices = [c.value for c in param.choices or []]
    if kind is T.string:
        if not isinstance(value, str):
            return f"{name} must be text."
        lo = param.min_value or 0
        hi = min(param.max_value or DISCORD_TEXT_MAX, DISCORD_TEXT_MAX)
        if not lo <= len(value) <= hi:
            return f"{name} must be {lo} to {hi} characters long (it has {len(value)})."
    elif kind in (T.integer, T.number):
        whole = kind is T.integer
        if isinstance(value, bool) or not isinstance(value, int if whole else int | float):
            return f"{name} must be {_KIND[kind]}, not {_show(value)}."
        if not math.isfinite(value):
            return f"{name} must be a finite number."
        lo = param.min_value if param.min_value is not None else -DISCORD_INT_MAX
        hi = param.max_value if param.max_value is not None else DISCORD_INT_MAX
        if not lo <= value <= hi:
            if param.name in NOT_FOUND:
                return MISSING  # an id that cannot exist: answered as "no such job"
            return f"{name} must be {_KIND[kind]} from {_fmt(lo)} to {_fmt(hi)}; {_show(value)} is not."
    else:
        return f"{name} is of a kind this bot does not take."
    if choices and value not in choices:
        listed = ", ".join(f"`{c}`" for c in choices[:25])
        return f"{name} must be one of {listed}; `{_show(value)}` is not."
    return None


def problems_of(params: Sequence[app_commands.Parameter], options: list[dict[str, Any]],
                resolved: dict[str, Any]) -> tuple[list[str], tuple[str, Any] | None]:
    """(problems, (option, value) of an id that cannot exist) of a command's raw options against its
    declared parameters."""
    declared = {p.name: p for p in params}
    seen: set[str] = set()
    problems: list[str] = []
    not_found: tuple[str, Any] | None = None
    for o in options:
        if not isinstance(o, dict):
            problems.append("An option of this command is malformed.")
            continue
        oname = str(o.get("name", ""))
        param = declared.get(oname)
        if param is None:
            problems.append(f"`{_show(oname)}` is not an option of this command (an admin may need to run "
                            "`/admin sync`).")
            continue
        if oname in seen:
            problems.append(f"`{oname}` was given twice.")
            continue
        seen.add(oname)
        why = check_value(param, o.get("type"), o.get("value"), resolved)
        if why == MISSING:
            not_found = (oname, o.get("value"))
        elif why:
            problems.append(why)
    problems += [f"`{p.name}` is required." for p in params if p.required and p.name not in seen]
    return problems, not_found


def check_raw_options(tree: app_commands.CommandTree, interaction: discord.Interaction) -> None:
    """Raise InvalidInput (or NotFound for an id that cannot exist) when a chat-input command's raw options
    do not fit what the command declared. Called before discord.py converts them."""
    data: dict[str, Any] = interaction.data or {}  # type: ignore[assignment]
    if data.get("type", 1) != 1:
        return  # context menus carry no options
    cmd, options = find_command(tree, data)
    if not isinstance(cmd, app_commands.Command):
        return
    problems, not_found = problems_of(cmd.parameters, options, data.get("resolved") or {})
    if problems:
        more = f"\n- ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        head = problems[0] if len(problems) == 1 else "These options are not valid:\n" + "\n".join(
            f"- {p}" for p in problems[:8]) + more
        raise InvalidInput(head, f"Nothing was done. See the choices `/{cmd.qualified_name}` offers and try again.")
    if not_found:
        what, todo = NOT_FOUND[not_found[0]]
        raise NotFound(what.format(value=_show(not_found[1])), todo)
