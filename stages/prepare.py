"""Stage ``prepare``: image folder (or captioned source) -> dataset index (``paths.index``).

``data.source`` picks the reader: the class folder (``fae_pipe.data.folder``) or a
captioned source, a captions folder, a JSONL/CSV/Parquet manifest or WebDataset tar
shards (``fae_pipe.data.captions``), which gives a captioned index.
Optionally writes an offline demo set first: the class demo (``data.demo``) or the
caption demo (``data.caption_demo``, indexed through its manifest). Every image is checked
once here so later stages can trust the index: the demo set is small and gets a full
decode, a user folder gets the cheap header check (see ``fae_pipe.data.folder``).
Unreadable files are skipped and listed, or stop the stage (``data.on_error``).
"""

from __future__ import annotations

import time

import click

from fae_pipe.data.caption_demo import write_caption_demo
from fae_pipe.data.captions import scan_captioned
from fae_pipe.data.demo import demo_is_complete, write_demo
from fae_pipe.data.folder import scan_folder
from fae_pipe.data.index import LARGE_JSON_INDEX, write_index

MAX_LISTED_FAILURES = 20


def run(cfg) -> None:
    d = cfg.data
    start = time.perf_counter()
    if d.demo:
        params = dict(classes=d.demo_classes, per_class=d.demo_per_class, size=d.demo_size, seed=d.seed)
        present = demo_is_complete(d.root, **params)
        root = write_demo(d.root, **params)
        state = "already present" if present else "written"
        click.echo(f"prepare: demo set {state} in {root} ({d.demo_classes} classes x {d.demo_per_class} images, "
                   f"{d.demo_size} px)")
    source, manifest = d.source, d.manifest
    if d.caption_demo:
        root = write_caption_demo(d.root, n=d.caption_demo_images, size=d.demo_size, seed=d.seed)
        source, manifest = "manifest", str(root / "manifest.jsonl")
        click.echo(f"prepare: caption demo set in {root} ({d.caption_demo_images} images, {d.demo_size} px)")
    check = d.check if d.check != "auto" else ("full" if d.demo or d.caption_demo else "header")
    if source == "folder":
        index = scan_folder(d.root, d.holdout_fraction, d.seed, d.on_error, check=check,
                            workers=d.decode_workers, progress=True)
    else:
        index = scan_captioned(source, d.root, manifest, d.holdout_fraction, d.seed, d.on_error, check=check,
                               workers=d.decode_workers, progress=True)
    write_index(index, cfg.paths.index)
    if str(cfg.paths.index).lower().endswith(".json") and len(index) > LARGE_JSON_INDEX:
        click.echo(f"note: {cfg.paths.index} is in the JSON index format, which every stage and dask worker parses "
                   "whole (at 1.28M samples ~1.4 s and ~450 MB per process); a paths.index ending in .npz gets the "
                   "binary format (~0.5 s, ~80 MB)")
    for failure in index.failures[:MAX_LISTED_FAILURES]:
        click.echo(f"skipped {failure['path']}: {failure['reason']}")
    if len(index.failures) > MAX_LISTED_FAILURES:
        click.echo(f"... and {len(index.failures) - MAX_LISTED_FAILURES} more (all listed in {cfg.paths.index})")
    seconds = time.perf_counter() - start
    kind = (f"{len(index.captions.texts)} captions" if index.captions is not None
            else f"{index.num_classes} classes")
    click.echo(f"prepare: {len(index)} images, {kind}, {int(index.holdout.sum())} held out, "
               f"{len(index.failures)} failures -> {cfg.paths.index} (fingerprint {index.fingerprint[:8]}) "
               f"in {seconds:.1f} s")
