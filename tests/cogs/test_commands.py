"""Slash commands through the fake Discord (direct path): deferral, followups, uploads, threads,
throttled progress edits, validation errors, autocomplete."""

from __future__ import annotations

import io
import time
import zipfile

import pytest
from cogkit import add_images, answer, png_bytes, run_command
from PIL import Image

CB_DEFERRED = 5
CB_AUTOCOMPLETE = 8


async def make_dataset(fake, bot, name="cats", user="bob", n=3, **extra):
    rec = await run_command(fake, bot, "dataset", {"name": name, **add_images(fake, n), **extra}, user=user,
                            subcommand="create")
    assert "added" in answer(rec), answer(rec)
    return rec


async def test_dataset_create_defers_then_reports_per_file(fake_discord, bot):
    fake = fake_discord
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("set/a.png", png_bytes((10, 10, 250)))
        z.writestr("set/a.txt", "a blue square")
        z.writestr("set/b.png", png_bytes((250, 250, 10)))
    opts = {
        "name": "mix",
        "file1": fake.add_attachment("one.png", png_bytes((200, 0, 0))),
        "file2": fake.add_attachment("one.txt", b"a red square, photo"),
        "file3": fake.add_attachment("dup.png", png_bytes((200, 0, 0))),  # same bytes as one.png
        "file4": fake.add_attachment("broken.png", b"\x89PNG not really"),
        "file5": fake.add_attachment("set.zip", zbuf.getvalue()),
        "trigger_word": "zxq",
    }
    payload = fake.slash_command("dataset", opts, user="bob", subcommand="create")
    t0 = time.monotonic()
    rec = fake.feed(bot, payload)
    await fake.wait_for_response(payload)
    cb = fake.calls("POST", "/callback")[-1]
    assert rec.callback_type == CB_DEFERRED and cb.ts - t0 < 3.0
    assert rec.original.ephemeral  # upload reports are private
    await fake.wait_for(lambda: bool(rec.followups), 10)
    text = answer(rec)
    assert "added 3 image(s)" in text
    assert "1 duplicate" in text and "dup.png" in text
    assert "broken.png" in text  # refused, with its reason
    ds = await bot.repo.find_dataset_by_name(fake.member_of("bob")["user"]["id"] and int(fake.users["bob"]["id"]), "mix")
    images = await bot.repo.list_images(ds.id)
    caps = {im.original_name: im.caption for im in images}
    assert caps["one.png"] == "a red square, photo"
    assert caps["set.zip/set/a.png"] == "a blue square"
    assert ds.trigger_word == "zxq" and ds.visibility == "private"


async def test_upload_limits_come_from_the_config(fake_discord, bot_factory):
    fake = fake_discord
    bot = bot_factory(limits={"max_image_side": 100, "zip_max_entries": 2})
    async with fake.running(bot, gateway=False):
        zbuf = io.BytesIO()
        with zipfile.ZipFile(zbuf, "w") as z:
            for i in range(3):
                z.writestr(f"z{i}.png", png_bytes((20 * i, 0, 0)))
        rec = await run_command(fake, bot, "dataset", {
            "name": "limits", "file1": fake.add_attachment("small.png", png_bytes((0, 200, 0), size=96)),
            "file2": fake.add_attachment("large.png", png_bytes((0, 0, 200), size=128)),
            "file3": fake.add_attachment("three.zip", zbuf.getvalue())}, user="bob", subcommand="create")
        text = answer(rec)
        assert "added 1 image(s)" in text, text
        assert "large.png" in text and "100" in text  # over this server's 100 px side limit, and says so
        assert "three.zip" in text and "2" in text  # more entries than this server allows


async def test_dataset_show_sends_contact_sheet_as_multipart(fake_discord, bot):
    fake = fake_discord
    await make_dataset(fake, bot, n=4)
    rec = await run_command(fake, bot, "dataset", {"dataset": "cats"}, user="bob", subcommand="show")
    msg = rec.followups[-1]
    assert msg.file_names and msg.file_names[0].endswith(".png")
    call = next(c for c in fake.calls("POST", "/webhooks/") if c.files)
    assert call.headers["Content-Type"].startswith("multipart/form-data")
    im = Image.open(io.BytesIO(msg.attachments[0][1]))
    assert im.width > 100 and im.height > 100


async def test_dataset_list_caption_delete(fake_discord, bot):
    fake = fake_discord
    await make_dataset(fake, bot, name="dogs")
    rec = await run_command(fake, bot, "dataset", {"dataset": "dogs", "file1": fake.add_attachment(
        "new.png", png_bytes((90, 40, 160))), "file2": fake.add_attachment("new.txt", b"a purple dog")},
        user="bob", subcommand="add")
    assert "added 1 image(s); it now has 4" in answer(rec), answer(rec)
    rec = await run_command(fake, bot, "dataset", {"dataset": "dogs", "file1": fake.add_attachment(
        "x.png", png_bytes((1, 2, 3)))}, user="alice", subcommand="add")
    assert "No dataset of yours" in answer(rec)  # names are per owner: nobody adds to bob's private set
    rec = await run_command(fake, bot, "dataset", None, user="bob", subcommand="list")
    assert "dogs" in answer(rec) and "4 image(s)" in answer(rec)
    rec = await run_command(fake, bot, "dataset", {"dataset": "dogs", "number": 2, "caption": "a green dog"},
                            user="bob", subcommand="caption")
    assert "caption set" in answer(rec)
    ds = await bot.repo.find_dataset_by_name(int(fake.users["bob"]["id"]), "dogs")
    assert (await bot.repo.list_images(ds.id))[1].caption == "a green dog"
    rec = await run_command(fake, bot, "dataset", {"dataset": "dogs"}, user="bob", subcommand="delete")
    assert "confirm" in answer(rec)
    assert await bot.repo.get_dataset(ds.id) is not None
    rec = await run_command(fake, bot, "dataset", {"dataset": "dogs", "confirm": True}, user="bob",
                            subcommand="delete")
    assert "Deleted" in answer(rec)
    assert await bot.repo.get_dataset(ds.id) is None
    assert not bot.files.dataset_dir(ds.id).exists()


async def test_autocomplete_datasets_and_models(fake_discord, bot):
    fake = fake_discord
    await make_dataset(fake, bot, name="cats")
    await make_dataset(fake, bot, name="shared-cows", user="alice", shared=True)
    await make_dataset(fake, bot, name="alice-private", user="alice")
    payload = fake.autocomplete("train", {"dataset": ""}, focused="dataset", user="bob")
    rec = fake.feed(bot, payload)
    await fake.wait_for_response(payload)
    assert rec.callback_type == CB_AUTOCOMPLETE
    names = [c["name"] for c in rec.autocomplete_choices]
    assert names == ["cats", "shared-cows (shared)"]  # own first; others' private ones never listed
    payload = fake.autocomplete("train", {"dataset": "cats", "base_model": "tiny"}, focused="base_model", user="bob")
    rec = fake.feed(bot, payload)
    await fake.wait_for_response(payload)
    assert [c["value"] for c in rec.autocomplete_choices] == ["tiny-sd15", "tiny-sd2", "tiny-sdxl"]


async def test_invalid_options_are_listed_and_nothing_is_queued(fake_discord, bot):
    fake = fake_discord
    await make_dataset(fake, bot)
    # alpha 0 passes Discord's min (0.0) but not the spec (> 0); resolution 100 is not a multiple of 8.
    rec = await run_command(fake, bot, "train", {"dataset": "cats", "alpha": 0.0, "resolution": 100}, user="bob")
    text = answer(rec)
    assert "network.alpha" in text and "data.resolution" in text, text
    assert rec.original.ephemeral
    assert await bot.repo.list_jobs() == []
    assert not fake.threads


async def test_toml_job_file_and_options_override_it(fake_discord, bot):
    fake = fake_discord
    await make_dataset(fake, bot)
    toml = b'steps = 7\nseed = 99\n[network]\ndim = 4\n[optimizer]\nname = "Lion"\nlr = 0.0003\n'
    rec = await run_command(fake, bot, "train", {"dataset": "cats", "steps": 5, "output_name": "fast-toml",
                                                 "job_file": fake.add_attachment("job.toml", toml)}, user="bob")
    assert "Queued job" in answer(rec), answer(rec)
    job = (await bot.repo.list_jobs())[0]
    spec = job.spec
    assert spec["steps"] == 5 and spec["seed"] == 99 and spec["network"]["dim"] == 4
    assert spec["optimizer"]["name"] == "Lion"
    bad = await run_command(fake, bot, "train", {"dataset": "cats", "job_file": fake.add_attachment(
        "bad.toml", b'[network]\ndimm = 4\n')}, user="bob")
    assert "network.dimm" in answer(bad) and "unknown setting" in answer(bad)


async def test_every_train_option_reaches_the_spec(fake_discord, bot):
    fake = fake_discord
    await make_dataset(fake, bot, class_prompt="cat")
    opts = {"dataset": "cats", "base_model": "tiny-sdxl", "trigger_word": " scs cat ", "steps": 12,
            "network_type": "lokr", "dim": 16,
            "alpha": 8.0, "conv_dim": 8, "conv_alpha": 4.0, "learning_rate": 5e-5, "optimizer": "Lion",
            "scheduler": "cosine", "batch_size": 2, "resolution": 512, "seed": 1111, "train_text_encoder": True,
            "sample_prompt": " chibi scs cat ", "output_name": "fast-all"}
    rec = await run_command(fake, bot, "train", opts, user="bob")
    assert "Queued job" in answer(rec), answer(rec)
    spec = (await bot.repo.list_jobs())[0].spec
    assert spec["base_model"] == "tiny-sdxl" and spec["steps"] == 12 and spec["seed"] == 1111
    net = spec["network"]
    assert (net["type"], net["dim"], net["alpha"], net["conv_dim"], net["conv_alpha"]) == ("lokr", 16, 8.0, 8, 4.0)
    assert net["train_text_encoder"] is True
    opt = spec["optimizer"]
    assert (opt["name"], opt["lr"], opt["scheduler"]) == ("Lion", 5e-5, "cosine")
    assert spec["batch_size"] == 2 and spec["data"]["resolution"] == 512
    assert spec["data"]["trigger_word"] == "scs cat" and spec["output_name"] == "fast-all"
    assert [p["prompt"] for p in spec["sample"]["prompts"]] == ["chibi scs cat"]
    assert spec["concepts"][0]["class_prompt"] == "cat"  # from the dataset
    # a value the official client would stop still gets a clear answer (min/max are checked again)
    bad = await run_command(fake, bot, "train", {"dataset": "cats", "optimizer": "SGD"}, user="bob")
    assert "optimizer" in answer(bad) and "Lion" in answer(bad)
    assert len(await bot.repo.list_jobs()) == 1


async def test_train_thread_progress_throttled_and_delivery(fake_discord, bot, monkeypatch):
    fake = fake_discord
    await make_dataset(fake, bot)
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    rec = await run_command(fake, bot, "train", {"dataset": "cats", "steps": 60, "output_name": "slow-prog"},
                            user="bob")
    text = answer(rec)
    assert "Queued job **#1**" in text and "running now" in text
    assert len(fake.threads) == 1
    thread_id = next(iter(fake.threads))
    assert f"<#{thread_id}>" in text
    job = await bot.scheduler.wait_for_job(1, 30)
    assert job.state == "succeeded"
    await bot.progress.wait_idle(1, 20)
    msgs = fake.channel_messages(thread_id)
    progress = fake.message(job.message_id if job.message_id else msgs[0].id)
    assert progress.via == "bot"  # bot token, never the interaction token
    edits = fake.calls("PATCH", f"/channels/{thread_id}/messages/{progress.id}")
    # 60 progress events in ~3 s with a 1 s interval: a handful of edits, each at least ~1 s apart
    assert 2 <= len(edits) <= 7, len(edits)
    gaps = [b.ts - a.ts for a, b in zip(edits, edits[1:], strict=False)][:-1]  # the final one comes at once
    assert all(g >= 0.9 for g in gaps), gaps
    assert "100%" in progress.content and "succeeded" in progress.content
    assert progress.components == []  # no Cancel button once it is over
    # samples posted as they came, then the result post mentioning the owner
    sample = next(m for m in msgs if m.content.startswith("Sample at step"))
    assert sample.file_names == ["sample-000060-0.png"]
    final = msgs[-1]
    assert final.content.startswith(f"<@{fake.users['bob']['id']}>")
    assert final.file_names == ["slow-prog.safetensors", "grid.png", "loss.png"]
    assert final.file("slow-prog.safetensors") == b"stub lora 1"
    assert "Settings:" in final.content and "steps `60`" in final.content


async def test_live_preview_shows_in_the_progress_message_and_goes_at_the_end(fake_discord, bot, monkeypatch):
    fake = fake_discord
    await make_dataset(fake, bot)
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    await run_command(fake, bot, "train", {"dataset": "cats", "steps": 60, "output_name": "slow-live"}, user="bob")
    job = await bot.scheduler.wait_for_job(1, 30)
    assert job.state == "succeeded"
    await bot.progress.wait_idle(1, 20)
    thread_id = next(iter(fake.threads))
    progress = fake.message(job.message_id)
    shown = [h for h in progress.history if h.get("attachments")]
    assert shown, "no live preview was ever attached to the progress message"
    # each attached picture is the engine's latest preview, named as such, with the step it shows in the text
    assert all([a["filename"] for a in h["attachments"]] == ["live-preview.png"] for h in shown)
    assert all("Live preview: sampling step" in h["content"] for h in shown)
    steps = [int(h["content"].split("sampling step ")[1].split("/")[0]) for h in shown]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)  # a new picture per edit, never an old one
    # at the end the preview is gone (the real sample and results are posted below) and the text says so
    assert progress.attachments == [] and "Live preview" not in progress.content
    assert any(m.content.startswith("Sample at step") for m in fake.channel_messages(thread_id))


async def test_progress_message_has_cancel_button_and_cancel_command(fake_discord, bot, monkeypatch):
    fake = fake_discord
    await make_dataset(fake, bot)
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    await run_command(fake, bot, "train", {"dataset": "cats", "steps": 2000, "output_name": "slow-c"}, user="bob")
    await fake.wait_for(lambda: any(m.custom_ids() == ["job:cancel:1"] for m in fake.all_messages()), 10)
    rec = await run_command(fake, bot, "cancel", {"id": 1}, user="carol")
    assert "No job of yours" in answer(rec)
    rec = await run_command(fake, bot, "cancel", {"id": 1}, user="bob")
    assert "ancel" in answer(rec)
    job = await bot.scheduler.wait_for_job(1, 20)
    assert job.state == "cancelled"
    await bot.progress.wait_idle(1, 20)
    thread_id = next(iter(fake.threads))
    assert "was cancelled" in fake.channel_messages(thread_id)[-1].content


async def test_jobs_job_show_retrain_models(fake_discord, bot, monkeypatch):
    fake = fake_discord
    await make_dataset(fake, bot)
    await run_command(fake, bot, "train", {"dataset": "cats", "steps": 3, "output_name": "fast-a"}, user="bob")
    await bot.scheduler.wait_for_job(1, 20)
    await bot.progress.wait_idle(1, 20)
    rec = await run_command(fake, bot, "jobs", None, user="bob")
    assert "**#1**" in answer(rec) and "succeeded" in answer(rec)
    rec = await run_command(fake, bot, "job", {"id": 1}, user="bob", subcommand="show")
    text = answer(rec)
    assert "Job #1" in text and "Download: <http://127.0.0.1:" in text and "steps `3`" in text
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    blocker = await run_command(fake, bot, "train", {"dataset": "#1", "steps": 40, "output_name": "slow-b"},
                                user="alice")
    assert "Queued job **#2**" in answer(blocker)
    rec = await run_command(fake, bot, "retrain", {"id": 1}, user="bob")
    assert "Queued job **#3**" in answer(rec) and "Position in queue: **1**" in answer(rec), answer(rec)
    j1, j3 = await bot.repo.get_job(1), await bot.repo.get_job(3)
    assert j1.spec_json == j3.spec_json
    assert len(fake.threads) == 3
    await bot.scheduler.wait_for_job(3, 20)
    await bot.progress.wait_idle(3, 20)
    rec = await run_command(fake, bot, "models", None, user="carol")
    assert "tiny-sd15" in answer(rec)


async def test_failed_job_tells_reason_and_what_to_do(fake_discord, bot):
    fake = fake_discord
    await make_dataset(fake, bot)
    await run_command(fake, bot, "train", {"dataset": "cats", "steps": 10, "output_name": "fail-x"}, user="bob")
    job = await bot.scheduler.wait_for_job(1, 20)
    assert job.state == "failed"
    await bot.progress.wait_idle(1, 20)
    last = fake.channel_messages(next(iter(fake.threads)))[-1]
    assert last.content.startswith(f"<@{fake.users['bob']['id']}>")
    assert "NaN" in last.content and "learning rate" in last.content


@pytest.mark.parametrize("dm_allowed", [False, True])
async def test_dms_allowed_or_not_by_config(fake_discord, bot_factory, dm_allowed):
    fake = fake_discord
    b = bot_factory(discord={"allow_dms": dm_allowed})
    async with fake.running(b, gateway=False):
        rec = await run_command(fake, b, "jobs", None, user="bob", dm=True)
        text = answer(rec)
        if dm_allowed:
            assert "No jobs yet" in text
        else:
            assert "direct messages" in text


async def test_dataset_delete_removes_its_snapshots_and_waits_for_its_jobs(fake_discord, bot, monkeypatch):
    """Train jobs read a hardlinked snapshot of the dataset: deleting the dataset must remove it too (or the
    images stay on disk), and is refused while a queued or running job still needs it."""
    fake = fake_discord
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    await make_dataset(fake, bot, name="gone")
    await make_dataset(fake, bot, name="kept")
    ds = await bot.repo.find_dataset_by_name(int(fake.users["bob"]["id"]), "gone")
    await run_command(fake, bot, "train", {"dataset": "gone", "steps": 2000, "output_name": "slow-d"}, user="bob")
    await run_command(fake, bot, "train", {"dataset": "kept", "steps": 2, "output_name": "fast-k"}, user="bob")
    [snap] = bot.files.dataset_snapshots(ds.id)
    assert snap.is_dir() and any(p.suffix == ".png" for p in snap.iterdir())
    rec = await run_command(fake, bot, "dataset", {"dataset": "gone", "confirm": True}, user="bob",
                            subcommand="delete")
    assert "in use" in answer(rec) and "#1" in answer(rec) and "/cancel" in answer(rec), answer(rec)
    assert snap.is_dir() and await bot.repo.get_dataset(ds.id) is not None
    await run_command(fake, bot, "cancel", {"id": 1}, user="bob")
    assert (await bot.scheduler.wait_for_job(1, 30)).state == "cancelled"
    rec = await run_command(fake, bot, "dataset", {"dataset": "gone", "confirm": True}, user="bob",
                            subcommand="delete")
    assert "Deleted" in answer(rec), answer(rec)
    assert not snap.exists() and not bot.files.dataset_dir(ds.id).exists()
    kept = await bot.repo.find_dataset_by_name(int(fake.users["bob"]["id"]), "kept")
    assert bot.files.dataset_snapshots(kept.id) and bot.files.dataset_dir(kept.id).is_dir()  # only that one
    await bot.scheduler.wait_for_job(2, 30)
    await bot.progress.wait_idle(2, 30)


async def test_job_delete_removes_rows_files_and_links(fake_discord, bot, monkeypatch):
    import aiohttp

    fake = fake_discord
    await make_dataset(fake, bot)
    await run_command(fake, bot, "train", {"dataset": "cats", "steps": 3, "output_name": "fast-del"}, user="bob")
    await bot.scheduler.wait_for_job(1, 20)
    await bot.progress.wait_idle(1, 20)
    [art] = await bot.repo.list_artifacts(1, "lora")
    url = bot.file_server.url_for(1, art.id)
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    await run_command(fake, bot, "train", {"dataset": "cats", "steps": 2000, "output_name": "slow-run"}, user="bob")
    rec = await run_command(fake, bot, "job", {"id": 2, "confirm": True}, user="bob", subcommand="delete")
    assert "only finished jobs" in answer(rec) and "/cancel 2" in answer(rec)
    rec = await run_command(fake, bot, "job", {"id": 1}, user="bob", subcommand="delete")
    assert "confirm" in answer(rec) and await bot.repo.get_job(1) is not None
    rec = await run_command(fake, bot, "job", {"id": 1, "confirm": True}, user="bob", subcommand="delete")
    assert "Deleted job #1" in answer(rec)
    assert await bot.repo.get_job(1) is None and not bot.files.job_dir(1).exists()
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 404  # the signed link no longer finds a file
    await run_command(fake, bot, "cancel", {"id": 2}, user="bob")
    await bot.scheduler.wait_for_job(2, 30)


def _bot_with_full_size_sdxl(bot_factory, gpu_memory_gib: float):
    """A bot whose card has ``gpu_memory_gib`` and whose models folder holds a full-size SDXL base as the bot sees
    it: a diffusers folder's configs (the stub worker never loads weights)."""
    import shutil

    from trainer.format.checkpoint import CONFIGS_DIR

    bot = bot_factory(workers={"gpu_memory_gib": gpu_memory_gib})
    shutil.copytree(CONFIGS_DIR / "sdxl", bot.config.models_dir / "real-sdxl")
    return bot


async def test_train_refuses_a_job_that_cannot_fit_the_gpu(fake_discord, bot_factory):
    fake = fake_discord
    bot = _bot_with_full_size_sdxl(bot_factory, 8)
    async with fake.running(bot, gateway=False):
        await make_dataset(fake, bot)
        big = {"dataset": "cats", "base_model": "real-sdxl", "resolution": 1024, "batch_size": 8, "steps": 5}
        rec = await run_command(fake, bot, "train", big, user="bob")
        text = answer(rec)
        assert "run out of GPU memory" in text and "SDXL 1024 batch 8 needs ~" in text, text
        assert "your card has 8.0 GB" in text and "lower the batch size" in text and "Nothing was queued" in text
        assert await bot.repo.list_jobs() == []
        rec = await run_command(fake, bot, "train", {**big, "batch_size": 1}, user="bob")
        text = answer(rec)
        assert "Queued job" in text, text
        assert "Memory plan: ~" in text and "SDXL 1024 batch 1, with gradient checkpointing" in text
        assert "fits the 8.0 GB card" in text


async def test_retrain_checks_the_memory_plan_again(fake_discord, bot_factory):
    """A job queued for a 24 GB card is refused on /retrain once the card is 8 GB, with the plan's advice."""
    fake = fake_discord
    bot = _bot_with_full_size_sdxl(bot_factory, 24)
    async with fake.running(bot, gateway=False):
        await make_dataset(fake, bot)
        big = {"dataset": "cats", "base_model": "real-sdxl", "resolution": 1024, "batch_size": 8, "steps": 2}
        rec = await run_command(fake, bot, "train", big, user="bob")
        assert "Queued job **#1**" in answer(rec), answer(rec)
        await bot.scheduler.wait_for_job(1, 30)
        await bot.progress.wait_idle(1, 20)
        bot.config.workers.gpu_memory_gib = 8  # the worker now has a smaller card
        rec = await run_command(fake, bot, "retrain", {"id": 1}, user="bob")
        text = answer(rec)
        assert "run out of GPU memory" in text and "SDXL 1024 batch 8 needs ~" in text, text
        assert "your card has 8.0 GB" in text and "Nothing was queued" in text
        assert [j.id for j in await bot.repo.list_jobs()] == [1]
        bot.config.workers.gpu_memory_gib = 48
        rec = await run_command(fake, bot, "retrain", {"id": 1}, user="bob")
        assert "Queued job **#2**" in answer(rec) and "Memory plan: ~" in answer(rec), answer(rec)
        await bot.scheduler.wait_for_job(2, 30)
