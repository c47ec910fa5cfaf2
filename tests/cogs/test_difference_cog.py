"""/train mode:difference (copy-machine training) through the fake Discord.

The end-to-end test runs the real worker on the built-in tiny SD1.5 model at 64 px with the fast-converging
recipe of tests/trainer/test_difference.py: progress edits name the pair and the pass, the copier-check image
is posted between the passes, the pass-2 LoRA (kohya, no copier weights) is delivered, then its grid. The
refusal tests use the torch-free stub worker: bad pairs never reach the queue and store nothing.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cogkit import answer, png_bytes, run_command
from PIL import Image, ImageDraw

from bot.progress import render
from cogs.train import group_pairs, split_pair_stem

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GRID_STEPS = 2
# tests/trainer/test_difference.py's recipe: the copier converges in 30 steps at lr 1e-2 on a 64 px image.
JOB_TOML = b"""
state_every_n_steps = 1000
[network]
dim = 8
conv_dim = 4
[optimizer]
name = "AdamW"
lr = 1e-2
[difference]
copier_min_improvement = 0.2
[difference.pass2]
steps = 15
[difference.pass2.optimizer]
lr = 3e-3
[difference.pass2.network]
dim = 4
alpha = 4
conv_dim = 0
"""


def drawing(size: tuple[int, int] = (64, 64), edited: bool = False) -> bytes:
    """A smooth picture (gradient + disc); the edit repaints the lower half and adds a white disc."""
    w, h = size
    img = Image.new("RGB", size)
    px = img.load()
    for y in range(h):
        for x in range(w):
            px[x, y] = (int(255 * x / w), int(255 * y / h), 128)
    d = ImageDraw.Draw(img)
    d.ellipse([w * 0.25, h * 0.25, w * 0.75, h * 0.75], fill=(240, 220, 40))
    if edited:
        d.rectangle([0, h * 0.5, w, h], fill=(20, 30, 200))
        d.ellipse([w * 0.1, h * 0.1, w * 0.4, h * 0.4], fill=(250, 250, 250))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def job_id_of(text: str) -> int:
    m = re.search(r"job \*\*#(\d+)\*\*", text)
    assert m, text
    return int(m.group(1))


async def refusal(fake: Any, bot: Any, options: dict, user: str = "bob") -> str:
    rec = await run_command(fake, bot, "train", options, user=user)
    msg = rec.followups[-1] if rec.followups else rec.original
    assert msg.ephemeral, msg.content
    return answer(rec)


# ---------------------------------------------------------------------------------- pure parts


def test_pair_naming_convention() -> None:
    assert split_pair_stem("front.png") == ("front", "original")
    assert split_pair_stem("front-target.png") == ("front", "target")
    assert split_pair_stem("front_edited.jpg") == ("front", "target")
    assert split_pair_stem("front_original.webp") == ("front", "original")
    assert split_pair_stem("pairs.zip/views/Left-Edit.png") == ("Left", "target")

    def row(name: str) -> Any:
        return SimpleNamespace(original_name=name)

    pairs = group_pairs([row("left.png"), row("front-target.png"), row("front.png"), row("left_edited.png")])
    assert [(n, o.original_name, t.original_name) for n, o, t in pairs] == [
        ("front", "front.png", "front-target.png"), ("left", "left.png", "left_edited.png")]
    from bot.errors import InvalidInput

    with pytest.raises(InvalidInput) as e:
        group_pairs([row("front.png"), row("front-target.png"), row("side.png"), row("back-target.png")])
    text = e.value.render()
    assert "`side.png` has no target" in text and "`back-target.png` has no original" in text
    assert "front-target.png" in text or "-target.png" in text  # the convention is explained


def test_progress_text_names_pair_and_pass() -> None:
    job = SimpleNamespace(id=5, kind="train", state="running", cancel_requested=False, error=None)
    st = {"difference": True, "pair_names": ["front", "left", "right"], "overall_total": 90,
          "total_steps": 90, "pair": "front", "pass": 1, "pair_index": 1, "pairs": 3,
          "phase": "pair front: pass 1 of 2 (copier)", "step": 12, "total": 20, "overall_step": 12,
          "progress_pair": "front", "progress_pass": 1, "loss": 0.1}
    text = render(job, st)
    assert "Pair **front** (1/3) \u00b7 pass 1 of 2 (copier) \u00b7 step 12/20" in text, text
    assert "overall step 12/90" in text and "loss 0.1000" in text
    st.update(phase="pair left: pass 2 of 2 (difference): caching latents", pair="left", **{"pass": 2},
              pair_index=2, step=20, progress_pair="front", progress_pass=1)
    text = render(job, st)
    # the step of the last pass is not shown against the new one; the sub-phase is
    assert "Pair **left** (2/3) \u00b7 pass 2 of 2 (difference)\n" in text and "Phase: caching latents" in text


async def test_grids_of_a_difference_job() -> None:
    """The merged LoRA when there is one, else each pair's pass-2 LoRA (at most 3); never a copier."""
    from bot.autogrid import AutoGrid, train_prompt

    arts: list[Any] = []

    class Repo:
        async def list_artifacts(self, job_id: int, kind: str | None = None) -> list[Any]:
            return arts

    def art(name: str, role: str, pair: str = "") -> Any:
        return SimpleNamespace(path=f"jobs/1/outputs/{name}.safetensors", meta={"role": role, "pair": pair})

    ag = AutoGrid(SimpleNamespace(repo=Repo(), files=SimpleNamespace(resolve=lambda s: Path("/data") / s)))
    job = SimpleNamespace(id=1, spec={"mode": "difference", "output_name": "cm", "difference": {"prompt": ""}})
    arts += [art("cm-front-copier", "copier", "front"), art("cm-front", "difference", "front"),
             art("cm-left", "difference", "left"), art("cm-right", "difference", "right"),
             art("cm-back view", "difference", "back view")]
    assert [(p.name, n) for p, n in await ag.grid_targets(job)] == [
        ("cm-front.safetensors", "cm-front-check"), ("cm-left.safetensors", "cm-left-check"),
        ("cm-right.safetensors", "cm-right-check")]
    arts.append(art("cm-merged", "merged"))
    assert [(p.name, n) for p, n in await ag.grid_targets(job)] == [("cm-merged.safetensors", "cm-merged-check")]
    assert train_prompt(job.spec) == ""  # trained without words: the grid too
    assert train_prompt({**job.spec, "output_name": "x", "difference": {"prompt": "zqx"}}) == "zqx"


# ---------------------------------------------------------------------------------- refusals (stub worker)


async def test_bad_pairs_are_refused_before_queueing(fake_discord: Any, bot: Any) -> None:
    fake = fake_discord
    a = fake.add_attachment
    text = await refusal(fake, bot, {"mode": "difference", "original": a("front.png", drawing())})
    assert "needs two images" in text and "only the original" in text and "target" in text
    text = await refusal(fake, bot, {"target": a("front-edit.png", drawing(edited=True))})
    assert "only the target" in text
    text = await refusal(fake, bot, {"original": a("front.png", drawing()),
                                     "target": a("front-edit.png", drawing((72, 72), edited=True))})
    assert "64x64" in text and "72x72" in text and "same size" in text and "resize_pairs" in text
    text = await refusal(fake, bot, {"original": a("front.png", drawing()), "target": a("notes.txt", b"hello")})
    assert "target image `notes.txt`" in text and "not an image" in text
    text = await refusal(fake, bot, {"original": a("front.png", drawing()), "target": a("copy.png", drawing())})
    assert "same image" in text
    text = await refusal(fake, bot, {"mode": "difference"})
    assert "needs two images" in text and "front-target.png" in text
    text = await refusal(fake, bot, {"mode": "standard", "preset": "copy-machine-sd15"})
    assert "copy-machine" in text and "mode:difference" in text
    text = await refusal(fake, bot, {"steps": 3})
    assert "Pick a dataset" in text
    text = await refusal(fake, bot, {"original": a("front.png", drawing()),
                                     "target": a("front-edit.png", drawing(edited=True)),
                                     "job_file": a("job.toml", b'[difference]\ncopier = "/etc/passwd"\n')})
    assert "difference.copier" in text
    assert await bot.repo.count_jobs() == 0
    assert not any((bot.files.root / "inputs").rglob("*"))  # refused uploads are not stored
    assert not fake.threads


async def test_pairs_from_attachments_and_datasets_are_queued(fake_discord: Any, bot: Any) -> None:
    fake = fake_discord
    a = fake.add_attachment
    # two attachments: one pair named after the original; the preset follows the base model
    rec = await run_command(fake, bot, "train", {"original": a("Front View.png", drawing()),
                                                 "target": a("front-edit.png", drawing(edited=True)),
                                                 "base_model": "tiny-sdxl", "resolution": 64}, user="bob")
    job = await bot.repo.get_job(job_id_of(answer(rec)))
    spec = job.spec
    assert spec["mode"] == "difference" and spec["preset"] == "copy-machine-sdxl"
    assert spec["optimizer"]["name"] == "Lion" and spec["difference"]["pass2"]["network"]["dim"] == 4
    [pair] = spec["difference"]["pairs"]
    assert pair["name"] == "Front View"
    for role in ("original", "target"):
        p = Path(pair[role])
        assert p.parent == (bot.files.root / "inputs" / "pairs").resolve() and p.is_file()
    assert "difference pairs `Front View`" in answer(rec)

    # a dataset of pairs (incomplete: refused, naming the file; complete: one pair per name)
    opts: dict[str, Any] = {"name": "views"}
    for i, (name, data) in enumerate([("front.png", drawing()), ("front-target.png", drawing(edited=True)),
                                      ("left.png", png_bytes((30, 200, 30), 64))]):
        opts[f"file{i + 1}"] = a(name, data)
    rec = await run_command(fake, bot, "dataset", opts, user="bob", subcommand="create")
    assert "added 3 image(s)" in answer(rec), answer(rec)
    text = await refusal(fake, bot, {"mode": "difference", "dataset": "views"})
    assert "`left.png` has no target" in text and "left-target.png" in text
    rec = await run_command(fake, bot, "dataset", {"dataset": "views", "file1": a(
        "left_edited.png", png_bytes((200, 30, 30), 64))}, user="bob", subcommand="add")
    rec = await run_command(fake, bot, "train", {"mode": "difference", "dataset": "views", "resolution": 64,
                                                 "trigger_word": "zqx"}, user="bob")
    job = await bot.repo.get_job(job_id_of(answer(rec)))
    spec = job.spec
    assert spec["preset"] == "copy-machine-sd15" and spec["output_name"] == "views"
    assert [p["name"] for p in spec["difference"]["pairs"]] == ["front", "left"]
    assert spec["difference"]["prompt"] == "zqx" and not spec["data"].get("trigger_word")
    # a job file's pairs name images of the dataset
    toml = b'[[difference.pairs]]\nname = "side"\noriginal = "left.png"\ntarget = "front-target.png"\n'
    rec = await run_command(fake, bot, "train", {"dataset": "views", "job_file": a("pairs.toml", toml),
                                                 "output_name": "fast-side"}, user="bob")
    side = await bot.repo.get_job(job_id_of(answer(rec)))
    assert [p["name"] for p in side.spec["difference"]["pairs"]] == ["side"]
    assert side.spec["mode"] == "difference"  # the job file's pairs alone chose the mode
    toml = b'[[difference.pairs]]\nname = "side"\noriginal = "left.png"\ntarget = "nope.png"\n'
    text = await refusal(fake, bot, {"dataset": "views", "job_file": a("pairs.toml", toml)})
    assert "no image named `nope.png`" in text

    # a copy-machine preset without mode: difference mode, then asks for the images
    text = await refusal(fake, bot, {"preset": "copy-machine-sd15"})
    assert "needs two images" in text
    for j in (job, side):
        await bot.scheduler.wait_for_job(j.id, 30)
        await bot.progress.wait_idle(j.id, 30)


# ---------------------------------------------------------------------------------- end to end (real worker)


@pytest.mark.slow
async def test_difference_end_to_end_real_engine(fake_discord: Any, bot_factory: Any) -> None:
    fake = fake_discord
    b = bot_factory(real_worker=True)
    async with fake.running(b, gateway=False):
        b.get_cog("Preview").autogrid.grid_overrides = {"steps": GRID_STEPS}
        rec = await run_command(fake, b, "train", {
            "mode": "difference", "original": fake.add_attachment("front.png", drawing()),
            "target": fake.add_attachment("front-edit.png", drawing(edited=True)), "base_model": "tiny-sd15",
            "steps": 30, "resolution": 64, "output_name": "cm", "seed": 1111,
            "job_file": fake.add_attachment("job.toml", JOB_TOML)}, user="bob", timeout=30)
        job_id = job_id_of(answer(rec))
        job = await b.scheduler.wait_for_job(job_id, 240)
        assert job.state == "succeeded", job.error
        await b.progress.wait_idle(job_id, 60)

        progress = fake.message(job.message_id)
        seen = "\n".join(h.get("content") or "" for h in progress.history) + progress.content
        assert "Pair **front** (1/1) \u00b7 pass 1 of 2 (copier)" in seen, seen
        assert "pass 2 of 2 (difference)" in seen and "overall step" in seen
        assert "succeeded" in progress.content and "overall step 45/45" in progress.content

        thread = fake.channel_messages(job.thread_id)
        [check] = [i for i, m in enumerate(thread) if m.content.startswith("Copier check, pair **front**")]
        assert thread[check].file_names == ["cm-front-copier-check.png"]
        assert "without the copier" in thread[check].content and "with it" in thread[check].content
        [final] = [i for i, m in enumerate(thread) if f"job **#{job_id}** finished" in m.content]
        assert check < final  # posted between the passes, before the result
        post = thread[final]
        assert "cm-front.safetensors" in post.file_names and "front-loss.png" in post.file_names
        assert "use it without the copier" in post.content and "Copier check, pair front" in post.content
        blob = post.file("cm-front.safetensors")

        # then the strength x seed grid of the pass-2 LoRA, in the same thread
        grid_job = await b.scheduler.wait_for_job(job_id + 1, 180)
        assert grid_job.kind == "preview" and grid_job.state == "succeeded", grid_job.error
        await b.progress.wait_idle(grid_job.id, 60)
        assert grid_job.thread_id == job.thread_id
        assert grid_job.spec["loras"][0]["path"].endswith("cm-front.safetensors")
        grids = [m for m in fake.channel_messages(job.thread_id) if f"job **#{grid_job.id}** finished" in m.content]
        assert grids and any(n.endswith(".png") for n in grids[-1].file_names)
        assert len(fake.threads) == 1

        # a copier that did not learn the original: the job stops after pass 1 and says what to change
        rec = await run_command(fake, b, "train", {
            "original": fake.add_attachment("front.png", drawing()),
            "target": fake.add_attachment("front-edit.png", drawing(edited=True)), "steps": 2, "resolution": 64,
            "output_name": "weak", "job_file": fake.add_attachment("job.toml", JOB_TOML.replace(
                b"copier_min_improvement = 0.2", b"copier_min_improvement = 0.95"))}, user="bob", timeout=30)
        weak = await b.scheduler.wait_for_job(job_id_of(answer(rec)), 180)
        assert weak.state == "failed" and "did not learn the original" in (weak.error or "")
        await b.progress.wait_idle(weak.id, 60)
        posts = fake.channel_messages(weak.thread_id)
        assert any(m.content.startswith("Copier check, pair **front**") for m in posts)
        assert "failed" in posts[-1].content and "copier check image above" in posts[-1].content
        assert not any(n.endswith(".safetensors") for m in posts for n in m.file_names)

    from trainer.format.kohya import read_kohya_bytes  # the test may use torch; the bot never does

    lora = read_kohya_bytes(blob)
    assert lora.arch == "sd1"
    assert lora.metadata["ss_network_dim"] == "4" and lora.metadata["loraforge_mode"] == "difference"
    # no copier weights: the copier had rank 8 and LoCon conv layers; the difference LoRA is rank 4, no conv
    assert all(re.match(r"lora_(unet|te)_", k) for k in lora.modules)
    assert {m.down.shape[0] for m in lora.modules.values()} == {4}
    assert not any(m.down.ndim == 4 and m.down.shape[-1] == 3 for m in lora.modules.values())
