"""End to end with the real engine: /dataset create with image attachments, /train on the built-in
tiny SD1.5 model at 64 px for a few steps, progress edits, samples, and the LoRA delivered as an
attachment that is a valid kohya safetensors file."""

from __future__ import annotations

import asyncio
import re

import pytest
from cogkit import answer, run_command

from bot.demo import demo_images

JOB_TOML = b"""
seed = 77
state_every_n_steps = 4
[network]
dim = 4
alpha = 2
[optimizer]
name = "AdamW"
lr = 0.002
scheduler = "constant"
[sample]
every_n_steps = 4
[[sample.prompts]]
prompt = "zqx, a red circle"
steps = 4
width = 64
height = 64
seed = 42
"""


@pytest.mark.slow
async def test_dataset_train_deliver_real_engine(fake_discord, bot_factory):
    fake = fake_discord
    b = bot_factory(real_worker=True)
    async with fake.running(b, gateway=False):
        files = demo_images(4)
        opts = {"name": "shapes", "trigger_word": "zqx"}
        for i, (name, data) in enumerate(files[:8]):
            opts[f"file{i + 1}"] = fake.add_attachment(name, data)
        rec = await run_command(fake, b, "dataset", opts, user="bob", subcommand="create")
        assert "added 4 image(s)" in answer(rec), answer(rec)

        rec = await run_command(fake, b, "train", {
            "dataset": "shapes", "base_model": "tiny-sd15", "steps": 8, "resolution": 64, "output_name": "e2e",
            "job_file": fake.add_attachment("job.toml", JOB_TOML)}, user="bob", timeout=30)
        assert "Queued job **#1**" in answer(rec), answer(rec)
        await asyncio.wait_for(b.service_ready.wait(), 120)
        job = await b.scheduler.wait_for_job(1, 240)
        assert job.state == "succeeded", job.error
        await b.progress.wait_idle(1, 60)

        thread = fake.channel_messages(job.thread_id)
        progress = fake.message(job.message_id)
        assert progress.edit_count >= 1 and "succeeded" in progress.content and "8/8" in progress.content
        samples = [m for m in thread if m.content.startswith("Sample at step")]
        assert samples and all(m.file_names[0].endswith(".png") for m in samples)
        # the result post mentions the owner; the check-grid job queued at the same moment may post after it
        finals = [m for m in thread if m.content.startswith(f"<@{fake.users['bob']['id']}>")]
        assert finals, [m.content[:60] for m in thread]
        final = finals[0]
        lora_name = next(n for n in final.file_names if n.endswith(".safetensors"))
        blob = final.file(lora_name)

    from trainer.format.kohya import read_kohya_bytes  # the test may use torch; the bot never does

    lora = read_kohya_bytes(blob)
    assert lora.arch == "sd1"
    assert lora.metadata["ss_network_dim"] == "4" and lora.metadata["ss_base_model_version"] == "sd_v1"
    assert all(re.match(r"lora_(unet|te)_", k) for k in lora.modules)
    assert {float(m.alpha) for m in lora.modules.values()} == {2.0}
