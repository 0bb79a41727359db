"""A real S3-compatible server on loopback for the object-store tests: moto's server mode.

Started once per test process (``s3`` fixture, session scope) as its own interpreter
(``python -m moto.server``) on a free port of 127.0.0.1 and killed at the end, so
every request goes over HTTP through s3fs/botocore exactly as to a real bucket.
The credentials are moto's dummy ones; ``S3.options`` is what ``storage.options``
(or ``zarr.open_group(..., storage_options=...)``) needs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3:
    endpoint: str
    bucket: str

    @property
    def options(self) -> dict:
        """fsspec/s3fs storage options for this server."""
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}

    @property
    def storage(self) -> dict:
        """The config's ``storage.options`` for this server."""
        return {"s3": self.options}

    def url(self, name: str) -> str:
        """A fresh prefix in the bucket (tests never share a store)."""
        return f"s3://{self.bucket}/{uuid.uuid4().hex[:8]}/{name}"

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options, skip_instance_cache=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3():
    port = _free_port()
    env = {**os.environ, **CREDENTIALS}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, "moto server exited"
            assert time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.1)
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # botocore in this process and in the CLI subprocesses
    server = S3(endpoint, "fae-test")
    server.fs().mkdir(server.bucket)
    try:
        yield server
    finally:
        proc.kill()
        proc.wait(timeout=30)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
