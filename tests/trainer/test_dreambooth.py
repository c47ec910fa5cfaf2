"""DreamBooth-style training through the real loop on the tiny models: class images generated once and reused,
the prior-preservation loss, aspect-ratio buckets and SDXL's size conditioning, caption shuffling and dropout,
samples during training, the dataset report, the presets, and exact resume with all of it on."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from trainer.data.buckets import fit_to_bucket, sdxl_size_conditioning
from trainer.data.dataset import TrainData, scan_dataset
from trainer.data.order import DataOrder
from trainer.events import JobCancelled
from trainer.spec import resolve_job
from trainer.train import losses as losses_mod
from trainer.train import prior
from trainer.train.loop import Trainer, train


def _phases(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "phase" and e["name"] == name]


def _mixed(folder: Path, draw) -> dict[str, tuple[int, int]]:
    """Two wide, one tall, two squarish images (for resolution 96, bucket step 16, sides 64-160)."""
    sizes = {"wide_a": (180, 100), "wide_b": (160, 120), "tall": (100, 190), "sq_a": (120, 120), "sq_b": (110, 100)}
    for i, (name, size) in enumerate(sizes.items()):
        draw(folder / f"{name}.png", size, seed=300 + i)
    return sizes


EXPECTED_BUCKET = {"wide_a": (128, 64), "wide_b": (112, 80), "tall": (64, 128), "sq_a": (96, 96), "sq_b": (96, 96)}
BUCKETS = {"resolution": 96, "bucketing": True, "bucket_step": 16, "bucket_min_side": 64, "bucket_max_side": 160}
# SDXL add_time_ids: original (h, w), crop (top, left), target (h, w); worked out by hand from the sizes above
TIME_IDS = {
    True: {"wide_a": (100, 180, 3, 0, 64, 128), "wide_b": (120, 160, 2, 0, 80, 112), "tall": (190, 100, 0, 1, 128, 64),
           "sq_a": (120, 120, 0, 0, 96, 96), "sq_b": (100, 110, 0, 5, 96, 96)},
    False: {"wide_a": (100, 180, 0, 38, 96, 96), "wide_b": (120, 160, 0, 16, 96, 96), "tall": (190, 100, 43, 0, 96, 96),
            "sq_a": (120, 120, 0, 0, 96, 96), "sq_b": (100, 110, 0, 5, 96, 96)},
}


def _draw(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A deterministic picture with flat shapes (as conftest's datasets)."""
    from PIL import ImageDraw

    g = torch.Generator().manual_seed(seed)
    colors = [tuple(int(c) for c in torch.randint(0, 256, (3,), generator=g)) for _ in range(3)]
    img = Image.new("RGB", size, colors[0])
    d = ImageDraw.Draw(img)
    w, h = size
    d.ellipse([w * 0.2, h * 0.15, w * 0.7, h * 0.65], fill=colors[1])
    d.rectangle([w * 0.5, h * 0.5, w * 0.95, h * 0.9], fill=colors[2])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture
def draw():
    return _draw


# --- prior preservation --------------------------------------------------------------------------------

def test_missing_class_images_are_generated_once(tmp_path: Path, dataset: Path, make_spec, draw,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    class_dir = tmp_path / "class"
    draw(class_dir / "own_0.png", (64, 64), seed=1)
    draw(class_dir / "own_1.png", (64, 64), seed=2)
    prompts: list[str] = []
    real = prior.default_render

    def recording(base, **kw):
        render = real(base, **{**kw, "steps": 2})  # a tiny model needs no 20 steps to make a picture

        def wrapped(prompt: str, seed: int, w: int, h: int):
            prompts.append(prompt)
            return render(prompt, seed, w, h)

        return wrapped

    monkeypatch.setattr(prior, "default_render", recording)
    spec = make_spec(dataset, steps=1, concepts=[{"image_dir": str(dataset), "instance_prompt": "scs girl",
                                                  "class_prompt": "girl", "class_dir": str(class_dir),
                                                  "class_count": 5}])
    events: list[dict[str, Any]] = []
    train(spec, tmp_path / "job1", on_event=events.append)
    assert prompts == ["girl"] * 3  # exactly the missing ones, with the class prompt
    names = sorted(p.name for p in class_dir.glob("*.png"))
    assert names == ["class_00000.png", "class_00001.png", "class_00002.png", "own_0.png", "own_1.png"]
    assert all((class_dir / f"class_0000{i}.txt").read_text().strip() == "girl" for i in range(3))
    gen = _phases(events, "generating class images")
    assert gen[0]["total"] == 3 and gen[-1]["current"] == 3
    # generation happens before the network exists, and before training
    kinds = [(e["type"], e.get("name")) for e in events]
    assert kinds.index(("phase", "generating class images")) < kinds.index(("phase", "training"))
    report = next(e for e in events if e["type"] == "report")
    assert "5 of 5 requested" in report["text"]

    stamps = {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()}
    events.clear()
    prompts.clear()
    train(spec, tmp_path / "job2", on_event=events.append)
    assert prompts == [] and not _phases(events, "generating class images")
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.iterdir()} == stamps

    # without a class_dir the images go to the shared cache, keyed by base model and class prompt, and are reused
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    spec2 = make_spec(dataset, steps=1, concepts=[{"image_dir": str(dataset), "instance_prompt": "scs girl",
                                                   "class_prompt": "woman", "class_count": 2}])
    train(spec2, tmp_path / "job3")
    assert prompts == ["woman"] * 2
    cached = prior.class_cache_dir(tmp_path / "cache", "tiny-sd15", "woman")
    assert len(prior.list_class_images(cached)) == 2
    train(spec2, tmp_path / "job4")
    assert len(prompts) == 2
    # count 0: no regularization, nothing generated
    spec0 = make_spec(dataset, steps=1, concepts=[{"image_dir": str(dataset), "class_prompt": "woman",
                                                   "class_count": 0}], data={"class_images_per_image": 3})
    t = Trainer(spec0, tmp_path / "job5")
    t.setup()
    assert not any(it.is_class for it in t.items) and len(prompts) == 2


def test_class_images_per_image_default_and_balance(tmp_path: Path, dataset_factory, make_spec, draw) -> None:
    folder = dataset_factory(tmp_path / "imgs", n=3)
    class_dir = tmp_path / "class"
    for i in range(7):
        draw(class_dir / f"c{i}.png", (64, 64), seed=50 + i)
    # no class_count: class_images_per_image x images (2 x 3 = 6 of the 7 in the folder)
    spec = make_spec(folder, steps=1, data={"resolution": 64, "class_images_per_image": 2},
                     concepts=[{"image_dir": str(folder), "instance_prompt": "scs girl", "class_prompt": "girl",
                                "class_dir": str(class_dir), "repeats": 1}])
    t = Trainer(spec, tmp_path / "job")
    t.setup()
    cls = [it for it in t.items if it.is_class]
    assert len(cls) == 6 and {it.caption for it in cls} == {"girl"}
    # kohya's balance: per epoch as many class samples as instance samples; the class images take turns, so
    # over two epochs all six are used exactly once each
    order = t.data.order
    assert order.epoch_len == 6
    for e in range(4):
        epoch = order.epoch_order(e)
        assert sum(t.items[i].is_class for i in epoch) == 3
    used = [i for e in (0, 1) for i in order.epoch_order(e) if t.items[i].is_class]
    assert sorted(used) == sorted(i for i, it in enumerate(t.items) if it.is_class)
    # no count and no per-image default: a class_dir is used whole (as kohya's regularization folders)
    spec_dir = make_spec(folder, steps=1, concepts=[{"image_dir": str(folder), "class_prompt": "girl",
                                                     "class_dir": str(class_dir)}])
    t2 = Trainer(spec_dir, tmp_path / "job2")
    t2.setup()
    assert sum(it.is_class for it in t2.items) == 7
    # the pool rule on its own: 2 instance slots, 3 class images -> class image (e*2 + s) % 3
    o = DataOrder([1, 1, 0, 0, 0], batch_size=1, seed=0, shuffle=False, pools=[(2, [2, 3, 4])])
    assert [o.epoch_order(e) for e in range(3)] == [[0, 1, 2, 3], [0, 1, 4, 2], [0, 1, 3, 4]]


def test_prior_loss_is_instance_mean_plus_weighted_class_mean(tmp_path: Path, dataset_factory, make_spec, draw,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    folder = dataset_factory(tmp_path / "imgs", n=3)
    class_dir = tmp_path / "class"
    for i in range(3):
        draw(class_dir / f"c{i}.png", (64, 64), seed=70 + i)
    w = 0.37
    spec = make_spec(folder, steps=1, batch_size=3, prior_loss_weight=w,
                     concepts=[{"image_dir": str(folder), "instance_prompt": "scs girl", "class_prompt": "girl",
                                "class_dir": str(class_dir), "class_count": 3}])
    t = Trainer(spec, tmp_path / "job")
    t.setup()
    t.cache()
    # a controlled batch: the first micro-batch that mixes instance and class samples (1:2 or 2:1)
    m = next(m for m in range(20) if len({t.items[i].is_class for _, _, i in t.data.order.positions(m)}) == 2)
    is_class = torch.tensor([t.items[i].is_class for _, _, i in t.data.order.positions(m)])
    seen: list[torch.Tensor] = []
    real = losses_mod.per_sample_loss

    def capture(*a, **k):
        out = real(*a, **k)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(losses_mod, "per_sample_loss", capture)
    loss = t.micro_step_loss(m, 0)  # grad_accum 1: step m is micro-batch m
    per = seen[-1]
    expected = per[~is_class].mean() + w * per[is_class].mean()
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-7)
    assert torch.allclose(loss, prior.combine_losses(per, is_class, w), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(loss, per.mean())  # it is not the plain batch mean
    # kohya's form (prior_loss_form = "kohya", or "auto" for a job imported from a kohya config): each sample
    # keeps its static weight (1 instance, prior_loss_weight class), then the plain batch mean
    assert spec.resolved_prior_loss_form == "diffusers"
    kohya_spec = spec.model_copy(update={"imported_from": "kohya"})
    assert kohya_spec.resolved_prior_loss_form == "kohya"
    assert spec.model_copy(update={"imported_from": "kohya", "prior_loss_form": "diffusers"}
                           ).resolved_prior_loss_form == "diffusers"
    t.data.prior_loss_form = kohya_spec.resolved_prior_loss_form
    loss_k = t.micro_step_loss(m, 0)
    per_k = seen[-1]
    static = torch.where(is_class, torch.tensor(w), torch.tensor(1.0))
    assert torch.allclose(loss_k, (per_k * static).mean(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(loss_k, prior.combine_losses(per_k, is_class, w))


# --- aspect-ratio buckets ----------------------------------------------------------------------------

def test_mixed_aspect_images_land_in_buckets_and_batches_are_single_bucket(tmp_path: Path, make_spec,
                                                                           draw) -> None:
    folder = tmp_path / "imgs"
    _mixed(folder, draw)
    spec = make_spec(folder, batch_size=2, data={"random_flip": True, **BUCKETS},
                     concepts=[{"image_dir": str(folder), "instance_prompt": "scs", "repeats": 3}])
    data = TrainData.from_spec(spec)
    assert {it.path.stem: data.bucket(i) for i, it in enumerate(data.items)} == EXPECTED_BUCKET

    class Halving:  # a stand-in VAE: latents are the pixels at 1/8 size (enough to check shapes)
        config = type("C", (), {"scaling_factor": 1.0, "shift_factor": None})()

        def parameters(self):
            yield torch.zeros(1)

        def encode(self, px):
            mean = torch.nn.functional.avg_pool2d(px, 8)[:, :1].repeat(1, 4, 1, 1)
            return type("O", (), {"latent_dist": type("D", (), {"mean": mean, "std": mean})()})()

    data.cache_latents(Halving())
    seen_buckets: set[tuple[int, int]] = set()
    per_epoch = len(data.order.bucket_batches(0))
    for m in range(3 * per_epoch):
        b = data.batch(m)
        keys = {(s.target_size[1], s.target_size[0]) for s in b.samples}
        assert len(keys) == 1, f"micro-batch {m} mixes buckets {keys}"
        (bw, bh), = keys
        assert b.latents is not None and b.latents.shape[-2:] == (bh // 8, bw // 8)
        assert all(EXPECTED_BUCKET[data.items[s.index].path.stem] == (bw, bh) for s in b.samples)
        seen_buckets.add((bw, bh))
    assert seen_buckets == set(EXPECTED_BUCKET.values())
    # one epoch = every (image, repeat) exactly once; leftovers form smaller batches, never mixed ones
    drawn = sorted(i for m in range(per_epoch) for _, _, i in data.order.positions(m))
    assert drawn == sorted(list(range(5)) * 3)
    assert data.order.epoch_of(per_epoch) == 1


@pytest.mark.parametrize("bucketing", [True, False], ids=["buckets", "center-crop"])
def test_sdxl_gets_original_size_and_crop_offsets(tmp_path: Path, make_spec, draw, bucketing: bool) -> None:
    folder = tmp_path / "imgs"
    sizes = _mixed(folder, draw)
    spec = make_spec(folder, base_model="tiny-sdxl", steps=4, batch_size=2, data={**BUCKETS, "bucketing": bucketing})
    expected = {name: [float(v) for v in TIME_IDS[bucketing][name]] for name in sizes}
    for name, size in sizes.items():  # the buckets module agrees with the hand-worked numbers
        bucket = EXPECTED_BUCKET[name] if bucketing else (96, 96)
        assert sdxl_size_conditioning(size, fit_to_bucket(size, bucket), bucket) == TIME_IDS[bucketing][name]
    calls: list[torch.Tensor] = []
    t = Trainer(spec, tmp_path / "job")
    t.setup()
    t.base.unet.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(kw["added_cond_kwargs"]["time_ids"].detach().clone()), with_kwargs=True)
    t.cache()
    for step in range(4):
        names = [t.items[i].path.stem for _, _, i in t.data.order.positions(step)]
        t.train_step()
        assert calls[-1].tolist() == [expected[n] for n in names]


# --- captions ---------------------------------------------------------------------------------------

def test_shuffle_keeps_trigger_and_first_tags_and_dropout_rate(tmp_path: Path, make_spec, draw) -> None:
    folder = tmp_path / "imgs"
    draw(folder / "a.png", (64, 64), seed=1)
    (folder / "a.txt").write_text("red dress, smiling, outdoors, hat, scs, night, long hair")
    spec = make_spec(folder, batch_size=8, data={"resolution": 64, "trigger_word": "scs", "shuffle_tags": True,
                                                 "keep_tokens": 1},
                     concepts=[{"image_dir": str(folder), "instance_prompt": "", "caption_mode": "caption_only"}])
    data = TrainData.from_spec(spec)
    data._latents[(0, False)] = torch.zeros(4, 8, 8)  # only captions matter here
    data._geometry[0] = data.cropped(0)
    caps = [c for m in range(25) for c in data.batch(m).captions]
    tags = sorted(["scs", "red dress", "smiling", "outdoors", "hat", "night", "long hair"])
    for c in caps:
        parts = c.split(", ")
        assert parts[:2] == ["scs", "red dress"] and sorted(parts) == tags
    assert len(set(caps)) > 20  # really shuffled
    again = TrainData.from_spec(spec)
    again._latents, again._geometry = data._latents, data._geometry
    assert [c for m in range(25) for c in again.batch(m).captions] == caps  # a function of (seed, position)

    rate = 0.3
    spec_d = make_spec(folder, batch_size=16, data={"resolution": 64, "trigger_word": "scs",
                                                    "caption_dropout": rate},
                       concepts=[{"image_dir": str(folder), "instance_prompt": "", "caption_mode": "caption_only",
                                  "repeats": 4}])
    dd = TrainData.from_spec(spec_d)
    dd._latents, dd._geometry = data._latents, data._geometry
    caps = [c for m in range(150) for c in dd.batch(m).captions]
    dropped = sum(c == "" for c in caps) / len(caps)
    assert abs(dropped - rate) < 0.05, dropped  # 2400 draws: 4 sigma is 0.037
    assert all(c.startswith("scs, red dress, smiling") for c in caps if c)  # not shuffled: as written


# --- samples during training -------------------------------------------------------------------------

def test_samples_written_at_configured_steps_reach_the_callback(tmp_path: Path, dataset: Path, make_spec) -> None:
    prompts = [{"prompt": "scs girl", "steps": 2, "seed": 5}, {"prompt": "scs girl, hat", "steps": 2, "cfg": 3.0}]
    spec = make_spec(dataset, steps=5, sample={"prompts": prompts, "every_n_steps": 2, "at_end": True})
    events: list[dict[str, Any]] = []
    out = train(spec, tmp_path / "job", on_event=events.append)
    samples = [e for e in events if e["type"] == "sample"]
    assert [(e["step"], e["prompt"]) for e in samples] == [
        (2, "scs girl"), (2, "scs girl, hat"), (4, "scs girl"), (4, "scs girl, hat"),
        (5, "scs girl"), (5, "scs girl, hat")]
    sample_dir = tmp_path / "job" / "samples"
    for e in samples:
        p = Path(e["path"])
        assert p.parent == sample_dir and p.is_file() and Image.open(p).size == (64, 64)
        assert p.name.startswith(f"step{e['step']:06d}_")
    assert out["samples"] == [e["path"] for e in samples]
    # the network at step 2 and at the end differ, so do their renders
    assert Image.open(samples[0]["path"]).tobytes() != Image.open(samples[4]["path"]).tobytes()


# --- the dataset report ------------------------------------------------------------------------------

def test_report_event_and_file_name_problems(tmp_path: Path, dataset: Path, make_spec, draw) -> None:
    shutil.copy(dataset / "img_0.png", dataset / "copy_of_0.png")
    (dataset / "copy_of_0.txt").write_text("red dress")
    draw(dataset / "tiny.png", (40, 30), seed=9)  # no caption, and smaller than 64 px
    spec = make_spec(dataset, steps=1, concepts=[{"image_dir": str(dataset), "instance_prompt": "scs girl",
                                                  "caption_mode": "caption_only"}])
    events: list[dict[str, Any]] = []
    train(spec, tmp_path / "job", on_event=events.append)
    reports = [e for e in events if e["type"] == "report"]
    assert len(reports) == 1
    r = reports[0]
    text = "\n".join(r["warnings"])
    assert "tiny.png" in text and "caption" in text  # missing caption
    dup = next(w for w in r["warnings"] if "duplicate" in w)
    assert "img_0.png" in dup and "copy_of_0.png" in dup
    assert "tiny.png 40x30" in text and "upscaled" in text  # undersized
    assert (tmp_path / "job" / "report.txt").read_text().strip() == r["text"].strip()
    kinds = [e["type"] for e in events]
    assert kinds.index("report") < kinds.index("progress")


def test_two_concepts_keep_their_own_prompts_and_repeats(tmp_path: Path, make_spec, draw) -> None:
    """A character and an outfit in one job: each folder trains with its own prompt, `repeats` times an epoch."""
    girl, hat = tmp_path / "girl", tmp_path / "hat"
    for i in range(2):
        draw(girl / f"g{i}.png", (64, 64), seed=20 + i)
    draw(hat / "h0.png", (64, 64), seed=30)
    (hat / "h0.txt").write_text("red brim")
    spec = make_spec(girl, steps=8, concepts=[
        {"image_dir": str(girl), "instance_prompt": "scs girl", "repeats": 2},
        {"image_dir": str(hat), "instance_prompt": "zqx hat", "repeats": 3, "caption_mode": "instance_and_caption"}])
    data = TrainData.from_spec(spec)
    assert {(it.path.name, it.concept_index, it.caption, it.repeats) for it in data.items} == {
        ("g0.png", 0, "scs girl", 2), ("g1.png", 0, "scs girl", 2), ("h0.png", 1, "zqx hat, red brim", 3)}
    drawn = [data.items[i].path.name for i in data.order.epoch_order(0)]
    assert sorted(drawn) == ["g0.png", "g0.png", "g1.png", "g1.png", "h0.png", "h0.png", "h0.png"]
    events: list[dict[str, Any]] = []
    out = train(spec, tmp_path / "job", on_event=events.append)
    [report] = [e for e in events if e["type"] == "report"]
    assert "scs girl" in report["text"] and "zqx hat" in report["text"]
    assert Path(out["lora"]).is_file() and events[-1]["type"] == "finished"


# --- presets -----------------------------------------------------------------------------------------

PRESET_CASES = [
    pytest.param("sd15-8gb", "tiny-sd15", id="sd15-8gb"),
    pytest.param("sdxl-10gb", "tiny-sdxl", id="sdxl-10gb"),
    pytest.param("sdxl-expression", "tiny-sdxl", id="sdxl-expression"),
]


@pytest.mark.parametrize(("preset", "model"), PRESET_CASES)
def test_preset_trains_the_tiny_model(tmp_path: Path, dataset: Path, preset: str, model: str,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from trainer.jobs.cli import main

    real = prior.default_render
    monkeypatch.setattr(prior, "default_render", lambda base, **kw: real(base, **{**kw, "steps": 2}))
    assert main(["presets"]) == 0
    assert preset in capsys.readouterr().out
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    values: dict[str, Any] = {
        "base_model": model, "steps": 2, "state_every_n_steps": 1000, "save_precision": "fp32",
        "data": {"resolution": 64},
        "concepts": [{"image_dir": str(dataset), "instance_prompt": "scs girl", "class_prompt": "girl"}],
    }
    if preset == "sdxl-10gb":
        values["data"].update(shuffle_tags=True, keep_tokens=1)  # with the preset's cached TE outputs
    spec = resolve_job(values, preset)
    assert spec.preset == preset
    events: list[dict[str, Any]] = []
    out = train(spec, tmp_path / "job", on_event=events.append)
    assert load_file(out["lora"])
    logs = [e["message"] for e in events if e["type"] == "log"]
    gen = _phases(events, "generating class images")
    if preset == "sd15-8gb":
        assert spec.optimizer.name == "AdamW8bit" and spec.gradient_checkpointing and spec.prior_loss_weight == 1.0
        assert any("fp16" in m and "fp32" in m for m in logs)  # fp16 on CPU trains in fp32, and says so
        assert gen and gen[0]["total"] == 5 * 2  # 5 class images per instance image, generated
    else:
        assert spec.mixed_precision == "bf16" and spec.gradient_checkpointing and not spec.network.train_text_encoder
        assert not gen  # no class images unless the preset asks for them
    if preset == "sdxl-10gb":
        assert spec.optimizer.name == "AdamW8bit" and spec.data.cache_text_encoder_outputs and spec.data.bucketing
        assert any("cache_text_encoder_outputs is turned off" in m for m in logs)
        assert any("bucket sides" in m for m in logs)
    if preset == "sdxl-expression":
        assert (spec.network.dim, spec.network.alpha, spec.optimizer.name, spec.optimizer.scheduler) == (
            32, 8, "Lion", "cosine")


# --- exact resume with everything on ---------------------------------------------------------------

def test_resume_exact_with_buckets_shuffle_dropout_and_prior(tmp_path: Path, make_spec, draw, stop_after) -> None:
    folder = tmp_path / "imgs"
    _mixed(folder, draw)
    for name, cap in (("wide_a", "red dress, smiling, hat"), ("tall", "blue hat, night, outdoors")):
        (folder / f"{name}.txt").write_text(cap)
    class_dir = tmp_path / "class"
    draw(class_dir / "c0.png", (64, 64), seed=11)
    draw(class_dir / "c1.png", (96, 48), seed=12)
    spec = make_spec(folder, steps=6, state_every_n_steps=2, batch_size=2, prior_loss_weight=0.7,
                     optimizer={"name": "AdamW", "lr": 5e-3, "scheduler": "cosine"},
                     data={**BUCKETS, "random_flip": True, "trigger_word": "scs",
                           "shuffle_tags": True, "keep_tokens": 1, "caption_dropout": 0.2},
                     concepts=[{"image_dir": str(folder), "instance_prompt": "scs girl", "class_prompt": "girl",
                                "class_dir": str(class_dir), "class_count": 3}])
    full = load_file(train(spec, tmp_path / "full")["lora"])
    assert len(list(class_dir.glob("*.png"))) == 3  # one generated by the first run

    job = tmp_path / "job"
    s = stop_after(3)
    with pytest.raises(JobCancelled):
        train(spec, job, on_event=s.sink, should_stop=s.stop)
    assert [p.name for p in sorted((job / "state").iterdir())] == ["step-00000002", "step-00000003"]
    events: list[dict[str, Any]] = []
    out = train(spec, job, on_event=events.append)
    assert events[0]["resumed_from"] == 3 and not _phases(events, "generating class images")
    resumed = load_file(out["lora"])
    assert resumed.keys() == full.keys()
    for k in full:
        assert torch.equal(resumed[k], full[k]), k


def test_scan_still_fails_before_class_generation(tmp_path: Path, make_spec) -> None:
    spec = make_spec(tmp_path / "nope", concepts=[{"image_dir": str(tmp_path / "nope"), "class_prompt": "girl",
                                                   "class_count": 3}])
    from trainer.events import JobFailed

    with pytest.raises(JobFailed, match="does not exist"):
        scan_dataset(spec)
    with pytest.raises(JobFailed, match="does not exist"):
        train(spec, tmp_path / "job")
