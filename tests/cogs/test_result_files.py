"""Which LoRA files a finished training job's result post carries: the final one (never an intermediate save,
even after a bot restart mid-run), and with keep_best the LoRA of the lowest validation loss beside it, named and
explained so the user knows which is which."""

from __future__ import annotations

import asyncio
import hashlib
import re

from cogkit import add_images, answer, run_command

from bot.resume import saved_step


async def _queue(fake, bot, name: str, job_file: bytes, steps: int) -> int:
    rec = await run_command(fake, bot, "dataset", {"name": f"ds-{name}", **add_images(fake, 3)}, user="bob",
                            subcommand="create")
    assert "added" in answer(rec), answer(rec)
    rec = await run_command(fake, bot, "train", {"dataset": f"ds-{name}", "steps": steps, "output_name": name,
                                                 "job_file": fake.add_attachment("job.toml", job_file)}, user="bob")
    m = re.search(r"job \*\*#(\d+)\*\*", answer(rec))
    assert m, answer(rec)
    return int(m.group(1))


async def test_a_restart_mid_run_still_delivers_the_final_lora_not_an_intermediate_save(fake_discord, bot_factory,
                                                                                      monkeypatch):
    fake = fake_discord
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    bot1 = bot_factory()
    async with fake.running(bot1, gateway=False):
        await asyncio.wait_for(bot1.service_ready.wait(), 60)
        job_id = await _queue(fake, bot1, "slow-inter", b"save_every_n_steps = 2\n", steps=14)
        await fake.wait_for(lambda: (saved_step(bot1.files, job_id) or 0) >= 5, 20)
    # The bot stopped mid-run: the next one re-queues the job, which resumes from its state and finishes.
    bot2 = bot_factory()
    async with fake.running(bot2, gateway=False):
        await asyncio.wait_for(bot2.service_ready.wait(), 60)
        job = await bot2.scheduler.wait_for_job(job_id, 30)
        assert job.state == "succeeded"
        await bot2.progress.wait_idle(job_id, 20)
        inter = [a.path for a in await bot2.repo.list_artifacts(job_id, "lora") if "-step" in a.path]
        assert any("step00000002" in p for p in inter), inter  # saved before the restart, recorded
        [post] = [m for m in fake.channel_messages(job.thread_id) if "finished" in m.content]
        loras = [n for n in post.file_names if n.endswith(".safetensors")]
        assert loras == ["slow-inter.safetensors"], post.file_names
        assert post.file("slow-inter.safetensors") == b"stub lora " + str(job_id).encode()


async def test_keep_best_delivers_the_best_lora_beside_the_final_one_and_says_which_is_which(fake_discord, bot):
    fake = fake_discord
    job_id = await _queue(fake, bot, "kb", b"validation_split = 1\nkeep_best = true\n", steps=6)
    job = await bot.scheduler.wait_for_job(job_id, 30)
    await bot.progress.wait_idle(job_id, 20)
    [post] = [m for m in fake.channel_messages(job.thread_id) if "finished" in m.content]
    assert post.file_names[:2] == ["kb.safetensors", "kb-best.safetensors"], post.file_names
    assert post.file("kb-best.safetensors") == f"stub best lora {job_id} step 3".encode()
    # written at step 1 and again at step 3: one artifact row, of the file as it is now
    rows = [a for a in await bot.repo.list_artifacts(job_id) if a.path.endswith("kb-best.safetensors")]
    assert [(r.sha256, r.meta["step"]) for r in rows] == [(hashlib.sha256(post.file("kb-best.safetensors")).hexdigest(), 3)]
    assert post.file("kb.safetensors") == b"stub lora " + str(job_id).encode()
    # the stub's validation: 0.1234567 at the end, lowest 0.0987654 at step 3 of 6
    assert ("`kb-best.safetensors`: the LoRA with the lowest validation loss (step 3, validation loss 0.0988); "
            "`kb.safetensors`: the LoRA after the last step (step 6, validation loss 0.123). Try both.") in post.content
    assert "validation loss 0.12 (lowest 0.099 at step 3)" in post.content, post.content  # the summary line

    # When the last step was the best, the -best file is the final one again: not posted twice.
    job_id = await _queue(fake, bot, "kb1", b"validation_split = 1\nkeep_best = true\n", steps=1)
    job = await bot.scheduler.wait_for_job(job_id, 30)
    await bot.progress.wait_idle(job_id, 20)
    [post] = [m for m in fake.channel_messages(job.thread_id) if "finished" in m.content]
    assert [n for n in post.file_names if n.endswith(".safetensors")] == ["kb1.safetensors"], post.file_names
    assert "The lowest validation loss was at the last step (step 1, validation loss 0.0988): " \
           "`kb1.safetensors` is also the best LoRA." in post.content, post.content
