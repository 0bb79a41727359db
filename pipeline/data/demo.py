"""The offline demo data set: procedurally drawn, class-labelled images on disk.

The pipeline must run end to end with no network and no ImageNet, so ``prepare``
can write a small image folder whose classes are easy to tell apart by shape,
colour and texture, yet with per-image random position, scale, rotation,
background gradient, colour jitter and noise so that nothing is a copy of anything.
The files are real PNGs and JPEGs (every fourth image is a JPEG) read through the
same loader as any user folder.

Class ``c`` combines shape ``c % 10`` with colour ``(c % 10 + c // 10) % 10`` and,
from class 100 on, a class-specific background tint ``c // 100``, so every class up
to 1000 is a distinct combination. The first ten are red circles, blue squares,
green triangles, yellow stripes, magenta checkerboards, cyan rings, orange crosses,
purple dots, white gradients and pink stars.

Determinism: class ``c`` draws its images in order from ``numpy.random.default_rng(
[seed, c])``, so the same parameters give the same bytes on every run (same
numpy/Pillow/zlib builds), other classes never shift, and raising ``per_class``
leaves the earlier images as they were. Shapes are rasterised at twice the size and box-averaged (anti-aliasing).
The set is built in a hidden sibling directory and renamed into place, with a
marker file written last; a complete set with the same parameters is left alone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from fae_pipe.errors import UserError

MARKER = ".fae-demo.json"
GENERATOR = "fae-pipe-demo/1"
SHAPES = ("circle", "square", "triangle", "stripes", "checker", "rings", "cross", "dots", "gradient", "star")
COLOURS = (("red", (220, 40, 40)), ("blue", (40, 80, 230)), ("green", (40, 190, 60)),
           ("yellow", (235, 210, 40)), ("magenta", (210, 50, 200)), ("cyan", (40, 210, 220)),
           ("orange", (245, 140, 30)), ("purple", (130, 60, 200)), ("white", (240, 240, 240)),
           ("pink", (250, 150, 180)))


def _shape_alpha(shape: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Coverage in [0, 1] of ``shape`` at local coordinates (unit radius, already rotated)."""
    rho = np.hypot(u, v)
    disc = rho <= 1.0
    if shape == "circle":
        m = disc
    elif shape == "square":
        m = np.maximum(abs(u), abs(v)) <= 0.8
    elif shape == "triangle":
        m = np.ones_like(disc)
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3
            m &= u * np.cos(a) + v * np.sin(a) >= -0.5
    elif shape == "stripes":
        m = disc & (np.sin(u * np.pi * rng.uniform(2.5, 4.0)) > 0)
    elif shape == "checker":
        n = rng.uniform(2.0, 3.0)
        m = (np.maximum(abs(u), abs(v)) <= 0.85) & ((np.floor(u * n) + np.floor(v * n)) % 2 == 0)
    elif shape == "rings":
        m = disc & (np.floor(rho * rng.uniform(3.0, 4.5)) % 2 == 0)
    elif shape == "cross":
        m = ((abs(u) <= 0.25) & (abs(v) <= 0.95)) | ((abs(v) <= 0.25) & (abs(u) <= 0.95))
    elif shape == "dots":
        n = rng.uniform(2.5, 3.5)
        fu, fv = (u * n) % 1.0 - 0.5, (v * n) % 1.0 - 0.5
        m = (rho <= 1.1) & (fu * fu + fv * fv <= 0.09)
    elif shape == "gradient":
        return np.where(disc, np.clip((u + 1.0) / 2.0, 0.0, 1.0), 0.0).astype(np.float32)
    else:  # star: five pointed lobes in polar form
        phi = np.arctan2(v, u)
        m = rho <= 0.38 + 0.62 * ((1.0 + np.cos(5.0 * phi)) / 2.0) ** 2
    return m.astype(np.float32)


def class_spec(c: int) -> tuple[str, tuple[int, int, int], int]:
    """(shape, RGB colour, background style) of class ``c``."""
    shape, variant = c % 10, c // 10
    return SHAPES[shape], COLOURS[(shape + variant) % 10][1], variant // 10


def class_names(classes: int) -> list[str]:
    """Directory names; zero-padded so sorted order equals class order."""
    width = max(2, len(str(classes - 1)))
    names = []
    for c in range(classes):
        shape, variant = c % 10, c // 10
        name = f"{c:0{width}d}_{COLOURS[(shape + variant) % 10][0]}_{SHAPES[shape]}"
        names.append(name + (f"_bg{variant // 10}" if variant >= 10 else ""))
    return names


@lru_cache(maxsize=4)
def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1] of an n x n image (y, x), float32."""
    yy, xx = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / n
    return yy, xx


def _box_half(a: np.ndarray) -> np.ndarray:
    """Average 2 x 2 blocks of a 2-D array (the anti-aliasing step)."""
    return (a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]) * 0.25


def render(c: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Next image of class ``c`` from ``rng``: uint8 (size, size, 3)."""
    shape, colour, style = class_spec(c)
    cx, cy, radius, theta, gdir = (float(a) for a in rng.uniform(
        [0.3, 0.3, 0.18, 0.0, 0.0], [0.7, 0.7, 0.36, 2 * np.pi, 2 * np.pi]))  # python floats keep float32 math
    yy, xx = _grid(2 * size)  # the shape is rasterised at 2x and box-averaged
    dx, dy = (xx - cx) / radius, (yy - cy) / radius
    cos, sin = math.cos(theta), math.sin(theta)
    alpha = _box_half(_shape_alpha(shape, cos * dx + sin * dy, cos * dy - sin * dx, rng))[..., None]

    if style:
        base = 0.35 * np.asarray(COLOURS[(style + 4) % 10][1], np.float32) + rng.uniform(0, 30, size=3)
    else:
        base = rng.uniform(0, 110, size=3)
    yy, xx = _grid(size)
    ramp = (math.cos(gdir) * xx + math.sin(gdir) * yy)[..., None] - 0.5
    background = (base + rng.uniform(20, 60) * ramp).astype(np.float32)
    foreground = (np.asarray(colour) + rng.normal(0, 15, size=3)).astype(np.float32)
    img = background + (foreground - background) * alpha
    img += float(rng.uniform(3.0, 10.0)) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_class(c: int, count: int, size: int, seed: int):
    """Yield images 0..count-1 of class ``c``; they draw from one stream seeded by (seed, c)."""
    rng = np.random.default_rng([seed, c])
    for _ in range(count):
        yield render(c, size, rng)


def _params(classes: int, per_class: int, size: int, seed: int) -> dict:
    return {"generator": GENERATOR, "classes": int(classes), "per_class": int(per_class),
            "size": int(size), "seed": int(seed)}


def demo_is_complete(root, classes: int = 10, per_class: int = 200, size: int = 64, seed: int = 0) -> bool:
    """True when ``root`` holds a finished demo set made with exactly these parameters."""
    root = Path(root)
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker != _params(classes, per_class, size, seed):
        return False
    for name in class_names(classes):
        d = root / name
        if not d.is_dir() or len(os.listdir(d)) != per_class:
            return False
    return True


def _write_class(out: Path, c: int, name: str, per_class: int, size: int, seed: int) -> None:
    width = max(4, len(str(per_class - 1)))
    (out / name).mkdir()
    for i, arr in enumerate(render_class(c, per_class, size, seed)):
        img = Image.fromarray(arr, "RGB")
        if i % 4 == 3:
            img.save(out / name / f"{i:0{width}d}.jpg", format="JPEG", quality=90, optimize=False)
        else:
            img.save(out / name / f"{i:0{width}d}.png", format="PNG", compress_level=1, optimize=False)


def _write_all(out: Path, classes: int, per_class: int, size: int, seed: int) -> None:
    """Classes in parallel threads (numpy and Pillow's encoders release the GIL); output is order-free."""
    with ThreadPoolExecutor(max_workers=min(classes, os.cpu_count() or 1)) as pool:
        jobs = [pool.submit(_write_class, out, c, name, per_class, size, seed)
                for c, name in enumerate(class_names(classes))]
        for job in jobs:
            job.result()


def _clean_stale_temps(root: Path) -> None:
    """Remove temporary siblings left by killed writers (their process no longer exists)."""
    prefix = f".{root.name}.tmp-"
    for p in root.parent.glob(prefix + "*"):
        try:
            pid = int(p.name[len(prefix):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            continue


def write_demo(root, classes: int = 10, per_class: int = 200, size: int = 64, seed: int = 0) -> Path:
    """Write the demo image folder ``root/<class>/<file>`` unless an identical one is there.

    Refuses (``UserError``) to replace a non-empty directory that is not a demo set.
    """
    root = Path(root)
    if demo_is_complete(root, classes, per_class, size, seed):
        return root
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / MARKER).exists())):
        raise UserError(f"data.root '{root}' exists and is not a demo set written by fae-pipe (no {MARKER}): "
                        f"refusing to overwrite it; use an empty or new data.root with data.demo=true")
    root.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_temps(root)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_all(tmp, classes, per_class, size, seed)
        (tmp / MARKER).write_text(json.dumps(_params(classes, per_class, size, seed), indent=1) + "\n")
        if root.exists():  # an empty directory or an older demo set: move it aside, then drop it
            old = root.parent / f".{root.name}.tmp-{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not demo_is_complete(root, classes, per_class, size, seed):
                raise  # another writer won the race only if it left an identical set
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
