"""The training data pipeline: scan concept folders, build captions, load and crop images, order them
deterministically, and cache what does not change (VAE latents, optionally text-encoder outputs).

- `scan_dataset(spec)` -> `list[ImageItem]` (one entry per image file; repeats are applied by `DataOrder`);
  `resolve_class_counts` / `class_items` add a concept's class images (prior preservation, see train.py)
- `build_caption(concept, file_caption, trigger)` -> the caption one image trains with before shuffling
  (`trainer.data.captions`: caption modes, [filewords], trigger first)
- `load_image(path)` / `crop_to_bucket(img, bucket)` / `resize_center_crop(img, res)` / `to_tensor(img)`
  -> pixels in [-1, 1], plus the original size and crop offset SDXL is conditioned on
- `DataOrder` -> which items form micro-batch m, a pure function of (seed, m): resume needs only the step.
  With aspect-ratio buckets every micro-batch comes from one bucket (`trainer.data.buckets`).
- `TrainData` -> `Sample`s and `Batch`es (captions processed per draw, prior-preservation weights), with the
  latent and text caches
- `encode_text(base, captions, device)` -> the UNet's conditioning for SD1/SD2/SDXL

Randomness here never touches a global RNG stream: every random choice (epoch order, bucket batches, flips,
tag shuffles, caption dropout) comes from a generator seeded with (seed, epoch[, position]), so a resumed
run sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.data import captions
from trainer.data.buckets import (
    Bucket,
    BucketBatchSampler,
    apply_plan,
    assign_bucket,
    center_crop_plan,
    clamp_sides,
    fit_to_bucket,
    make_buckets,
    sdxl_size_conditioning,
)
from trainer.events import JobFailed

if TYPE_CHECKING:
    from trainer.models.base import BaseModel
    from trainer.spec import Concept, TrainSpec

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


# --- deterministic seeds -----------------------------------------------------------------------

def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from (seed, step, ...): the same on every machine and Python run (unlike hash())."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: int | str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


# --- dataset scanning and captions ---------------------------------------------------------------

@dataclass
class ImageItem:
    """One image of the dataset with the caption it trains with."""

    path: Path
    caption: str
    concept_index: int
    repeats: int = 1
    loss_weight: float = 1.0  # prior preservation gives class images prior_loss_weight
    is_class: bool = False


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not p.name.startswith("."))


def read_caption_file(image_path: Path) -> str | None:
    txt = image_path.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:
        return " ".join(txt.read_text(encoding="utf-8", errors="replace").split())
    except OSError as e:
        raise JobFailed(f"caption file {txt} could not be read ({e}); fix or delete it", reason="bad_input") from None


def put_trigger_first(caption: str, trigger: str | None) -> str:
    """The trigger word leads every caption (kohya's keep_tokens and tag shuffling rely on it being first)."""
    return captions.process_caption(caption, trigger_word=trigger, rng=random.Random(0))


def build_caption(concept: Concept, file_caption: str | None, trigger: str | None) -> str:
    """The caption an instance image trains with when nothing is shuffled or dropped: the concept's caption
    mode and [filewords] (`captions.build_caption`), then the trigger word first."""
    built = captions.build_caption(concept.instance_prompt, file_caption, concept.caption_mode)
    return put_trigger_first(built, trigger)


def scan_concept(concept: Concept, index: int, trigger: str | None) -> list[ImageItem]:
    folder = Path(concept.image_dir).expanduser()
    if not folder.is_dir():
        raise JobFailed(
            f"image folder {folder} does not exist; check concepts[{index}].image_dir or upload the dataset again",
            reason="bad_input",
        )
    images = list_images(folder)
    if not images:
        raise JobFailed(
            f"image folder {folder} has no images ({', '.join(IMAGE_EXTS)}); add some images to it",
            reason="bad_input",
        )
    return [ImageItem(path=p, caption=build_caption(concept, read_caption_file(p), trigger), concept_index=index,
                      repeats=concept.repeats) for p in images]


def scan_dataset(spec: TrainSpec) -> list[ImageItem]:
    if not spec.concepts:
        raise JobFailed("the job has no concepts: add at least one image folder (concepts.image_dir)",
                        reason="bad_input")
    items: list[ImageItem] = []
    for i, concept in enumerate(spec.concepts):
        items += scan_concept(concept, i, spec.data.trigger_word)
    return items


def resolve_class_counts(spec: TrainSpec, items: Sequence[ImageItem]) -> list[Concept]:
    """The concepts with every class_count decided: a concept's own count when set; else, when it has a
    class_prompt and `data.class_images_per_image` is set, that many per instance image (the DreamBooth
    extension's "class images per instance image"); else, when it has a class_dir, every image in it (as
    kohya uses its regularization folders); else 0 (no prior preservation)."""
    per_image = spec.data.class_images_per_image
    out = []
    for i, c in enumerate(spec.concepts):
        n = c.class_count
        if n is None:
            n_images = sum(1 for it in items if it.concept_index == i and not it.is_class)
            folder = Path(c.class_dir).expanduser() if c.class_dir else None
            if (c.class_prompt or "").strip() and per_image:
                n = per_image * n_images
            elif folder is not None and folder.is_dir():
                n = len(list_images(folder))
            else:
                n = 0
        out.append(c.model_copy(update={"class_count": n}))
    return out


def class_items(concept: Concept, index: int, paths: Sequence[Path], prior_loss_weight: float) -> list[ImageItem]:
    """Class (regularization) images train with the class prompt (their own .txt when there is none)."""
    prompt = " ".join((concept.class_prompt or "").split())
    return [ImageItem(path=Path(p), caption=prompt or (read_caption_file(Path(p)) or ""), concept_index=index,
                      repeats=1, loss_weight=prior_loss_weight, is_class=True) for p in paths]


def dataset_fingerprint(items: Sequence[ImageItem]) -> str:
    """Changes when images, their sizes or their captions change: a saved state is only valid for the same data."""
    h = hashlib.sha256()
    for it in items:
        size = it.path.stat().st_size if it.path.exists() else -1
        h.update(f"{it.path}\0{size}\0{it.caption}\0{it.repeats}\0{it.loss_weight}\0{it.is_class}\n".encode())
    return h.hexdigest()[:16]


# --- images ------------------------------------------------------------------------------------

def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)  # phone photos: honour the orientation tag
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                # Transparent areas become white, not the undefined colour the pixels happen to hold.
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(bg, rgba).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise JobFailed(
            f"{path} could not be read as an image ({type(e).__name__}: {e}); remove or replace that file",
            reason="bad_input",
        ) from None


@dataclass
class Cropped:
    image: Image.Image
    original_size: tuple[int, int]  # (h, w) of the file, for SDXL's size conditioning
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    target_size: tuple[int, int]  # (h, w) trained at


def image_size(path: Path) -> tuple[int, int]:
    """(w, h) as `load_image` will return it (EXIF orientation applied), from the header alone."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # orientations that swap width and height
                w, h = h, w
            return w, h
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise JobFailed(
            f"{path} could not be read as an image ({type(e).__name__}: {e}); remove or replace that file",
            reason="bad_input",
        ) from None


def crop_to_bucket(img: Image.Image, bucket: Bucket) -> Cropped:
    """Resize to cover `bucket` (w, h), centre crop; the geometry SDXL is conditioned on comes along."""
    plan = fit_to_bucket(img.size, bucket)
    h, w, top, left, th, tw = sdxl_size_conditioning(img.size, plan, bucket)
    return Cropped(apply_plan(img, plan, bucket), (h, w), (top, left), (th, tw))


def resize_center_crop(img: Image.Image, resolution: int) -> Cropped:
    """Shorter side to `resolution`, then a centred square crop (kohya's non-bucketed path)."""
    plan = center_crop_plan(img.size, resolution)
    bucket = (resolution, resolution)
    h, w, top, left, th, tw = sdxl_size_conditioning(img.size, plan, bucket)
    return Cropped(apply_plan(img, plan, bucket), (h, w), (top, left), (th, tw))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# --- order -------------------------------------------------------------------------------------

Slot = int | tuple[int, int]  # an item index, or (pool, position in pool) for a class-image slot


class DataOrder:
    """Which items micro-batch m holds, from (seed, m) alone.

    The data is an endless stream of epochs; an epoch lists each item `repeats` times, shuffled by a
    generator seeded with (seed, epoch). Micro-batch m takes stream positions [m*bs, (m+1)*bs), so a batch
    can straddle two epochs (no image is dropped, none is seen twice within an epoch).

    `pools` (prior preservation): `(slots, item indices)` per concept with class images. The concept gets
    `slots` class samples per epoch (as many as its instance samples, kohya's balance), filled with its class
    images in turn: slot s of epoch e holds class image `(e * slots + s) % len(items)`, so every class image
    is used evenly, over several epochs when there are more class images than slots (kohya would only ever
    use the first ones).

    `bucket_of` (aspect-ratio buckets): the bucket of each item. Every micro-batch then comes from one
    bucket (`BucketBatchSampler` over the epoch's slots); a bucket's leftovers form a smaller batch, so a
    batch never straddles two epochs. Without pools every epoch has the same number of batches; with
    pools the count is computed per epoch (a pure function of the epoch, cached).
    """

    def __init__(self, repeats: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                 pools: Sequence[tuple[int, Sequence[int]]] = (), bucket_of: Sequence[Bucket] | None = None):
        self.slots: list[Slot] = [i for i, r in enumerate(repeats) for _ in range(r)]
        self.pools = [list(items) for _, items in pools]
        self._pool_len = [n for n, _ in pools]
        self.slots += [(p, s) for p, (n, items) in enumerate(pools) if items for s in range(n)]
        if not self.slots:
            raise JobFailed("the dataset is empty: no image has a repeat", reason="bad_input")
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.bucket_of = list(bucket_of) if bucket_of is not None else None
        self._perms: dict[int, list[int]] = {}
        self._bucket_batches: dict[int, list[list[tuple[int, int]]]] = {}
        self._cum: list[int] = [0]  # bucket mode: micro-batches before epoch e
        self._n0: int | None = None

    @property
    def epoch_len(self) -> int:
        return len(self.slots)

    def resolve(self, slot: Slot, epoch: int) -> int:
        if isinstance(slot, int):
            return slot
        p, s = slot
        items = self.pools[p]
        return items[(epoch * self._pool_len[p] + s) % len(items)]

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            if self.shuffle:
                perm = torch.randperm(len(self.slots), generator=generator(self.seed, "epoch", epoch)).tolist()
            else:
                perm = list(range(len(self.slots)))
            self._perms[epoch] = [self.resolve(self.slots[i], epoch) for i in perm]
        return self._perms[epoch]

    # -- bucket mode --

    def _epoch_keys(self, epoch: int) -> list[Bucket]:
        assert self.bucket_of is not None
        return [self.bucket_of[self.resolve(slot, epoch)] for slot in self.slots]

    def _n_batches(self, epoch: int) -> int:
        counts: dict[Bucket, int] = {}
        for k in self._epoch_keys(epoch):
            counts[k] = counts.get(k, 0) + 1
        return sum(-(-n // self.batch_size) for n in counts.values())

    def bucket_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The epoch's batches as lists of (slot index, item index), each from one bucket."""
        if epoch not in self._bucket_batches:
            if len(self._bucket_batches) > 4:
                self._bucket_batches.clear()
            sampler = BucketBatchSampler(self._epoch_keys(epoch), self.batch_size, self.seed)
            self._bucket_batches[epoch] = [[(j, self.resolve(self.slots[j], epoch)) for j in b]
                                           for b in sampler.batches(epoch)]
        return self._bucket_batches[epoch]

    def _locate(self, micro_batch: int) -> tuple[int, int]:
        if not self.pools:  # every epoch has the same number of batches
            if self._n0 is None:
                self._n0 = self._n_batches(0)
            return divmod(micro_batch, self._n0)
        while self._cum[-1] <= micro_batch:
            self._cum.append(self._cum[-1] + self._n_batches(len(self._cum) - 1))
        epoch = bisect.bisect_right(self._cum, micro_batch) - 1
        return epoch, micro_batch - self._cum[epoch]

    # -- both modes --

    def positions(self, micro_batch: int) -> list[tuple[int, int, int]]:
        """(epoch, position in epoch, item index) for each sample of a micro-batch.

        The position is unique within an epoch: flips and caption shuffles are seeded with (epoch, position).
        """
        if self.bucket_of is not None:
            epoch, k = self._locate(micro_batch)
            return [(epoch, j, i) for j, i in self.bucket_batches(epoch)[k]]
        out = []
        for p in range(micro_batch * self.batch_size, (micro_batch + 1) * self.batch_size):
            epoch, pos = divmod(p, self.epoch_len)
            out.append((epoch, pos, self.epoch_order(epoch)[pos]))
        return out

    def epoch_of(self, micro_batch: int) -> int:
        if self.bucket_of is not None:
            return self._locate(micro_batch)[0]
        return (micro_batch * self.batch_size) // self.epoch_len


# --- samples and batches -----------------------------------------------------------------------

@dataclass
class Sample:
    index: int  # item index
    caption: str
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]
    flipped: bool = False
    loss_weight: float = 1.0
    pixels: torch.Tensor | None = None  # [3, H, W] in [-1, 1] (when latents are not cached)
    latents: torch.Tensor | None = None  # [C, h, w], already scaled
    is_class: bool = False


@dataclass
class Batch:
    samples: list[Sample]
    captions: list[str]
    loss_weight: torch.Tensor  # [b] per-sample weights (prior preservation weights class images)
    latents: torch.Tensor | None = None  # [b, C, h, w] scaled (cached path)
    pixels: torch.Tensor | None = None  # [b, 3, H, W] (uncached path: the loop encodes them)
    encoder_hidden_states: torch.Tensor | None = None  # cached text outputs, when enabled
    pooled: torch.Tensor | None = None  # SDXL pooled text embeds (cached)
    add_time_ids: torch.Tensor | None = None  # SDXL [b, 6]: original size, crop top-left, target size

    def __len__(self) -> int:
        return len(self.samples)


def time_ids(samples: Sequence[Sample]) -> torch.Tensor:
    return torch.tensor([[*s.original_size, *s.crop_top_left, *s.target_size] for s in samples],
                        dtype=torch.float32)


# --- text encoding -----------------------------------------------------------------------------

def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_text(base: BaseModel, captions: Sequence[str], device: torch.device | str
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(encoder_hidden_states, pooled or None) as the UNet of this architecture expects them.

    SD1/SD2: the last hidden state (clip skip 1; diffusers' convention for SD2 too).
    SDXL: TE1 and TE2 penultimate hidden states concatenated on the channel axis; pooled = TE2's projected
    text embeds. Runs with whatever grad mode the caller set (text-encoder training needs grads).
    """
    if base.arch != "sdxl":
        ids = tokenize(base.tokenizers[0], captions).to(device)
        return base.text_encoders[0](ids).last_hidden_state, None
    hidden = []
    pooled = None
    for te, tok in zip(base.text_encoders, base.tokenizers, strict=True):
        out = te(tokenize(tok, captions).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if hasattr(out, "text_embeds"):
            pooled = out.text_embeds
    return torch.cat(hidden, dim=-1), pooled


# --- latents -----------------------------------------------------------------------------------

def vae_scale(vae, dist_sample: torch.Tensor) -> torch.Tensor:
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        dist_sample = dist_sample - shift
    return dist_sample * vae.config.scaling_factor


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """Scaled latents; the distribution's mean when no generator is given, a seeded sample otherwise."""
    vdtype = next(vae.parameters()).dtype
    vdev = next(vae.parameters()).device
    dist = vae.encode(pixels.to(vdev, vdtype)).latent_dist
    if gen is None:
        lat = dist.mean
    else:
        lat = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(dist.mean.device, dist.mean.dtype)
    return vae_scale(vae, lat).float()


# --- the data of one job -------------------------------------------------------------------------

@dataclass
class TrainData:
    """Items + order + caches. `batch(m)` is a pure function of m once the caches are filled.

    Captions: `ImageItem.caption` is the caption with nothing shuffled or dropped (trigger word first); each
    draw of an instance image then goes through `captions.process_caption` (tag shuffling after the first
    `keep_tokens` tags, caption dropout) with `caption_rng(seed, epoch, position)`, so a resumed run draws
    the same captions. Class images always train with their class prompt as it is.
    Prior preservation: a batch holding class images gets the per-sample weights of `prior.prior_weights`,
    so the loop's weighted mean equals mean(instance) + prior_loss_weight * mean(class).
    """

    items: list[ImageItem]
    resolution: int
    batch_size: int
    seed: int
    random_flip: bool = False
    bucketing: bool = False
    bucket_step: int = 64
    bucket_min_side: int = 256
    bucket_max_side: int = 1024
    trigger_word: str | None = None
    shuffle_tags: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    prior_loss_weight: float = 1.0
    _latents: dict[tuple[int, bool], torch.Tensor] = field(default_factory=dict)
    _text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    _geometry: dict[int, Cropped] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.has_class = any(it.is_class for it in self.items)
        self.item_buckets: list[Bucket] = [(self.resolution, self.resolution)] * len(self.items)
        if self.bucketing:
            lo, hi = clamp_sides(self.resolution, self.bucket_min_side, self.bucket_max_side)
            self.bucket_list = make_buckets(self.resolution, self.bucket_step, lo, hi)
            self.item_buckets = [assign_bucket(*image_size(it.path), self.bucket_list) for it in self.items]
        pools: list[tuple[int, list[int]]] = []
        for c in sorted({it.concept_index for it in self.items if it.is_class}):
            n_instance = sum(it.repeats for it in self.items if it.concept_index == c and not it.is_class)
            members = [i for i, it in enumerate(self.items) if it.concept_index == c and it.is_class]
            pools.append((n_instance, members))
        self.order = DataOrder([0 if it.is_class else it.repeats for it in self.items], self.batch_size,
                               self.seed, pools=pools, bucket_of=self.item_buckets if self.bucketing else None)

    @classmethod
    def from_spec(cls, spec: TrainSpec, items: list[ImageItem] | None = None) -> TrainData:
        d = spec.data
        return cls(items=items if items is not None else scan_dataset(spec), resolution=d.resolution,
                   batch_size=spec.batch_size, seed=spec.seed, random_flip=d.random_flip, bucketing=d.bucketing,
                   bucket_step=d.bucket_step, bucket_min_side=d.bucket_min_side, bucket_max_side=d.bucket_max_side,
                   trigger_word=d.trigger_word, shuffle_tags=d.shuffle_tags, keep_tokens=d.keep_tokens,
                   caption_dropout=d.caption_dropout, prior_loss_weight=spec.prior_loss_weight)

    @property
    def latents_cached(self) -> bool:
        return bool(self._latents)

    @property
    def text_cached(self) -> bool:
        return bool(self._text)

    @property
    def captions_vary(self) -> bool:
        """True when an image's caption changes from draw to draw (text-encoder outputs cannot be cached)."""
        return self.shuffle_tags or self.caption_dropout > 0

    def caption_for(self, epoch: int, pos: int, index: int) -> str:
        it = self.items[index]
        if it.is_class or not self.captions_vary:
            return it.caption
        return captions.process_caption(it.caption, trigger_word=self.trigger_word, shuffle_tags=self.shuffle_tags,
                                        keep_tokens=self.keep_tokens, caption_dropout=self.caption_dropout,
                                        rng=captions.caption_rng(self.seed, epoch, pos))

    def flip_for(self, epoch: int, pos: int) -> bool:
        if not self.random_flip:
            return False
        return bool(torch.rand((), generator=generator(self.seed, "flip", epoch, pos)).item() < 0.5)

    def bucket(self, index: int) -> Bucket:
        """(w, h) item `index` trains at: its aspect bucket, or the square of the resolution."""
        return self.item_buckets[index]

    def cropped(self, index: int) -> Cropped:
        return crop_to_bucket(load_image(self.items[index].path), self.bucket(index))

    def check_images(self, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Open every image once up front: a broken file fails the job before any training time is spent."""
        for i in range(len(self.items)):
            self._geometry[i] = self.cropped(i)
            self._geometry[i].image = None  # type: ignore[assignment]  # keep sizes, not pixels
            if on_progress:
                on_progress(i + 1, len(self.items))

    def pixels(self, index: int, flipped: bool) -> tuple[torch.Tensor, Cropped]:
        c = self.cropped(index)
        img = ImageOps.mirror(c.image) if flipped else c.image
        return to_tensor(img), c

    def cache_latents(self, vae, on_progress: Callable[[int, int], None] | None = None) -> None:
        """Encode every image once at its bucket size (both orientations when flipping)."""
        flips = (False, True) if self.random_flip else (False,)
        n = len(self.items) * len(flips)
        done = 0
        for i in range(len(self.items)):
            for f in flips:
                px, c = self.pixels(i, f)
                self._latents[(i, f)] = encode_pixels(vae, px[None])[0].cpu()
                self._geometry[i] = Cropped(None, c.original_size, c.crop_top_left, c.target_size)  # type: ignore[arg-type]
                done += 1
                if on_progress:
                    on_progress(done, n)

    @torch.no_grad()
    def cache_text(self, base: BaseModel, device: torch.device | str) -> None:
        """Encode each distinct caption once (only valid while captions are fixed and the TE is frozen)."""
        if self.captions_vary:
            raise ValueError("text-encoder outputs cannot be cached while captions are shuffled or dropped")
        for cap in sorted({it.caption for it in self.items}):
            h, p = encode_text(base, [cap], device)
            self._text[cap] = (h[0].float().cpu(), None if p is None else p[0].float().cpu())

    def sample(self, epoch: int, pos: int, index: int) -> Sample:
        it = self.items[index]
        flipped = self.flip_for(epoch, pos)
        caption = self.caption_for(epoch, pos, index)
        if (index, flipped) in self._latents:
            g = self._geometry[index]
            return Sample(index, caption, g.original_size, g.crop_top_left, g.target_size, flipped,
                          it.loss_weight, latents=self._latents[(index, flipped)], is_class=it.is_class)
        px, c = self.pixels(index, flipped)
        return Sample(index, caption, c.original_size, c.crop_top_left, c.target_size, flipped,
                      it.loss_weight, pixels=px, is_class=it.is_class)

    def batch(self, micro_batch: int) -> Batch:
        samples = [self.sample(e, p, i) for e, p, i in self.order.positions(micro_batch)]
        return self.collate(samples)

    def loss_weights(self, samples: Sequence[Sample]) -> torch.Tensor:
        if self.has_class:
            from trainer.train.prior import prior_weights

            return prior_weights(torch.tensor([s.is_class for s in samples]), self.prior_loss_weight)
        return torch.tensor([s.loss_weight for s in samples], dtype=torch.float32)

    def collate(self, samples: list[Sample]) -> Batch:
        captions_ = [s.caption for s in samples]
        b = Batch(samples=samples, captions=captions_, loss_weight=self.loss_weights(samples),
                  add_time_ids=time_ids(samples))
        if all(s.latents is not None for s in samples):
            b.latents = torch.stack([s.latents for s in samples])  # type: ignore[misc]
        else:
            b.pixels = torch.stack([s.pixels for s in samples])  # type: ignore[misc]
        if self._text and all(c in self._text for c in captions_):
            b.encoder_hidden_states = torch.stack([self._text[c][0] for c in captions_])
            if self._text[captions_[0]][1] is not None:
                b.pooled = torch.stack([self._text[c][1] for c in captions_])  # type: ignore[misc]
        return b
