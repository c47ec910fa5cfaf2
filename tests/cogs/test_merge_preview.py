"""/merge and /preview through the fake Discord, and the check grid posted by itself after /train.

The LoRAs are small random kohya files for the built-in tiny models, written here with the engine's
own code (the test process may use torch; the bot never does). The end-to-end tests run the real
worker: merged file (valid kohya, rank as asked) + grid in the job's thread; a 2 x 2 preview grid;
a checkpoint merge by an admin delivered as a link; the automatic grid after a tiny /train. The
refusal tests use the torch-free stub worker: bad files are refused before anything is queued.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
from pathlib import Path
from typing import Any

import pytest
from cogkit import answer, run_command
from PIL import Image

from bot.demo import demo_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CB_AUTOCOMPLETE = 8
GRID_STEPS = 2  # the tiny models draw noise anyway; few steps keep the tests fast


# ---------------------------------------------------------------------------------- test files


def _random_lora(base: Any, rank: int, seed: int, name: str, base_name: str) -> tuple[dict, dict]:
    import torch

    from trainer.format.metadata import build_metadata
    from trainer.network.targets import lora_targets

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for t in lora_targets(base.unet, base.text_encoders, base.arch, conv=False, train_te=True):
        sd[f"{t.kohya_name}.lora_down.weight"] = (torch.randn(t.down_shape(rank), generator=g) * 0.3).half()
        sd[f"{t.kohya_name}.lora_up.weight"] = (torch.randn(t.up_shape(rank), generator=g) * 0.3).half()
        sd[f"{t.kohya_name}.alpha"] = torch.tensor(rank / 2).half()
    md = build_metadata(base.arch, rank, rank / 2, base_model_name=base_name, output_name=name, resolution=64)
    md["modelspec.trigger_phrase"] = "zqx shape"
    return sd, md


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """name -> file bytes: two SD1.5 LoRAs (ranks 4 and 3), one with a NaN, an SDXL one, one with a layer
    of the wrong size, a checkpoint, a pickle renamed .safetensors and a truncated file."""
    import torch

    from trainer.format.kohya import save_kohya
    from trainer.models.load import load_base
    from trainer.models.single_file import materialize_tiny_single_file

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("loras")
    out: dict[str, bytes] = {}
    sd15 = load_base("tiny-sd15")
    for name, rank, seed in (("front", 4, 1), ("side", 3, 2)):
        sd, md = _random_lora(sd15, rank, seed, name, "tiny-sd15")
        save_kohya(d / f"{name}.safetensors", sd, md)
        out[f"{name}.safetensors"] = (d / f"{name}.safetensors").read_bytes()
    sd, md = _random_lora(sd15, 4, 3, "odd", "tiny-sd15")
    k = next(k for k in sd if k.endswith("attn2_to_k.lora_down.weight"))
    sd[k] = torch.zeros(4, sd[k].shape[1] + 8).half()  # made for another model: wider input
    save_kohya(d / "odd.safetensors", sd, md)
    out["odd.safetensors"] = (d / "odd.safetensors").read_bytes()
    sd, md = _random_lora(sd15, 4, 5, "nan", "tiny-sd15")
    k = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[k][0, 0] = float("nan")  # a diverged training run: only the worker (with torch) can see this
    save_kohya(d / "nan.safetensors", sd, md)
    out["nan.safetensors"] = (d / "nan.safetensors").read_bytes()
    from trainer.format.metadata import build_metadata
    from trainer.network.lycoris_net import LycorisNetwork

    for algo in ("loha", "dora"):  # LyCORIS files (zero-initialised changes: fine for the checks here)
        net = LycorisNetwork.create(sd15, algo, 4, 2.0, seed=6)
        net.save(d / f"{algo}.safetensors", build_metadata("sd1", 4, 2.0, base_model_name="tiny-sd15",
                                                           output_name=algo, resolution=64, network_type=algo))
        net.remove()
        out[f"{algo}.safetensors"] = (d / f"{algo}.safetensors").read_bytes()
    sd, md = _random_lora(load_base("tiny-sdxl"), 4, 4, "xl", "tiny-sdxl")
    save_kohya(d / "xl.safetensors", sd, md)
    out["xl.safetensors"] = (d / "xl.safetensors").read_bytes()
    out["model.safetensors"] = materialize_tiny_single_file("tiny-sd15").read_bytes()
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(4)}}, buf)  # a zip-pickle, as .ckpt/.pt files are
    out["renamed.safetensors"] = buf.getvalue()
    out["cut.safetensors"] = out["front.safetensors"][: len(out["front.safetensors"]) // 2]
    return out


def attach(fake: Any, files: dict[str, bytes], name: str, as_name: str | None = None) -> dict:
    return fake.add_attachment(as_name or name, files[name])


def expected_grid_size(strengths: list[float], seeds: list[int], prompt: str, cell: int = 64) -> tuple[int, int]:
    """The size of a grid of these axes, laid out by the engine's own grid code with blank cells."""
    from trainer.infer.grid import strength_seed_grid

    blank = Image.new("RGB", (cell, cell))
    img, boxes = strength_seed_grid([[blank] * len(strengths) for _ in seeds], strengths, seeds, prompt)
    assert len(boxes) == len(strengths) * len(seeds)
    return img.size


def job_id_of(text: str) -> int:
    m = re.search(r"job \*\*#(\d+)\*\*", text)
    assert m, text
    return int(m.group(1))


async def finished(bot: Any, job_id: int, timeout: float = 180) -> Any:
    job = await bot.scheduler.wait_for_job(job_id, timeout)
    assert job.state == "succeeded", job.error
    await bot.progress.wait_idle(job_id, 60)
    return job


def final_post(fake: Any, job: Any) -> Any:
    posts = [m for m in fake.channel_messages(job.thread_id) if f"job **#{job.id}** finished" in m.content]
    assert posts, [m.content for m in fake.channel_messages(job.thread_id)]
    return posts[-1]


# ---------------------------------------------------------------------------------- end to end


@pytest.mark.slow
async def test_merge_and_preview_end_to_end(fake_discord: Any, bot_factory: Any, lora_files: dict[str, bytes]):
    from trainer.format.kohya import read_kohya_bytes

    fake = fake_discord
    b = bot_factory(real_worker=True)
    async with fake.running(b, gateway=False):
        # /merge: two attached LoRAs at 0.6 each to rank 2; the base comes from their metadata.
        rec = await run_command(fake, b, "merge", {
            "lora1": attach(fake, lora_files, "front.safetensors"), "lora2": attach(fake, lora_files, "side.safetensors"),
            "ratios": "0.6", "rank": "2", "grid_steps": GRID_STEPS}, user="bob", timeout=30)
        text = answer(rec)
        assert "Queued job **#1**" in text and "tiny-sd15" in text and rec.followups[-1].ephemeral, text
        assert "x0.6" in text and "zqx shape" in text  # the ratio and the grid prompt (the trigger phrase)
        merge_job = await finished(b, 1)
        post = final_post(fake, merge_job)
        assert post.file_names == ["front-merged.safetensors", "grid.png"], post.file_names
        merged = read_kohya_bytes(post.file("front-merged.safetensors"))
        assert merged.arch == "sd1" and {m.rank for m in merged.modules.values()} == {2}
        assert merged.metadata["ss_network_dim"] == "2"
        grid = Image.open(io.BytesIO(post.file("grid.png")))
        assert grid.size == expected_grid_size([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0], [1111, 2222, 3333], "zqx shape")
        # the uploads were kept under the data dir, content-addressed
        spec = merge_job.spec
        for inp in spec["inputs"]:
            p = Path(inp["path"])
            assert p.is_file() and p.is_relative_to(b.files.root.resolve()) and inp["ratio"] == 0.6

        # /preview with an attachment: strengths 0,1 x seeds 1111,2222 -> a 2 x 2 grid
        rec = await run_command(fake, b, "preview", {
            "prompt": "chibi scs girl", "lora": attach(fake, lora_files, "front.safetensors"),
            "strengths": "0,1", "seeds": "1111,2222", "steps": GRID_STEPS, "sampler": "euler"}, user="bob", timeout=30)
        assert "2 x 2 grid" in answer(rec), answer(rec)
        job = await finished(b, job_id_of(answer(rec)))
        post = final_post(fake, job)
        [png] = [n for n in post.file_names if n.endswith(".png")]
        grid = Image.open(io.BytesIO(post.file(png)))
        assert grid.size == expected_grid_size([0.0, 1.0], [1111, 2222], "chibi scs girl")

        # autocomplete lists bob's merged LoRA; /preview with it and one strength -> one image
        payload = fake.autocomplete("preview", {"prompt": "x", "mine": "merged"}, focused="mine", user="bob")
        ac = fake.feed(b, payload)
        await fake.wait_for_response(payload)
        assert ac.callback_type == CB_AUTOCOMPLETE
        assert [c["name"] for c in ac.autocomplete_choices] == ["job:1 front-merged.safetensors"]
        value = ac.autocomplete_choices[0]["value"]
        payload = fake.autocomplete("preview", {"prompt": "x", "mine": ""}, focused="mine", user="carol")
        ac = fake.feed(b, payload)
        await fake.wait_for_response(payload)
        assert ac.autocomplete_choices == []  # nobody sees others' LoRAs
        rec = await run_command(fake, b, "preview", {"prompt": "zqx shape", "mine": value, "strength": 0.8,
                                                     "steps": GRID_STEPS}, user="bob", timeout=30)
        assert "one image" in answer(rec), answer(rec)
        job = await finished(b, job_id_of(answer(rec)))
        assert job.spec["base_model"] == "tiny-sd15"  # from the merge job that made the LoRA
        post = final_post(fake, job)
        [png] = [n for n in post.file_names if n.endswith(".png")]
        assert Image.open(io.BytesIO(post.file(png))).size == (64, 64)

        # a NaN passes the header check; the worker's full check fails the job with a clear message
        rec = await run_command(fake, b, "preview", {"prompt": "a", "lora": attach(fake, lora_files, "nan.safetensors"),
                                                     "steps": GRID_STEPS}, user="bob", timeout=30)
        job = await b.scheduler.wait_for_job(job_id_of(answer(rec)), 120)
        await b.progress.wait_idle(job.id, 60)
        assert job.state == "failed" and "NaN" in job.error
        failed = fake.channel_messages(job.thread_id)[-1].content
        assert f"job **#{job.id}** failed" in failed and "nan.safetensors" in failed and "NaN" in failed

        # an admin merges into a checkpoint: delivered as a link, never attached
        rec = await run_command(fake, b, "merge", {"mine1": value, "ratios": "1", "base_model": "tiny-sd15",
                                                   "into_checkpoint": True, "output_name": "baked"}, user="alice",
                                timeout=30)
        job = await finished(b, job_id_of(answer(rec)))
        post = final_post(fake, job)
        assert "baked.safetensors" in post.content and "/files/" in post.content and not post.file_names
        assert (b.files.job_outputs_dir(job.id) / "baked.safetensors").stat().st_size > 1_000_000


@pytest.mark.slow
async def test_train_posts_the_check_grid_by_itself(fake_discord: Any, bot_factory: Any):
    fake = fake_discord
    b = bot_factory(real_worker=True)
    async with fake.running(b, gateway=False):
        b.get_cog("Preview").autogrid.grid_overrides = {"steps": GRID_STEPS}
        opts: dict[str, Any] = {"name": "shapes", "trigger_word": "zqx"}
        for i, (name, data) in enumerate(demo_images(3)):
            opts[f"file{i + 1}"] = fake.add_attachment(name, data)
        rec = await run_command(fake, b, "dataset", opts, user="bob", subcommand="create")
        assert "added 3 image(s)" in answer(rec), answer(rec)
        rec = await run_command(fake, b, "train", {"dataset": "shapes", "base_model": "tiny-sd15", "steps": 4,
                                                   "resolution": 64, "dim": 2, "output_name": "tri"},
                                user="bob", timeout=30)
        train = await finished(b, job_id_of(answer(rec)), 240)
        await fake.wait_for(lambda: any("grid" in n for m in fake.channel_messages(train.thread_id)
                                        for n in m.file_names), 180)
        grid_job = await b.repo.get_job(train.id + 1)
        assert grid_job.kind == "preview" and grid_job.owner_id == train.owner_id
        assert grid_job.thread_id == train.thread_id  # same thread, no new one
        post = final_post(fake, await finished(b, grid_job.id))
        [png] = [n for n in post.file_names if n.endswith(".png")]
        grid = Image.open(io.BytesIO(post.file(png)))
        assert grid.size == expected_grid_size([-1.0, 0.0, 0.5, 1.0, 1.5, 2.0], [1111, 2222, 3333], "zqx")
        assert len(fake.threads) == 1  # the grid job opened no thread of its own
        # once per train job: a replayed success queues nothing more
        assert await b.get_cog("Preview").autogrid.submit_for(train) is None
        assert await b.repo.count_jobs() == 2


# ---------------------------------------------------------------------------------- refusals


async def refusal(fake: Any, bot: Any, options: dict, user: str = "bob", command: str = "merge") -> str:
    rec = await run_command(fake, bot, command, options, user=user)
    msg = rec.followups[-1] if rec.followups else rec.original
    assert msg.ephemeral, msg.content
    return answer(rec)


async def test_bad_files_are_refused_before_queueing(fake_discord: Any, bot: Any, lora_files: dict[str, bytes]):
    fake = fake_discord
    a = lambda n: attach(fake, lora_files, n)  # noqa: E731

    text = await refusal(fake, bot, {"lora1": a("front.safetensors"), "lora2": a("renamed.safetensors")})
    assert "`renamed.safetensors`" in text and "pickle" in text and "Nothing was queued" in text
    text = await refusal(fake, bot, {"lora1": a("cut.safetensors")})
    assert "`cut.safetensors`" in text and "truncated" in text
    text = await refusal(fake, bot, {"lora1": a("model.safetensors")})
    assert "`model.safetensors`" in text and "checkpoint" in text and "not a LoRA" in text
    text = await refusal(fake, bot, {"lora1": a("xl.safetensors"), "base_model": "tiny-sd15"})
    assert "`xl.safetensors`" in text and "SDXL" in text and "tiny-sd15" in text and "SD1.x" in text
    text = await refusal(fake, bot, {"lora1": a("front.safetensors"), "lora2": a("xl.safetensors")})
    assert "different base models" in text and "front.safetensors" in text and "xl.safetensors" in text
    text = await refusal(fake, bot, {"lora1": a("front.safetensors"), "lora2": a("odd.safetensors")})
    assert "odd.safetensors" in text and "cannot be merged" in text
    text = await refusal(fake, bot, {"lora1": fake.add_attachment("front.ckpt", lora_files["front.safetensors"])})
    assert "`front.ckpt`" in text and ".safetensors" in text
    text = await refusal(fake, bot, {"lora1": a("front.safetensors"), "lora2": a("side.safetensors"),
                                     "ratios": "0.6,0.6,0.6"})
    assert "3 values for 2 LoRAs" in text
    text = await refusal(fake, bot, {"lora1": a("front.safetensors"), "lora2": a("dora.safetensors")})
    assert "`dora.safetensors` is a DoRA network" in text and "into_checkpoint" in text, text
    text = await refusal(fake, bot, {"lora1": a("front.safetensors"), "rank": "big"})
    assert "`rank`" in text
    text = await refusal(fake, bot, {"prompt": "chibi scs girl", "lora": a("xl.safetensors"),
                                     "base_model": "tiny-sd15"}, command="preview")
    assert "`xl.safetensors`" in text and "SDXL" in text
    text = await refusal(fake, bot, {"prompt": "chibi scs girl", "lora": a("renamed.safetensors")}, command="preview")
    assert "pickle" in text
    text = await refusal(fake, bot, {"prompt": "a cat", "lora": a("front.safetensors"), "seeds": "1,x"},
                         command="preview")
    assert "`seeds`" in text
    text = await refusal(fake, bot, {"prompt": "a", "mine": "job:99"}, command="preview")
    assert "No job of yours" in text
    text = await refusal(fake, bot, {"prompt": "a", "lora": a("front.safetensors"), "base_model": "/etc/passwd"},
                         command="preview")
    assert "not a base model of this server" in text
    assert await bot.repo.count_jobs() == 0
    assert not any((bot.files.root / "inputs").rglob("*"))  # refused uploads are not stored


async def test_checkpoint_merge_is_for_admins(fake_discord: Any, bot: Any, lora_files: dict[str, bytes]):
    fake = fake_discord
    text = await refusal(fake, bot, {"lora1": attach(fake, lora_files, "front.safetensors"),
                                     "base_model": "tiny-sd15", "into_checkpoint": True})
    assert "Only admins can merge into a checkpoint" in text
    text = await refusal(fake, bot, {"lora1": attach(fake, lora_files, "front.safetensors")}, user="carol")
    assert "role" in text  # carol may not start jobs at all
    assert await bot.repo.count_jobs() == 0


async def test_merge_clamp_option_reaches_the_job(fake_discord: Any, bot: Any, lora_files: dict[str, bytes]):
    """`clamp:kohya` asks for kohya's svd_merge_lora clamp (`clamp = true` in the job), the default stays auto;
    a value no client offers (a raw interaction) is refused before anything is queued."""
    fake = fake_discord
    front = lambda: attach(fake, lora_files, "front.safetensors")  # noqa: E731
    rec = await run_command(fake, bot, "merge", {"lora1": front(), "clamp": "kohya"}, user="alice")
    assert "kohya's 0.99-quantile clamp" in answer(rec), answer(rec)
    job = await finished(bot, job_id_of(answer(rec)), 30)
    assert job.spec["clamp"] is True
    rec = await run_command(fake, bot, "merge", {"lora1": front(), "clamp": "off"}, user="alice")
    assert (await finished(bot, job_id_of(answer(rec)), 30)).spec["clamp"] is False
    rec = await run_command(fake, bot, "merge", {"lora1": front()}, user="alice")
    assert (await finished(bot, job_id_of(answer(rec)), 30)).spec["clamp"] == "auto"
    text = await refusal(fake, bot, {"lora1": front(), "clamp": "sometimes"}, user="alice")
    assert "`clamp` must be one of `auto`, `kohya`, `off`" in text
    assert await bot.repo.count_jobs() == 3


async def test_no_second_grid_when_the_train_job_made_one(fake_discord: Any, bot: Any):
    """The stub worker's train jobs deliver a grid themselves: the automatic one is not queued again."""
    from cogkit import add_images

    fake = fake_discord
    rec = await run_command(fake, bot, "dataset", {"name": "cats", **add_images(fake, 2)}, user="bob",
                            subcommand="create")
    assert "added" in answer(rec)
    rec = await run_command(fake, bot, "train", {"dataset": "cats", "steps": 3, "output_name": "fast"}, user="bob")
    job = await finished(bot, job_id_of(answer(rec)), 30)
    assert await bot.get_cog("Preview").autogrid.submit_for(job) is None
    await asyncio.sleep(0.2)  # the listener runs on its own queue: give it a moment to (not) act
    assert await bot.repo.count_jobs() == 1


async def test_checkpoint_merge_is_delivered_by_link_even_when_small(fake_discord: Any, bot: Any,
                                                                       lora_files: dict[str, bytes]):
    """The link-only flag travels in the job's one META event (written before the progress hub is bound),
    so even a stub checkpoint of a few bytes, finished at once, is never attached; a LoRA merge of the
    same size is."""
    import aiohttp

    fake = fake_discord
    rec = await run_command(fake, bot, "merge", {"lora1": attach(fake, lora_files, "front.safetensors"),
                                                 "base_model": "tiny-sd15", "into_checkpoint": True,
                                                 "output_name": "baked"}, user="alice")
    job = await finished(bot, job_id_of(answer(rec)), 30)
    [meta] = await bot.repo.list_events(job.id, types=["discord.meta"])
    assert meta.payload["link_only"] is True and meta.payload["destination"] == "thread"
    post = final_post(fake, job)
    assert post.file_names == [], post.file_names
    url = re.search(r"<(http://127\.0\.0\.1:\d+/files/[^>]+)>", post.content).group(1)
    assert "baked.safetensors" in post.content
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        assert r.status == 200
        assert await r.read() == (bot.files.job_outputs_dir(job.id) / "baked.safetensors").read_bytes()

    rec = await run_command(fake, bot, "merge", {"lora1": attach(fake, lora_files, "front.safetensors"),
                                                 "output_name": "small"}, user="alice")
    job = await finished(bot, job_id_of(answer(rec)), 30)
    [meta] = await bot.repo.list_events(job.id, types=["discord.meta"])
    assert "link_only" not in meta.payload
    assert "small.safetensors" in final_post(fake, job).file_names  # fits the limit: attached


def _with_metadata(data: bytes, **changes: str) -> bytes:
    """The same safetensors file with some metadata values changed (the tensors' bytes untouched)."""
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header["__metadata__"].update(changes)
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


async def test_merge_of_foreign_loras_grids_on_the_servers_base(fake_discord: Any, bot: Any,
                                                                lora_files: dict[str, bytes]):
    """LoRAs from another trainer name a base this server does not have: the check grid still comes,
    on the server's own base of their architecture (never on a built-in tiny model)."""
    fake = fake_discord
    foreign = _with_metadata(lora_files["front.safetensors"], ss_sd_model_name="anything-v5.safetensors")
    rec = await run_command(fake, bot, "merge", {"lora1": fake.add_attachment("a.safetensors", foreign),
                                                 "ratios": "0.6"}, user="bob", timeout=30)
    assert "Queued job" in answer(rec) and "No check grid" in answer(rec), answer(rec)  # nothing to render on
    models = bot.config.models_dir
    models.mkdir(parents=True, exist_ok=True)
    (models / "my-sd15.safetensors").write_bytes(lora_files["model.safetensors"])
    rec = await run_command(fake, bot, "merge", {"lora1": fake.add_attachment("a.safetensors", foreign),
                                                 "ratios": "0.6"}, user="bob", timeout=30)
    text = answer(rec)
    assert "`my-sd15.safetensors` for the check grid" in text and "only SD" in text, text
    job = await bot.repo.get_job(job_id_of(text))
    assert job.spec["base_model"] == "my-sd15.safetensors" and job.spec["grid"] is not None


async def test_train_init_lora_starts_from_an_attached_lora(fake_discord: Any, bot: Any,
                                                            lora_files: dict[str, bytes]):
    """/train init_lora: checked against the base model's architecture and dim before queueing; the job's spec
    names the stored upload, with the LoRA's rank and text-encoder layers."""
    from cogkit import add_images

    fake = fake_discord
    rec = await run_command(fake, bot, "dataset", {"name": "cats", **add_images(fake, 3)}, user="bob",
                            subcommand="create")
    assert "added" in answer(rec), answer(rec)
    base = {"dataset": "cats", "steps": 2}
    rec = await run_command(fake, bot, "train", {**base, "init_lora": attach(fake, lora_files, "xl.safetensors")},
                            user="bob")
    assert "`xl.safetensors` is a LoRA for SDXL" in answer(rec) and "Nothing was queued" in answer(rec), answer(rec)
    rec = await run_command(fake, bot, "train", {**base, "dim": 8,
                                                 "init_lora": attach(fake, lora_files, "front.safetensors")}, user="bob")
    assert "has rank 4, but dim is 8" in answer(rec) and "dim:4" in answer(rec), answer(rec)
    rec = await run_command(fake, bot, "train", {**base, "init_lora": attach(fake, lora_files, "loha.safetensors")},
                            user="bob")
    assert "continues a plain LoRA/LoCon (`loha.safetensors` is LoHa" in answer(rec), answer(rec)
    rec = await run_command(fake, bot, "train", {**base, "network_type": "dora",
                                                 "init_lora": attach(fake, lora_files, "front.safetensors")},
                            user="bob")
    assert "this job trains network type dora" in answer(rec) and "Nothing was queued" in answer(rec), answer(rec)
    job_file = fake.add_attachment("job.toml", b'init_lora = "/srv/someone-else/secret.safetensors"\n')
    rec = await run_command(fake, bot, "train", {**base, "job_file": job_file}, user="bob")
    assert "names a file on the server" in answer(rec), answer(rec)  # only an attachment can be continued
    assert await bot.repo.list_jobs() == []
    rec = await run_command(fake, bot, "train", {**base, "init_lora": attach(fake, lora_files, "front.safetensors")},
                            user="bob")
    assert "Queued job **#1**" in answer(rec), answer(rec)
    spec = (await bot.repo.get_job(1)).spec
    assert Path(spec["init_lora"]).read_bytes() == lora_files["front.safetensors"]
    assert spec["network"]["dim"] == 4 and spec["network"]["train_text_encoder"] is True
    await bot.scheduler.wait_for_job(1, 30)
