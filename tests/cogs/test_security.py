"""Security through the fake Discord (issue 17): names, cooldowns, download bounds, quotas, /me."""

from __future__ import annotations

from cogkit import answer, png_bytes, run_command

RLO = "\u202e"


async def test_hostile_upload_name_is_stored_and_echoed_clean(fake_discord, bot):
    fake = fake_discord
    long_rtl = RLO + "gnp." + "A" * 190 + "\u2066\x1b.png"  # 200 characters with a right-to-left override
    assert len(long_rtl) >= 197
    rec = await run_command(fake, bot, "dataset", {
        "name": "names",
        "file1": fake.add_attachment(long_rtl, png_bytes((200, 0, 0))),
        "file2": fake.add_attachment(RLO + "B" * 199 + ".png", b"\x89PNG broken"),
        "trigger_word": f"zq{RLO}x",
    }, user="bob", subcommand="create")
    text = answer(rec)
    assert "added 1 image(s)" in text, text
    assert RLO not in text and "\u2066" not in text and "\x1b" not in text
    assert "B" * 90 in text  # the refused file is still named, cut short
    ds = await bot.repo.find_dataset_by_name(int(fake.users["bob"]["id"]), "names")
    [image] = await bot.repo.list_images(ds.id)
    assert RLO not in image.original_name and "\x1b" not in image.original_name
    assert len(image.original_name) <= 100 and image.original_name.endswith(".png")
    assert ds.trigger_word == "zqx"


def noise_png(seed: int, size: int = 96) -> bytes:
    """An image that does not compress (about 27 KiB): storage quotas count real bytes."""
    import io
    import random

    from PIL import Image

    rnd = random.Random(seed)
    im = Image.frombytes("RGB", (size, size), bytes(rnd.randrange(256) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


async def test_storage_quota_refuses_what_does_not_fit_and_me_shows_usage(fake_discord, bot_factory):
    fake = fake_discord
    bot = bot_factory(limits={"max_storage_mib_per_user": 0.06, "daily_gpu_minutes_per_user": 30})
    async with fake.running(bot, gateway=False):
        files = {f"file{i + 1}": fake.add_attachment(f"n{i}.png", noise_png(i)) for i in range(3)}
        rec = await run_command(fake, bot, "dataset", {"name": "big", **files}, user="bob", subcommand="create")
        text = answer(rec)
        assert "added 2 image(s)" in text, text  # 2 x 27 KiB fit in 61 KiB, the third does not
        assert "n2.png" in text and "storage quota" in text and "/me" in text
        rec = await run_command(fake, bot, "me", user="bob")
        text = answer(rec)
        assert rec.original.ephemeral or rec.followups[-1].ephemeral
        assert "**Datasets**: 1 with 2 image(s)" in text
        assert "of 0.1 MiB" in text and "**GPU time, last 24 h**: 0.0 min of 30 min" in text, text
        # someone else's /me shows their own (empty) usage
        rec = await run_command(fake, bot, "me", user="carol")
        assert "**Datasets**: 0 with 0 image(s)" in answer(rec)


async def test_low_disk_pauses_dispatch_refuses_uploads_and_tells_admins(fake_discord, bot):
    from bot.diskguard import DiskGuard

    fake = fake_discord
    free = {"bytes": 10 * 1024 * 1024}
    sched = bot.scheduler
    sched.disk = DiskGuard(bot.files.root, 1024, free_bytes=lambda p: free["bytes"])
    job = await sched.submit(7, "train", {"kind": "train", "output_name": "fast", "steps": 3})
    sched.kick()
    await sched._dispatch_once()
    assert (await bot.repo.get_job(job.id)).state == "queued"
    rec = await run_command(fake, bot, "dataset", {"name": "full", "file1": fake.add_attachment(
        "a.png", png_bytes((1, 2, 3)))}, user="bob", subcommand="create")
    assert "added 0 image(s)" in answer(rec) and "disk is nearly full" in answer(rec)
    rec = await run_command(fake, bot, "admin", user="alice", subcommand="status")
    assert "Low disk: 10 MiB free" in answer(rec) and "min_free_disk_mib" in answer(rec)
    free["bytes"] = 50 * 1024**3  # space freed: the queue moves by itself
    sched.kick()
    assert (await sched.wait_for_job(job.id, 30)).state == "succeeded"
    rec = await run_command(fake, bot, "admin", user="alice", subcommand="status")
    assert "Low disk" not in answer(rec)


async def test_expensive_commands_have_a_per_user_cooldown(fake_discord, bot_factory):
    fake = fake_discord
    bot = bot_factory(limits={"cooldown_s": 60, "cooldown_uses": 1})
    async with fake.running(bot, gateway=False):
        first = await run_command(fake, bot, "dataset", {"name": "one", "file1": fake.add_attachment(
            "a.png", png_bytes((9, 9, 9)))}, user="bob", subcommand="create")
        assert "added 1 image(s)" in answer(first)
        again = await run_command(fake, bot, "dataset", {"name": "two", "file1": fake.add_attachment(
            "b.png", png_bytes((9, 9, 90)))}, user="bob", subcommand="create")
        text = answer(again)
        assert "Slow down: try again in" in text and " s." in text, text
        assert (again.followups[-1] if again.followups else again.original).ephemeral
        assert await bot.repo.find_dataset_by_name(int(fake.users["bob"]["id"]), "two") is None
        # per user: carol and the admin alice are not held up by bob's cooldown
        other = await run_command(fake, bot, "dataset", {"name": "three", "file1": fake.add_attachment(
            "c.png", png_bytes((9, 90, 9)))}, user="alice", subcommand="create")
        assert "added 1 image(s)" in answer(other)
        for cmd, opts in (("preview", {"prompt": "a cat"}), ("merge", {})):
            rec = await run_command(fake, bot, cmd, opts, user="carol")  # refused for its options, but counted
            assert "Slow down" not in answer(rec), cmd  # each command has its own cooldown
            rec = await run_command(fake, bot, cmd, opts, user="carol")
            assert "Slow down: try again in" in answer(rec), (cmd, answer(rec))
        for _ in range(3):  # admins have no cooldown
            rec = await run_command(fake, bot, "preview", {"prompt": "a cat"}, user="alice")
            assert "Slow down" not in answer(rec)


async def test_attachment_downloads_are_bounded_over_all_commands(fake_discord, bot_factory, monkeypatch):
    import asyncio

    fake = fake_discord
    bot = bot_factory(limits={"max_parallel_downloads": 2})
    now = {"n": 0, "max": 0}
    original = fake._respond

    async def slow_cdn(request, call, files):
        if not call.path.startswith("/cdn/"):
            return await original(request, call, files)
        now["n"] += 1
        now["max"] = max(now["max"], now["n"])
        try:
            await asyncio.sleep(0.05)
            return await original(request, call, files)
        finally:
            now["n"] -= 1

    monkeypatch.setattr(fake, "_respond", slow_cdn)
    async with fake.running(bot, gateway=False):
        fake.add_user("dave", roles=[fake.role_ids["trainer"]])
        users = ["alice", "bob", "dave"]
        recs = []
        for k, user in enumerate(users):
            opts = {f"file{i + 1}": fake.add_attachment(f"{user}{i}.png", png_bytes((40 * i, 60 * k, 7)))
                    for i in range(4)}
            recs.append(fake.feed(bot, fake.slash_command("dataset", {"name": f"d{user}", **opts}, user=user,
                                                          subcommand="create")))
        await fake.wait_for(lambda: all(r.followups for r in recs), 20)
        assert all("added 4 image(s)" in answer(r) for r in recs), [answer(r) for r in recs]
        assert now["max"] == 2  # 12 downloads at once, never more than 2 in flight
