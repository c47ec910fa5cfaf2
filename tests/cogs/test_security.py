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
