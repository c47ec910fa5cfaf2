"""The training data pipeline: scan concept folders, build captions, load and crop images, order them
deterministically, and cache what does not change (VAE latents, optionally text-encoder outputs).

Kept in small pieces on purpose, so aspect buckets, tag shuffling and prior preservation can be added
beside them:
- `scan_dataset(spec)` -> `list[ImageItem]` (one entry per image file; repeats are applied by `DataOrder`)
- `build_caption(...)` -> the caption one image trains with
- `load_image(path)` / `resize_center_crop(img, res)` / `to_tensor(img)` -> pixels in [-1, 1]
- `DataOrder` -> which items form micro-batch m, a pure function of (seed, m): resume needs only the step
- `TrainData` -> `Sample`s and `Batch`es, with the latent and text caches
- `encode_text(base, captions, device)` -> the UNet's conditioning for SD1/SD2/SDXL

Randomness here never touches a global RNG stream: every random choice (epoch order, flips) comes from a
generator seeded with (seed, epoch[, position]), so a resumed run sees exactly the data an uninterrupted
run would have seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.events import JobFailed

if TYPE_CHECKING:
    from trainer.models import BaseModel
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
    trigger = (trigger or "").strip()
    if not trigger:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    if tags and (tags[0] == trigger or tags[0].startswith(trigger + " ")):
        return caption
    tags = [t for t in tags if t != trigger]
    return ", ".join([trigger, *tags])


def build_caption(concept: Concept, file_caption: str | None, trigger: str | None) -> str:
    instance = concept.instance_prompt.strip()
    file_caption = (file_caption or "").strip()
    if concept.caption_mode == "instance_only":
        parts = [instance]
    elif concept.caption_mode == "caption_only":
        parts = [file_caption or instance]  # an image without a .txt still trains with the instance prompt
    else:
        parts = [instance, file_caption]
    return put_trigger_first(", ".join(p for p in parts if p), trigger)


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


def dataset_fingerprint(items: Sequence[ImageItem]) -> str:
    """Changes when images, their sizes or their captions change: a saved state is only valid for the same data."""
    h = hashlib.sha256()
    for it in items:
        size = it.path.stat().st_size if it.path.exists() else -1
        h.update(f"{it.path}\0{size}\0{it.caption}\0{it.repeats}\0{it.loss_weight}\n".encode())
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


def resize_center_crop(img: Image.Image, resolution: int) -> Cropped:
    """Shorter side to `resolution`, then a centred square crop (kohya's non-bucketed path)."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    return Cropped(img, (h, w), (top, left), (resolution, resolution))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# --- order -------------------------------------------------------------------------------------

class DataOrder:
    """Which items micro-batch m holds, from (seed, m) alone.

    The data is an endless stream of epochs; an epoch lists each item `repeats` times, shuffled by a
    generator seeded with (seed, epoch). Micro-batch m takes stream positions [m*bs, (m+1)*bs), so a batch
    can straddle two epochs (no image is dropped, none is seen twice within an epoch).
    """

    def __init__(self, repeats: Sequence[int], batch_size: int, seed: int, shuffle: bool = True):
        self.slots = [i for i, r in enumerate(repeats) for _ in range(r)]
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, list[int]] = {}

    @property
    def epoch_len(self) -> int:
        return len(self.slots)

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            if self.shuffle:
                perm = torch.randperm(len(self.slots), generator=generator(self.seed, "epoch", epoch)).tolist()
            else:
                perm = list(range(len(self.slots)))
            self._perms[epoch] = [self.slots[i] for i in perm]
        return self._perms[epoch]

    def positions(self, micro_batch: int) -> list[tuple[int, int, int]]:
        """(epoch, position in epoch, item index) for each sample of a micro-batch."""
        out = []
        for p in range(micro_batch * self.batch_size, (micro_batch + 1) * self.batch_size):
            epoch, pos = divmod(p, self.epoch_len)
            out.append((epoch, pos, self.epoch_order(epoch)[pos]))
        return out

    def epoch_of(self, micro_batch: int) -> int:
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
    """Items + order + caches. `batch(m)` is a pure function of m once the caches are filled."""

    items: list[ImageItem]
    resolution: int
    batch_size: int
    seed: int
    random_flip: bool = False
    _latents: dict[tuple[int, bool], torch.Tensor] = field(default_factory=dict)
    _text: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    _geometry: dict[int, Cropped] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.order = DataOrder([it.repeats for it in self.items], self.batch_size, self.seed)

    @classmethod
    def from_spec(cls, spec: TrainSpec, items: list[ImageItem] | None = None) -> TrainData:
        return cls(items=items if items is not None else scan_dataset(spec), resolution=spec.data.resolution,
                   batch_size=spec.batch_size, seed=spec.seed, random_flip=spec.data.random_flip)

    @property
    def latents_cached(self) -> bool:
        return bool(self._latents)

    @property
    def text_cached(self) -> bool:
        return bool(self._text)

    def flip_for(self, epoch: int, pos: int) -> bool:
        if not self.random_flip:
            return False
        return bool(torch.rand((), generator=generator(self.seed, "flip", epoch, pos)).item() < 0.5)

    def cropped(self, index: int) -> Cropped:
        return resize_center_crop(load_image(self.items[index].path), self.resolution)

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
        """Encode every image once (both orientations when flipping); the VAE is not needed afterwards."""
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
        for cap in sorted({it.caption for it in self.items}):
            h, p = encode_text(base, [cap], device)
            self._text[cap] = (h[0].float().cpu(), None if p is None else p[0].float().cpu())

    def sample(self, epoch: int, pos: int, index: int) -> Sample:
        it = self.items[index]
        flipped = self.flip_for(epoch, pos)
        if (index, flipped) in self._latents:
            g = self._geometry[index]
            return Sample(index, it.caption, g.original_size, g.crop_top_left, g.target_size, flipped,
                          it.loss_weight, latents=self._latents[(index, flipped)])
        px, c = self.pixels(index, flipped)
        return Sample(index, it.caption, c.original_size, c.crop_top_left, c.target_size, flipped,
                      it.loss_weight, pixels=px)

    def batch(self, micro_batch: int) -> Batch:
        samples = [self.sample(e, p, i) for e, p, i in self.order.positions(micro_batch)]
        return self.collate(samples)

    def collate(self, samples: list[Sample]) -> Batch:
        captions = [s.caption for s in samples]
        b = Batch(samples=samples, captions=captions,
                  loss_weight=torch.tensor([s.loss_weight for s in samples], dtype=torch.float32),
                  add_time_ids=time_ids(samples))
        if all(s.latents is not None for s in samples):
            b.latents = torch.stack([s.latents for s in samples])  # type: ignore[misc]
        else:
            b.pixels = torch.stack([s.pixels for s in samples])  # type: ignore[misc]
        if self._text and all(c in self._text for c in captions):
            b.encoder_hidden_states = torch.stack([self._text[c][0] for c in captions])
            if self._text[captions[0]][1] is not None:
                b.pooled = torch.stack([self._text[c][1] for c in captions])  # type: ignore[misc]
        return b
