"""Exactly once (issue 18): the bot process is killed after Discord created the result message but before the
bot read the reply; the restarted bot finds the message in the channel instead of posting the LoRA again.

A real ``python -m bot run`` subprocess (gateway, REST, stub worker) against the fake Discord, which holds the
reply to the result post and forgets nonces at once (Discord's dedup lasts only minutes; the restart may come
later), so only the bot's own record and history lookup can prevent the second post."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
from cogkit import add_images, make_config
from test_first_run import ROOT, write_toml


async def gw_command(fake: Any, name: str, options: dict, **kw: Any) -> Any:
    payload = fake.slash_command(name, options, **kw)
    await fake.dispatch("INTERACTION_CREATE", payload)
    rec = fake.interaction(payload)
    await fake.wait_for(lambda: rec.callback_type == 4 or bool(rec.followups), 60)
    return rec


async def start_bot(cfg: Path, token: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORAFORGE_TOKEN": token, "HF_HUB_OFFLINE": "1"}
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "bot", "run", "--config", str(cfg), cwd=ROOT,
                                                env=env, stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)


def delivered(db: Path) -> bool:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return bool(conn.execute("SELECT 1 FROM job_events WHERE type = 'discord.delivered'").fetchone())


@pytest.mark.parametrize("held", ["job **#1** finished.", "**Job #1**"], ids=["result", "progress"])
async def test_killed_between_post_and_reply_posts_once(fake_discord: Any, tmp_path: Path, held: str) -> None:
    fake = fake_discord
    fake.nonce_window_s = 0.0
    cfg = write_toml(tmp_path / "config.toml", make_config(tmp_path, fake), api_url=fake.api_base)
    hold = fake.hold_reply(held)
    bot = await start_bot(cfg, fake.token)
    try:
        await fake.wait_for_gateway(60)
        rec = await gw_command(fake, "dataset", {"name": "once", **add_images(fake, 2)}, user="bob",
                               subcommand="create")
        assert "added" in rec.followups[-1].content, rec.followups[-1].content
        rec = await gw_command(fake, "train", {"dataset": "once", "steps": 3}, user="bob")
        assert "Queued job **#1**" in rec.followups[-1].content, rec.followups[-1].content
        await asyncio.wait_for(hold.created.wait(), 60)  # Discord made the message; the reply is held
        bot.kill()  # SIGKILL: no clean-up, the reply is never read
        await bot.wait()
    finally:
        if bot.returncode is None:
            bot.kill()
            await bot.wait()
    hold.release.set()
    assert hold.message is not None
    thread = hold.message.channel_id
    db = tmp_path / "data" / "loraforge.db"
    assert not delivered(db)

    history_reads = len(fake.calls("GET", f"/channels/{thread}/messages"))
    bot = await start_bot(cfg, fake.token)
    try:
        await fake.wait_for(lambda: delivered(db), 60)
        await asyncio.sleep(1.0)  # time for a second post, were one coming
    finally:
        bot.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(bot.communicate(), 60)
    results = [m for m in fake.channel_messages(thread) if "job **#1** finished." in m.content]
    assert len(results) == 1, [m.content for m in results]
    assert any(n.endswith(".safetensors") for n in results[0].file_names)
    progress = [m for m in fake.channel_messages(thread) if m.content.startswith("**Job #1**")]
    assert len(progress) == 1, [m.content for m in progress]
    held_now = [m for m in (results + progress) if m.id == hold.message.id]
    assert held_now, "the message made before the kill is the one kept"
    if held == "**Job #1**":  # found again, and brought up to date
        assert "Results are posted below" in progress[0].content or "succeeded" in progress[0].content
    assert len(fake.calls("GET", f"/channels/{thread}/messages")) > history_reads  # it looked before posting
    assert b"Traceback" not in err, err.decode()
