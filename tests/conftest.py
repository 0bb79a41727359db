"""Suite-wide settings.

Every in-process test runs torch on one thread: the models here are tiny, and on a
2-core machine two OpenMP threads per process only spin (an AdamW step of 650k
parameters ran up to 20x slower). Subprocess tests set OMP_NUM_THREADS themselves
where bit-equality with in-process runs matters; ``OMP_NUM_THREADS=1`` here makes the
thread policy's auto choice (``fae_pipe.threads``) one thread too, for in-process CLI runs
and for every subprocess that does not set its own.
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
