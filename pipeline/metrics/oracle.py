"""An oracle for the caption demo: read colour, shape and count back from the pixels.

Text-to-image quality on the offline demo must be measurable without CLIP or any other
pretrained network (none can be downloaded). The demo's scenes are plain backgrounds
with 1-3 objects of one colour and shape, so the attributes can be measured directly:

* background: the median colour of the image's 1-pixel frame (objects never touch it);
* foreground: pixels farther than ``FOREGROUND_DISTANCE`` from the background in RGB;
  its colour is the mean of the *core* pixels (those beyond 60% of the 95th-percentile
  distance, so anti-aliased edges do not pull it toward the background), named by the
  nearest palette colour;
* count: connected foreground components (8-connectivity) of at least ``MIN_AREA``
  pixels, a tenth of the smallest object the demo draws at 64 px;
* shape: each component's fill of its bounding box, nearest of circle pi/4, square 1
  and triangle 1/2; the majority over components, a tie going to the shape with the larger
  total area (then FILL's order): never to set order, which follows PYTHONHASHSEED and
  made the same images score differently from one process to the next.

On the demo's real images colour is exact and shape and count are >= 0.97
(tests/test_caption_demo.py measures it), which is what makes them usable as a
target for generated images.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fae_pipe.data.caption_demo import COLOURS

FOREGROUND_DISTANCE = 60.0
MIN_AREA_FRACTION = 0.0012  # of the image area: 5 px at 64 px
FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
_PALETTE = np.asarray(list(COLOURS.values()), np.float32)
_NAMES = list(COLOURS)


def measure(image: np.ndarray) -> dict:
    """{"colour", "shape", "count"} of a uint8 (H, W, 3) image; colour/shape None when nothing stands out."""
    img = image.astype(np.float32)
    frame = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    dist = np.linalg.norm(img - np.median(frame, axis=0), axis=-1)
    fg = dist > FOREGROUND_DISTANCE
    labels, n = ndimage.label(fg, structure=np.ones((3, 3)))
    min_area = max(1, int(MIN_AREA_FRACTION * fg.size))
    shapes = []
    for k, box in enumerate(ndimage.find_objects(labels), start=1):
        area = int((labels[box] == k).sum())
        if area >= min_area:
            fill = area / ((box[0].stop - box[0].start) * (box[1].stop - box[1].start))
            shapes.append((min(FILL, key=lambda s: abs(FILL[s] - fill)), area))
    if not shapes:
        return {"colour": None, "shape": None, "count": 0}
    core = dist > 0.6 * np.percentile(dist[fg], 95)
    colour = _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - img[core].mean(axis=0), axis=1)))]
    votes = {s: (sum(n == s for n, _ in shapes), sum(a for n, a in shapes if n == s)) for s in FILL}
    return {"colour": colour, "shape": max(FILL, key=votes.__getitem__), "count": len(shapes)}


def accuracy(images, targets: list[dict]) -> dict:
    """Fraction of images whose measured colour / shape / count / all three match their targets."""
    hits = {"colour": 0, "shape": 0, "count": 0, "all": 0}
    for image, want in zip(images, targets, strict=True):
        got = measure(np.asarray(image))
        ok = {k: got[k] == want[k] for k in ("colour", "shape", "count")}
        for k, v in ok.items():
            hits[k] += v
        hits["all"] += all(ok.values())
    n = max(1, len(targets))
    return {k: v / n for k, v in hits.items()} | {"images": len(targets)}


def by_split(images, prompt_ids, prompts: list[dict]) -> dict | None:
    """Oracle accuracy of generated images against their prompts' attributes, for seen and held-out prompts.

    ``prompt_ids[i]`` is the prompt image ``i`` was generated from; prompts without the
    attributes (a user's own prompts) are not scored. None when no prompt has them.
    """
    keys = ("colour", "shape", "count")
    scored = [i for i, p in enumerate(prompts) if all(k in p for k in keys)]
    if not scored:
        return None
    ids = np.asarray(prompt_ids, np.int64)
    out = {}
    for split, want in (("seen", False), ("heldout", True)):
        chosen = {i for i in scored if bool(prompts[i].get("heldout", False)) == want}
        rows = [r for r, i in enumerate(ids.tolist()) if i in chosen]
        if rows:
            out[split] = accuracy([images[r] for r in rows], [prompts[int(ids[r])] for r in rows]) \
                | {"prompts": len(chosen)}
    out["chance"] = {"colour": 1 / len(_NAMES), "shape": 1 / len(FILL), "count": 1 / 3}
    return out
