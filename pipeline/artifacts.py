"""How fae-pipe writes, reads, names and seeds its own files: one owner for each of those facts.

- Atomic writes: every file a stage leaves (checkpoints, exports, logs, metrics,
  indices, records, images) is written to a temporary sibling and renamed, so a
  killed process never leaves half a file where a reader expects a whole one.
- Exports: one safetensors file each (``save_export`` / ``load_export``): tensors
  named ``<group>/<state-dict key>``, everything else one JSON document in the
  header's ``__metadata__["fae_pipe"]`` with a ``format`` tag. Loading runs no
  code (no pickle); a file of another kind, or an old pickled ``.pt`` export, is
  one line naming it and what to run (``fae-pipe convert-export`` for the latter).
- Checkpoints: ``torch.save`` of tensors and plain types, read back with
  ``weights_only=True`` (``load_payload``): a pickle that would run code is refused.
- Fingerprints: ``sha256:<hex>`` of a file's bytes is how stores, exports and
  checkpoints name the files they were made from.
- Seeds: every random stream is seeded from names (seed, rank, step, stream...),
  never from global RNG state, so a resumed or re-split run draws the same numbers.
- One writer per directory: ``DirLock`` is the lock of every store (``<store>/.fae/lock``)
  and every training run directory (``<run>/.lock``): an O_EXCL file naming host and
  pid; a second writer is refused with one line naming the holder, and a lock left by
  a dead pid on this host is taken over with a warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

from fae_pipe.errors import UserError


def atomic_write(path: str | Path, write: Callable[[Path], None], fsync: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it over ``path``.

    The temp name (``.<name>.<pid>.tmp``) carries the pid so two processes never
    share one, and ends in ``.tmp`` so stray-file cleanup finds it; ``write`` must
    not rely on the file extension (pass formats explicitly). A failed ``write``
    removes its temp file and re-raises; ``path`` is untouched (a full disk, a
    read-only or unwritable directory become the one-line ``disk_write_error``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        friendly = disk_write_error(path, e)  # before the temp file goes: a full disk is still full
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. a read-only directory never held it
        if friendly is not None:
            raise friendly from None
        raise
    return path


def atomic_write_dir(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling directory of ``path``, then rename it into place.

    For artefacts that are directories (a written model + tokenizer, a generated data set):
    readers see the old directory or the whole new one, never half of either. An existing
    ``path`` is replaced (moved aside, then removed); a failed ``write`` leaves ``path`` as it was.
    """
    import shutil
    import uuid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write(tmp)
        if path.exists():
            old = tmp.with_name(tmp.name + "-old")
            os.rename(path, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, path)
    except BaseException as e:
        friendly = disk_write_error(path, e)
        shutil.rmtree(tmp, ignore_errors=True)
        if friendly is not None:
            raise friendly from None
        raise
    return path


# errno -> what the user reads; these are the write failures a user fixes (space, mounts, permissions)
_DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}


def _nearly_full(directory: Path, margin: int = 1 << 20) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < margin


def disk_write_error(path, exc: BaseException) -> UserError | None:
    """The one-line error for a write that failed on a full disk, a read-only file system or
    missing permissions (None for any other exception); names the path and what to do."""
    seen, cur = [], exc
    while isinstance(cur, BaseException) and cur not in seen:  # e.g. torch.save raises while handling an OSError
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    exc = next((x for x in seen if isinstance(x, OSError) and x.errno in _DISK_ERRORS), exc)
    if not isinstance(exc, OSError) and isinstance(exc, Exception) and _nearly_full(Path(path).parent):
        # writers in C (torch's zip writer, some codecs) lose the errno of a full disk
        exc = OSError(errno.ENOSPC, f"{type(exc).__name__}: {exc}")
    if not isinstance(exc, OSError) or exc.errno not in _DISK_ERRORS:
        return None
    fix = ("free some space and run the same command again" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else
           "make it writable (or point the path elsewhere) and run the same command again")
    return UserError(f"cannot write {path}: {_DISK_ERRORS[exc.errno]}; {fix} "
                     "(finished parts are kept, unfinished ones are redone)")


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, payload, indent: int | None = 2, sort_keys: bool = False) -> Path:
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys)
    return atomic_write_text(path, text + ("\n" if indent is not None else ""))


def atomic_torch_save(obj, path: str | Path, fsync: bool = False) -> Path:
    """``torch.save`` through a temp file (checkpoints pass ``fsync`` so a power cut keeps them)."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # through a Python file, so a full disk surfaces as OSError(ENOSPC)
            torch.save(obj, fh)

    return atomic_write(path, write, fsync=fsync)


def load_payload(path: str | Path, fmt: str | None, made_by: str, what: str = "") -> dict:
    """A dict saved by ``torch.save`` with ``format == fmt`` (None: any dict); one-line errors otherwise.

    Loaded with ``weights_only=True``: tensors and plain types only, so a crafted
    pickle (whose ``__reduce__`` would run code) is refused, never executed.
    """
    import torch

    path = Path(path)
    label = what or str(path)
    if not path.is_file():
        raise UserError(f"{label} '{path}' not found: run `fae-pipe {made_by}` first" if what else
                        f"{path} not found: run `fae-pipe {made_by}` first")
    try:
        with warnings.catch_warnings():  # torch warns about a foreign pickle protocol before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            kind = f"holds an object that is not a tensor or plain type ({found.group(1)}): refused, not loaded"
        elif isinstance(e, pickle.UnpicklingError):
            kind = "cannot be read as tensors and plain types: refused, not loaded"
        else:
            kind = f"cannot be read ({type(e).__name__})"
        raise UserError(f"{path} {kind}: pass a file written by `fae-pipe {made_by}`") from None
    if not isinstance(payload, dict) or (fmt is not None and payload.get("format") != fmt):
        raise UserError(f"{path} is not a {fmt or 'fae-pipe'} file: pass the file written by `fae-pipe {made_by}`")
    return payload


EXPORT_KEY = "fae_pipe"  # the safetensors ``__metadata__`` key holding an export's JSON document


def save_export(path: str | Path, groups: dict, meta: dict) -> Path:
    """Write one safetensors export: tensors ``<group>/<key>`` + ``meta`` (with ``format``) as JSON.

    ``groups``: name -> state dict (name -> tensor); a ``None`` group is left out (its
    absence is recorded in ``meta["groups"]``). Tensors are stored as contiguous CPU
    copies; the JSON is written with sorted keys, so the same content gives the same bytes.
    """
    import torch
    from safetensors.torch import save_file

    if "format" not in meta:
        raise ValueError("export metadata needs a 'format' tag")
    tensors = {}
    for group, state in groups.items():
        if state is None:
            continue
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"export group {group!r}: {key!r} is not a tensor")
            tensors[f"{group}/{key}"] = value.detach().to("cpu").contiguous().clone()
    doc = {**meta, "groups": sorted(g for g, s in groups.items() if s is not None)}
    header = {EXPORT_KEY: json.dumps(doc, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def _pickled(path: Path) -> bool:
    """A ``torch.save`` file (zip or legacy pickle), by its first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if head[8:9] == b"{":  # safetensors: a little-endian u64 header length (its first byte may be 0x80), then JSON
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def read_export(path: str | Path) -> tuple[dict, dict]:
    """``(groups, meta)`` of a safetensors export, unchecked; raises on anything else."""
    from safetensors import safe_open

    groups: dict[str, dict] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = json.loads((f.metadata() or {})[EXPORT_KEY])
        for name in f.keys():
            group, _, key = name.partition("/")
            groups.setdefault(group, {})[key] = f.get_tensor(name)
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    for group in meta.get("groups", []):
        groups.setdefault(group, {})
    return groups, meta


def read_export_meta(path: str | Path) -> dict | None:
    """An export's JSON document from the header only (no tensors read); None when unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = json.loads((f.metadata() or {})[EXPORT_KEY])
        return meta if isinstance(meta, dict) else None
    except Exception:  # noqa: BLE001
        return None


def load_export(path: str | Path, fmt: str, made_by: str, what: str = "") -> tuple[dict, dict]:
    """``(groups, meta)`` of the export at ``path`` with ``meta["format"] == fmt``; one-line errors otherwise.

    Never unpickles: an old pickled export (``.pt``) is refused with a pointer to
    ``fae-pipe convert-export``.
    """
    path = Path(path)
    label = f"{what} '{path}'" if what else str(path)
    if not path.is_file():
        raise UserError(f"{label} not found: run `fae-pipe {made_by}` first")
    if _pickled(path):
        raise UserError(f"{label} is a pickled (old-format) export, not loaded: convert it once with "
                        f"`fae-pipe convert-export {path}` (or re-run `fae-pipe {made_by}`)")
    try:
        groups, meta = read_export(path)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
        raise UserError(f"{label} is not a fae-pipe safetensors export ({type(e).__name__}): pass the file "
                        f"written by `fae-pipe {made_by}`") from None
    if meta.get("format") != fmt:
        raise UserError(f"{label} is a {meta.get('format')!r} file, not {fmt!r}: pass the file written by "
                        f"`fae-pipe {made_by}`")
    return groups, meta


def export_fingerprints(path: str | Path) -> set[str]:
    """The fingerprints an export answers to: its own, and that of the pickled file it was converted from."""
    found = {file_fingerprint(path)}
    old = (read_export_meta(path) or {}).get("converted_from")
    if isinstance(old, str):
        found.add(old)
    return found


def file_fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes: how stores, exports and checkpoints name their sources."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def derived_seed(seed: int, *names) -> int:
    """A 63-bit seed that depends only on ``seed`` and the ``names`` (e.g. rank, step, stream)."""
    text = "/".join(map(str, (int(seed), *names)))
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_generator(seed: int, *names, device="cpu"):
    """A fresh ``torch.Generator`` on ``device`` seeded with ``derived_seed(seed, *names)``."""
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(derived_seed(seed, *names))
    return g


def pid_alive(pid: int) -> bool:
    """True when ``pid`` runs on this host (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class DirLock:
    """Exclusive writer lock of a directory: a file created with O_CREAT|O_EXCL holding host and pid.

    ``what`` names the directory in messages (``store cache/f.zarr``, ``run directory runs/sit``);
    ``hint`` says who the other writer probably is (``another extract running?``). A lock
    whose pid is dead on this host is taken over with a warning; a live one, or one from
    another host (its pid cannot be checked), is refused with one line naming the holder.
    """

    def __init__(self, lock_path, what: str, hint: str = ""):
        self.path, self.what, self.hint = Path(lock_path), what, hint
        self.held = False

    def _try_create(self) -> bool:
        """Create the lock with its content in one step: a hard link of a written temp file
        (fails if the lock exists), so a writer killed at any instant never leaves an empty lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def acquire(self) -> "DirLock":
        if self._try_create():
            self.held = True
            return self
        try:
            owner = json.loads(self.path.read_text())
            host, pid = str(owner["host"]), int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{self.what} has an unreadable lock file; if no other writer runs, "
                            f"remove {self.path}") from None
        if host == socket.gethostname() and not pid_alive(pid):
            print(f"WARNING: taking over the lock of {self.what} left by dead pid {pid}", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            if self._try_create():
                self.held = True
                return self
        hint = f" ({self.hint})" if self.hint else ""
        raise UserError(f"{self.what} is locked by pid {pid} on host {host}{hint}; "
                        f"if that process is dead, remove {self.path}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
