"""Scan an image folder (root/<class>/<image>) into a ``DatasetIndex``.

Order and labels match torchvision's ``ImageFolder`` so ids and labels agree with
the usual ImageNet tooling: classes are the sorted names of the directories in the
root, and each class directory is walked recursively (symlinks followed, each real
directory once, so a symlink loop ends) with directories and file names sorted.
Extensions .jpg .jpeg .png .webp .gif, any case (an animated GIF/WebP/PNG gives its
first frame). A file name that is not valid UTF-8 cannot be stored in the index:
it is a failure ("file name is not valid UTF-8"), listed with its undecodable bytes
shown as backslash escapes; a dangling symlink is a failure too.
One deliberate difference: hidden directories (name starting with ".") are not
classes, so editor folders and the demo writer's temporary directory never become one.

Checking every image is the expensive part, so there are three levels:
``check="stat"`` only stats each file (missing and zero-byte files fail; at tens of
millions of samples the header check's open and read per file is the cost of prepare);
``check="header"`` (default) reads only enough to catch zero-byte files, non-images,
PNG files with bad chunks (Pillow's verify reads them whole) and JPEGs without an
end-of-image marker in their last 64 KiB (the usual truncated download). A truncated
WebP or a subtly damaged JPEG body passes it and is reported later, when decoded.
``check="full"`` decodes every image exactly as training will (``load_rgb``); use it
for small sets, the demo set uses it. The checks take a path or a ``TarMember`` (an
image inside a tar shard, ``fae_pipe.data.tar_members``), so the caption sources
(``fae_pipe.data.captions``) reuse them unchanged.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fae_pipe.data.index import DatasetIndex, stratified_holdout
from fae_pipe.data.tar_members import TarMember
from fae_pipe.data.transforms import ImageDecodeError, as_source, load_rgb, open_source, source_size
from fae_pipe.errors import UserError
from fae_pipe.phases import phase

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")
CHECKS = ("stat", "header", "full")
ON_ERROR = ("skip", "fail")
_JPEG_TAIL = 64 * 1024
_BLOCK = 2048
_CHUNK = {"stat": 256, "header": 8, "full": 1}


def list_classes(root: Path) -> list[str]:
    """Class names: the sorted, non-hidden directory names directly under ``root``."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def list_images(root: Path, classes: list[str]) -> tuple[list[str], list[int]]:
    """(paths relative to root in posix form, labels) of every image, in ImageFolder order.

    Two flat lists, not a list of (path, label) tuples: at ImageNet's 1.28M files the
    tuples alone would be ~70 MB more, held through the whole scan.
    """
    rels, labels = [], []
    seen: set[tuple[int, int]] = set()
    for label, name in enumerate(classes):
        class_dir = root / name
        for dirpath, _, filenames in sorted(_walk_once(class_dir, seen)):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    rels.append(f"{rel_dir}/{fname}")
                    labels.append(label)
    return rels, labels


def _walk_once(top: Path, seen: set):
    """``os.walk(top, followlinks=True)`` entering each real directory once (a symlink loop ends)."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        yield dirpath, dirnames, filenames


def printable(rel: str) -> str:
    """A path as the user can read it: undecodable bytes of a non-UTF-8 name as backslash escapes."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def name_problem(path: Path | TarMember) -> str | None:
    """Why a file cannot be indexed before it is even opened (bad name, dangling symlink), or None."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (the index cannot store it): rename the file"
    if isinstance(path, Path) and path.is_symlink() and not path.exists():
        return f"dangling symlink (its target {printable(os.readlink(path))!r} does not exist)"
    return None


def sized(path: Path | TarMember) -> tuple[str | None, int]:
    """(failure reason or None, size in bytes): the file exists and is not empty."""
    try:
        size = source_size(path)
    except OSError as e:
        return f"unreadable: {e.strerror or e}", 0
    return ("zero-byte file", 0) if size == 0 else (None, size)


def check_stat(path: Path | TarMember) -> str | None:
    """Cheapest check: the file exists and is not empty; returns a failure reason or None."""
    return sized(path)[0]


def check_header(path: Path | TarMember) -> str | None:
    """Cheap check; returns a failure reason or None (see module docstring for its reach)."""
    if (reason := check_stat(path)) is not None:
        return reason
    size = source_size(path)
    try:
        with open_source(path) as f:
            with Image.open(f) as img:
                fmt = img.format
                img.verify()
            if fmt == "JPEG":
                f.seek(max(0, size - _JPEG_TAIL))
                if b"\xff\xd9" not in f.read():
                    return "truncated or corrupt image: JPEG end-of-image marker missing"
    except UnidentifiedImageError:
        return "not an image"
    except Image.DecompressionBombError as e:
        return f"image too large: {e}"
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        return f"truncated or corrupt image: {e}"
    return None


def check_full(path: Path | TarMember) -> str | None:
    """Decode the whole image as training will; returns a failure reason or None."""
    try:
        load_rgb(path)
    except ImageDecodeError as e:
        return e.reason
    return None


def _checked(paths, total: int, check: str, workers: int, progress: bool):
    """Yield (reason or None, size) per path of the iterable ``paths``, in order; threads overlap I/O and decoding.

    ``paths`` is consumed ``_BLOCK`` at a time, so 1.28M files never exist as 1.28M Path objects at once.
    """
    from itertools import islice

    from tqdm import tqdm

    fn = {"stat": None, "header": check_header, "full": check_full}[check]

    def one(p: Path | TarMember):  # the stat level is one lstat + one stat per file (a tar member: none)
        p = as_source(p)
        reason = name_problem(p)
        reason, size = (reason, 0) if reason else sized(p)
        if reason is None and fn is not None:
            reason = fn(p)
        return reason, (size if reason is None else 0)

    bar = tqdm(total=total, desc=f"checking images ({check})", unit="img",
               disable=None if progress else True, leave=False)
    try:
        if workers > 1:
            step = _CHUNK[check]  # files per thread task: a stat is cheaper than a future
            with ThreadPoolExecutor(max_workers=workers) as pool:
                paths = iter(paths)
                while block := list(islice(paths, _BLOCK)):  # bounded: no million pending futures
                    chunks = [block[k:k + step] for k in range(0, len(block), step)]
                    for results in pool.map(lambda chunk: [one(p) for p in chunk], chunks):
                        bar.update(len(results))
                        yield from results
        else:
            for p in paths:
                bar.update()
                yield one(p)
    finally:
        bar.close()


def scan_folder(root, holdout_fraction: float, seed: int, on_error: str = "skip", check: str = "header",
                workers: int = 0, progress: bool = False) -> DatasetIndex:
    """Index the image folder ``root``; unreadable images are skipped (and listed) or fatal.

    ``on_error="skip"`` leaves failed files out of the samples and records each in
    ``failures`` as {"path", "reason"}; ``"fail"`` raises ``UserError`` at the first one.
    """
    if on_error not in ON_ERROR:
        raise UserError(f"data.on_error = {on_error!r} is invalid: expected one of {', '.join(ON_ERROR)}")
    if check not in CHECKS:
        raise UserError(f"image check {check!r} is invalid: expected one of {', '.join(CHECKS)}")
    root_str = str(root)
    root = Path(root)
    if not root.exists():
        raise UserError(f"data.root '{root_str}' does not exist: point it at an image folder "
                        f"root/<class>/<image> (or set data.demo=true for the offline demo set)")
    if not root.is_dir():
        raise UserError(f"data.root '{root_str}' is not a directory: expected root/<class>/<image>")
    classes = list_classes(root)
    if not classes:
        raise UserError(f"data.root '{root_str}' holds no class directories: expected root/<class>/<image>")
    with phase("scan: list files"):
        rels, found_labels = list_images(root, classes)
    if not rels:
        raise UserError(f"data.root '{root_str}' holds no images ({' '.join(IMAGE_EXTENSIONS)}) "
                        f"in its {len(classes)} class directories")
    found = set(found_labels)
    empty = [c for i, c in enumerate(classes) if i not in found]
    if empty:
        raise UserError(f"class directory '{root / empty[0]}' holds no images ({' '.join(IMAGE_EXTENSIONS)}); "
                        f"remove it or add images ({len(empty)} such class directories)")

    results = _checked((root / rel for rel in rels), len(rels), check, workers, progress)
    with phase("scan: check images"):
        paths, labels, sizes, failures = _keep_readable(rels, found_labels, results, root, on_error)
    if not paths:
        raise UserError(f"data.root '{root_str}': none of its {len(rels)} images could be read "
                        f"(first: {failures[0]['path']}: {failures[0]['reason']})")
    labels = np.asarray(labels, dtype=np.int64)
    with phase("scan: split + fingerprint"):
        holdout = stratified_holdout(paths, labels, holdout_fraction, seed)
        return DatasetIndex(root=root_str, classes=classes, paths=paths, labels=labels, sizes=sizes,
                            holdout=holdout, seed=seed, holdout_fraction=holdout_fraction, failures=failures)


def _keep_readable(rels, found_labels, results, root: Path, on_error: str):
    """Split the checked files into the indexed (paths, labels, sizes) and the failures."""
    paths, labels, sizes, failures = [], [], [], []
    for rel, label, (reason, size) in zip(rels, found_labels, results):
        if reason is None:
            paths.append(rel)
            labels.append(label)
            sizes.append(size)
        elif on_error == "fail":
            results.close()
            raise refusal(printable(str(root / rel)), reason)
        else:
            failures.append({"path": printable(rel), "reason": reason})
    return paths, labels, sizes, failures


def refusal(shown: str, reason: str) -> UserError:
    """The error of ``data.on_error=fail`` at the first sample that cannot be indexed."""
    return UserError(f"image '{shown}': {reason} (data.on_error=fail; use data.on_error=skip to leave such files out)")
