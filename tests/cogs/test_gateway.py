"""Through the fake GATEWAY websocket (HELLO, IDENTIFY, READY, GUILD_CREATE, INTERACTION_CREATE):
start-up, a Cancel button pressed after a restart (new bot instance, same data dir), and a job that
resumes after a restart."""

from __future__ import annotations

import asyncio

from cogkit import add_images, answer

from bot.resume import saved_step


async def gw_command(fake, name, options=None, timeout=15.0, **kw):
    payload = fake.slash_command(name, options, **kw)
    await fake.dispatch("INTERACTION_CREATE", payload)
    rec = fake.interaction(payload)
    await fake.wait_for(lambda: rec.callback_type == 4 or bool(rec.followups), timeout)
    return rec


async def start_slow_job(fake, bot, steps: int) -> int:
    rec = await gw_command(fake, "dataset", {"name": "gw", **add_images(fake, 2)}, user="bob", subcommand="create")
    assert "added" in rec.followups[-1].content
    rec = await gw_command(fake, "train", {"dataset": "gw", "steps": steps, "output_name": "slow-gw"}, user="bob")
    assert "Queued job **#1**" in rec.followups[-1].content
    return 1


async def test_gateway_startup_and_commands(fake_discord, bot_factory):
    fake = fake_discord
    bot = bot_factory()
    async with fake.running(bot):
        conn = await fake.wait_for_gateway()
        assert conn.identify and conn.identify["token"]
        assert bot.get_guild(fake.guild_id) is not None
        assert fake.commands == {}  # nothing synced on start
        rec = await gw_command(fake, "admin", {"scope": "guild"}, user="alice", subcommand="sync")
        assert "Synced" in rec.followups[-1].content
        names = {c["name"] for c in fake.commands[fake.guild_id]}
        assert {"dataset", "train", "jobs", "job", "cancel", "retrain", "models", "admin"} <= names
        train = next(c for c in fake.commands[fake.guild_id] if c["name"] == "train")
        preset = next(o for o in train["options"] if o["name"] == "preset")
        assert {c["value"] for c in preset["choices"]} >= {"sd15-8gb", "sdxl-10gb"}
        rec = await gw_command(fake, "admin", {"scope": "guild"}, user="bob", subcommand="sync")
        assert "Only admins" in answer(rec)


async def test_cancel_button_works_after_restart(fake_discord, bot_factory, monkeypatch):
    fake = fake_discord
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    bot1 = bot_factory()
    async with fake.running(bot1):
        await asyncio.wait_for(bot1.service_ready.wait(), 30)
        job_id = await start_slow_job(fake, bot1, steps=4000)
        await fake.wait_for(lambda: any(m.custom_ids() == [f"job:cancel:{job_id}"] for m in fake.all_messages()), 10)
        await fake.wait_for(lambda: "step" in fake.message(
            next(m.id for m in fake.all_messages() if m.custom_ids())).content, 10)

    bot2 = bot_factory()  # a new process, in effect: same data dir, nothing in memory
    async with fake.running(bot2):
        await asyncio.wait_for(bot2.service_ready.wait(), 30)
        job = await bot2.repo.get_job(job_id)
        msg = fake.message(job.message_id)
        assert msg.custom_ids() == [f"job:cancel:{job_id}"]
        await fake.wait_for(lambda: job_id in bot2.scheduler.running_jobs(), 10)
        # someone else's click is refused
        press = fake.button_press(f"job:cancel:{job_id}", msg.id, user="carol")
        await fake.dispatch("INTERACTION_CREATE", press)
        rec = await fake.wait_for_response(press)
        assert "No job of yours" in (rec.callback_data or {}).get("content", "")
        assert (await bot2.repo.get_job(job_id)).cancel_requested is False
        # the owner's click cancels it
        press = fake.button_press(f"job:cancel:{job_id}", msg.id, user="bob")
        await fake.dispatch("INTERACTION_CREATE", press)
        rec = await fake.wait_for_response(press)
        assert "ancel" in rec.callback_data["content"] and rec.callback_data.get("flags") == 64
        job = await bot2.scheduler.wait_for_job(job_id, 20)
        assert job.state == "cancelled"
        await bot2.progress.wait_idle(job_id, 20)
        assert "cancelled" in fake.message(job.message_id).content
        assert fake.message(job.message_id).components == []


async def test_job_resumes_after_restart_and_is_delivered_once(fake_discord, bot_factory, monkeypatch):
    fake = fake_discord
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    bot1 = bot_factory()
    async with fake.running(bot1):
        await asyncio.wait_for(bot1.service_ready.wait(), 30)
        job_id = await start_slow_job(fake, bot1, steps=80)
        await fake.wait_for(lambda: (saved_step(bot1.files, job_id) or 0) >= 10, 15)
    saved = saved_step(bot1.files, job_id)

    bot2 = bot_factory()
    async with fake.running(bot2):
        await asyncio.wait_for(bot2.service_ready.wait(), 30)
        job = await bot2.scheduler.wait_for_job(job_id, 30)
        assert job.state == "succeeded" and job.attempts == 2
        await bot2.progress.wait_idle(job_id, 20)
        progress = fake.message(job.message_id)
        assert any(f"Resumed from step {saved}" in h.get("content", "") for h in progress.history)
        thread = fake.channel_messages(job.thread_id)
        results = [m for m in thread if "slow-gw.safetensors" in m.file_names]
        assert len(results) == 1
        assert results[0].content.startswith(f"<@{fake.users['bob']['id']}>")
