"""Image data: demo set, folder scan (order, split, failures), index file, transforms."""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fae_pipe.data.demo import MARKER, class_names, write_demo
from fae_pipe.data.folder import IMAGE_EXTENSIONS, scan_folder
from fae_pipe.data.index import holdout_count, read_index, write_index
from fae_pipe.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, ImageDecodeError, adm_center_crop, apply_view,
                                      encoder_input, load_pixels, load_rgb)
from fae_pipe.errors import UserError


def save(path: Path, arr, fmt: str = "PNG", mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = arr if isinstance(arr, Image.Image) else Image.fromarray(np.asarray(arr), mode)
    img.save(path, format=fmt, **kw)
    return path


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def tree_bytes(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- demo set

def test_demo_is_deterministic_complete_and_mixed_format(tmp_path):
    a = write_demo(tmp_path / "a", classes=3, per_class=6, size=32, seed=1)
    b = write_demo(tmp_path / "b", classes=3, per_class=6, size=32, seed=1)
    files_a, files_b = tree_bytes(a), tree_bytes(b)
    assert files_a == files_b
    class_dirs = sorted(p.name for p in a.iterdir() if p.is_dir())
    assert class_dirs == class_names(3) == ["00_red_circle", "01_blue_square", "02_green_triangle"]
    for name in class_dirs:
        files = sorted((a / name).iterdir())
        assert len(files) == 6
        assert {f.suffix for f in files} == {".png", ".jpg"}
        for f in files:
            assert load_rgb(f).size == (32, 32)
    other = tree_bytes(write_demo(tmp_path / "c", classes=3, per_class=6, size=32, seed=2))
    assert sum(files_a[k] != other[k] for k in files_a if k != MARKER) == 18


def test_demo_classes_differ_in_colour_and_beyond_ten(tmp_path):
    root = write_demo(tmp_path / "d", classes=12, per_class=4, size=32, seed=0)
    names = class_names(12)
    assert len({p.name for p in root.iterdir() if p.is_dir()}) == 12
    red = np.stack([np.asarray(load_rgb(p), float) for p in (root / names[0]).iterdir()])
    blue = np.stack([np.asarray(load_rgb(p), float) for p in (root / names[1]).iterdir()])
    assert (red[..., 0] - red[..., 2]).mean() > (blue[..., 0] - blue[..., 2]).mean() + 20
    assert len(set(class_names(1000))) == 1000


def test_demo_idempotent_replaces_other_params_and_refuses_foreign_dirs(tmp_path):
    root = write_demo(tmp_path / "demo", classes=2, per_class=3, size=16)
    probe = root / class_names(2)[0] / "0000.png"
    stamp = (probe.stat().st_ino, probe.stat().st_mtime_ns)
    write_demo(root, classes=2, per_class=3, size=16)
    assert (probe.stat().st_ino, probe.stat().st_mtime_ns) == stamp
    write_demo(root, classes=2, per_class=5, size=16)
    assert len(list((root / class_names(2)[0]).iterdir())) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    foreign = tmp_path / "photos"
    save(foreign / "cat" / "x.png", noise(8, 8))
    with pytest.raises(UserError, match="not a demo set"):
        write_demo(foreign, classes=2, per_class=3, size=16)
    assert (foreign / "cat" / "x.png").exists()


# ---------------------------------------------------------------- folder scan

def test_scan_order_and_labels_match_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    root = tmp_path / "data"
    for i, rel in enumerate(["b_cls/1.png", "b_cls/10.png", "b_cls/2.png", "a_cls/z.png", "a_cls/A.JPG",
                             "a_cls/m.jpeg", "a_cls/sub/x.webp", "a_cls/sub/deeper/y.png", "C_cls/img.PNG"]):
        ext = rel.rsplit(".", 1)[1].lower()
        save(root / rel, noise(8, 8, i), {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
    (root / "a_cls" / "notes.txt").write_text("not an image")
    index = scan_folder(root, 0.0, 0, check="full")
    reference = ImageFolder(str(root), is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS))
    assert index.classes == reference.classes == ["C_cls", "a_cls", "b_cls"]
    assert index.paths == [Path(p).relative_to(root).as_posix() for p, _ in reference.samples]
    assert index.labels.tolist() == [label for _, label in reference.samples]
    assert index.ids.tolist() == list(range(9)) and index.abspath(0) == str(root / "C_cls" / "img.PNG")
    save(root / ".hidden" / "q.png", noise(8, 8))
    assert scan_folder(root, 0.0, 0).classes == ["C_cls", "a_cls", "b_cls"]


def make_tree(root: Path, classes: int = 3, per_class: int = 20) -> Path:
    for c in range(classes):
        for i in range(per_class):
            save(root / f"class{c}" / f"{i:03d}.png", noise(4, 4, c * 1000 + i))
    return root


def test_split_is_deterministic_stratified_and_seeded(tmp_path):
    root = make_tree(tmp_path / "data")
    a = scan_folder(root, 0.25, seed=7)
    b = scan_folder(root, 0.25, seed=7)
    c = scan_folder(root, 0.25, seed=8)
    assert np.array_equal(a.holdout_mask(), b.holdout_mask()) and a.fingerprint == b.fingerprint
    assert not np.array_equal(a.holdout_mask(), c.holdout_mask()) and a.fingerprint != c.fingerprint
    assert np.bincount(a.labels[a.holdout_mask()]).tolist() == [5, 5, 5]
    assert sorted(np.concatenate([a.train_ids(), a.holdout_ids()]).tolist()) == list(range(60))
    assert holdout_count(1, 0.5) == 0 and holdout_count(3, 0.5) == 2 and holdout_count(100, 0.01) == 1


def test_fingerprint_ignores_location_and_mtime_but_not_content(tmp_path):
    root = make_tree(tmp_path / "data", classes=2, per_class=4)
    copy = Path(shutil.copytree(root, tmp_path / "copy", copy_function=shutil.copy))
    first = scan_folder(root, 0.25, 0)
    assert scan_folder(copy, 0.25, 0).fingerprint == first.fingerprint
    save(copy / "class1" / "000.png", noise(6, 6, 99))
    assert scan_folder(copy, 0.25, 0).fingerprint != first.fingerprint


def test_index_roundtrip_and_errors(tmp_path):
    index = scan_folder(make_tree(tmp_path / "data", classes=2, per_class=5), 0.2, 3)
    path = write_index(index, tmp_path / "cache" / "index.json")
    back = read_index(path)
    assert back.paths == index.paths and back.classes == index.classes and back.root == index.root
    assert np.array_equal(back.labels, index.labels) and np.array_equal(back.holdout, index.holdout)
    assert back.fingerprint == index.fingerprint and len(back) == 10
    zero = scan_folder(tmp_path / "data", 0, 0)  # integer fraction: same fingerprint after the JSON trip
    assert read_index(write_index(zero, tmp_path / "zero.json")).fingerprint == zero.fingerprint
    with pytest.raises(UserError, match=r"not found: run `fae-pipe prepare` first"):
        read_index(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        read_index(tmp_path / "bad.json")
    path.write_text(path.read_text().replace('"label":[0', '"label":[1', 1))
    with pytest.raises(UserError, match="fingerprint"):
        read_index(path)


def test_scan_reports_missing_or_empty_roots(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan_folder(tmp_path / "nope", 0.0, 0)
    (tmp_path / "flat").mkdir()
    save(tmp_path / "flat" / "x.png", noise(4, 4))
    with pytest.raises(UserError, match="no class directories"):
        scan_folder(tmp_path / "flat", 0.0, 0)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        scan_folder(tmp_path / "empty", 0.0, 0)


# ---------------------------------------------------------------- decoding

def test_formats_and_modes_load_as_rgb(tmp_path):
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:3, :, 3] = 255
    palette = Image.new("P", (6, 6), 1)
    palette.putpalette([0, 0, 0, 200, 50, 50] + [0] * 762)
    palette.info["transparency"] = 0
    files = {
        "rgb.jpg": save(tmp_path / "rgb.jpg", np.full((6, 6, 3), 200, np.uint8), "JPEG"),
        "rgb.webp": save(tmp_path / "rgb.webp", noise(6, 6), "WEBP", lossless=True),
        "rgba.png": save(tmp_path / "rgba.png", rgba, mode="RGBA"),
        "p.png": save(tmp_path / "p.png", palette),
        "l.png": save(tmp_path / "l.png", np.full((6, 6), 77, np.uint8), mode="L"),
        "la.png": save(tmp_path / "la.png", np.stack([np.full((6, 6), 77, np.uint8)] * 2, -1), mode="LA"),
        "cmyk.jpg": save(tmp_path / "cmyk.jpg", Image.new("CMYK", (6, 6), (0, 0, 0, 0)), "JPEG", quality=100),
        "i16.png": save(tmp_path / "i16.png", Image.fromarray(np.full((6, 6), 0x8000, np.uint16))),
        "bw.png": save(tmp_path / "bw.png", Image.new("1", (6, 6), 1)),
    }
    assert Image.open(files["i16.png"]).mode == "I;16" and Image.open(files["cmyk.jpg"]).mode == "CMYK"
    out = {k: np.asarray(load_rgb(p)) for k, p in files.items()}
    assert all(a.shape == (6, 6, 3) and a.dtype == np.uint8 for a in out.values())
    assert np.array_equal(out["rgb.webp"], noise(6, 6))
    assert (out["rgba.png"][0, 0] == (10, 20, 30)).all() and (out["rgba.png"][5, 5] == 255).all()
    assert (out["p.png"][0, 0] == (200, 50, 50)).all()
    assert (out["l.png"] == 77).all() and (out["i16.png"] == 128).all() and (out["bw.png"] == 255).all()
    assert np.abs(out["cmyk.jpg"].astype(int) - 255).max() <= 3


def broken_files(root: Path) -> dict[str, str]:
    """Writes good and broken images into root/cls; returns {relpath: expected reason fragment}."""
    png = io.BytesIO()
    Image.fromarray(noise(32, 32)).save(png, "PNG")
    jpg = io.BytesIO()
    Image.fromarray(noise(32, 32)).save(jpg, "JPEG")
    save(root / "cls" / "good.png", noise(8, 8))
    save(root / "cls" / "good.jpg", noise(8, 8), "JPEG")
    (root / "cls" / "half.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "cls" / "half.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (root / "cls" / "empty.png").write_bytes(b"")
    (root / "cls" / "text.jpg").write_text("hello, not a jpeg")
    return {"cls/half.png": "truncated or corrupt", "cls/half.jpg": "truncated or corrupt",
            "cls/empty.png": "zero-byte file", "cls/text.jpg": "not an image"}


@pytest.mark.parametrize("check", ["header", "full"])
def test_skip_lists_every_broken_file_and_keeps_good_ones(tmp_path, check):
    expected = broken_files(tmp_path / "data")
    index = scan_folder(tmp_path / "data", 0.0, 0, on_error="skip", check=check, workers=2)
    assert index.paths == ["cls/good.jpg", "cls/good.png"]
    reasons = {f["path"]: f["reason"] for f in index.failures}
    assert set(reasons) == set(expected)
    for path, fragment in expected.items():
        assert fragment in reasons[path]
        with pytest.raises(ImageDecodeError) as err:
            load_rgb(tmp_path / "data" / path)
        assert fragment in err.value.reason and err.value.path.endswith(path.split("/")[1])


def test_fail_mode_names_the_file(tmp_path):
    broken_files(tmp_path / "data")
    with pytest.raises(UserError, match=r"empty\.png': zero-byte file"):
        scan_folder(tmp_path / "data", 0.0, 0, on_error="fail", check="full")


# ---------------------------------------------------------------- transforms

@pytest.mark.parametrize("w,h", [(300, 200), (50, 100), (20, 30), (64, 64)])
def test_adm_crop_is_square(w, h):
    assert adm_center_crop(Image.fromarray(noise(h, w)), 32).size == (32, 32)


def test_adm_crop_halves_with_box_then_centres():
    big = noise(128, 128)
    halved = np.asarray(adm_center_crop(Image.fromarray(big), 64)).astype(int)
    box = big.reshape(64, 2, 64, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(halved - box).max() <= 1
    wide = np.zeros((50, 100, 3), np.uint8)
    wide[:, 25:75] = 255
    crop = np.asarray(adm_center_crop(Image.fromarray(wide), 32))
    assert crop[:, 2:-2].min() >= 250 and crop.shape == (32, 32, 3)


def test_load_pixels_flip_is_exact_mirror(tmp_path):
    path = save(tmp_path / "x.png", noise(40, 60))
    pix = load_pixels(path, 32, ("orig", "flip"))
    assert pix.shape == (2, 32, 32, 3) and pix.dtype == np.uint8
    assert np.array_equal(pix[1], pix[0][:, ::-1])
    assert np.array_equal(load_pixels(path, 32, ("flip",))[0], pix[1])
    with pytest.raises(UserError, match="unknown view"):
        apply_view(pix[0], "rot90")


def test_encoder_input_normalises_and_resizes_deterministically():
    const = np.full((2, 32, 32, 3), 128, np.uint8)
    x = encoder_input(const, 28)
    assert tuple(x.shape) == (2, 3, 28, 28) and str(x.dtype) == "torch.float32"
    expected = (128 / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.abs(x.numpy() - expected[None, :, None, None]).max() < 1e-6
    for src, dst in [(64, 112), (256, 224)]:
        orig = noise(src, src, src)
        both = encoder_input(np.stack([orig, apply_view(orig, "flip")]), dst).numpy()
        assert np.array_equal(both[1], both[0][:, :, ::-1])
    with pytest.raises(ValueError):
        encoder_input(const.astype(np.float32), 28)
    digest = hashlib.sha256(encoder_input(noise(64, 64)[None], 112).numpy().tobytes()).hexdigest()
    assert digest == hashlib.sha256(encoder_input(noise(64, 64)[None], 112).numpy().tobytes()).hexdigest()


# ---- the images users really have (issue #15) -------------------------------------------------

def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    p = save(tmp_path / "c.jpg", Image.new("CMYK", (16, 16), (255, 0, 0, 0)), "JPEG", quality=95)  # cyan ink
    rgb = np.asarray(load_rgb(p))
    assert rgb.shape == (16, 16, 3) and np.abs(rgb.astype(int) - (0, 255, 255)).max() <= 3


def test_sixteen_bit_png_keeps_its_high_byte(tmp_path):
    p = save(tmp_path / "g.png", np.full((8, 8), 0xC0FF, np.uint16))
    with Image.open(p) as img:
        assert img.mode.startswith("I")
    assert np.array_equal(np.asarray(load_rgb(p)), np.full((8, 8, 3), 0xC0, np.uint8))


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90 degrees clockwise
    p = save(tmp_path / "e.jpg", arr, "JPEG", quality=100, exif=exif.tobytes())
    up = np.asarray(load_rgb(p))
    assert up.shape == (40, 20, 3)  # upright: portrait
    assert up[:15].mean() > 200 and up[25:].mean() < 50  # the white half is now on top
    plain = save(tmp_path / "p.jpg", arr, "JPEG", quality=100)
    assert np.asarray(load_rgb(plain)).shape == (20, 40, 3)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), (250, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 250))]
    p = tmp_path / "a.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=40, loop=0)
    rgb = np.asarray(load_rgb(p)).astype(int)
    assert rgb[..., 0].min() > 200 and rgb[..., 2].max() < 40
    assert ".gif" in IMAGE_EXTENSIONS


def test_decompression_bomb_is_a_decode_error_not_a_crash(tmp_path, monkeypatch):
    p = save(tmp_path / "big.png", np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageDecodeError, match="image too large"):
        load_rgb(p)


def test_symlinks_and_bad_names_in_a_folder_scan(tmp_path):
    import os

    root = tmp_path / "root"
    save(root / "a" / "x.png", noise(8, 8))
    save(root / "b" / "y.png", noise(8, 8, 1))
    os.symlink(root / "a" / "x.png", root / "b" / "link.png")
    os.symlink(tmp_path / "gone.png", root / "b" / "dangling.png")
    os.symlink(root / "b", root / "b" / "loop")
    save(Path(os.fsdecode(os.fsencode(root / "b") + b"/n\xe9.png")), noise(8, 8, 2))  # latin-1 name
    index = scan_folder(root, 0.0, 0, on_error="skip", check="full")
    assert index.paths == ["a/x.png", "b/link.png", "b/y.png"]
    reasons = {f["path"]: f["reason"] for f in index.failures}
    assert reasons.keys() == {"b/dangling.png", "b/n\\xe9.png"}
    assert reasons["b/dangling.png"].startswith("dangling symlink") and "UTF-8" in reasons["b/n\\xe9.png"]
    write_index(index, tmp_path / "index.json")  # the JSON index holds only valid text
    assert read_index(tmp_path / "index.json").failures == index.failures
    with pytest.raises(UserError, match=r"dangling\.png': dangling symlink.*data.on_error=fail"):
        scan_folder(root, 0.0, 0, on_error="fail", check="header")
