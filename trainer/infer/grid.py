"""X/Y grids: one PNG with labelled axes (columns = LoRA strengths, rows = seeds).

Drawn with Pillow's default font so nothing has to be installed or downloaded. Tiny cells (the 64 px test models)
are upscaled with NEAREST to at least `min_cell` px, so the labels fit and the pixels stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive, like PIL crop boxes)

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable since Pillow 10.1
    except TypeError:  # older Pillow: fixed bitmap font
        return ImageFont.load_default()


def cell_scale(width: int, height: int, min_cell: int = 128) -> int:
    """Integer upscale factor that brings the smaller side of a cell to at least `min_cell` px."""
    side = max(1, min(width, height))
    return max(1, -(-min_cell // side))


def fit_cell(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The exact transform the grid applies to each cell (tests use it to compare pixels)."""
    img = img.convert("RGB")
    if img.size == size:
        return img
    return img.resize(size, Image.Resampling.NEAREST)


def strength_label(strength: float) -> str:
    # "strength 1.0" rather than "strength 1": the axis reads as a scale of strengths.
    text = f"{strength:.1f}" if round(strength, 1) == strength else f"{strength:g}"
    return f"strength {text}"


def seed_label(seed: int) -> str:
    return f"seed {seed}"


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    # Greedy word wrap; a long prompt is cut with an ellipsis rather than widening the image.
    words, lines, cur = text.split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if _text_size(draw, trial, font)[0] <= width or not cur:
            cur = trial
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip() + " ..."
    return lines


def make_grid(
    images: Sequence[Sequence[Image.Image]],
    col_labels: Sequence[str],
    row_labels: Sequence[str],
    title: str | None = None,
    min_cell: int = 128,
    gap: int = 4,
) -> tuple[Image.Image, list[Box]]:
    """Lay out images[row][col] with a header per column, a label per row and an optional title.

    Returns the grid and the cell boxes in row-major order (row 0 col 0, row 0 col 1, ...).
    """
    n_rows, n_cols = len(images), len(images[0]) if images else 0
    if n_rows == 0 or n_cols == 0:
        raise ValueError("a grid needs at least one image")
    if any(len(r) != n_cols for r in images):
        raise ValueError("every grid row must have the same number of images")
    if len(col_labels) != n_cols or len(row_labels) != n_rows:
        raise ValueError(f"labels do not match the grid: {n_rows}x{n_cols} cells, "
                         f"{len(row_labels)} row labels, {len(col_labels)} column labels")
    w0, h0 = images[0][0].size
    scale = cell_scale(w0, h0, min_cell)
    cw, ch = w0 * scale, h0 * scale

    font_size = max(12, min(28, cw // 10))
    font = _font(font_size)
    title_font = _font(font_size + 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(4, font_size // 2)
    line_h = _text_size(probe, "Ag", font)[1] + 4

    label_w = max(_text_size(probe, t, font)[0] for t in row_labels) + 2 * pad
    header_h = line_h + 2 * pad
    grid_w = label_w + n_cols * cw + (n_cols - 1) * gap + pad
    title_lines = _wrap(probe, title, title_font, grid_w - 2 * pad) if title else []
    title_h = (len(title_lines) * (line_h + 2) + pad) if title_lines else 0
    grid_h = title_h + header_h + n_rows * ch + (n_rows - 1) * gap + pad

    canvas = Image.new("RGB", (grid_w, grid_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = pad // 2
    for line in title_lines:
        draw.text((pad, y), line, fill=INK, font=title_font)
        y += line_h + 2

    top0 = title_h + header_h
    boxes: list[Box] = []
    for c, text in enumerate(col_labels):
        x = label_w + c * (cw + gap)
        tw, _ = _text_size(draw, text, font)
        draw.text((x + max(0, (cw - tw) // 2), title_h + pad), text, fill=INK, font=font)
    for r, text in enumerate(row_labels):
        y = top0 + r * (ch + gap)
        _, th = _text_size(draw, text, font)
        draw.text((pad, y + max(0, (ch - th) // 2)), text, fill=INK, font=font)
        for c in range(n_cols):
            x = label_w + c * (cw + gap)
            canvas.paste(fit_cell(images[r][c], (cw, ch)), (x, y))
            boxes.append((x, y, x + cw, y + ch))
    return canvas, boxes


def strength_seed_grid(
    images: Sequence[Sequence[Image.Image]],
    strengths: Sequence[float],
    seeds: Sequence[int],
    prompt: str | None = None,
    min_cell: int = 128,
) -> tuple[Image.Image, list[Box]]:
    """The verification grid: rows = seeds, columns = strengths, images[seed index][strength index]."""
    return make_grid(images, [strength_label(s) for s in strengths], [seed_label(s) for s in seeds],
                     title=prompt or None, min_cell=min_cell)


def save_png(img: Image.Image, path: Path) -> Path:
    """Write atomically: a half-written PNG must never be delivered."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path
