"""The data pipeline: captions, folder checks, crops and SDXL size conditioning, deterministic order, caches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.data.dataset import TrainData, build_caption, put_trigger_first, scan_dataset
from trainer.data.encode import encode_pixels, encode_text
from trainer.data.images import load_image, resize_center_crop, to_tensor
from trainer.data.order import DataOrder
from trainer.events import JobFailed
from trainer.spec import Concept


def test_caption_modes_and_trigger_first() -> None:
    c = Concept(image_dir="x", instance_prompt="scs girl")
    assert build_caption(c, "red dress", None) == "scs girl, red dress"
    assert build_caption(c, None, None) == "scs girl"
    c2 = Concept(image_dir="x", instance_prompt="scs girl", caption_mode="caption_only")
    assert build_caption(c2, "red dress", None) == "red dress"
    assert build_caption(c2, None, None) == "scs girl"  # no .txt: the instance prompt still trains
    c3 = Concept(image_dir="x", instance_prompt="scs girl", caption_mode="instance_only")
    assert build_caption(c3, "red dress", None) == "scs girl"
    # the trigger word leads, moved there when it was a tag elsewhere, not duplicated
    assert build_caption(c2, "red dress, scs", "scs") == "scs, red dress"
    assert put_trigger_first("scs girl, smiling", "scs") == "scs girl, smiling"
    assert put_trigger_first("smiling", "scs") == "scs, smiling"
    assert put_trigger_first("", "scs") == "scs"


def test_scan_reads_captions_and_sorts(dataset: Path, make_spec) -> None:
    (dataset / "notes.md").write_text("not an image")
    spec = make_spec(dataset, data={"resolution": 64, "trigger_word": "scs"})
    items = scan_dataset(spec)
    assert [it.path.name for it in items] == ["img_0.png", "img_1.png"]
    assert [it.caption for it in items] == ["scs girl, red dress, smiling", "scs girl, blue hat"]


def test_missing_and_empty_folders_fail_clearly(tmp_path: Path, make_spec) -> None:
    with pytest.raises(JobFailed) as e:
        scan_dataset(make_spec(tmp_path / "nope"))
    assert e.value.reason == "bad_input" and str(tmp_path / "nope") in str(e.value)
    assert "does not exist" in str(e.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("caption without image")
    with pytest.raises(JobFailed) as e:
        scan_dataset(make_spec(tmp_path / "empty"))
    assert e.value.reason == "bad_input" and "no images" in str(e.value) and "empty" in str(e.value)


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_text("this is a text file, not a PNG")
    with pytest.raises(JobFailed) as e:
        load_image(bad)
    assert e.value.reason == "bad_input" and str(bad) in str(e.value) and "remove or replace" in str(e.value)


def test_transparency_becomes_white(tmp_path: Path) -> None:
    p = tmp_path / "t.png"
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(p)
    assert load_image(p).getpixel((0, 0)) == (255, 255, 255)


def test_resize_center_crop_geometry() -> None:
    wide = Image.new("RGB", (80, 64))
    c = resize_center_crop(wide, 64)
    assert c.image.size == (64, 64) and c.original_size == (64, 80) and c.crop_top_left == (0, 8)
    tall = Image.new("RGB", (100, 200))  # -> 64 x 128, centre crop from the top 32
    c = resize_center_crop(tall, 64)
    assert c.image.size == (64, 64) and c.original_size == (200, 100) and c.crop_top_left == (32, 0)
    assert c.target_size == (64, 64)
    t = to_tensor(Image.new("RGB", (4, 4), (255, 0, 128)))
    assert t.shape == (3, 4, 4) and t[0].eq(1).all() and t[1].eq(-1).all() and abs(float(t[2, 0, 0])) < 0.01


def test_order_is_a_function_of_seed_and_position() -> None:
    a = DataOrder([1, 2, 1], batch_size=3, seed=7)
    b = DataOrder([1, 2, 1], batch_size=3, seed=7)
    seq_a = [i for m in range(8) for _, _, i in a.positions(m)]
    seq_b = [i for m in reversed(range(8)) for _, _, i in b.positions(m)][::-1]
    # order of the questions does not matter; each micro-batch holds the same items
    assert [a.positions(m) for m in range(8)] == [b.positions(m) for m in range(8)]
    assert len(seq_a) == len(seq_b) == 24
    for e in range(6):  # each epoch: every item, repeats honoured
        assert sorted(seq_a[4 * e:4 * e + 4]) == [0, 1, 1, 2]
    assert DataOrder([1, 2, 1], 3, seed=8).epoch_order(0) != a.epoch_order(0) or \
        DataOrder([1, 2, 1], 3, seed=8).epoch_order(1) != a.epoch_order(1)
    assert a.epoch_of(0) == 0 and a.epoch_of(2) == 1  # micro-batch 2 starts at position 6, epoch 1


def test_latent_cache_flip_and_sdxl_conditioning(tmp_path: Path, dataset_factory, make_spec) -> None:
    from trainer.models.load import load_base

    folder = dataset_factory(tmp_path / "imgs", n=1, size=(100, 200))
    spec = make_spec(folder, base_model="tiny-sdxl", data={"resolution": 64, "random_flip": True})
    base = load_base("tiny-sdxl")
    data = TrainData.from_spec(spec)
    data.cache_latents(base.vae)
    assert set(data._latents) == {(0, False), (0, True)}
    px, _ = data.pixels(0, False)
    direct = encode_pixels(base.vae, px[None])[0]
    assert torch.allclose(data._latents[(0, False)], direct)
    fpx, _ = data.pixels(0, True)
    assert torch.equal(fpx, px.flip(-1))
    b = data.batch(0)
    assert b.latents is not None and b.latents.shape == (1, 4, 8, 8) and b.pixels is None
    # SDXL size conditioning: the real original size (h, w), the crop offset, the trained size
    assert b.add_time_ids.tolist() == [[200.0, 100.0, 32.0, 0.0, 64.0, 64.0]]
    assert b.loss_weight.tolist() == [1.0]
    hidden, pooled = encode_text(base, b.captions, "cpu")
    assert hidden.shape == (1, 77, 32 + 48) and pooled is not None and pooled.shape == (1, 40)
    data.cache_text(base, "cpu")
    b = data.batch(0)
    assert torch.allclose(b.encoder_hidden_states, hidden, atol=1e-6) and torch.allclose(b.pooled, pooled, atol=1e-6)


def test_sd1_text_is_last_hidden_state() -> None:
    from trainer.models.load import load_base

    base = load_base("tiny-sd15")
    hidden, pooled = encode_text(base, ["a", "b"], "cpu")
    assert pooled is None and hidden.shape == (2, 77, 32)


def test_uncached_batches_are_pixels(dataset: Path, make_spec) -> None:
    data = TrainData.from_spec(make_spec(dataset, batch_size=2, data={"resolution": 64, "cache_latents": False}))
    data.check_images()
    b = data.batch(0)
    assert b.pixels is not None and b.pixels.shape == (2, 3, 64, 64) and b.latents is None
    assert float(b.pixels.min()) >= -1 and float(b.pixels.max()) <= 1


def test_filewords_and_caption_dedup_at_scan_time() -> None:
    c = Concept(image_dir="x", instance_prompt="photo of scs girl, [filewords]")
    assert build_caption(c, "red dress, smiling", "scs") == "photo of scs girl, red dress, smiling"
    assert build_caption(c, None, "scs") == "photo of scs girl"
    c2 = Concept(image_dir="x", instance_prompt="scs girl")
    assert build_caption(c2, "scs girl, red dress", None) == "scs girl, red dress"  # no doubled instance tag


def test_exif_rotated_image_gets_the_tall_bucket(tmp_path: Path, make_spec) -> None:
    from trainer.data.images import crop_to_bucket, image_size

    folder = tmp_path / "imgs"
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.new("RGB", (190, 100), (1, 2, 3)).save(folder / "phone.jpg", exif=exif)
    assert image_size(folder / "phone.jpg") == (100, 190) == load_image(folder / "phone.jpg").size
    spec = make_spec(folder, data={"resolution": 96, "bucketing": True, "bucket_step": 16, "bucket_min_side": 64,
                                   "bucket_max_side": 160})
    data = TrainData.from_spec(spec)
    assert data.bucket(0) == (64, 128)
    c = crop_to_bucket(load_image(folder / "phone.jpg"), (64, 128))
    assert c.image.size == (64, 128) and c.original_size == (190, 100) and c.crop_top_left == (0, 1)
    assert c.target_size == (128, 64)
