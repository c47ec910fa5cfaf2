"""Pixel-level detectors for the toy world: what a picture shows (background colour, figure colour, figure class,
background pattern) and continuous scores for the reserved concepts, with no model and no download.

How: every pixel is labelled with the nearest entry of an extended palette (each colour, its pattern shade, skin,
hair); the border's majority label is the background; the other pixels are the figure. The figure class is the
template (each figure drawn into the figure's bounding box) with the best overlap; the pattern is read from the
2-D Fourier transform of the background at the pattern period (stripes: rows only; checkers: diagonals; dots: both).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageFilter

from trainer.toy.world import (
    COLOURS,
    HAIR,
    IMAGE_SIZE,
    PERIOD,
    RESERVED_SHAPES,
    SHAPES,
    SKIN,
    Scene,
    pattern_colour,
    render,
)

_TEMPLATES = (*SHAPES, "girl", *RESERVED_SHAPES)
_NAMES = list(COLOURS)
# Extended palette: label i < len(COLOURS) is the colour, the next len(COLOURS) its pattern shade, then skin, hair.
_PALETTE = np.array([*COLOURS.values(), *(pattern_colour(c) for c in COLOURS.values()), SKIN, HAIR], dtype=np.float32)
_N = len(COLOURS)
_SKIN, _HAIR = 2 * _N, 2 * _N + 1
_SURE = 60.0  # RGB distance within which a pixel is taken for its palette colour


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str  # the figure's colour ("" when no figure was found)
    figure: str  # a figure class, or "" when no figure was found
    pattern: str
    shape_scores: dict[str, float]  # template overlap (IoU) per figure class
    pattern_scores: dict[str, float]

    def matches(self, scene: Scene) -> bool:
        return (self.background, self.colour, self.figure, self.pattern) == (
            scene.background, scene.colour, scene.figure, scene.pattern)


def _pixels(img: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img.astype(np.uint8))
    img = img.convert("RGB")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    # A 3x3 median takes out a sample's speckle and keeps edges and the star's points.
    return np.asarray(img.filter(ImageFilter.MedianFilter(3)), dtype=np.float32)


def _labels(px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nearest extended-palette entry of each pixel, and whether it is near enough to be sure (edge pixels,
    a mix of two colours, are not)."""
    d = ((px[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    return d.argmin(-1), d.min(-1) < _SURE ** 2


@cache
def _template(figure: str) -> np.ndarray:
    """The figure's mask cropped to its bounding box, drawn large (then resized to each observed box)."""
    img = np.asarray(render(Scene(figure, "white", "black", "large"), size=4 * IMAGE_SIZE), dtype=np.float32)
    mask = img.mean(-1) > 60
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of a mask (stray pixels of a noisy sample must not stretch the figure's box)."""
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, blob = [(int(y0), int(x0))], []
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    out = np.zeros_like(mask)
    if best:
        ys, xs = zip(*best, strict=True)
        out[list(ys), list(xs)] = True
    return out


def _shape_scores(mask: np.ndarray) -> dict[str, float]:
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape
    scores = {}
    for fig in _TEMPLATES:
        t = np.asarray(Image.fromarray(_template(fig)).resize((w, h), Image.Resampling.NEAREST))
        scores[fig] = float((t & box).sum() / max((t | box).sum(), 1))
    return scores


def _pattern_scores(bg_shade: np.ndarray, bg_mask: np.ndarray) -> dict[str, float]:
    f = np.where(bg_mask, bg_shade - bg_shade[bg_mask].mean(), 0.0)
    spec = np.abs(np.fft.fft2(f)) / bg_mask.sum()
    k = IMAGE_SIZE // PERIOD
    rows, cols, diag = spec[k, 0], spec[0, k], (spec[k, k] + spec[k, -k]) / 2
    return {"stripes": float(rows - cols), "dots": float(min(rows, cols)), "checkered": float(diag - max(rows, cols)),
            "fraction": float(bg_shade[bg_mask].mean())}


def read(img: Image.Image | np.ndarray) -> Reading:
    """What a toy-world picture shows."""
    px = _pixels(img)
    lab, sure = _labels(px)
    base = np.where((lab >= _N) & (lab < 2 * _N), lab - _N, lab)  # a pattern shade counts as its colour
    border = np.concatenate([base[:2].ravel(), base[-2:].ravel(), base[:, :2].ravel(), base[:, -2:].ravel()])
    border = border[border < _N]
    bg = int(np.bincount(border, minlength=_N).argmax()) if border.size else 0
    bg_mask = base == bg
    fig_mask = ~bg_mask & sure & ((lab < _N) | (lab >= 2 * _N))  # figures are never drawn in a pattern shade
    pscores = _pattern_scores((lab == bg + _N).astype(np.float32), bg_mask)
    if not 0.05 < pscores["fraction"] < 0.9:  # (all of it in the shade: a plain background of that shade)
        pattern = "plain"
    else:
        pattern = max(("stripes", "dots", "checkered"), key=lambda p: pscores[p])
    if fig_mask.sum() < 12:
        return Reading(_NAMES[bg], "", "", pattern, {f: 0.0 for f in _TEMPLATES}, pscores)
    fig_mask = _largest_blob(fig_mask)
    sscores = _shape_scores(fig_mask)
    fig_labels = base[fig_mask]
    # Skin and hair count only where solid (eroded): the thin edge between two flat colours can look like either.
    skin, hair = int(_erode(sure & (lab == _SKIN)).sum()), int(_erode(sure & (lab == _HAIR)).sum())
    colour_counts = np.bincount(fig_labels[fig_labels < _N], minlength=_N)
    colour = _NAMES[int(colour_counts.argmax())] if colour_counts.sum() else ""
    figure = "girl" if skin >= 4 and hair >= 2 else max((f for f in _TEMPLATES if f != "girl"), key=lambda f: sscores[f])
    return Reading(_NAMES[bg], colour, figure, pattern, sscores, pscores)


def concept_score(img: Image.Image | np.ndarray, concept: str) -> float:
    """How strongly a picture shows a reserved concept: for a shape, its template overlap minus the best other
    shape's; for a pattern, its Fourier score. Higher is more; it rises smoothly as the concept appears."""
    r = read(img)
    if concept in r.shape_scores:
        return r.shape_scores[concept] - max(v for f, v in r.shape_scores.items() if f not in (concept, "girl"))
    if concept in r.pattern_scores:
        return r.pattern_scores[concept]
    raise ValueError(f"no score for {concept!r}")
