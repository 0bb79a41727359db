"""The caption demo set and its oracle: captions say what the pixels show, and the oracle reads it back."""

import json

import numpy as np
import pytest
from PIL import Image

from fae_pipe.data.caption_demo import HELD_OUT, caption, render, scene, write_caption_demo
from fae_pipe.errors import UserError
from fae_pipe.metrics.oracle import accuracy, measure


def test_oracle_reads_the_real_images_back():
    scenes = [scene(i, 64, 3) for i in range(300)]
    acc = accuracy([render(s, 64) for s in scenes], scenes)
    assert acc["colour"] == 1.0 and acc["shape"] >= 0.97 and acc["count"] >= 0.97


def test_oracle_is_not_fooled_by_wrong_targets():
    s = scene(0, 64, 0)
    img = render(s, 64)
    wrong = dict(s, colour=next(c for c in ("red", "blue") if c != s["colour"]))
    assert accuracy([img], [wrong])["colour"] == 0.0
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert measure(flat) == {"colour": None, "shape": None, "count": 0}


def test_oracle_shape_tie_goes_to_the_larger_area_whatever_the_order():
    """One square and one circle: a tie of votes, which set order once broke (differently per PYTHONHASHSEED)."""
    yy, xx = np.mgrid[0:64, 0:64]

    def two(square: int, radius: int) -> np.ndarray:
        img = np.full((64, 64, 3), 15, np.uint8)
        img[8:8 + square, 8:8 + square] = (220, 40, 40)
        img[(yy - 44) ** 2 + (xx - 44) ** 2 <= radius ** 2] = (220, 40, 40)
        return img

    assert measure(two(18, 6)) == {"colour": "red", "shape": "square", "count": 2}
    assert measure(two(6, 12)) == {"colour": "red", "shape": "circle", "count": 2}


def test_held_out_pairs_keep_every_colour_and_shape_seen():
    seen = {(c, s) for c in ("red", "green", "blue", "yellow", "magenta", "cyan")
            for s in ("circle", "square", "triangle")} - HELD_OUT
    assert {c for c, _ in seen} == {c for c, _ in HELD_OUT} and {s for _, s in seen} == {s for _, s in HELD_OUT}


def test_written_set_is_deterministic_and_matches_its_manifest(tmp_path):
    root = write_caption_demo(tmp_path / "demo", n=40, size=32, seed=1)
    rows = [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and len({r["path"] for r in rows}) == 40
    r = rows[7]
    assert r["captions"][0] == caption(r["colour"], r["shape"], r["count"], r["background"])
    assert len(r["captions"]) == 3 and r["heldout"] == ((r["colour"], r["shape"]) in HELD_OUT)
    img = np.asarray(Image.open(root / r["path"]))
    assert np.array_equal(img, render(scene(7, 32, 1), 32))
    again = write_caption_demo(tmp_path / "again", n=40, size=32, seed=1)
    assert (again / "manifest.jsonl").read_bytes() == (root / "manifest.jsonl").read_bytes()
    assert (again / r["path"]).read_bytes() == (root / r["path"]).read_bytes()
    mtime = (root / "manifest.jsonl").stat().st_mtime_ns
    write_caption_demo(root, n=40, size=32, seed=1)  # identical: left alone
    assert (root / "manifest.jsonl").stat().st_mtime_ns == mtime


def test_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a caption demo set"):
        write_caption_demo(tmp_path, n=4, size=32)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
