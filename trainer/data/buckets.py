"""Aspect-ratio buckets (kohya sd-scripts style): pure geometry and a deterministic batch order.

API (everything here is pure: no torch, no I/O; Pillow only in `apply_plan`):

- `make_buckets(resolution, step=64, min_side=256, max_side=1024) -> list[(w, h)]`
  Every (w, h) with sides multiples of `step` inside [min_side, max_side] and w*h <= resolution**2,
  the largest height for each width (kohya's rule), both orientations, deduplicated, sorted by aspect
  ratio (tallest first), then area. The square bucket is always included.
- `assign_bucket(width, height, buckets) -> (w, h)`: the bucket whose aspect ratio is closest in
  log-ratio (so 2:1 and 1:2 are equally far from 1:1); ties go to the larger area.
  Pass the size *after* EXIF orientation (what `trainer.data.images.load_image` returns).
- `fit_to_bucket(img_size, bucket) -> CropPlan(resize_to, crop_left, crop_top)`: scale the image so it
  covers the bucket, then centre-crop the excess. `center_crop_plan(img_size, resolution)` is the same
  for the square (non-bucketed) mode. `apply_plan(img, plan, bucket)` does the resize + crop.
  SDXL's add_time_ids come from `sdxl_size_conditioning(img_size, plan, bucket)`:
  original_size (h, w) of the file, crops_coords_top_left (top, left) in the resized image, target (h, w).
- `BucketBatchSampler(bucket_of, batch_size, seed)`: `bucket_of[i]` is the bucket key of sample i
  (expand repeats first: one entry per (image, repeat), as kohya does). `batches(epoch)` is a shuffled
  list of batches, each from ONE bucket, every sample exactly once per epoch; a bucket's leftovers form
  a smaller batch (never dropped, never mixed with another bucket). The order is a pure function of
  (seed, epoch, bucket_of), so a resumed job sees the same batches: `batch_at(m)` gives micro-batch m
  of the whole run without replaying earlier epochs.

Typical data-pipeline use:
    buckets = make_buckets(d.resolution, d.bucket_step, d.bucket_min_side, d.bucket_max_side)
    key = assign_bucket(w, h, buckets) if d.bucketing else (d.resolution, d.resolution)
    plan = fit_to_bucket((w, h), key)            # or center_crop_plan((w, h), d.resolution)
    img = apply_plan(img, plan, key)
    sampler = BucketBatchSampler([key per sample], spec.batch_size, spec.seed)
    epoch, indices = sampler.batch_at(micro_batch)
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from PIL import Image

Bucket = tuple[int, int]  # (width, height)


def make_buckets(resolution: int, step: int = 64, min_side: int = 256, max_side: int = 1024) -> list[Bucket]:
    if resolution <= 0 or step <= 0:
        raise ValueError("resolution and step must be positive")
    lo = math.ceil(min_side / step) * step  # sides must be multiples of step
    hi = max_side // step * step
    if lo > hi:
        raise ValueError(f"no multiple of {step} between bucket_min_side {min_side} and bucket_max_side {max_side}")
    max_area = resolution * resolution
    found: set[Bucket] = set()
    for w in range(lo, hi + 1, step):
        # kohya: for each width the tallest height that keeps the area within resolution**2
        h = min(hi, max_area // w // step * step)
        if h >= lo:
            found.add((w, h))
            found.add((h, w))
    square = min(hi, max(lo, resolution // step * step))
    found.add((square, square))
    return sorted(found, key=lambda b: (b[0] / b[1], b[0] * b[1]))


def clamp_sides(resolution: int, min_side: int, max_side: int) -> tuple[int, int]:
    """(min_side, max_side) widened so the square bucket at `resolution` always fits.

    A preset made for 1024 px (min side 512) used at 64 px would otherwise train everything at 512.
    """
    return min(min_side, resolution), max(max_side, resolution)


def _log_ratio(w: int, h: int) -> float:
    return math.log(w / h)


def assign_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    if not buckets:
        raise ValueError("no buckets to choose from")
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = _log_ratio(width, height)
    # Round the distance so floating-point noise cannot break a real tie (e.g. 4:3 vs 3:4 for a square).
    return min(buckets, key=lambda b: (round(abs(_log_ratio(*b) - target), 9), -b[0] * b[1], -b[0]))


class CropPlan(NamedTuple):
    resize_to: tuple[int, int]  # (w, h) the image is resized to before cropping
    crop_left: int
    crop_top: int


def fit_to_bucket(img_size: tuple[int, int], bucket: Bucket) -> CropPlan:
    """Scale (w, h) so it covers `bucket` on both sides, then centre the crop window on the excess."""
    w, h = img_size
    bw, bh = bucket
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    scale = max(bw / w, bh / h)
    # max(): rounding must never leave the resized image a pixel short of the bucket.
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    return CropPlan((rw, rh), (rw - bw) // 2, (rh - bh) // 2)


def center_crop_plan(img_size: tuple[int, int], resolution: int) -> CropPlan:
    """The square mode: shorter side to `resolution`, centred square crop."""
    return fit_to_bucket(img_size, (resolution, resolution))


def apply_plan(img: Image.Image, plan: CropPlan, bucket: Bucket) -> Image.Image:
    from PIL import Image as PILImage

    if img.size != plan.resize_to:
        # Lanczos when shrinking keeps detail; bicubic when enlarging avoids ringing.
        shrinking = plan.resize_to[0] < img.size[0]
        resample = PILImage.Resampling.LANCZOS if shrinking else PILImage.Resampling.BICUBIC
        img = img.resize(plan.resize_to, resample)
    return img.crop((plan.crop_left, plan.crop_top, plan.crop_left + bucket[0], plan.crop_top + bucket[1]))


def sdxl_size_conditioning(img_size: tuple[int, int], plan: CropPlan, bucket: Bucket) -> tuple[int, ...]:
    """SDXL add_time_ids: original_size (h, w) + crops_coords_top_left (top, left) + target_size (h, w)."""
    w, h = img_size
    return (h, w, plan.crop_top, plan.crop_left, bucket[1], bucket[0])


def _rng(*parts: object) -> random.Random:
    # sha256, not hash(): str hashes change between Python runs, and resume must see the same order.
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class BucketBatchSampler:
    """Per-epoch single-bucket batches in a deterministic shuffled order (see the module docstring)."""

    def __init__(self, bucket_of: Sequence[Hashable], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not bucket_of:
            raise ValueError("no samples to batch")
        self.batch_size = batch_size
        self.seed = seed
        # Buckets in order of first appearance: deterministic for the same inputs, needs no sortable keys.
        self._members: dict[Hashable, list[int]] = {}
        for i, key in enumerate(bucket_of):
            self._members.setdefault(key, []).append(i)
        self._cache: tuple[int, list[list[int]]] | None = None

    @property
    def buckets(self) -> dict[Hashable, int]:
        """Bucket key -> number of samples."""
        return {k: len(v) for k, v in self._members.items()}

    def __len__(self) -> int:
        """Batches per epoch (the same every epoch)."""
        return sum(-(-len(m) // self.batch_size) for m in self._members.values())

    def batches(self, epoch: int) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == epoch:
            return [list(b) for b in self._cache[1]]
        out: list[list[int]] = []
        for b_index, members in enumerate(self._members.values()):
            order = list(members)
            _rng(self.seed, epoch, "bucket", b_index).shuffle(order)
            out += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        _rng(self.seed, epoch, "batches").shuffle(out)
        self._cache = (epoch, out)
        return [list(b) for b in out]

    def locate(self, micro_batch: int) -> tuple[int, int]:
        """(epoch, index within that epoch's batches) of the run's micro-batch number `micro_batch`."""
        return divmod(micro_batch, len(self))

    def batch_at(self, micro_batch: int) -> tuple[int, list[int]]:
        epoch, pos = self.locate(micro_batch)
        return epoch, self.batches(epoch)[pos]
