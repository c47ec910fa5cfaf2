"""Cancel-and-save, then /resume from Discord: a cancelled job keeps its training state, the cancel notice says
so, and /resume queues a job that continues from the saved step (`steps:` trains it further)."""

from __future__ import annotations

from cogkit import add_images, answer, run_command

from bot.resume import saved_step


async def test_cancel_keeps_the_state_and_resume_continues_from_it(fake_discord, bot, monkeypatch):
    fake = fake_discord
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    rec = await run_command(fake, bot, "dataset", {"name": "cats", **add_images(fake, 2)}, user="bob",
                            subcommand="create")
    assert "added" in answer(rec), answer(rec)
    await run_command(fake, bot, "train", {"dataset": "cats", "steps": 400, "output_name": "slow-r"}, user="bob")
    await fake.wait_for(lambda: (saved_step(bot.files, 1) or 0) >= 5, 15)
    rec = await run_command(fake, bot, "resume", {"id": 1}, user="bob")
    assert "still running" in answer(rec) and "/cancel 1" in answer(rec), answer(rec)

    await run_command(fake, bot, "cancel", {"id": 1}, user="bob")
    first = await bot.scheduler.wait_for_job(1, 20)
    assert first.state == "cancelled"
    saved = saved_step(bot.files, 1)
    assert saved == first.progress["step"]  # the cancel saved the step it stopped at: none is lost
    await bot.progress.wait_idle(1, 20)
    notice = fake.channel_messages(first.thread_id)[-1].content
    assert f"state at step {saved} is saved" in notice and "`/resume 1`" in notice, notice

    dave = fake.add_user("dave", roles=[fake.role_ids["trainer"]])  # another trainer: bob's job is not his
    rec = await run_command(fake, bot, "resume", {"id": 1}, user=dave)
    assert "No job of yours" in answer(rec), answer(rec)
    rec = await run_command(fake, bot, "resume", {"id": 1, "steps": saved}, user="bob")
    assert f"more than the {saved} steps" in answer(rec), answer(rec)
    assert len(await bot.repo.list_jobs()) == 1  # nothing queued for a refused /resume

    rec = await run_command(fake, bot, "resume", {"id": 1, "steps": saved + 5}, user="bob")
    assert "Queued job **#2**" in answer(rec), answer(rec)
    second = await bot.scheduler.wait_for_job(2, 30)
    assert second.state == "succeeded" and second.spec["steps"] == saved + 5
    await bot.progress.wait_idle(2, 20)
    progress = fake.message(second.message_id)
    assert any(f"Resumed from step {saved}" in h.get("content", "") for h in progress.history)
    assert f"continues #1 from step {saved}" in fake.threads[second.thread_id]["name"]
    assert saved_step(bot.files, 1) == saved  # the cancelled job's own state is untouched

    rec = await run_command(fake, bot, "resume", {"id": 2}, user="bob")
    assert f"already trained all its {saved + 5} steps" in answer(rec) and "`steps`" in answer(rec), answer(rec)

