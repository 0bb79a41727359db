"""Where a store lives: a local directory or a URL on any fsspec file system (``s3://``, ``gs://``...).

Why one place: every store path (``paths.features``, ``paths.latents``, ``inspect`` /
``verify`` arguments) may be a URL, and the code that writes, locks, records and reads
a store must agree on what the path means. ``StoreLocation.of(path)`` decides once:
a plain path (or ``file://``) is a local directory and everything behaves exactly as
before (zarr's ``LocalStore``, ``os`` files, ``pathlib``); anything else with ``://``
is opened through fsspec, and zarr sees it as a ``zarr.storage.FsspecStore``.

Storage options: ``storage.options`` of the config, a mapping ``protocol -> fsspec
options`` (``{s3: {endpoint_url: "http://minio:9000"}}``), set for the process with
``configure`` by the CLI and shipped with every dask work unit (workers of an external
cluster see the coordinator's options, not their own config). The usual environment
variables still apply underneath (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``GOOGLE_APPLICATION_CREDENTIALS``, fsspec's ``FSSPEC_S3_*``), since the options are
only passed on to the file system class.
"""

from __future__ import annotations

import os
from pathlib import Path

from fae_pipe.errors import UserError

_OPTIONS: dict[str, dict] = {}  # protocol -> fsspec storage options (config storage.options)
DEFAULT_LEASE_SECONDS = 60.0
_LEASE = [DEFAULT_LEASE_SECONDS]  # storage.lease_seconds: object-store writer locks of this process


def lease_seconds() -> float:
    return _LEASE[0]


def configure(options: dict | None, lease: float | None = None) -> None:
    """Set this process's storage options (``{protocol: {option: value}}``; validated here) and,
    when given, the lease of object-store writer locks (``storage.lease_seconds``)."""
    if lease is not None:
        _LEASE[0] = float(lease)
    options = dict(options or {})
    for protocol, opts in options.items():
        if not isinstance(protocol, str) or not isinstance(opts, dict):
            raise UserError(f"config error: storage.options = {options!r} is invalid: expected a mapping of "
                            "protocol -> fsspec options, e.g. {s3: {endpoint_url: 'http://127.0.0.1:9000'}}")
    _OPTIONS.clear()
    _OPTIONS.update({p: dict(o) for p, o in options.items()})


def configured() -> dict[str, dict]:
    """This process's storage options (what a dask work unit carries to its worker)."""
    return {p: dict(o) for p, o in _OPTIONS.items()}


def is_url(path) -> bool:
    """True for a store on an fsspec file system other than the local one."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def options_for(protocol: str) -> dict:
    """The configured options of one protocol (s3 and s3a share them, gs and gcs too)."""
    aliases = {"s3a": "s3", "gcs": "gs"}
    return dict(_OPTIONS.get(protocol) or _OPTIONS.get(aliases.get(protocol, protocol)) or {})


class StoreLocation:
    """A store's root: ``local`` (a Path) or ``url`` + fsspec ``fs`` + ``root`` (the fs path).

    ``key``s are store-relative, ``/``-separated (``.fae/lock``, ``latents/c/0/0/0/0/0``).
    The object methods are what the bookkeeping and readers need; local stores keep
    using ``pathlib`` directly through ``local``.
    """

    def __init__(self, path):
        text = str(path)
        if text.startswith("file://"):
            text = text[len("file://"):]
        if is_url(text):
            self.protocol = text.split("://", 1)[0]
            self.url = text.rstrip("/")
            self.local: Path | None = None
        else:
            self.protocol = "file"
            self.local = Path(text)
            self.url = str(self.local)
        self._fs = None

    @classmethod
    def of(cls, path) -> "StoreLocation":
        return path if isinstance(path, StoreLocation) else cls(path)

    def __str__(self) -> str:
        return self.url

    @property
    def is_local(self) -> bool:
        return self.local is not None

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def canonical(self) -> str:
        """The path handed to other processes: local paths absolute, URLs as given."""
        return str(self.local.resolve()) if self.local is not None else self.url

    @property
    def fs(self):
        """The fsspec file system of a URL store (built once, with the configured options)."""
        if self._fs is None:
            import fsspec

            # no listings cache: other processes (workers, other nodes) write the same store, and a
            # cached listing would hide their objects (a record, zarr.json) from this process
            opts = {"use_listings_cache": False, **options_for(self.protocol)}
            try:
                try:
                    self._fs, self._root = fsspec.core.url_to_fs(self.url, **opts)
                except TypeError:  # a file system without a listings cache
                    opts.pop("use_listings_cache")
                    self._fs, self._root = fsspec.core.url_to_fs(self.url, **opts)
            except (ImportError, ValueError) as e:
                raise UserError(f"{self.url}: cannot open a {self.protocol}:// store ({e}); install fsspec's file "
                                "system for it (s3://: pip install 'fae-pipe[s3]', gs://: 'fae-pipe[gcs]')") from None
        return self._fs

    @property
    def root(self) -> str:
        self.fs  # noqa: B018 - sets _root
        return self._root.rstrip("/")

    def path(self, key: str = "") -> str:
        """The fs path (URL stores) or the OS path (local) of a store-relative key."""
        if self.local is not None:
            return str(self.local / key) if key else str(self.local)
        return f"{self.root}/{key}" if key else self.root

    def child(self, key: str) -> str:
        """The full URL / path of a key, for messages."""
        return f"{self.url}/{key}" if self.local is None else str(self.local / key)

    def zarr_store(self, read_only: bool = False):
        """What zarr opens: the local path string (zarr builds its ``LocalStore``), else an ``FsspecStore``."""
        if self.local is not None:
            return str(self.local)
        from zarr.storage import FsspecStore

        opts = {"use_listings_cache": False, **options_for(self.protocol)}  # see ``fs``
        try:
            return FsspecStore.from_url(self.url, storage_options=opts, read_only=read_only)
        except TypeError:
            opts.pop("use_listings_cache")
            return FsspecStore.from_url(self.url, storage_options=opts, read_only=read_only)

    # ---- object operations (both kinds; the bookkeeping and readers use them) ----
    def exists(self, key: str) -> bool:
        if self.local is not None:
            return (self.local / key).is_file()
        try:  # not fs.isfile: it answers False for an unreachable endpoint or bad credentials too
            return self.fs.info(self.path(key)).get("type") == "file"
        except FileNotFoundError:
            return False

    def read_bytes(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """The object's bytes (``FileNotFoundError`` when absent); ``start``/``end`` a byte range."""
        if self.local is not None:
            with open(self.local / key, "rb") as f:
                if start is None and end is None:
                    return f.read()
                size = os.fstat(f.fileno()).st_size
                lo = (start or 0) + (size if (start or 0) < 0 else 0)
                f.seek(max(0, lo))
                return f.read(((end if end is not None else size) - max(0, lo)))
        return self.fs.cat_file(self.path(key), start=start, end=end)

    def size(self, key: str) -> int:
        if self.local is not None:
            return (self.local / key).stat().st_size
        return int(self.fs.size(self.path(key)))

    def list(self, prefix: str) -> list[str]:
        """Keys of the objects under ``prefix/`` (recursive), store-relative."""
        if self.local is not None:
            base = self.local / prefix
            return sorted(p.relative_to(self.local).as_posix() for p in base.rglob("*") if p.is_file()) \
                if base.is_dir() else []
        base = self.path(prefix)
        if not self.fs.isdir(base):
            return []
        n = len(self.root) + 1
        return sorted(p[n:] for p in self.fs.find(base))

    def data_bytes(self, skip: str | None = None) -> int:
        """Total bytes of the store's objects, the top-level entry ``skip`` excluded."""
        if self.local is not None:
            return sum(p.stat().st_size for p in self.local.rglob("*")
                       if p.is_file() and (skip is None or p.relative_to(self.local).parts[0] != skip))
        if not self.fs.isdir(self.root):
            return 0
        n = len(self.root) + 1
        return sum(int(info.get("size") or 0) for p, info in self.fs.find(self.root, detail=True).items()
                   if skip is None or p[n:].split("/", 1)[0] != skip)

    def top_level(self) -> list[str]:
        """Names directly under the store root (empty when it does not exist)."""
        if self.local is not None:
            return sorted(p.name for p in self.local.iterdir()) if self.local.is_dir() else []
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        except FileNotFoundError:
            return []

    def remove(self, key: str, recursive: bool = False) -> None:
        """Delete an object (or, ``recursive``, everything under ``key/``); absent is fine."""
        if self.local is not None:
            import shutil

            target = self.local / key
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
            return
        try:
            self.fs.rm(self.path(key), recursive=recursive)
        except FileNotFoundError:
            pass
