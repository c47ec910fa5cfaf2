"""A procedural toy world: one figure (a shape or a chibi girl) of one colour on a plain or patterned background,
with a caption from a small vocabulary ("small red circle on blue with stripes").

Some concepts are RESERVED: the pretraining script never draws them, so a LoRA test can teach one to a base that
has never seen it (a star shape, a checkered background). Drawing is deterministic (Pillow, no randomness inside
``render``); ``sample_scene`` takes an explicit ``random.Random``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPER = 4  # drawn at 4x and box-filtered down: smooth edges, the same pixels every time

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SKIN = (250, 205, 170)
HAIR = (110, 55, 25)
SHAPES = ("circle", "square", "triangle")
FIGURES = (*SHAPES, "girl")  # "girl" is the chibi figure; its colour is its dress
PATTERNS = ("plain", "stripes", "dots")
SIZES = ("small", "large")
RESERVED_SHAPES = ("star",)
RESERVED_PATTERNS = ("checkered",)
PERIOD = 16  # pixels per pattern period at 64 px (stripes, dots, checkers)
# Every word a caption can hold (reserved concepts included): the toy tokenizer gives each one its own token.
CAPTION_WORDS = (*FIGURES, *RESERVED_SHAPES, "chibi", "in", "dress", "on", "with", "red", "green", "blue", "yellow",
                 "white", "black", *PATTERNS, *RESERVED_PATTERNS, *SIZES)
_RADIUS = {"small": 12.0, "large": 19.0}  # figure half-size in pixels at 64 px


@dataclass(frozen=True)
class Scene:
    figure: str  # a SHAPES/FIGURES entry or a reserved shape
    colour: str
    background: str
    size: str = "large"
    pattern: str = "plain"
    dx: int = 0  # offset of the figure's centre from the image centre, pixels
    dy: int = 0

    def caption(self, trigger: str | None = None) -> str:
        """The scene in words; a reserved concept is named by ``trigger`` when given (how a LoRA learns it)."""
        fig = trigger if trigger and self.figure in RESERVED_SHAPES else self.figure
        if self.figure == "girl":
            text = f"{self.size} chibi girl in {self.colour} dress on {self.background}"
        else:
            text = f"{self.size} {self.colour} {fig} on {self.background}"
        if self.pattern != "plain":
            pat = trigger if trigger and self.pattern in RESERVED_PATTERNS else self.pattern
            text += f" with {pat}"
        return text


def sample_scene(rng: random.Random, figures: tuple[str, ...] = FIGURES,
                 patterns: tuple[str, ...] = PATTERNS) -> Scene:
    """A random scene from the given figures and patterns (the reserved ones only when asked for)."""
    colour = rng.choice(list(COLOURS))
    background = rng.choice([c for c in COLOURS if c != colour])
    return Scene(figure=rng.choice(figures), colour=colour, background=background, size=rng.choice(SIZES),
                 pattern=rng.choice(patterns), dx=rng.randint(-6, 6), dy=rng.randint(-6, 6))


def pretrain_scenes(n: int, seed: int) -> list[Scene]:
    """The pretraining set: never a reserved concept."""
    rng = random.Random(seed)
    return [sample_scene(rng) for _ in range(n)]


def concept_scenes(concept: str, n: int, seed: int) -> list[Scene]:
    """n scenes that show one reserved concept (a star shape, or a checkered background behind a known shape)."""
    rng = random.Random(seed)
    if concept in RESERVED_SHAPES:
        return [sample_scene(rng, figures=(concept,), patterns=("plain",)) for _ in range(n)]
    if concept in RESERVED_PATTERNS:
        return [sample_scene(rng, figures=SHAPES, patterns=(concept,)) for _ in range(n)]
    raise ValueError(f"{concept!r} is not a reserved concept; reserved: {RESERVED_SHAPES + RESERVED_PATTERNS}")


def pattern_colour(bg: tuple[int, int, int]) -> tuple[int, int, int]:
    # Half way to white on dark colours, half way to black on light ones: visible on every background.
    light = sum(bg) / 3 > 150
    return tuple(c // 2 if light else (c + 255) // 2 for c in bg)  # type: ignore[return-value]


def figure_polygon(figure: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """The outline of a polygonal figure (square, triangle, star); None for the round ones."""
    if figure == "square":
        return [(cx - r * 0.85, cy - r * 0.85), (cx + r * 0.85, cy - r * 0.85),
                (cx + r * 0.85, cy + r * 0.85), (cx - r * 0.85, cy + r * 0.85)]
    if figure == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if figure == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.4
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + 0.15 * r + rad * math.sin(a)))
        return pts
    return None


def _draw_background(d: ImageDraw.ImageDraw, scene: Scene, size: int) -> None:
    bg = COLOURS[scene.background]
    d.rectangle([0, 0, size, size], fill=bg)
    if scene.pattern == "plain":
        return
    pc = pattern_colour(bg)
    p = PERIOD * size / IMAGE_SIZE
    n = int(size / p) + 1
    for i in range(n):
        for j in range(n):
            x, y = j * p, i * p
            if scene.pattern == "stripes" and j == 0:
                d.rectangle([0, y, size, y + p / 2 - 1], fill=pc)
            elif scene.pattern == "dots":
                d.ellipse([x + p * 0.25, y + p * 0.25, x + p * 0.75, y + p * 0.75], fill=pc)
            elif scene.pattern == "checkered":  # two of the four quarter cells of each period
                d.rectangle([x, y, x + p / 2 - 1, y + p / 2 - 1], fill=pc)
                d.rectangle([x + p / 2, y + p / 2, x + p - 1, y + p - 1], fill=pc)


def _draw_girl(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float, dress: tuple[int, int, int]) -> None:
    d.polygon([(cx, cy - 0.1 * r), (cx - r, cy + r), (cx + r, cy + r)], fill=dress)  # dress
    d.ellipse([cx - 0.62 * r, cy - r, cx + 0.62 * r, cy + 0.2 * r], fill=HAIR)  # hair behind the head
    d.ellipse([cx - 0.5 * r, cy - 0.8 * r, cx + 0.5 * r, cy + 0.2 * r], fill=SKIN)  # face
    d.pieslice([cx - 0.6 * r, cy - r, cx + 0.6 * r, cy - 0.3 * r], 180, 360, fill=HAIR)  # fringe
    for ex in (-0.22, 0.22):  # eyes
        d.ellipse([cx + (ex - 0.07) * r, cy - 0.4 * r, cx + (ex + 0.07) * r, cy - 0.22 * r], fill=(30, 30, 40))


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB picture of ``size`` pixels (drawn at 4x, then box-filtered down)."""
    big = size * _SUPER
    img = Image.new("RGB", (big, big))
    d = ImageDraw.Draw(img)
    _draw_background(d, scene, big)
    k = big / IMAGE_SIZE
    cx, cy, r = (IMAGE_SIZE / 2 + scene.dx) * k, (IMAGE_SIZE / 2 + scene.dy) * k, _RADIUS[scene.size] * k
    fill = COLOURS[scene.colour]
    if scene.figure == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.figure == "girl":
        _draw_girl(d, cx, cy, r, fill)
    else:
        poly = figure_polygon(scene.figure, cx, cy, r)
        if poly is None:
            raise ValueError(f"unknown figure {scene.figure!r}")
        d.polygon(poly, fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def with_change(scene: Scene, **changes: str | int) -> Scene:
    """The same scene with one attribute changed (copy-machine pairs)."""
    return replace(scene, **changes)  # type: ignore[arg-type]
