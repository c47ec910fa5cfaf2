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
