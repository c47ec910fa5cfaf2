"""What users read: the result post's summary in human units, /jobs active with nothing active, and the
automatic check grid's prompt (what the LoRA was trained on, never its file name) and LoRA name."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cogkit import add_images, answer, run_command

from bot.autogrid import AutoGrid, train_prompt
from bot.interactions import spec_summary


async def test_result_post_and_jobs_list_read_as_sentences(fake_discord, bot):
    fake = fake_discord
    rec = await run_command(fake, bot, "dataset", {"name": "cats", **add_images(fake, 2)}, user="bob",
                            subcommand="create")
    assert "added" in answer(rec)
    rec = await run_command(fake, bot, "jobs", {"active": True}, user="bob")
    assert "No jobs yet" in answer(rec)  # truly none yet
    rec = await run_command(fake, bot, "train", {"dataset": "cats", "steps": 3, "output_name": "tri"}, user="bob")
    job_id = int(re.search(r"job \*\*#(\d+)\*\*", answer(rec)).group(1))
    await bot.scheduler.wait_for_job(job_id, 30)
    await bot.progress.wait_idle(job_id, 30)
    job = await bot.repo.get_job(job_id)
    post = next(m for m in fake.channel_messages(job.thread_id) if f"job **#{job_id}** finished" in m.content)
    # the stub sends the engine's summary keys with raw floats (elapsed_s 65.22395266000001, ...)
    assert "Summary: took 1m05s \u00b7 3 steps at 3.1 steps/s \u00b7 loss 0.51 \u2192 0.33" in post.content, post.content
    assert "elapsed_s" not in post.content and "65.22" not in post.content and "3.066" not in post.content

    rec = await run_command(fake, bot, "jobs", {"active": True}, user="bob")
    text = answer(rec)
    assert "No jobs yet" not in text and "Nothing is queued or running for you" in text, text
    assert f"#{job_id}" in answer(await run_command(fake, bot, "jobs", None, user="bob"))


class _Repo:
    def __init__(self, lora: Path) -> None:
        self.lora, self.events = lora, []

    async def list_events(self, job_id: int, types: list[str] | None = None, limit: int | None = None) -> list:
        return []

    async def list_artifacts(self, job_id: int, kind: str | None = None) -> list:
        return [SimpleNamespace(path=str(self.lora), meta={})] if kind == "lora" else []

    async def add_event(self, job_id: int, etype: str, payload: dict) -> None:
        self.events.append((etype, payload))


async def _grid_of(tmp_path: Path, spec: dict[str, Any]) -> Any:
    lora = tmp_path / "out" / "tri.safetensors"
    submitted: list[Any] = []

    async def submit(owner, kind, preview, guild_id, channel, **kw):
        submitted.append(preview)
        return SimpleNamespace(id=2)

    bot = SimpleNamespace(repo=_Repo(lora), files=SimpleNamespace(resolve=lambda s: Path(s)),
                          scheduler=SimpleNamespace(submit=submit))
    job = SimpleNamespace(id=1, kind="train", spec=spec, owner_id=5, guild_id=None, channel_id=9, thread_id=9)
    await AutoGrid(bot).submit_for(job)  # type: ignore[arg-type]
    [preview] = submitted
    return preview


async def test_check_grid_prompt_is_the_trigger_word_or_the_captions_never_the_file_name(tmp_path: Path):
    snap = tmp_path / "snap"
    snap.mkdir()
    for i, cap in enumerate(["a red square, photo", "a blue square, photo", "photo, studio light"]):
        (snap / f"{i}.png").write_bytes(b"")
        (snap / f"{i}.txt").write_text(cap)
    spec = {"kind": "train", "output_name": "tri", "base_model": "tiny-sd15",
            "concepts": [{"image_dir": str(snap), "instance_prompt": ""}], "data": {}}
    assert train_prompt(spec) == ""  # no words given: not the output (file) name
    preview = await _grid_of(tmp_path, spec)
    assert preview.grid.prompt == "photo"  # the tag the LoRA saw most
    text = spec_summary(preview.model_dump(mode="json"))
    assert "LoRA `tri.safetensors`" in text and "prompt *photo*" in text, text
    assert "strengths -1, 0, 0.5, 1, 1.5, 2 x seeds 1111, 2222, 3333" in text

    with_trigger = {**spec, "data": {"trigger_word": "zqx"}}
    assert (await _grid_of(tmp_path, with_trigger)).grid.prompt == "zqx"
    bare = tmp_path / "bare"
    bare.mkdir()
    nothing = {**spec, "concepts": [{"image_dir": str(bare), "instance_prompt": ""}]}
    assert (await _grid_of(tmp_path, nothing)).grid.prompt == ""  # trained without words: the grid too
