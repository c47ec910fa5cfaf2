"""/train job_file: takes a kohya sd-scripts config too: translated, and the queued message says what was not."""

from __future__ import annotations

from cogkit import add_images, answer, run_command


async def test_a_kohya_config_as_the_job_file(fake_discord, bot):
    fake = fake_discord
    rec = await run_command(fake, bot, "dataset", {"name": "cats", **add_images(fake, 3)}, user="bob",
                            subcommand="create")
    assert "added" in answer(rec), answer(rec)
    kohya = (b'[additional_network_arguments]\nnetwork_dim = 4\nnetwork_alpha = 2\nnetwork_train_unet_only = true\n'
             b'[optimizer_arguments]\noptimizer_type = "Lion"\nlearning_rate = 3e-4\n'
             b'[training_arguments]\nmax_train_steps = 7\nclip_skip = 2\noutput_dir = "C:/out"\n')
    rec = await run_command(fake, bot, "train", {"dataset": "cats", "job_file": fake.add_attachment("kohya.toml", kohya)},
                            user="bob")
    text = answer(rec)
    assert "Queued job" in text, text
    spec = (await bot.repo.list_jobs())[0].spec
    assert spec["steps"] == 7 and spec["network"]["dim"] == 4 and spec["network"]["alpha"] == 2.0
    assert spec["optimizer"]["name"] == "Lion" and spec["optimizer"]["lr"] == 3e-4
    assert spec["network"]["train_text_encoder"] is False
    assert "kohya config" in text and "clip_skip" in text, text
