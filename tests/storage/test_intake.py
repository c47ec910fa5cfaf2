"""Upload checks with crafted hostile files: each gets the right refusal, good files still pass."""

from __future__ import annotations

import io
import stat
import struct
import time
import zipfile
import zlib

import pytest
from PIL import Image

from storage.intake import IntakeError, IntakeLimits, check_image, contact_sheet, ingest_uploads


def png(w: int = 80, h: int = 80, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def encoded(fmt: str, w: int = 96, h: int = 96, seed: int = 1, **kw: object) -> bytes:
    im = Image.effect_noise((w, h), 40 + seed).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A small, otherwise valid PNG whose IHDR claims width x height (CRC fixed up)."""
    data = bytearray(png(64, 64))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return buf.getvalue()


def reason_of(name: str, data: bytes, limits: IntakeLimits | None = None) -> str:
    with pytest.raises(IntakeError) as exc:
        check_image(name, data, limits or IntakeLimits())
    assert exc.value.name == name and name in str(exc.value)
    return exc.value.reason


# ---- single images -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "ext", "kw"),
    [
        ("PNG", "png", {}),
        ("JPEG", "jpg", {"quality": 90}),
        ("WEBP", "webp", {}),
        ("BMP", "bmp", {}),
        ("GIF", "gif", {}),
    ],
)
def test_accepts_allowed_formats(fmt: str, ext: str, kw: dict[str, object]) -> None:
    data = encoded(fmt, 100, 70, **kw)
    checked = check_image(f"photo.{ext}", data)
    assert (checked.ext, checked.width, checked.height) == (ext, 100, 70)
    assert checked.data == data and len(checked.sha256) == 64


def test_ext_comes_from_content_not_name() -> None:
    assert check_image("really_a_png.jpg", png()).ext == "png"


def test_phone_jpeg_with_extra_frames_mpo_is_a_jpeg() -> None:
    frames = [Image.effect_noise((100, 100), 50).convert("RGB") for _ in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, format="MPO", save_all=True, append_images=frames[1:])
    assert check_image("phone.jpg", buf.getvalue()).ext == "jpg"


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("P", (80, 80), i) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert check_image("anim.gif", buf.getvalue()).ext == "gif"


def test_header_declaring_50000_square_is_refused() -> None:
    reason = reason_of("bomb.png", png_declaring(50_000, 50_000))
    assert "too many pixels" in reason


def test_dimension_and_pixel_limits_checked_before_decoding() -> None:
    # The IDAT holds 64x64 of data: a decode would fail as truncated. The refusal must be the size one.
    assert "9000x100" in reason_of("wide.png", png_declaring(9000, 100))
    assert "largest accepted is 8192x8192" in reason_of("tall.png", png_declaring(100, 9000))
    assert "49,000,000 pixels" in reason_of("big.png", png_declaring(7000, 7000))
    assert "at least 64 px" in reason_of("tiny.png", png(32, 200))


def test_truncated_jpeg() -> None:
    data = encoded("JPEG", 256, 256, quality=95)
    reason = reason_of("cut.jpg", data[: len(data) // 2])
    assert "truncated or corrupt" in reason


def test_truncated_png() -> None:
    data = encoded("PNG", 256, 256)
    assert "truncated or corrupt" in reason_of("cut.png", data[: len(data) // 2])


def test_text_named_png() -> None:
    assert "not an image" in reason_of("notes.png", b"hello, this is not a picture\n" * 10)


def test_zero_bytes() -> None:
    assert "empty" in reason_of("empty.png", b"")


def test_file_too_big() -> None:
    reason = reason_of("huge.png", png(), IntakeLimits(max_file_bytes=100))
    assert "limit per image" in reason


def test_unsupported_format_refused() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (80, 80)).save(buf, format="TIFF")
    assert "not an image we can read" in reason_of("scan.tif", buf.getvalue())


# ---- zips --------------------------------------------------------------------------------------


def rejected_map(result: object) -> dict[str, str]:
    return dict(result.rejected)  # type: ignore[attr-defined]


def test_zip_bomb_refused_by_ratio_without_inflating(monkeypatch: pytest.MonkeyPatch) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("bomb.png", "w") as f:
            zero = bytes(1 << 20)
            for _ in range(200):
                f.write(zero)
        zf.writestr("ok.png", png())
    data = buf.getvalue()
    assert len(data) < 2 * 1024 * 1024

    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self: zipfile.ZipFile, name: object, *a: object, **kw: object) -> object:
        opened.append(getattr(name, "filename", name))  # type: ignore[arg-type]
        return real_open(self, name, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    t0 = time.perf_counter()
    result = ingest_uploads([("set.zip", data)])
    assert time.perf_counter() - t0 < 2.0
    assert "zip bomb" in rejected_map(result)["set.zip/bomb.png"]
    assert opened == ["ok.png"]  # the bomb was never opened for reading
    assert [a.name for a in result.accepted] == ["set.zip/ok.png"]


def test_zip_declared_total_over_limit() -> None:
    data = make_zip([(f"{i}.png", png(80, 80, (i, 0, 0))) for i in range(3)], zipfile.ZIP_STORED)
    result = ingest_uploads([("a.zip", data)], IntakeLimits(zip_max_total_bytes=200))
    assert "unpacks to" in rejected_map(result)["a.zip"] and not result.accepted


def test_zip_archive_itself_too_big() -> None:
    result = ingest_uploads([("a.zip", make_zip([("x.png", png())]))], IntakeLimits(zip_max_bytes=10))
    assert "archives may be at most" in rejected_map(result)["a.zip"]


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        ("../evil.png", "'..'"),
        ("ok/../../evil.png", "'..'"),
        ("/etc/x.png", "absolute path"),
        ("C:/Windows/x.png", "drive-letter"),
        ("..\\evil.png", "backslash"),
        ("C:\\evil.png", "backslash"),
    ],
)
def test_zip_path_escapes(entry: str, needle: str) -> None:
    data = make_zip([(entry, png()), ("good.png", png(90, 90))])
    result = ingest_uploads([("pack.zip", data)])
    assert needle in rejected_map(result)[f"pack.zip/{entry}"]
    assert [a.name for a in result.accepted] == ["pack.zip/good.png"]


def test_zip_with_too_many_entries_refused_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_zip([(f"{i}.txt", b"") for i in range(10_000)], zipfile.ZIP_STORED)
    monkeypatch.setattr(zipfile, "ZipFile", None)  # proves the count comes from the end record alone
    result = ingest_uploads([("many.zip", data)])
    assert "10,000 entries" in rejected_map(result)["many.zip"]


def test_zip_entry_count_checked_after_parse_too() -> None:
    data = make_zip([(f"{i}.png", b"x") for i in range(5)])
    result = ingest_uploads([("few.zip", data)], IntakeLimits(zip_max_entries=3))
    assert "at most 3" in rejected_map(result)["few.zip"]


def test_zip_symlink_entry() -> None:
    link = zipfile.ZipInfo("link.png")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    data = make_zip([(link, b"/etc/passwd"), ("good.png", png())])
    result = ingest_uploads([("s.zip", data)])
    assert "symbolic link" in rejected_map(result)["s.zip/link.png"]
    assert len(result.accepted) == 1


def test_zip_encrypted_entry() -> None:
    raw = bytearray(make_zip([("secret.png", png()), ("good.png", png(70, 70))]))
    # zipfile cannot write encrypted entries: set bit 0 of the flags in the central directory.
    pos = raw.find(b"PK\x01\x02")
    raw[pos + 8] |= 0x01
    result = ingest_uploads([("e.zip", bytes(raw))])
    assert "encrypted" in rejected_map(result)["e.zip/secret.png"]
    assert [a.name for a in result.accepted] == ["e.zip/good.png"]


def test_zip_entry_lying_about_its_size() -> None:
    raw = bytearray(make_zip([("liar.png", encoded("PNG", 128, 128))], zipfile.ZIP_STORED))
    pos = raw.find(b"PK\x01\x02")
    raw[pos + 24 : pos + 28] = struct.pack("<I", 100)  # declared uncompressed size: 100 bytes
    result = ingest_uploads([("l.zip", bytes(raw))])
    reason = rejected_map(result)["l.zip/liar.png"]
    assert "damaged" in reason or "declares" in reason or "corrupt" in reason
    assert not result.accepted


def test_not_a_zip_and_nested_zip_and_junk() -> None:
    inner = make_zip([("x.png", png())])
    data = make_zip([("inner.zip", inner), ("__MACOSX/._a.png", b"junk"), ("dir/", b""), ("a.png", png())])
    result = ingest_uploads([("broken.zip", b"PK not really"), ("outer.zip", data)])
    rej = rejected_map(result)
    assert "not a valid zip" in rej["broken.zip"]
    assert "archive inside the archive" in rej["outer.zip/inner.zip"]
    assert result.ignored == ["outer.zip/__MACOSX/._a.png"]
    assert [a.name for a in result.accepted] == ["outer.zip/a.png"]


# ---- whole uploads -----------------------------------------------------------------------------


def test_mixed_upload_good_files_survive_bad_ones() -> None:
    good = png(80, 80, (1, 2, 3))
    jpeg = encoded("JPEG", 256, 256, quality=95)
    files = [
        ("good.png", good),
        ("good.txt", b"a red square, flat colour\n"),
        ("bomb.png", png_declaring(50_000, 50_000)),
        ("cut.jpg", jpeg[:2000]),
        ("notes.png", b"just text"),
        ("empty.png", b""),
        ("evil.zip", make_zip([("../evil.png", png()), ("/etc/x.png", png())])),
        ("orphan.txt", b"nobody"),
    ]
    result = ingest_uploads(files)
    assert [(a.name, a.caption, a.ext, a.width) for a in result.accepted] == [
        ("good.png", "a red square, flat colour", "png", 80)
    ]
    assert result.accepted[0].bytes == len(good) and result.accepted[0].data == good
    rej = rejected_map(result)
    assert set(rej) == {
        "bomb.png",
        "cut.jpg",
        "notes.png",
        "empty.png",
        "evil.zip/../evil.png",
        "evil.zip//etc/x.png",
        "orphan.txt",
    }
    assert "caption needs its image" in rej["orphan.txt"]
    assert "Added 1 image(s)" in result.summary() and "bomb.png" in result.summary()


def test_duplicates_within_upload_and_against_existing() -> None:
    a, b, c = png(80, 80, (1, 0, 0)), png(80, 80, (2, 0, 0)), png(80, 80, (3, 0, 0))
    existing = {check_image("c", c).sha256}
    zipped = make_zip([("again_a.png", a)])
    result = ingest_uploads(
        [("a.png", a), ("b.png", b), ("copy_of_a.png", a), ("c.png", c), ("z.zip", zipped)],
        existing_hashes=existing,
    )
    assert [x.name for x in result.accepted] == ["a.png", "b.png"]
    assert result.duplicates == ["copy_of_a.png", "c.png", "z.zip/again_a.png"]
    assert not result.rejected


def test_captions_matched_inside_zips_by_path_and_stem() -> None:
    data = make_zip(
        [
            ("set/cat.png", png(80, 80, (9, 9, 9))),
            ("set/cat.txt", "a \ufeffcat,\n  sitting ".encode("utf-8-sig")),
            ("other/dog.png", png(80, 80, (8, 8, 8))),
            ("other/bird.webp", encoded("WEBP", 80, 80)),
            ("captions/bird.caption", b"a bird"),
        ]
    )
    result = ingest_uploads([("d.zip", data), ("dog.txt", b"a dog")])
    caps = {a.name: a.caption for a in result.accepted}
    assert caps == {
        "d.zip/set/cat.png": "a cat, sitting",  # leading BOM and the zero-width one inside both dropped
        "d.zip/other/dog.png": "a dog",  # plain .txt beside the zip, matched by bare stem
        "d.zip/other/bird.webp": "a bird",
    }
    assert not result.rejected


def test_caption_not_utf8() -> None:
    result = ingest_uploads([("a.png", png()), ("a.txt", b"\xff\xfe\xfa bad")])
    assert "UTF-8" in rejected_map(result)["a.txt"]
    assert result.accepted[0].caption is None


def test_plain_upload_names_are_reduced_to_basename() -> None:
    result = ingest_uploads([("../../x.png", png())])
    assert result.accepted[0].name == "x.png"


# ---- contact sheet -----------------------------------------------------------------------------


def test_contact_sheet() -> None:
    long_caption = "a very long caption " * 30
    items = [(encoded("JPEG", 300, 200, seed=i), long_caption if i % 2 else None) for i in range(7)]
    items.append((b"garbage", "broken"))
    items.append((png(64, 300), "tall"))
    sheet = Image.open(io.BytesIO(contact_sheet(items, thumb=96, cols=4)))
    assert sheet.format == "PNG"
    assert sheet.width == 4 * (96 + 12)
    assert sheet.height > 3 * 96  # 9 items in 4 columns: 3 rows with caption space


def test_contact_sheet_empty() -> None:
    assert Image.open(io.BytesIO(contact_sheet([]))).format == "PNG"


def test_exif_rotated_image_is_checked_and_recorded_as_shown() -> None:
    """A 64x48 phone photo with EXIF orientation 6 is shown (and trained) 48x64: that is what intake records."""
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 48), (10, 120, 200)).save(buf, "JPEG", exif=exif)
    data = buf.getvalue()
    limits = IntakeLimits(min_side=16)
    checked = check_image("phone.jpg", data, limits)
    assert (checked.width, checked.height) == (48, 64)
    accepted = ingest_uploads([("phone.jpg", data)], limits).accepted[0]
    assert (accepted.width, accepted.height) == (48, 64) and accepted.data == data  # bytes kept as uploaded
    with pytest.raises(IntakeError, match="48x64"):  # the limits judge the shown size too
        check_image("phone.jpg", data, IntakeLimits(min_side=16, max_width=50, max_height=60))
