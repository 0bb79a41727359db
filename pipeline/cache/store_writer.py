"""The coordinator's side of a store's life: open-or-create under the lock, then finalise.

Only the coordinating process touches group attrs (workers write shard data and
completion records only). A store whose ``config_hash`` differs from the current
settings is refused unless ``overwrite`` (then its content is replaced); a store
with a matching hash is resumed.
"""

from __future__ import annotations

import sys
from typing import Callable

import zarr

from fae_pipe import __version__
from fae_pipe.cache import schema
from fae_pipe.cache.bookkeeping import check_held_locks, remove_stray_files
from fae_pipe.cache.location import StoreLocation
from fae_pipe.errors import UserError


def open_or_create(path, config_hash: str, create: Callable[[], zarr.Group], overwrite: bool,
                   option: str = "--overwrite") -> tuple[zarr.Group, bool]:
    """Return ``(group, resumed)``; call with the store lock held.

    ``create`` builds the empty store (schema.create_*_store); it runs when the store is
    new, was left half-created (no config_hash yet), or is replaced under ``overwrite``.
    """
    loc = StoreLocation.of(path)  # a local directory or a URL (``cache.location``)
    path = loc.local if loc.is_local else loc.url
    if loc.exists("zarr.json"):
        try:
            group = schema.open_group(path, "r+")
            existing = group.attrs.get(schema.A_CONFIG_HASH)
        except Exception:  # an unreadable hierarchy is replaced like a mismatching one
            group, existing = None, "<unreadable>"
        if existing == config_hash:
            removed = remove_stray_files(path)
            if removed:
                print(f"note: removed {removed} stray temp file(s) left by an interrupted writer in {path}",
                      file=sys.stderr)
            return group, True
        if existing is not None and not overwrite:
            raise UserError(f"store {path} was made with a different config (config_hash {str(existing)[:12]} "
                            f"!= {config_hash[:12]}); pass {option} to replace it, or choose another path")
        if existing is not None:
            print(f"note: {option}: replacing store {path} (config_hash {str(existing)[:12]})", file=sys.stderr)
    elif any(name != schema.BOOKKEEPING_DIR for name in loc.top_level()):
        if not overwrite:
            raise UserError(f"{path} exists and is not a fae-pipe store; pass {option} to replace it, "
                            "or choose another path")
    group = create()
    group.attrs.update({schema.A_CONFIG_HASH: config_hash, schema.A_CREATED_WITH: f"fae-pipe {__version__}"})
    return group, False


def mark_incomplete(group: zarr.Group) -> None:
    """Clear ``complete`` before writing: a store being (re)written is not complete."""
    if group.attrs.get(schema.A_COMPLETE) is not False:
        group.attrs[schema.A_COMPLETE] = False


def finalize(group: zarr.Group, failures: list[dict], extra_attrs: dict | None = None) -> None:
    """Mark a store complete: all shards have matching records. One attrs write, refused when this
    process's store lock was lost (an object-store lease taken over by another writer)."""
    check_held_locks()
    attrs = {schema.A_COMPLETE: True, schema.A_FAILURES: failures}
    attrs.update(extra_attrs or {})
    group.attrs.update(attrs)
