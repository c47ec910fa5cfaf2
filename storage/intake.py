"""Checks on uploaded images, caption files and zip archives, before anything is stored.

Everything here is synchronous and CPU/memory bound (hashing, decoding, inflating): async callers
run it with ``await asyncio.to_thread(ingest_uploads, files, limits, existing_hashes)``.

Order of checks, cheapest and safest first: byte size, then the image header (Pillow's
``Image.open`` reads only the header), where width/height/pixel limits refuse decompression bombs
before a single pixel is decoded; only then a full decode (``load()``) that catches truncated or
corrupt files. Zip archives are vetted from the central directory (entry count, declared sizes,
compression ratios, names, symlinks, encryption) before any entry is inflated, and every entry is
read with a bounded read, since declared sizes can lie.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps, UnidentifiedImageError

from storage.masks import AcceptedMask, KnownImage, known_rows, mask_target, pair_masks
from storage.names import display_file_name, display_text

MiB = 1024 * 1024

# A truncated upload must be refused, not silently padded with grey. (Global Pillow switch; the
# bot process has no reason to want it on.)
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's own bomb guard is a backstop (it raises DecompressionBombError at 2x this value);
# our header check against IntakeLimits runs first. Never let it be disabled.
if Image.MAX_IMAGE_PIXELS is None:
    Image.MAX_IMAGE_PIXELS = 89_478_485

# Pillow format name -> the extension we store the file under.
# MPO is how Pillow reports many phone-camera JPEGs (a JPEG with extra frames): a JPEG to us.
FORMAT_EXT: dict[str, str] = {
    "PNG": "png",
    "JPEG": "jpg",
    "MPO": "jpg",
    "WEBP": "webp",
    "BMP": "bmp",
    "GIF": "gif",
}
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # JPEG's opener may hand back MPO
CAPTION_EXTS = frozenset({".txt", ".caption"})
ARCHIVE_EXTS = frozenset({".zip"})
SPLIT_HINT = "Split it into smaller zips and upload them one by one."
# OS litter inside archives: skipped without a complaint.
_JUNK_RE = re.compile(r"(^|/)(__MACOSX/|\.DS_Store$|Thumbs\.db$|desktop\.ini$|\._)", re.IGNORECASE)
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True, slots=True)
class IntakeLimits:
    max_file_bytes: int = 20 * MiB
    max_width: int = 8192
    max_height: int = 8192
    max_pixels: int = 40_000_000
    min_side: int = 64
    zip_max_entries: int = 2000
    zip_max_total_bytes: int = 500 * MiB
    zip_max_ratio: float = 100.0
    zip_max_bytes: int = 200 * MiB
    # Small entries are exempt from the ratio check: a plain-colour BMP or a long caption can
    # compress 100:1 legitimately, and a 1 MiB entry cannot be a bomb (reads are bounded anyway).
    zip_ratio_floor_bytes: int = 1 * MiB
    max_caption_bytes: int = 64 * 1024


class IntakeError(ValueError):
    """One file refused; ``reason`` is a short human sentence fragment (what is wrong, what to do)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True, slots=True)
class CheckedImage:
    sha256: str
    ext: str  # from the detected format, not the file name
    width: int
    height: int
    data: bytes  # the uploaded bytes, unchanged (hash-addressed as uploaded)


@dataclass(frozen=True, slots=True)
class AcceptedImage:
    name: str  # display name; zip entries as "archive.zip/inner/name.png"
    sha256: str
    ext: str
    width: int
    height: int
    bytes: int
    caption: str | None
    data: bytes


@dataclass(slots=True)
class IntakeResult:
    accepted: list[AcceptedImage] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    duplicates: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # OS litter and folders inside archives
    masks: list[AcceptedMask] = field(default_factory=list)  # loss masks, each paired with its image (storage.masks)

    def summary(self, max_lines: int = 10) -> str:
        """A short multi-line report fit for a Discord message."""
        lines = [f"Added {len(self.accepted)} image(s)."]
        if self.duplicates:
            lines.append(f"Skipped {len(self.duplicates)} duplicate(s).")
        if self.rejected:
            lines.append(f"Refused {len(self.rejected)} file(s):")
            lines += [f"- {n}: {r}" for n, r in self.rejected[:max_lines]]
            if len(self.rejected) > max_lines:
                lines.append(f"- ... and {len(self.rejected) - max_lines} more")
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


# ---- single images -----------------------------------------------------------------------------


def _too_many_pixels(limits: IntakeLimits) -> str:
    return (
        f"declares far too many pixels (a possible decompression bomb); the largest accepted is "
        f"{limits.max_width}x{limits.max_height} and {limits.max_pixels:,} pixels. Resize it"
    )


# EXIF orientations (tag 0x0112) that turn the image by 90 degrees: shown (and trained, see trainer.data.images) with
# width and height swapped.
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


def _orientation(img: Image.Image) -> int | None:
    """The EXIF orientation from the header (no pixels decoded); None when absent or unreadable."""
    try:
        return img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is not the image's problem; the pixels are checked below
        return None


def check_image(name: str, data: bytes, limits: IntakeLimits | None = None) -> CheckedImage:
    """Validate one image; raises IntakeError naming the file and the problem."""
    limits = limits or IntakeLimits()
    if not data:
        raise IntakeError(name, "is empty (0 bytes); upload the image again")
    if len(data) > limits.max_file_bytes:
        raise IntakeError(
            name,
            f"is {_mib(len(data))}, over the {_mib(limits.max_file_bytes)} limit per image; "
            "re-save it smaller (e.g. as JPEG) and upload again",
        )
    try:
        # Header only: no pixels are decoded here.
        img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        raise IntakeError(name, _too_many_pixels(limits)) from e
    except UnidentifiedImageError as e:
        raise IntakeError(
            name, f"is not an image we can read (accepted: {', '.join(ALLOWED_FORMATS)})"
        ) from e
    except Exception as e:  # noqa: BLE001 - any parser failure on hostile input is a refusal
        raise IntakeError(
            name, f"has a damaged image header ({type(e).__name__}); re-export the image"
        ) from e

    with img:
        fmt = img.format or ""
        width, height = img.size
        if _orientation(img) in SWAPPING_ORIENTATIONS:  # a phone photo shown rotated: checked and recorded as shown
            width, height = height, width
        if fmt not in FORMAT_EXT:  # belt and braces: formats= already restricts this
            raise IntakeError(name, f"is a {fmt or 'unknown'} image; accepted: {', '.join(ALLOWED_FORMATS)}")
        if width > limits.max_width or height > limits.max_height:
            raise IntakeError(
                name,
                f"is {width}x{height}; the largest accepted is {limits.max_width}x{limits.max_height}. "
                "Resize it (training uses ~1024 px anyway)",
            )
        if width * height > limits.max_pixels:
            raise IntakeError(
                name,
                f"has {width * height:,} pixels ({width}x{height}); the limit is {limits.max_pixels:,}. Resize it",
            )
        if min(width, height) < limits.min_side:
            raise IntakeError(
                name, f"is only {width}x{height}; each side must be at least {limits.min_side} px"
            )
        try:
            img.load()  # full decode of the first frame (GIF/WEBP animations: first frame only)
        except Image.DecompressionBombError as e:
            raise IntakeError(name, _too_many_pixels(limits)) from e
        except Exception as e:  # noqa: BLE001 - truncated/corrupt data raises OSError, SyntaxError, ...
            raise IntakeError(
                name, f"is truncated or corrupt and cannot be decoded ({e}); re-export or re-upload it"
            ) from e
    return CheckedImage(
        sha256=hashlib.sha256(data).hexdigest(), ext=FORMAT_EXT[fmt], width=width, height=height, data=data
    )


def _decode_caption(name: str, data: bytes) -> str | None:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise IntakeError(name, "is not UTF-8 text; save the caption file as UTF-8") from e
    # Captions are one line of training text: newlines and runs of spaces collapse, and control, bidi and
    # zero-width characters go (they would be trained on, and echoed by /dataset show).
    text = display_text(text, max_len=len(text) + 1)
    return text or None


# ---- zip archives ------------------------------------------------------------------------------

_EOCD_SIG = b"PK\x05\x06"
_EOCD64_LOC_SIG = b"PK\x06\x07"
_EOCD64_SIG = b"PK\x06\x06"


def _zip_directory_size(data: bytes) -> tuple[int, int] | None:
    """(entry count, central directory bytes) from the end record, without parsing the directory.

    zipfile parses the whole central directory into objects when the archive is opened; reading
    the end record first lets a 200 MiB archive of millions of empty entries be refused cheaply.
    """
    tail_start = max(0, len(data) - (22 + 0xFFFF))
    pos = data.rfind(_EOCD_SIG, tail_start)
    if pos < 0 or pos + 22 > len(data):
        return None
    _, _, _, _, total, cd_size, _, _ = struct.unpack("<4s4H2LH", data[pos : pos + 22])
    if total == 0xFFFF or cd_size == 0xFFFFFFFF:  # zip64: the real numbers are in the zip64 record
        loc = pos - 20
        if loc >= 0 and data[loc : loc + 4] == _EOCD64_LOC_SIG:
            (rec_off,) = struct.unpack("<Q", data[loc + 8 : loc + 16])
            rec = data[rec_off : rec_off + 56]
            if len(rec) == 56 and rec[:4] == _EOCD64_SIG:
                total, cd_size = struct.unpack("<QQ", rec[32:48])
    return total, cd_size


def _unsafe_name_reason(raw: str) -> str | None:
    if "\x00" in raw:
        return "has a NUL byte in its name"
    if "\\" in raw:
        # Windows separators can smuggle "..\" or "C:\" past a "/"-only check.
        norm = raw.replace("\\", "/")
        if _unsafe_name_reason(norm):
            return "has a path that escapes the archive (backslash path)"
    if raw.startswith("/") or raw.startswith("\\"):
        return "has an absolute path; zip entries must be relative"
    if _DRIVE_RE.match(raw):
        return "has a drive-letter path; zip entries must be relative"
    if ".." in raw.replace("\\", "/").split("/"):
        return "has a '..' path component that escapes the archive"
    return None


@dataclass(slots=True)
class _Item:
    name: str  # display name
    key: str  # lowercased path without extension, for caption matching
    stem: str  # lowercased bare stem
    data: bytes


@dataclass(slots=True)
class _Gather:
    images: list[_Item] = field(default_factory=list)
    captions: list[_Item] = field(default_factory=list)


def _read_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes | None:
    """At most ``limit`` bytes of the entry; None if it holds more (whatever it declared)."""
    with zf.open(info) as f:
        data = f.read(limit + 1)
    return None if len(data) > limit else data


def _scan_zip(name: str, data: bytes, limits: IntakeLimits, out: _Gather, result: IntakeResult) -> None:
    if len(data) > limits.zip_max_bytes:
        result.rejected.append(
            (name, f"is {_mib(len(data))}; archives may be at most {_mib(limits.zip_max_bytes)}. " + SPLIT_HINT)
        )
        return
    counts = _zip_directory_size(data)
    if counts is None:
        result.rejected.append((name, "is not a valid zip archive; re-create it and upload again"))
        return
    declared_entries, cd_size = counts
    # 46 bytes of fixed header per entry plus a generous allowance for name/extra/comment.
    if declared_entries > limits.zip_max_entries or cd_size > limits.zip_max_entries * 1100:
        result.rejected.append(
            (
                name,
                f"has {declared_entries:,} entries; at most {limits.zip_max_entries:,} are accepted. " + SPLIT_HINT,
            )
        )
        return
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as e:
        result.rejected.append((name, f"is not a valid zip archive ({e}); re-create it and upload again"))
        return
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.zip_max_entries:
            result.rejected.append(
                (
                    name,
                    f"has {len(infos):,} entries; at most {limits.zip_max_entries:,} are accepted. " + SPLIT_HINT,
                )
            )
            return
        declared_total = sum(i.file_size for i in infos)
        if declared_total > limits.zip_max_total_bytes:
            result.rejected.append(
                (
                    name,
                    f"unpacks to {_mib(declared_total)}; the limit is {_mib(limits.zip_max_total_bytes)}. " + SPLIT_HINT,
                )
            )
            return
        read_total = 0
        for info in infos:
            raw = info.orig_filename or info.filename
            shown = f"{name}/{raw.replace(chr(0), '?')}"
            if info.is_dir():
                continue
            if _JUNK_RE.search(raw.replace("\\", "/")):
                result.ignored.append(shown)
                continue
            reason = _unsafe_name_reason(raw)
            if reason is None and stat.S_ISLNK(info.external_attr >> 16):
                reason = "is a symbolic link; only regular files are accepted"
            if reason is None and info.flag_bits & 0x1:
                reason = "is encrypted; upload an archive without a password"
            if reason is not None:
                result.rejected.append((shown, reason))
                continue
            inner = raw.replace("\\", "/")
            ext = posixpath.splitext(inner)[1].lower()
            if ext in ARCHIVE_EXTS:
                result.rejected.append((shown, "is an archive inside the archive; unpack it first"))
                continue
            is_caption = ext in CAPTION_EXTS
            size_limit = limits.max_caption_bytes if is_caption else limits.max_file_bytes
            # Ratio first: a bomb is named as such even when it is also over the size limit.
            if info.file_size > limits.zip_ratio_floor_bytes and info.file_size > limits.zip_max_ratio * max(
                info.compress_size, 1
            ):
                ratio = info.file_size / max(info.compress_size, 1)
                result.rejected.append(
                    (
                        shown,
                        f"compresses {ratio:,.0f}:1 (limit {limits.zip_max_ratio:,.0f}:1), which looks like a "
                        "zip bomb; it was not unpacked",
                    )
                )
                continue
            if info.file_size > size_limit:
                result.rejected.append(
                    (shown, f"is {_mib(info.file_size)}, over the {_mib(size_limit)} limit per file")
                )
                continue
            try:
                # Bounded: never trust file_size; an entry holding more than allowed is refused.
                body = _read_bounded(zf, info, min(size_limit, limits.zip_max_total_bytes - read_total))
            except (
                zipfile.BadZipFile,
                zlib.error,
                OSError,
                EOFError,
                RuntimeError,
                NotImplementedError,
                ValueError,
            ) as e:
                result.rejected.append((shown, f"is damaged inside the archive ({e})"))
                continue
            if body is None:
                result.rejected.append((shown, "holds more data than its header declares; refused"))
                continue
            read_total += len(body)
            stem_path = posixpath.splitext(f"{name}/{inner}")[0].lower()
            item = _Item(shown, stem_path, posixpath.basename(stem_path), body)
            (out.captions if is_caption else out.images).append(item)


# ---- uploads -----------------------------------------------------------------------------------


def ingest_uploads(
    files: Sequence[tuple[str, bytes]],
    limits: IntakeLimits | None = None,
    existing_hashes: Iterable[str] = (),
    existing_images: Sequence[Any] = (),
) -> IntakeResult:
    """Sort an upload (images, .txt/.caption files, .zip archives) into accepted, rejected and
    duplicate files. Refusals never stop the rest: good files are accepted beside bad ones.

    Captions pair with images by path without extension (``a/cat.png`` <- ``a/cat.txt``), falling
    back to the bare stem when exactly one caption file has it. ``existing_hashes``: sha256 of images
    already in the dataset (``Repo.image_hashes``); those count as duplicates. Blocking: call it via
    ``asyncio.to_thread``. Mask files (``storage.masks``) pair with an image of the upload or, by its upload
    name, of ``existing_images`` (the dataset's rows).
    """
    limits = limits or IntakeLimits()
    result = IntakeResult()
    gathered = _Gather()
    for raw_name, data in files:
        # Discord names are plain, but never trust a client: keep the last path part only.
        name = posixpath.basename(raw_name.replace("\\", "/")) or "unnamed"
        ext = posixpath.splitext(name)[1].lower()
        stem_path = posixpath.splitext(name)[0].lower()
        if ext in ARCHIVE_EXTS:
            _scan_zip(name, data, limits, gathered, result)
        elif ext in CAPTION_EXTS:
            if len(data) > limits.max_caption_bytes:
                result.rejected.append(
                    (name, f"is {len(data):,} bytes; captions may be at most {limits.max_caption_bytes:,}")
                )
            else:
                gathered.captions.append(_Item(name, stem_path, stem_path, data))
        else:
            gathered.images.append(_Item(name, stem_path, stem_path, data))

    captions_by_key: dict[str, str | None] = {}
    captions_by_stem: dict[str, list[_Item]] = {}
    for cap in gathered.captions:
        try:
            captions_by_key[cap.key] = _decode_caption(cap.name, cap.data)
        except IntakeError as e:
            result.rejected.append((e.name, e.reason))
            continue
        captions_by_stem.setdefault(cap.stem, []).append(cap)

    used_caption_keys: set[str] = set()
    seen = set(existing_hashes)
    sizes = {r.sha256: (r.width, r.height) for r in existing_images}
    masks = [(it.name, it.key, it.data) for it in gathered.images if mask_target(it.key) is not None]
    known: list[KnownImage] = []  # this upload's images a mask may pair with
    for item in gathered.images:
        if mask_target(item.key) is not None:
            continue
        sha = hashlib.sha256(item.data).hexdigest()
        if sha in seen:
            result.duplicates.append(item.name)  # identical bytes were already checked or stored
            if sha in sizes:
                known.append(KnownImage(item.name, item.key, sha, *sizes[sha]))
            continue
        try:
            checked = check_image(item.name, item.data, limits)
        except IntakeError as e:
            result.rejected.append((e.name, e.reason))
            continue
        seen.add(sha)
        sizes[sha] = (checked.width, checked.height)
        known.append(KnownImage(item.name, item.key, sha, checked.width, checked.height))
        key = item.key
        if key not in captions_by_key:
            same_stem = captions_by_stem.get(item.stem, [])
            key = same_stem[0].key if len(same_stem) == 1 else ""
        caption = captions_by_key.get(key)
        if key in captions_by_key:
            used_caption_keys.add(key)
        result.accepted.append(
            AcceptedImage(
                name=item.name,
                sha256=checked.sha256,
                ext=checked.ext,
                width=checked.width,
                height=checked.height,
                bytes=len(item.data),
                caption=caption,
                data=item.data,
            )
        )

    for cap in gathered.captions:
        if cap.key in captions_by_key and cap.key not in used_caption_keys:
            result.rejected.append(
                (cap.name, "has no accepted image with the same name; a caption needs its image beside it")
            )
    if masks:
        result.masks, refused = pair_masks(masks, known + known_rows(existing_images),
                                           lambda name, data: check_image(name, data, limits))
        result.rejected += refused
    return _clean_names(result)


def _clean_names(result: IntakeResult) -> IntakeResult:
    """Every name in the result as it may be stored and shown (no control or bidi characters, capped).
    Done last: captions pair with images by their names as uploaded."""
    result.accepted = [replace(a, name=display_file_name(a.name)) for a in result.accepted]
    result.rejected = [(display_file_name(n), r) for n, r in result.rejected]
    result.duplicates = [display_file_name(n) for n in result.duplicates]
    result.ignored = [display_file_name(n) for n in result.ignored]
    result.masks = [replace(m, name=display_file_name(m.name), image_name=display_file_name(m.image_name))
                    for m in result.masks]
    return result


# ---- contact sheet -----------------------------------------------------------------------------


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # very old Pillow without sizes
        return ImageFont.load_default()


def _caption_lines(
    draw: ImageDraw.ImageDraw, text: str, font: object, width: int, max_lines: int
) -> list[str]:
    """Wrap to the cell width; the last line ends in '...' when the caption does not fit."""
    words = text.split()
    lines: list[str] = []
    cur = ""
    for word in words:
        trial = f"{cur} {word}".strip()
        if draw.textlength(trial, font=font) <= width:  # type: ignore[arg-type]
            cur = trial
            continue
        if cur:
            lines.append(cur)
        cur = word
        while draw.textlength(cur, font=font) > width and len(cur) > 1:  # type: ignore[arg-type]
            # A single word wider than the cell: hard-break it.
            cut = len(cur)
            while cut > 1 and draw.textlength(cur[:cut], font=font) > width:  # type: ignore[arg-type]
                cut -= 1
            lines.append(cur[:cut])
            cur = cur[cut:]
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and draw.textlength(last + "...", font=font) > width:  # type: ignore[arg-type]
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last.rstrip() + "..."]
    return lines


def _thumbnail(data: bytes, thumb: int) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (thumb * 2, thumb * 2))  # JPEG: decode at reduced scale, much faster
            im = ImageOps.exif_transpose(im)
            im.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
            if im.mode in ("RGBA", "LA", "P", "PA"):
                im = im.convert("RGBA")
                bg = Image.new("RGB", im.size, (48, 48, 48))
                bg.paste(im, mask=im.getchannel("A"))
                return bg
            return im.convert("RGB")
    except Exception:  # noqa: BLE001 - one unreadable file must not break the whole sheet
        return None


def contact_sheet(
    images: Sequence[tuple[bytes, str | None]], thumb: int = 128, cols: int = 6, caption_lines: int = 3
) -> bytes:
    """A PNG grid of thumbnails, each with its caption (wrapped, truncated) below, for /dataset show."""
    cols = max(1, min(cols, len(images) or 1))
    rows = max(1, -(-len(images) // cols))
    pad, font_size = 6, max(9, thumb // 11)
    font = _font(font_size)
    line_h = font_size + 3
    cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + caption_lines * line_h
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), (32, 32, 36))
    draw = ImageDraw.Draw(sheet)
    for i, (data, caption) in enumerate(images):
        x0, y0 = (i % cols) * cell_w + pad, (i // cols) * cell_h + pad
        im = _thumbnail(data, thumb)
        if im is None:
            draw.rectangle([x0, y0, x0 + thumb - 1, y0 + thumb - 1], outline=(160, 60, 60))
            draw.text((x0 + 4, y0 + thumb // 2 - font_size), "unreadable", fill=(200, 120, 120), font=font)
        else:
            sheet.paste(im, (x0 + (thumb - im.width) // 2, y0 + (thumb - im.height) // 2))
        text = caption if caption else "(no caption)"
        fill = (220, 220, 220) if caption else (130, 130, 130)
        for j, line in enumerate(_caption_lines(draw, text, font, thumb, caption_lines)):
            draw.text((x0, y0 + thumb + 2 + j * line_h), line, fill=fill, font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


__all__ = [
    "ALLOWED_FORMATS",
    "AcceptedImage",
    "CheckedImage",
    "IntakeError",
    "IntakeLimits",
    "IntakeResult",
    "check_image",
    "contact_sheet",
    "ingest_uploads",
]
