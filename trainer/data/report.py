"""The dataset report shown before training: what will train, and what looks wrong.

API:

- `dataset_report(concepts, resolution, *, bucketing=False, bucket_step=64, bucket_min_side=256,
  bucket_max_side=1024, class_images=None, batch_size=1, max_names=10, verify=True) -> Report`
  `class_images[i]` is what `trainer.train.prior.ensure_class_images` returned for concept i (None: the
  concept's class_dir is listed, if it has one). `verify` decodes every image fully (catches truncated
  files; the header alone does not).
- `report_for_spec(spec, class_images=None) -> Report`: the same with the settings of a TrainSpec.

`Report.text` is human-readable, `Report.warnings` are one-line problems, `Report.concepts` holds the
numbers per concept (`ConceptStats`), `Report.buckets` the image count per (w, h) over all concepts.
The training loop emits it as `event("report", text=r.text, warnings=r.warnings)` before training.

Checked per concept: images (count, per bucket), captions found/missing (a missing or empty sidecar
`.txt`; not checked in 'instance_only' mode), duplicates by sha256 of the file bytes (across all
concepts), undersized images (shorter side < resolution in square mode, narrower or lower than their
bucket when bucketing: they will be upscaled), unreadable images, class images present vs requested.
Image sizes honour the EXIF orientation, as the loader does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from trainer import atomic
from trainer.data.buckets import Bucket, assign_bucket, clamp_sides, make_buckets
from trainer.data.images import IMAGE_EXTS
from trainer.events import EventSink, event

if TYPE_CHECKING:
    from trainer.spec import Concept, TrainSpec

_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass
class ConceptStats:
    index: int
    image_dir: str
    images: int = 0  # readable images
    captions_found: int = 0
    missing_captions: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # "name (reason)"
    undersized: list[str] = field(default_factory=list)  # "name WxH"
    buckets: dict[Bucket, int] = field(default_factory=dict)
    class_requested: int = 0
    class_present: int = 0
    folder_missing: bool = False


@dataclass
class Report:
    text: str
    warnings: list[str]
    concepts: list[ConceptStats]
    buckets: dict[Bucket, int]
    duplicates: list[list[str]]  # groups of paths with identical bytes


def _names(items: Sequence[str], limit: int) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def _image_size(path: Path, verify: bool) -> tuple[int, int]:
    with Image.open(path) as im:
        size = im.size
        if im.getexif().get(0x0112) in _TRANSPOSED:
            size = (size[1], size[0])
        if verify:
            im.load()
    return size


def _has_caption(path: Path) -> bool:
    txt = path.with_suffix(".txt")
    try:
        return txt.is_file() and bool(txt.read_text(encoding="utf-8", errors="replace").strip())
    except OSError:
        return False


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _bucket_str(b: Bucket) -> str:
    return f"{b[0]}x{b[1]}"


def dataset_report(
    concepts: Sequence[Concept],
    resolution: int,
    *,
    bucketing: bool = False,
    bucket_step: int = 64,
    bucket_min_side: int = 256,
    bucket_max_side: int = 1024,
    class_images: Sequence[Sequence[Path] | None] | None = None,
    batch_size: int = 1,
    max_names: int = 10,
    verify: bool = True,
) -> Report:
    bucket_min_side, bucket_max_side = clamp_sides(resolution, bucket_min_side, bucket_max_side)
    buckets = make_buckets(resolution, bucket_step, bucket_min_side, bucket_max_side) if bucketing else []
    warnings: list[str] = []
    lines: list[str] = []
    stats: list[ConceptStats] = []
    by_hash: dict[str, list[str]] = {}
    totals: dict[Bucket, int] = {}

    for i, concept in enumerate(concepts):
        st = ConceptStats(index=i, image_dir=concept.image_dir, class_requested=concept.class_count or 0)
        stats.append(st)
        folder = Path(concept.image_dir).expanduser()
        label = f"concept {i + 1} ({folder.name or folder})"
        if not folder.is_dir():
            st.folder_missing = True
            warnings.append(f"{label}: image folder {folder} does not exist")
            lines.append(f"{label}: folder {folder} does not exist")
            continue
        paths = _list_images(folder)
        for p in paths:
            try:
                w, h = _image_size(p, verify)
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
                st.unreadable.append(f"{p.name} ({type(e).__name__})")
                continue
            st.images += 1
            by_hash.setdefault(_sha256(p), []).append(str(p))
            bucket = assign_bucket(w, h, buckets) if bucketing else (resolution, resolution)
            st.buckets[bucket] = st.buckets.get(bucket, 0) + 1
            totals[bucket] = totals.get(bucket, 0) + 1
            small = (w < bucket[0] or h < bucket[1]) if bucketing else min(w, h) < resolution
            if small:
                st.undersized.append(f"{p.name} {w}x{h}")
            if concept.caption_mode != "instance_only":
                if _has_caption(p):
                    st.captions_found += 1
                else:
                    st.missing_captions.append(p.name)

        present: int
        given = class_images[i] if class_images is not None and i < len(class_images) else None
        if given is not None:
            present = len(given)
        elif concept.class_dir and Path(concept.class_dir).expanduser().is_dir():
            present = len(_list_images(Path(concept.class_dir).expanduser()))
        else:
            present = 0
        st.class_present = present

        # --- text for this concept
        mode = concept.caption_mode
        lines.append(f"{label}: {st.images} images x {concept.repeats} repeats, "
                     f"instance prompt {concept.instance_prompt!r}, captions: {mode}")
        if st.buckets:
            per_bucket = ", ".join(f"{_bucket_str(b)}: {n}" for b, n in sorted(st.buckets.items()))
            lines.append(f"  {'buckets' if bucketing else 'size'}: {per_bucket}")
        if mode == "instance_only":
            lines.append("  captions: not used (instance_only)")
        else:
            lines.append(f"  captions: {st.captions_found} found, {len(st.missing_captions)} missing")
            if st.missing_captions:
                fallback = "the instance prompt" if concept.instance_prompt.strip() else "an empty caption"
                if mode == "caption_only" or st.captions_found or not concept.instance_prompt.strip():
                    warnings.append(f"{label}: {_n(len(st.missing_captions), 'image')} without a caption (.txt) train "
                                    f"with {fallback}: {_names(st.missing_captions, max_names)}")
                lines.append(f"  missing captions: {_names(st.missing_captions, max_names)}")
        if st.undersized:
            what = "their bucket" if bucketing else f"{resolution} px on the shorter side"
            warnings.append(f"{label}: {_n(len(st.undersized), 'image')} smaller than {what} will be upscaled "
                            f"(blurrier results): {_names(st.undersized, max_names)}")
            lines.append(f"  undersized (upscaled): {_names(st.undersized, max_names)}")
        if st.unreadable:
            warnings.append(f"{label}: {_n(len(st.unreadable), 'file')} could not be read as images; remove or replace "
                            f"them: {_names(st.unreadable, max_names)}")
            lines.append(f"  unreadable: {_names(st.unreadable, max_names)}")
        if st.images == 0:
            warnings.append(f"{label}: no readable images in {folder}")
        if concept.class_count:
            lines.append(f"  class images ({concept.class_prompt or 'no class prompt'}): "
                         f"{min(present, concept.class_count)} of {concept.class_count} requested"
                         + (f" ({present} in the folder)" if present > concept.class_count else ""))
            if present < concept.class_count:
                warnings.append(f"{label}: only {present} class images of the {concept.class_count} requested")

    duplicates = [group for group in by_hash.values() if len(group) > 1]
    if duplicates:
        shown = [" = ".join(Path(p).name for p in g) for g in duplicates]
        extra = sum(len(g) - 1 for g in duplicates)
        warnings.append(f"{_n(extra, 'duplicate image')} (identical files) will train more often than the others: "
                        f"{_names(shown, max_names)}")
        lines.append(f"duplicates: {_names(shown, max_names)}")

    n_images = sum(s.images for s in stats)
    head = f"dataset: {_n(len(stats), 'concept')}, {_n(n_images, 'image')}, resolution {resolution}"
    if bucketing:
        head += f", aspect buckets (step {bucket_step}, sides {bucket_min_side}-{bucket_max_side})"
        lines.append("all buckets: " + ", ".join(f"{_bucket_str(b)}: {n}" for b, n in sorted(totals.items())))
        thin = [b for b, n in totals.items() if n < batch_size]
        if thin:
            lines.append(f"buckets with fewer images than the batch size {batch_size} (smaller batches): "
                         + ", ".join(_bucket_str(b) for b in sorted(thin)))
    else:
        head += ", centre-cropped squares"
    text = "\n".join([head, *lines] + [f"warning: {w}" for w in warnings])
    return Report(text=text, warnings=warnings, concepts=stats, buckets=dict(sorted(totals.items())),
                  duplicates=duplicates)


def report_for_spec(spec: TrainSpec, class_images: Sequence[Sequence[Path] | None] | None = None) -> Report:
    d = spec.data
    return dataset_report(spec.concepts, d.resolution, bucketing=d.bucketing, bucket_step=d.bucket_step,
                          bucket_min_side=d.bucket_min_side, bucket_max_side=d.bucket_max_side,
                          class_images=class_images, batch_size=spec.batch_size)


def emit_dataset_report(spec: TrainSpec, concepts: Sequence[Concept],
                        class_images: Sequence[Sequence[Path] | None], job_dir: Path, emit: EventSink
                        ) -> Report | None:
    """What will train (images per concept and bucket, captions, duplicates, undersized images): a `report`
    event and job_dir/report.txt, before any training time is spent. A failing report never stops a job."""
    def log(message: str, level: str = "info") -> None:
        emit(event("log", level=level, message=message))

    d = spec.data
    if d.bucketing and (d.bucket_min_side > d.resolution or d.bucket_max_side < d.resolution):
        log(f"bucket sides {d.bucket_min_side}-{d.bucket_max_side} do not include the resolution "
            f"{d.resolution}: buckets use sides {min(d.bucket_min_side, d.resolution)}-"
            f"{max(d.bucket_max_side, d.resolution)}", "warning")
    for i, (given, c) in enumerate(zip(spec.concepts, concepts, strict=True)):
        if (c.class_prompt or "").strip() and not c.class_count and given.class_count is None:
            log(f"concepts[{i}] has a class_prompt but no class images: no prior preservation (set its "
                "class_count, or data.class_images_per_image)")
    try:
        r = report_for_spec(spec.model_copy(update={"concepts": list(concepts)}), class_images=class_images)
    except Exception as e:  # noqa: BLE001 - the report informs; it never stops a job on its own
        log(f"dataset report failed: {type(e).__name__}: {e}", "warning")
        return None
    atomic.write_text(job_dir / "report.txt", r.text + "\n")
    emit(event("report", text=r.text, warnings=list(r.warnings)))
    return r
