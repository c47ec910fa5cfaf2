"""Never trust the client: every option of every command, sent raw through the fake Discord with values an
official client would never send (out of range, wrong type, huge, negative, not a choice, a missing file),
gets a private answer naming the option, and nothing changes (no row, no job, no file).

One bot for the whole module (stub worker): the raw values are refused before any work starts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cogkit import add_images, answer, make_config, run_command
from discord import AppCommandOptionType as T
from discord import app_commands
from fakediscord import FakeDiscord

from bot.app import LoraforgeBot

pytestmark = pytest.mark.asyncio(loop_scope="module")

CB_MESSAGE = 4
HUGE = 2**63  # one past SQLite's integers


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[FakeDiscord, LoraforgeBot, Any]]:
    tmp = tmp_path_factory.mktemp("raw")
    async with FakeDiscord() as fake:
        bot = LoraforgeBot(make_config(tmp, fake))
        async with fake.running(bot, gateway=False):
            await asyncio.wait_for(bot.service_ready.wait(), 60)
            rec = await run_command(fake, bot, "dataset", {"name": "cats", **add_images(fake, 3)}, user="alice",
                                    subcommand="create")
            assert "added 3" in answer(rec), answer(rec)
            ds = await bot.repo.find_dataset_by_name(int(fake.users["alice"]["id"]), "cats")
            yield fake, bot, ds


async def state(bot: LoraforgeBot) -> tuple[Any, ...]:
    """Everything a command could change: rows (with captions and job states) and files on disk."""
    db = bot.repo.db
    rows = []
    for table in ("datasets", "images", "jobs", "artifacts", "job_events"):
        rows.append(tuple(tuple(r) for r in await db.fetchall(f"SELECT * FROM {table} ORDER BY id")))
    root: Path = bot.files.root
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if p.is_file() and not p.name.startswith(bot.files.db_path.name))
    return (*rows, tuple(files))


def walk_commands(bot: LoraforgeBot) -> Iterator[tuple[str, str | None, app_commands.Command]]:
    """(top-level name, subcommand path or None, command) for every chat-input command."""
    for cmd in bot.tree.walk_commands():
        if isinstance(cmd, app_commands.Command):
            parts = cmd.qualified_name.split()
            yield parts[0], " ".join(parts[1:]) or None, cmd


def good_value(fake: FakeDiscord, p: app_commands.Parameter, ds: Any) -> dict:
    """A raw option a real client would send for ``p`` (so each case has exactly one bad option)."""
    if p.type is T.attachment:
        from cogkit import png_bytes

        att = fake.add_attachment("ok.png", png_bytes((9, 9, 9)))
        return {"type": 11, "value": att["id"], "_attachment": att}
    if p.choices:
        return {"type": p.type.value, "value": p.choices[0].value}
    if p.type is T.string:
        return {"type": 3, "value": {"dataset": f"#{ds.id}", "name": "fresh", "prompt": "a cat"}.get(p.name, "x")}
    if p.type is T.boolean:
        return {"type": 5, "value": False}
    if p.type is T.integer:
        return {"type": 4, "value": int(p.min_value if p.min_value is not None else 1)}
    return {"type": 10, "value": float(p.min_value if p.min_value is not None else 1.0)}


def bad_values(p: app_commands.Parameter) -> list[tuple[str, dict]]:
    """(what, raw option type + value) an official client would never send for ``p``."""
    cases: list[tuple[str, dict]] = []
    if p.type in (T.integer, T.number):
        whole = p.type is T.integer
        step = 1 if whole else 0.5
        t = p.type.value
        if p.min_value is not None:
            cases.append(("below min", {"type": t, "value": p.min_value - step}))
            if p.min_value > -5:
                cases.append(("negative", {"type": t, "value": -5}))
        if p.max_value is not None:
            cases.append(("above max", {"type": t, "value": p.max_value + step}))
        cases.append(("huge", {"type": t, "value": HUGE if whole else 1e300}))
        cases.append(("text", {"type": 3, "value": "12abc"}))
        cases.append(("bool", {"type": t, "value": True}))
        if whole:
            cases.append(("fraction", {"type": 10, "value": 1.5}))
        else:
            cases.append(("infinite", {"type": t, "value": float("inf")}))
    elif p.type is T.string:
        cases.append(("number", {"type": 4, "value": 5}))
        cases.append(("too long", {"type": 3, "value": "y" * 6001}))
        if p.choices:
            cases.append(("not a choice", {"type": 3, "value": "no-such-choice"}))
    elif p.type is T.boolean:
        cases.append(("text", {"type": 5, "value": "yes"}))
        cases.append(("number", {"type": 4, "value": 1}))
    elif p.type is T.attachment:
        cases.append(("unknown file", {"type": 11, "value": "12345"}))
        cases.append(("text", {"type": 3, "value": "file.png"}))
    return cases


def payload(fake: FakeDiscord, name: str, sub: str | None, options: dict[str, dict], user: str = "alice") -> dict:
    raw, resolved = [], {}
    for oname, o in options.items():
        att = o.get("_attachment")
        if att is not None:
            resolved[str(att["id"])] = att
        raw.append({"name": oname, "type": o["type"], "value": o["value"]})
    pl = fake.slash_command(name, raw, user=user, subcommand=sub)
    if resolved:
        target = pl["data"]
        target.setdefault("resolved", {}).setdefault("attachments", {}).update(resolved)
    return pl


async def send(fake: FakeDiscord, bot: LoraforgeBot, pl: dict) -> Any:
    rec = fake.feed(bot, pl)
    await fake.wait_for(lambda: rec.callback_type is not None and (rec.callback_type == CB_MESSAGE
                                                                   or bool(rec.followups)), 15)
    return rec


def refused_privately(rec: Any, option: str) -> str | None:
    """None when the interaction got an immediate private answer naming the option; else what was wrong."""
    text = answer(rec)
    if rec.callback_type != CB_MESSAGE:
        return f"was deferred (type {rec.callback_type}), answered {text[:120]!r}"
    if not rec.original.ephemeral:
        return f"public answer {text[:120]!r}"
    if f"`{option}`" not in text or "went wrong" in text:
        return f"answer does not name `{option}`: {text[:160]!r}"
    return None


async def test_every_option_of_every_command_refuses_raw_values_it_did_not_declare(world):
    fake, bot, ds = world
    before = await state(bot)
    failures: list[str] = []
    n = 0
    commands = list(walk_commands(bot))
    assert {"train", "preview", "merge", "dataset", "job", "jobs", "cancel", "retrain", "admin"} <= {
        c[0] for c in commands}
    for name, sub, cmd in commands:
        for p in cmd.parameters:
            if p.type in (T.integer, T.number):
                # A number without a declared range would take anything up to 2**53 from a raw client.
                assert p.min_value is not None and p.max_value is not None, f"/{cmd.qualified_name} {p.name}"
            cases = bad_values(p)
            assert len(cases) >= 2, f"no raw cases for /{cmd.qualified_name} {p.name} ({p.type})"
            for what, bad in cases:
                opts = {q.name: good_value(fake, q, ds) for q in cmd.parameters if q.required and q is not p}
                opts[p.name] = bad
                rec = await send(fake, bot, payload(fake, name, sub, opts))
                n += 1
                why = refused_privately(rec, p.name)
                if why:
                    failures.append(f"/{cmd.qualified_name} {p.name} ({what}): {why}")
    assert not failures, f"{len(failures)} of {n} raw values were not refused:\n" + "\n".join(failures[:40])
    assert await state(bot) == before  # no row, no job, no file


async def test_unknown_missing_and_repeated_options_are_refused(world):
    fake, bot, ds = world
    before = await state(bot)
    rec = await send(fake, bot, payload(fake, "dataset", "show", {"dataset": {"type": 3, "value": f"#{ds.id}"},
                                                                   "pages": {"type": 4, "value": 2}}))
    assert refused_privately(rec, "pages") is None, answer(rec)
    rec = await send(fake, bot, payload(fake, "dataset", "caption", {"dataset": {"type": 3, "value": f"#{ds.id}"}}))
    assert refused_privately(rec, "number") is None and "required" in answer(rec)
    pl = fake.slash_command("dataset", [{"name": "dataset", "type": 3, "value": f"#{ds.id}"},
                                        {"name": "number", "type": 4, "value": 1},
                                        {"name": "number", "type": 4, "value": 2}], user="alice",
                            subcommand="caption")
    rec = await send(fake, bot, pl)
    assert refused_privately(rec, "number") is None and "twice" in answer(rec)
    assert await state(bot) == before


@pytest.mark.parametrize("number", [0, -5])
async def test_caption_number_zero_or_negative_edits_nothing(world, number):
    fake, bot, ds = world
    captions = [im.caption for im in await bot.repo.list_images(ds.id)]
    rec = await run_command(fake, bot, "dataset", {"dataset": f"#{ds.id}", "number": number, "caption": "hacked"},
                            user="alice", subcommand="caption")
    text = answer(rec)
    assert "`number`" in text and "from 1 to" in text, text
    assert [im.caption for im in await bot.repo.list_images(ds.id)] == captions


async def test_show_page_zero_is_refused(world):
    fake, bot, ds = world
    rec = await run_command(fake, bot, "dataset", {"dataset": f"#{ds.id}", "page": 0}, user="alice",
                            subcommand="show")
    text = answer(rec)
    assert "`page`" in text and "from 1 to 1000" in text, text
    assert not rec.original.file_names


async def test_strength_and_strengths_share_one_range(world):
    fake, bot, _ = world
    one = answer(await run_command(fake, bot, "preview", {"prompt": "a cat", "strength": 100.0}, user="alice"))
    grid = answer(await run_command(fake, bot, "preview", {"prompt": "a cat", "strengths": "99,1", "base_model": "tiny-sd15"}, user="alice"))
    assert "`strength`" in one and "from -10 to 10" in one, one
    assert "`strengths`" in grid and "from -10 to 10" in grid, grid
    ok = answer(await run_command(fake, bot, "preview", {"prompt": "a cat", "strength": 10.0}, user="alice"))
    assert "`strength`" not in ok  # the edge of the range is allowed (refused later for another reason)


@pytest.mark.parametrize("ref", [HUGE, 2**53 + 1, 0, -5])
async def test_job_ids_that_cannot_exist_say_no_such_job(world, ref):
    fake, bot, _ = world
    for sub in ("show", "delete"):
        rec = await run_command(fake, bot, "job", {"id": ref}, user="bob", subcommand=sub)
        assert "No job of yours" in answer(rec) and "`id`" in answer(rec), answer(rec)
        assert rec.original.ephemeral
    for name in ("cancel", "retrain", "resume"):
        rec = await run_command(fake, bot, name, {"id": ref}, user="bob")
        assert "No job of yours" in answer(rec), answer(rec)


async def test_huge_dataset_reference_says_no_such_dataset(world):
    fake, bot, _ = world
    rec = await run_command(fake, bot, "dataset", {"dataset": f"#{HUGE * 10}"}, user="bob", subcommand="show")
    assert "No dataset" in answer(rec), answer(rec)
