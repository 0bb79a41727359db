"""The labelled PNG grid: one row per class, the class name in a strip on the left.

Rows are in the order of the requested classes; each row shows the first
``per_class`` samples of that class in sample order (with round-robin labels these
are the first samples generated, so the grid appears after a short run too). A
class with fewer samples leaves the rest of its row black. Names are drawn with
Pillow's built-in font (no font file needed); a name longer than the strip is cut.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PAD = 2


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType support for sized default fonts
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` cut (with '..') so it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


def make_grid(images: np.ndarray, labels: np.ndarray, classes: list[int], per_class: int,
              names: list[str] | None = None, strip_em: float = 12) -> Image.Image:
    """uint8 images (N, H, W, 3) with labels (N,) -> RGB grid image with a name strip per row.

    Text-to-image grids pass prompt numbers as labels and the prompts as names (one row per
    prompt) with a wider strip (``strip_em``: its cap in font sizes).
    """
    h, w = int(images.shape[1]), int(images.shape[2])
    font_size = max(10, min(24, h // 4))
    font = _font(font_size)
    texts = [f"{c}: {names[c]}" if names is not None and c < len(names) else str(c) for c in classes]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max((measure.textlength(t, font=font) for t in texts), default=0.0)
    strip = int(min(widest, strip_em * font_size)) + 4 * PAD
    rows, cols = len(classes), per_class
    canvas = Image.new("RGB", (strip + cols * (w + PAD) + PAD, rows * (h + PAD) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (c, label) in enumerate(zip(classes, texts)):
        top = PAD + r * (h + PAD)
        text = _fit(draw, label, font, strip - 2 * PAD)
        draw.text((PAD, top + h // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
        members = np.flatnonzero(np.asarray(labels) == c)[:per_class]
        for k in range(cols):
            left = strip + PAD + k * (w + PAD)
            if k < len(members):
                canvas.paste(Image.fromarray(images[members[k]]), (left, top))
            else:
                draw.rectangle((left, top, left + w - 1, top + h - 1), fill=(0, 0, 0))
    return canvas
