"""The training data pipeline: scan concept folders, build captions, load and crop images, order them
deterministically, and cache what does not change (VAE latents, optionally text-encoder outputs).

- `scan_dataset(spec)` -> `list[ImageItem]` (one entry per image file; repeats are applied by `DataOrder`);
  `resolve_class_counts` / `class_items` add a concept's class images (prior preservation, see trainer/train/prior.py)
- `build_caption(concept, file_caption, trigger)` -> the caption one image trains with before shuffling
  (`trainer.data.captions`: caption modes, [filewords], trigger first)
- `trainer.data.images`: `load_image(path)` / `crop_to_bucket(img, bucket)` / `resize_center_crop(img, res)` /
  `to_tensor(img)` -> pixels in [-1, 1], plus the original size and crop offset SDXL is conditioned on
- `trainer.data.order.DataOrder` -> which items form micro-batch m, a pure function of (seed, m): resume needs
  only the step. With aspect-ratio buckets every micro-batch comes from one bucket (`trainer.data.buckets`).
- `TrainData` -> `Sample`s and `Batch`es (captions processed per draw, prior-preservation weights), with the
  latent and text caches
- `trainer.data.encode.encode_text(base, captions, device)` -> the UNet's conditioning for SD1/SD2/SDXL

Randomness here never touches a global RNG stream: every random choice (epoch order, bucket batches, flips,
tag shuffles, caption dropout) comes from a generator seeded with (seed, epoch[, position]), so a resumed
run sees exactly the data an uninterrupted run would have seen.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import ImageOps

from trainer.data import captions
from trainer.data.buckets import Bucket, assign_bucket, clamp_sides, make_buckets
from trainer.data.encode import encode_pixels, encode_text
from trainer.data.images import IMAGE_EXTS, Cropped, crop_to_bucket, image_size, load_image, to_tensor
from trainer.data.order import DataOrder
from trainer.data.seeds import generator
from trainer.events import JobFailed

if TYPE_CHECKING:
    from trainer.models.base import BaseModel
    from trainer.spec import Concept, TrainSpec


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
    mask: Path | None = None  # masked loss: the mask image (trainer.data.masks)


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
    masks: list[Path | None] = [None] * len(images)
    if concept.mask_dir:
        from trainer.data.masks import find_masks

        masks = list(find_masks(images, Path(concept.mask_dir).expanduser(), f"concepts[{index}]"))
    return [ImageItem(path=p, caption=build_caption(concept, read_caption_file(p), trigger), concept_index=index,
                      repeats=concept.repeats, mask=m) for p, m in zip(images, masks, strict=True)]


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
        if it.mask is not None:  # only then: fingerprints of mask-free data stay what they were
            h.update(f"mask {it.mask}\0{it.mask.stat().st_size if it.mask.exists() else -1}\n".encode())
    return h.hexdigest()[:16]


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
    mask: torch.Tensor | None = None  # [1, H, W] uint8 loss mask (masked loss)


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
    mask: torch.Tensor | None = None  # [b, 1, H, W] uint8 loss masks (255 where a sample has none)

    def __len__(self) -> int:
        return len(self.samples)


def time_ids(samples: Sequence[Sample]) -> torch.Tensor:
    return torch.tensor([[*s.original_size, *s.crop_top_left, *s.target_size] for s in samples],
                        dtype=torch.float32)


# --- the data of one job -------------------------------------------------------------------------

@dataclass
class TrainData:
    """Items + order + caches. `batch(m)` is a pure function of m once the caches are filled.

    Captions: `ImageItem.caption` is the caption with nothing shuffled or dropped (trigger word first); each
    draw of an instance image then goes through `captions.process_caption` (tag shuffling after the first
    `keep_tokens` tags, caption dropout) with `caption_rng(seed, epoch, position)`, so a resumed run draws
    the same captions. Class images always train with their class prompt as it is.
    Prior preservation, diffusers' form: a batch holding class images gets the per-sample weights of
    `prior.prior_weights`, so the loop's weighted mean equals mean(instance) + prior_loss_weight * mean(class);
    kohya's form: each sample keeps its own weight (prior_loss_weight for class images), then the batch mean.
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
    prior_loss_form: str = "diffusers"  # or "kohya": per-sample weights, then the plain batch mean
    _latents: dict[tuple[int, bool], torch.Tensor] = field(default_factory=dict)
    _text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    _geometry: dict[int, Cropped] = field(default_factory=dict)
    _masks: dict[tuple[int, bool], torch.Tensor] = field(default_factory=dict)

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
                   caption_dropout=d.caption_dropout, prior_loss_weight=spec.prior_loss_weight,
                   prior_loss_form=spec.resolved_prior_loss_form)

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
            self.mask_for(i, False)  # a broken mask fails now too
            if on_progress:
                on_progress(i + 1, len(self.items))

    def pixels(self, index: int, flipped: bool) -> tuple[torch.Tensor, Cropped]:
        c = self.cropped(index)
        img = ImageOps.mirror(c.image) if flipped else c.image
        return to_tensor(img), c

    def mask_for(self, index: int, flipped: bool) -> torch.Tensor | None:
        """The item's loss mask at its bucket size (kept: a byte per pixel), or None without one."""
        it = self.items[index]
        if it.mask is None:
            return None
        if (index, flipped) not in self._masks:
            from trainer.data.masks import load_mask

            self._masks[(index, flipped)] = load_mask(it.mask, it.path, self.bucket(index), flipped)
        return self._masks[(index, flipped)]

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
                          it.loss_weight, latents=self._latents[(index, flipped)], is_class=it.is_class,
                          mask=self.mask_for(index, flipped))
        px, c = self.pixels(index, flipped)
        return Sample(index, caption, c.original_size, c.crop_top_left, c.target_size, flipped,
                      it.loss_weight, pixels=px, is_class=it.is_class, mask=self.mask_for(index, flipped))

    def batch(self, micro_batch: int) -> Batch:
        samples = [self.sample(e, p, i) for e, p, i in self.order.positions(micro_batch)]
        return self.collate(samples)

    def loss_weights(self, samples: Sequence[Sample]) -> torch.Tensor:
        if self.has_class and self.prior_loss_form == "diffusers":
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
        if any(s.mask is not None for s in samples):  # a sample without a mask counts everywhere
            b.mask = torch.stack([s.mask if s.mask is not None else torch.full((1, *s.target_size), 255,
                                  dtype=torch.uint8) for s in samples])
        if self._text and all(c in self._text for c in captions_):
            b.encoder_hidden_states = torch.stack([self._text[c][0] for c in captions_])
            if self._text[captions_[0]][1] is not None:
                b.pooled = torch.stack([self._text[c][1] for c in captions_])  # type: ignore[misc]
        return b
