"""The offline text-to-image demo set: procedural scenes whose captions mean something.

Each image is a scene of 1-3 objects of one colour and one shape on a plain background,
and its captions are generated from exactly those attributes ("two red circles on a
black background"), so a text-conditioned generator can be checked without any
pretrained network: the oracle in ``fae_pipe.metrics.oracle`` measures colour, shape
and count back from the pixels.

Compositional generalisation: the colour-shape pairs in ``HELD_OUT`` never appear in
the training split (each colour and each shape does appear, with other partners), so
the oracle accuracy on held-out prompts measures whether the model composes attributes
it learned separately. Held-out scenes are still written (flagged ``heldout``): they are
the reference images for FD on held-out captions.

Layout written (the "manifest" source of the caption index): ``images/<id>.png`` and
``manifest.jsonl`` with one row per image: ``path``, ``captions`` (three phrasings, as
COCO has several per image), the attributes and ``heldout``; and ``prompts.jsonl``, the
evaluation prompts (``prompt_set``): every colour-shape pair, seen and held out, with
the attributes the oracle checks. Built in a temporary
sibling and renamed into place (``artifacts.atomic_write_dir``), with the parameters recorded in the manifest's marker;
an identical set is left alone. Deterministic: scene ``i`` draws from
``default_rng([seed, i])``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from fae_pipe.artifacts import atomic_write_dir
from fae_pipe.errors import UserError

GENERATOR = "fae-pipe-caption-demo/2"  # /2: prompts.jsonl written too
MARKER = ".fae-caption-demo.json"
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235),
           "yellow": (235, 215, 40), "magenta": (215, 50, 205), "cyan": (40, 215, 225)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
# one held-out shape per colour pair, a Latin-square pattern: every colour and shape is seen in training
HELD_OUT = frozenset({("red", "triangle"), ("green", "circle"), ("blue", "square"),
                      ("yellow", "triangle"), ("magenta", "circle"), ("cyan", "square")})
TEMPLATES = ("{count} {colour} {shapes} on a {background} background",
             "a {background} background with {count} {colour} {shapes}",
             "{count} {shapes}, {colour}, over {background}")


def caption(colour: str, shape: str, count: int, background: str, template: int = 0) -> str:
    """The caption of a scene; ``template`` picks one of the phrasings."""
    shapes = shape if count == 1 else shape + "s"
    return TEMPLATES[template].format(count=COUNTS[count - 1], colour=colour, shapes=shapes, background=background)


def _mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Coverage of one object, rasterised at 4x and box-averaged (anti-aliased edges)."""
    n = 4 * size
    yy, xx = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / 4
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        m = dx * dx + dy * dy <= r * r
    elif shape == "square":  # axis-aligned, the same area as the circle would look too small
        m = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    else:  # upright triangle
        m = (dy <= 0.8 * r) & (dy >= -r + 1.8 * np.abs(dx))
    return m.reshape(size, 4, size, 4).mean(axis=(1, 3))


def scene(i: int, size: int, seed: int) -> dict:
    """Attributes and object placements of scene ``i``: 1-3 non-overlapping objects."""
    rng = np.random.default_rng([seed, i])
    colour = str(rng.choice(list(COLOURS)))
    shape, background = str(rng.choice(SHAPES)), str(rng.choice(list(BACKGROUNDS)))
    count = int(rng.integers(1, 4))
    r = size * float(rng.uniform(0.10, 0.15))
    objects: list[tuple[float, float]] = []
    while len(objects) < count:  # rejection sampling; 1-3 objects of this size always fit
        cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
        if all((cx - ox) ** 2 + (cy - oy) ** 2 > (2.6 * r) ** 2 for ox, oy in objects):
            objects.append((float(cx), float(cy)))
    return {"colour": colour, "shape": shape, "count": count, "background": background, "radius": r,
            "objects": objects, "heldout": (colour, shape) in HELD_OUT, "noise": float(rng.uniform(2, 6)),
            "noise_seed": int(rng.integers(2**31))}


def render(s: dict, size: int) -> np.ndarray:
    """uint8 (size, size, 3) image of a scene."""
    alpha = np.zeros((size, size), np.float32)
    for cx, cy in s["objects"]:
        alpha = np.maximum(alpha, _mask(s["shape"], size, cx, cy, s["radius"]))
    bg, fg = np.asarray(BACKGROUNDS[s["background"]], np.float32), np.asarray(COLOURS[s["colour"]], np.float32)
    img = bg + (fg - bg) * alpha[..., None]
    img += s["noise"] * np.random.default_rng(s["noise_seed"]).standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def prompt_set(per_pair: int = 2) -> list[dict]:
    """Evaluation prompts: ``per_pair`` for each of the 18 colour-shape pairs (12 seen, 6 held out).

    Count and background cycle over the pairs so every value appears; the caption is the
    first template's. Rows carry the attributes (``colour``, ``shape``, ``count``,
    ``background``, ``heldout``) the oracle compares a generated image with.
    """
    rows, k = [], 0
    for colour in COLOURS:
        for shape in SHAPES:
            for _ in range(per_pair):
                count, background = 1 + k % len(COUNTS), list(BACKGROUNDS)[(k // len(COUNTS)) % len(BACKGROUNDS)]
                rows.append({"prompt": caption(colour, shape, count, background), "colour": colour, "shape": shape,
                             "count": count, "background": background, "heldout": (colour, shape) in HELD_OUT})
                k += 1
    return rows


def _params(n: int, size: int, seed: int) -> dict:
    return {"generator": GENERATOR, "images": int(n), "size": int(size), "seed": int(seed)}


def write_caption_demo(root, n: int = 2000, size: int = 64, seed: int = 0) -> Path:
    """Write ``root/images/*.png`` and ``root/manifest.jsonl`` unless an identical set is there."""
    root = Path(root)
    marker = root / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == _params(n, size, seed):
        return root
    if root.exists() and any(root.iterdir()) and not marker.exists():
        raise UserError(f"data.root '{root}' exists and is not a caption demo set written by fae-pipe "
                        f"(no {MARKER}): refusing to overwrite it; use an empty or new directory")

    def write(tmp: Path) -> None:
        (tmp / "images").mkdir()
        width = len(str(n - 1))
        with open(tmp / "manifest.jsonl", "w", encoding="utf-8") as out:
            for i in range(n):
                s = scene(i, size, seed)
                rel = f"images/{i:0{width}d}.png"
                Image.fromarray(render(s, size), "RGB").save(tmp / rel, format="PNG", compress_level=1)
                caps = [caption(s["colour"], s["shape"], s["count"], s["background"], k) for k in range(len(TEMPLATES))]
                row = {"path": rel, "captions": caps, "colour": s["colour"], "shape": s["shape"],
                       "count": s["count"], "background": s["background"], "heldout": s["heldout"]}
                out.write(json.dumps(row) + "\n")
        (tmp / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompt_set()), encoding="utf-8")
        (tmp / MARKER).write_text(json.dumps(_params(n, size, seed)) + "\n")

    atomic_write_dir(root, write)
    return root
