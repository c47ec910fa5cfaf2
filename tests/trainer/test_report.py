"""The dataset report names missing captions, duplicates, undersized and unreadable images, class counts."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from trainer.data.report import dataset_report, report_for_spec
from trainer.spec import Concept, parse_job


def _img(path: Path, size: tuple[int, int], color: tuple[int, int, int], exif_orientation: int | None = None) -> None:
    im = Image.new("RGB", size, color)
    if exif_orientation is None:
        im.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif)


def _dataset(root: Path) -> Path:
    d = root / "sks"
    d.mkdir()
    _img(d / "wide.png", (640, 384), (10, 0, 0))
    _img(d / "tall.png", (384, 640), (20, 0, 0))
    _img(d / "square.png", (512, 512), (30, 0, 0))
    _img(d / "photo.png", (1024, 576), (40, 0, 0))
    _img(d / "small.png", (200, 300), (50, 0, 0))
    (d / "copy.png").write_bytes((d / "square.png").read_bytes())
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    for name in ("wide", "tall", "square"):
        (d / f"{name}.txt").write_text("red hair, smiling")
    (d / "photo.txt").write_text("  \n")  # empty caption counts as missing
    return d


def test_report_square_mode(tmp_path: Path) -> None:
    d = _dataset(tmp_path)
    concept = Concept(image_dir=str(d), instance_prompt="sks girl", class_prompt="girl", class_count=10)
    rep = dataset_report([concept], 512, class_images=[[tmp_path / f"c{i}.png" for i in range(4)]])
    st = rep.concepts[0]
    assert st.images == 6 and st.captions_found == 3
    assert sorted(st.missing_captions) == ["copy.png", "photo.png", "small.png"]
    assert st.unreadable and st.unreadable[0].startswith("broken.jpg")
    # square mode: the shorter side must reach 512
    assert sorted(st.undersized) == ["small.png 200x300", "tall.png 384x640", "wide.png 640x384"]
    assert st.buckets == {(512, 512): 6}
    assert (st.class_requested, st.class_present) == (10, 4)
    assert [sorted(Path(p).name for p in g) for g in rep.duplicates] == [["copy.png", "square.png"]]
    text = rep.text
    for needle in ("copy.png", "photo.png", "small.png 200x300", "broken.jpg", "4 of 10 requested",
                   "copy.png = square.png"):
        assert needle in text
    joined = "\n".join(rep.warnings)
    assert "without a caption" in joined and "photo.png" in joined
    assert "duplicate" in joined and "upscaled" in joined and "small.png" in joined
    assert "could not be read" in joined and "4 class images of the 10" in joined


def test_report_buckets_and_undersized_relative_to_bucket(tmp_path: Path) -> None:
    d = _dataset(tmp_path)
    # EXIF orientation 6 (rotate 90): stored 640x384, shown 384x640 -> portrait bucket
    _img(d / "rotated.jpg", (640, 384), (60, 0, 0), exif_orientation=6)
    spec = parse_job({"concepts": [{"image_dir": str(d), "instance_prompt": "sks girl"}],
                      "data": {"resolution": 512, "bucketing": True}, "batch_size": 2})
    rep = report_for_spec(spec)
    st = rep.concepts[0]
    assert st.buckets[(640, 384)] == 2  # wide + photo (1024x576)
    assert st.buckets[(384, 640)] == 3  # tall + rotated + small (2:3 is nearer 3:5 than 7:9 in log ratio)
    assert st.buckets[(512, 512)] == 2  # square + copy
    assert st.undersized == ["small.png 200x300"]  # 640x384 in its 640x384 bucket is not undersized
    assert rep.buckets == {(384, 640): 3, (512, 512): 2, (640, 384): 2}
    assert "384x640: 3" in rep.text and "fewer images than the batch size" not in rep.text
    rep3 = report_for_spec(spec.model_copy(update={"batch_size": 3}))
    assert "fewer images than the batch size 3 (smaller batches): 512x512, 640x384" in rep3.text


def test_report_instance_only_and_missing_folder(tmp_path: Path) -> None:
    d = _dataset(tmp_path)
    ok = Concept(image_dir=str(d), instance_prompt="sks girl", caption_mode="instance_only")
    gone = Concept(image_dir=str(tmp_path / "nope"), instance_prompt="x")
    rep = dataset_report([ok, gone], 512, verify=False)
    assert rep.concepts[0].missing_captions == [] and "not used (instance_only)" in rep.text
    assert rep.concepts[1].folder_missing
    assert any("does not exist" in w for w in rep.warnings)
    assert not any("without a caption" in w for w in rep.warnings)


def test_report_name_limit(tmp_path: Path) -> None:
    d = tmp_path / "many"
    d.mkdir()
    for i in range(15):
        _img(d / f"img{i:02d}.png", (64, 64), (i, i, i))
    (d / "img00.txt").write_text("a")
    rep = dataset_report([Concept(image_dir=str(d), instance_prompt="sks")], 512, max_names=5)
    assert "and 9 more" in rep.text
    assert len(rep.concepts[0].missing_captions) == 14 and len(rep.concepts[0].undersized) == 15
