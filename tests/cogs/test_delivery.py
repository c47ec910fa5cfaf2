"""Big files: attached when they fit, otherwise a signed expiring link served by the bot; and the
fault paths (413 on upload, expired interaction token, 429, edit cap, unexpected errors)."""

from __future__ import annotations

import asyncio
import logging
import re

import aiohttp
import pytest
from cogkit import add_images, answer, run_command

from bot.delivery import ExpiredLink, ForgedLink, LinkSigner
from bot.errors import RedactFilter


async def train_and_wait(fake, bot, name: str, user: str = "bob", steps: int = 3) -> int:
    rec = await run_command(fake, bot, "dataset", {"name": f"ds-{name}", **add_images(fake, 2)}, user=user,
                            subcommand="create")
    assert "added" in answer(rec)
    rec = await run_command(fake, bot, "train", {"dataset": f"ds-{name}", "steps": steps, "output_name": name},
                            user=user)
    m = re.search(r"job \*\*#(\d+)\*\*", answer(rec))
    assert m, answer(rec)
    job_id = int(m.group(1))
    await bot.scheduler.wait_for_job(job_id, 30)
    await bot.progress.wait_idle(job_id, 30)
    return job_id


def final_post(fake, bot_job) -> object:
    return fake.channel_messages(bot_job.thread_id)[-1]


async def test_link_above_upload_limit_downloads_exact_bytes(fake_discord, bot):
    fake = fake_discord
    fake.set_upload_limit(16 * 1024)  # the stub's "big" LoRA is 64 KiB
    job_id = await train_and_wait(fake, bot, "big-one")
    job = await bot.repo.get_job(job_id)
    post = final_post(fake, job)
    assert "big-one.safetensors" not in post.file_names
    assert post.file_names == ["grid.png", "loss.png"]  # the small ones are still attached
    url = re.search(r"<(http://127\.0\.0\.1:\d+/files/[^>]+)>", post.content).group(1)
    expected = (bot.files.job_outputs_dir(job_id) / "big-one.safetensors").read_bytes()
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            assert r.status == 200
            assert await r.read() == expected
            assert "big-one.safetensors" in r.headers["Content-Disposition"]
        token = url.rsplit("/", 1)[1]
        job_part, art, exp, mac = token.split(".")
        tampered = f"{job_part}.{int(art) + 1}.{exp}.{mac}"
        async with http.get(url.replace(token, tampered)) as r:
            assert r.status == 403
        longer = f"{job_part}.{art}.{int(exp) + 3600}.{mac}"
        async with http.get(url.replace(token, longer)) as r:
            assert r.status == 403
        async with http.get(url.rsplit("/", 1)[0] + "/garbage") as r:
            assert r.status == 403
        expired = bot.file_server.url_for(job_id, int(art), ttl_s=-1)
        async with http.get(expired) as r:
            assert r.status == 410


async def test_upload_refused_413_falls_back_to_link(fake_discord, bot):
    fake = fake_discord
    # Discord says 10 MiB in the payload but refuses the LoRA upload anyway (a lower real limit).
    from fakediscord import error_response

    @fake.route("POST", r"/channels/(?P<cid>\d+)/messages")
    async def refuse_loras(call, files, cid):
        if any(name.endswith(".safetensors") for name, *_ in files):
            return error_response(413, 40005, "Request entity too large")
        return fake._create_message(int(cid), call.json or {}, files, via="bot").data

    job_id = await train_and_wait(fake, bot, "big-413")
    job = await bot.repo.get_job(job_id)
    msgs = fake.channel_messages(job.thread_id)
    post = msgs[-1]
    assert post.file_names == ["grid.png", "loss.png"]
    assert "big-413.safetensors" in post.content and "/files/" in post.content
    assert any(c.status == 413 for c in fake.calls("POST", f"/channels/{job.thread_id}/messages"))


async def test_expired_interaction_token_falls_back_to_channel_post(fake_discord, bot):
    fake = fake_discord
    fake.fail_next("/webhooks/", 401, 50027, "Invalid Webhook Token", method="POST", count=1)
    payload = fake.slash_command("dataset", {"name": "late", **add_images(fake, 1)}, user="bob",
                                 subcommand="create")
    fake.feed(bot, payload)
    bob = fake.users["bob"]["id"]
    await fake.wait_for(lambda: any(m.via == "bot" and f"<@{bob}>" in m.content
                                    for m in fake.channel_messages(fake.channel_id)), 10)
    msg = next(m for m in fake.channel_messages(fake.channel_id) if m.via == "bot")
    assert "added 1 image(s)" in msg.content


async def test_429_on_followup_and_edit_is_retried(fake_discord, bot, monkeypatch):
    fake = fake_discord
    fake.rate_limit_next("/webhooks/", retry_after=0.05, method="POST")
    rec = await run_command(fake, bot, "dataset", {"name": "rl", **add_images(fake, 1)}, user="bob",
                            subcommand="create")
    assert "added 1" in answer(rec)
    assert [c.status for c in fake.calls("POST", "/webhooks/")][:2] == [429, 200]
    fake.rate_limit_next("/messages/", retry_after=0.05, method="PATCH", count=1)
    job_id = await train_and_wait(fake, bot, "fast-rl", steps=4)
    job = await bot.repo.get_job(job_id)
    patches = fake.calls("PATCH", f"/channels/{job.thread_id}/messages/")
    assert 429 in [c.status for c in patches] and patches[-1].status == 200
    assert "succeeded" in fake.message(job.message_id).content


async def test_edit_cap_starts_a_fresh_progress_message(fake_discord, bot, monkeypatch):
    fake = fake_discord
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    armed = {}

    async def arm(job, ev):
        if ev.get("type") == "progress" and ev.get("step") == 5 and not armed:
            armed["x"] = True
            fake.fail_next(f"/channels/{job.thread_id}/messages/", 400, 30046,
                           "Maximum number of edits to messages older than 1 hour reached.", method="PATCH")

    bot.scheduler.add_listener(arm)
    job_id = await train_and_wait(fake, bot, "slow-cap", steps=50)
    job = await bot.repo.get_job(job_id)
    progress_msgs = [m for m in fake.channel_messages(job.thread_id) if m.content.startswith(f"**Job #{job_id}**")]
    assert len(progress_msgs) == 2
    assert job.message_id == progress_msgs[-1].id
    assert "succeeded" in progress_msgs[-1].content


async def test_unexpected_error_shows_id_and_logs_traceback(fake_discord, bot, monkeypatch, caplog):
    fake = fake_discord
    await run_command(fake, bot, "dataset", {"name": "boom", **add_images(fake, 1)}, user="bob", subcommand="create")

    async def broken(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(bot.service, "build_train_spec", broken)
    with caplog.at_level(logging.ERROR, logger="loraforge.errors"):
        rec = await run_command(fake, bot, "train", {"dataset": "boom"}, user="bob")
    text = answer(rec)
    eid = re.search(r"error id `([0-9a-f]+)`", text).group(1)
    assert "disk on fire" not in text and rec.followups[-1].ephemeral
    logged = [r for r in caplog.records if eid in r.getMessage()]
    assert logged and logged[0].exc_info and "disk on fire" in str(logged[0].exc_info[1])


def test_link_signer_unit():
    now = [1000.0]
    s = LinkSigner("x" * 32, ttl_s=60, clock=lambda: now[0])
    tok = s.sign(3, 7)
    assert s.verify(tok).artifact_id == 7
    other = LinkSigner("y" * 32, ttl_s=60, clock=lambda: now[0])
    with pytest.raises(ForgedLink):
        other.verify(tok)
    now[0] += 61
    with pytest.raises(ExpiredLink):
        s.verify(tok)
    with pytest.raises(ValueError):
        LinkSigner("short")


def test_token_never_logged(caplog):
    token = "MTAxNjQ4.secret-bot-token.abcdefg"
    f = RedactFilter([token])
    logger = logging.getLogger("loraforge.test.redact")
    handler = logging.Handler()
    records = []
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(f)
    logger.addHandler(handler)
    try:
        logger.error("connecting with %s", token)
        try:
            raise RuntimeError(f"bad token {token}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert all(token not in r.getMessage() and token not in (r.exc_text or "") for r in records)
    assert "[redacted]" in records[0].getMessage()


def refuse_posts(fake, status: int, code: int, *, where=None, results_only: bool = True,
                 times: list[int] | None = None):
    """Make the fake refuse message posts in the channels ``where(channel_id)`` picks (all by default):
    only those carrying a LoRA (the final result) unless ``results_only`` is False, ``times[0]`` times
    (forever when None). Other messages go through. Several calls add rules; the first that matches wins."""
    from fakediscord import error_response

    rules = getattr(fake, "_refusal_rules", None)
    if rules is None:
        rules = fake._refusal_rules = []

        @fake.route("POST", r"/channels/(?P<cid>\d+)/messages")
        async def refuse(call, files, cid):
            carries_lora = any(name.endswith(".safetensors") for name, *_ in files)
            for st, cd, pick, only, left in rules:
                if (carries_lora or not only) and (pick is None or pick(int(cid))) and (left is None or left[0] > 0):
                    if left is not None:
                        left[0] -= 1
                    return error_response(st, cd, "Injected refusal")
            return fake._create_message(int(cid), call.json or {}, files, via="bot").data

    rules.append((status, code, where, results_only, times))


def result_posts(fake, channel_id: int, name: str) -> list:
    return [m for m in fake.channel_messages(channel_id) if f"{name}.safetensors" in m.file_names]


def is_thread(fake):
    return lambda cid: cid in fake.threads


async def test_result_goes_to_the_owners_dms_when_the_thread_is_gone(fake_discord, bot):
    fake = fake_discord
    bot.progress.retry_base_s = 0.05
    # Unknown Channel: someone deleted the job's thread, so nothing can be posted there, progress included
    refuse_posts(fake, 404, 10003, where=is_thread(fake), results_only=False)
    job_id = await train_and_wait(fake, bot, "orphan")
    job = await bot.repo.get_job(job_id)
    [post] = [m for m in fake.dm_messages("bob") if "orphan.safetensors" in m.file_names]
    assert post.content.startswith(f"<@{fake.users['bob']['id']}> job **#{job_id}** finished")
    assert "grid.png" in post.file_names and await bot.progress.already_delivered(job_id)
    assert result_posts(fake, job.channel_id, "orphan") == []  # never in the shared channel


async def test_with_thread_gone_and_dms_closed_the_channel_gets_a_notice_not_the_files(fake_discord, bot):
    fake = fake_discord
    bot.progress.retry_base_s = 0.05
    refuse_posts(fake, 404, 10003, where=is_thread(fake), results_only=False)
    dms = lambda cid: any(int(ch["id"]) == cid for ch in fake.dm_channels.values())  # noqa: E731
    refuse_posts(fake, 403, 50007, where=dms, results_only=False)  # Cannot send messages to this user
    job_id = await train_and_wait(fake, bot, "hidden")
    job = await bot.repo.get_job(job_id)
    [notice] = [m for m in fake.channel_messages(job.channel_id) if f"job **#{job_id}** finished" in m.content]
    assert notice.content.startswith(f"<@{fake.users['bob']['id']}>") and f"/job show {job_id}" in notice.content
    assert notice.file_names == [] and "/files/" not in notice.content  # no file, no link where others read
    assert await bot.progress.already_delivered(job_id)


async def test_failed_result_post_is_retried_until_it_gets_through(fake_discord, bot):
    fake = fake_discord
    bot.progress.retry_base_s = 0.05
    left = [2]  # Discord refuses the result twice (not a 429 discord.py would retry by itself)
    refuse_posts(fake, 400, 50035, times=left)
    job_id = await train_and_wait(fake, bot, "stubborn")
    job = await bot.repo.get_job(job_id)
    assert left == [0]
    assert len(result_posts(fake, job.thread_id, "stubborn")) == 1
    assert result_posts(fake, fake.channel_id, "stubborn") == []  # not a thread problem: no fallback
    assert [m for m in fake.dm_messages("bob") if "stubborn.safetensors" in m.file_names] == []
    assert await bot.progress.already_delivered(job_id)


async def test_result_not_posted_before_a_restart_is_posted_after_it(fake_discord, bot_factory):
    fake = fake_discord
    left = [10**6]
    refuse_posts(fake, 400, 50035, times=left)  # every try fails while the first bot runs
    bot1 = bot_factory()
    async with fake.running(bot1, gateway=False):
        await asyncio.wait_for(bot1.service_ready.wait(), 60)
        bot1.progress.retry_base_s = 60.0  # still waiting to retry when the bot stops
        rec = await run_command(fake, bot1, "dataset", {"name": "ds-late", **add_images(fake, 2)}, user="bob",
                                subcommand="create")
        rec = await run_command(fake, bot1, "train", {"dataset": "ds-late", "steps": 3, "output_name": "late"},
                                user="bob")
        job_id = int(re.search(r"job \*\*#(\d+)\*\*", answer(rec)).group(1))
        job = await bot1.scheduler.wait_for_job(job_id, 30)
        assert job.state == "succeeded"
        await fake.wait_for(lambda: any(c.status == 400 for c in fake.calls("POST", f"/channels/{job.thread_id}/")))
        assert not await bot1.progress.already_delivered(job_id)
    left[0] = 0  # Discord takes posts again

    bot2 = bot_factory()
    async with fake.running(bot2, gateway=False):
        await asyncio.wait_for(bot2.service_ready.wait(), 60)
        await fake.wait_for(lambda: len(result_posts(fake, job.thread_id, "late")) == 1, 15)
        await bot2.progress.wait_idle(job_id, 15)
        assert await bot2.progress.already_delivered(job_id)
    bot3 = bot_factory()  # once delivered, never again
    async with fake.running(bot3, gateway=False):
        await asyncio.wait_for(bot3.service_ready.wait(), 60)
        await asyncio.sleep(0.5)
    assert len(result_posts(fake, job.thread_id, "late")) == 1


async def test_dm_progress_mode_reports_and_delivers_in_dms(fake_discord, bot_factory):
    fake = fake_discord
    bot = bot_factory(discord={"progress_mode": "dm"})
    async with fake.running(bot, gateway=False):
        await asyncio.wait_for(bot.service_ready.wait(), 60)
        job_id = await train_and_wait(fake, bot, "by-dm")
        job = await bot.repo.get_job(job_id)
        dms = fake.dm_messages("bob")
        assert job.thread_id == dms[0].channel_id and not fake.threads
        progress = fake.message(job.message_id)
        assert progress in dms and "succeeded" in progress.content
        [post] = [m for m in dms if "by-dm.safetensors" in m.file_names]
        assert f"job **#{job_id}** finished" in post.content
        assert result_posts(fake, fake.channel_id, "by-dm") == []
