"""The writer lock of a store on object storage: conditional create plus a renewed lease.

Why not the local lock: ``DirLock`` relies on ``O_EXCL`` / hard links and on checking a
pid on this host; on a bucket there is neither, and a "create if absent" made of a
``exists()`` then a ``put()`` lets two extractors both win. What the object store
guarantees is used instead:

- **Conditional create** (S3 and S3-compatible services: ``PutObject`` with
  ``If-None-Match: *``, answered 412 when the key exists; moto 5.2 honours it): the
  lock object ``<store>/.fae/lock`` is created only if absent, so exactly one writer
  gets it. Renewals and take-overs are ``If-Match: <ETag>`` writes, so a holder that
  lost its lock (paused beyond its lease and taken over) notices on its next renewal
  instead of writing on, and two writers taking over the same expired lock cannot
  both succeed.
- **Lease**: the lock names its holder (``host``, ``pid``, a random ``owner``) and an
  ``expires`` time; a thread renews it every ``lease_seconds / 3``. A holder killed
  without releasing (SIGKILL, a lost node) is taken over, with a warning, once its
  lease has expired, or at once by a process on the same host that sees its pid is
  dead. A live holder's lock is refused with one line naming it and when it expires.
- **Services without conditional writes** (other fsspec protocols, e.g. ``gs://``
  through a file system that ignores create-only mode): the lease alone, written and
  read back after ``SETTLE_SECONDS``: with strong read-after-write consistency
  (S3, GCS) every contender reads the same last write, so one owner wins; renewals
  check the owner before rewriting (a short race window this mode cannot close).

Take-overs compare against the MD5 of the lock's bytes, which is a single PUT's ETag on
S3; a bucket whose ETags are not MD5s (SSE-KMS) makes a take-over fail safe: refused,
with the lock object named, never two owners.

The coordinator calls ``check()`` before it marks a store complete: a run whose lease
was lost fails with one line rather than finalising a store another writer now owns.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid

from fae_pipe.artifacts import pid_alive
from fae_pipe.cache.location import DEFAULT_LEASE_SECONDS, StoreLocation
from fae_pipe.errors import UserError

SETTLE_SECONDS = 2.0  # lease-only mode: how long a writer waits before reading its lock back
CONDITIONAL_PROTOCOLS = ("s3", "s3a")  # PutObject If-None-Match / If-Match


class ObjectLock:
    """Exclusive writer lock object ``key`` of a store on object storage (see the module docstring)."""

    def __init__(self, location: StoreLocation, key: str, what: str, hint: str = "",
                 lease_seconds: float = DEFAULT_LEASE_SECONDS, conditional: bool | None = None):
        self.loc, self.key, self.what, self.hint = location, key, what, hint
        self.lease_seconds = float(lease_seconds)
        self.conditional = location.protocol in CONDITIONAL_PROTOCOLS if conditional is None else conditional
        self.owner = uuid.uuid4().hex
        self.held = False
        self.lost: str | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.loc.child(self.key)

    def _payload(self) -> bytes:
        now = time.time()
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "owner": self.owner, "since": now,
                           "expires": now + self.lease_seconds, "lease_seconds": self.lease_seconds}).encode()

    # ---- the two primitives: conditional put and read-with-etag -------------------
    def _put(self, data: bytes, create: bool = False, if_match: str | None = None) -> str:
        """Write the lock object; returns its ETag. ``FileExistsError`` when the condition fails."""
        fs, path = self.loc.fs, self.loc.path(self.key)
        if not self.conditional:
            fs.pipe_file(path, data)
            return _md5_etag(data)
        try:
            if create:
                out = fs.pipe_file(path, data, mode="create")
            else:
                out = fs.pipe_file(path, data, IfMatch=if_match)
        except FileExistsError:
            raise
        except OSError as e:
            if "pre-condition" in str(e).lower() or "precondition" in str(e).lower():
                raise FileExistsError(str(e)) from None
            raise
        etag = (out or {}).get("ETag") if isinstance(out, dict) else None
        return etag or _md5_etag(data)

    def _read(self) -> tuple[dict | None, str | None]:
        """The lock's content and the ETag of exactly that content (S3: the MD5 of a single PUT)."""
        try:
            data = self.loc.read_bytes(self.key)
        except FileNotFoundError:
            return None, None
        try:
            owner = json.loads(data)
            if not isinstance(owner, dict):
                raise ValueError
        except ValueError:
            raise UserError(f"{self.what} has an unreadable lock object; if no other writer runs, remove "
                            f"{self.url}") from None
        return owner, _md5_etag(data)

    # ---- lock protocol ---------------------------------------------------------
    def acquire(self) -> "ObjectLock":
        try:
            return self._acquire()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - endpoint, credentials, permissions, bucket: one line
            raise UserError(f"{self.what}: cannot create its lock object {self.url} ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}); check the URL, the credentials and "
                            "storage.options") from None

    def _acquire(self) -> "ObjectLock":
        if self._create():
            return self._start()
        owner, etag = self._read()
        if owner is None and self._create():  # released between our create and our read
            return self._start()
        owner = owner or {}
        host, pid = str(owner.get("host", "?")), owner.get("pid", "?")
        expires = float(owner.get("expires") or 0)
        dead_here = host == socket.gethostname() and isinstance(pid, int) and not pid_alive(pid)
        if dead_here or time.time() > expires:
            why = f"dead pid {pid} on this host" if dead_here else \
                f"pid {pid} on host {host}, whose lease expired {time.time() - expires:.0f} s ago"
            if self._take_over(etag):
                print(f"WARNING: taking over the lock of {self.what} left by {why}", file=sys.stderr)
                return self._start()
            owner, _ = self._read()
            owner = owner or {}
            host, pid, expires = str(owner.get("host", "?")), owner.get("pid", "?"), float(owner.get("expires") or 0)
        hint = f" ({self.hint})" if self.hint else ""
        left = max(0.0, expires - time.time())
        raise UserError(f"{self.what} is locked by pid {pid} on host {host}{hint}, lease renewed until "
                        f"{left:.0f} s from now; a dead holder is taken over once its lease expires, or remove "
                        f"{self.url}")

    def _create(self) -> bool:
        data = self._payload()
        if not self.conditional:
            if self.loc.exists(self.key):
                return False
            return self._write_verify(data)
        try:
            self._etag = self._put(data, create=True)
        except FileExistsError:
            return False
        return True

    def _take_over(self, etag: str | None) -> bool:
        data = self._payload()
        if not self.conditional:
            return self._write_verify(data)
        try:
            self._etag = self._put(data, if_match=etag)
        except (FileExistsError, FileNotFoundError):
            return False  # another writer changed (or released) it first
        return True

    def _write_verify(self, data: bytes) -> bool:
        """Lease-only mode: write, let concurrent writers land, read back; ours iff the owner is ours."""
        self._put(data)
        time.sleep(SETTLE_SECONDS)
        owner, etag = self._read()
        self._etag = etag
        return bool(owner) and owner.get("owner") == self.owner

    def _start(self) -> "ObjectLock":
        self.held, self.lost = True, None
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="fae-pipe-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a transient error is retried until the lease runs out
                if isinstance(e, UserError):
                    return
                print(f"WARNING: {self.what}: renewing the lease failed ({type(e).__name__}: {e}); retrying",
                      file=sys.stderr)

    def renew(self) -> None:
        """Extend the lease; a lock another writer took over marks this one ``lost``."""
        data = self._payload()
        if not self.conditional:
            owner, _ = self._read()
            if not owner or owner.get("owner") != self.owner:
                self.lost = f"the lock now belongs to pid {(owner or {}).get('pid')} on {(owner or {}).get('host')}"
                raise UserError(self.lost)
            self._etag = self._put(data)
            return
        try:
            self._etag = self._put(data, if_match=self._etag)
        except (FileExistsError, FileNotFoundError):
            owner, _ = self._read()
            self.lost = (f"the lock now belongs to pid {(owner or {}).get('pid')} on {(owner or {}).get('host')}"
                         if owner else "the lock object was removed")
            raise UserError(self.lost) from None

    def check(self) -> None:
        """Raise one line when this writer no longer holds the lock (lease lost or taken over)."""
        if self.lost:
            raise UserError(f"{self.what}: this run lost its writer lock ({self.lost}): another writer took the "
                            "store over, so this run stops without marking it complete")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.held:
            owner, _ = self._read()
            if owner and owner.get("owner") == self.owner:
                self.loc.remove(self.key)
            self.held = False

    def __enter__(self) -> "ObjectLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'
