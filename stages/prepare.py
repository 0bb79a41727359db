"""Stage ``prepare``: image folder -> dataset index (``paths.index``).

Optionally writes the offline demo set first (``data.demo``). Every image is checked
once here so later stages can trust the index: the demo set is small and gets a full
decode, a user folder gets the cheap header check (see ``fae_pipe.data.folder``).
Unreadable files are skipped and listed, or stop the stage (``data.on_error``).
"""

from __future__ import annotations

import time

import click

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
    check = d.check if d.check != "auto" else ("full" if d.demo else "header")
    index = scan_folder(d.root, d.holdout_fraction, d.seed, d.on_error, check=check,
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
    click.echo(f"prepare: {len(index)} images, {index.num_classes} classes, {int(index.holdout.sum())} held out, "
               f"{len(index.failures)} failures -> {cfg.paths.index} (fingerprint {index.fingerprint[:8]}) "
               f"in {seconds:.1f} s")
