"""Suite-wide settings.

Every in-process test runs torch on one thread: the models here are tiny, and on a
2-core machine two OpenMP threads per process only spin (an AdamW step of 650k
parameters ran up to 20x slower). Subprocess tests set OMP_NUM_THREADS themselves
where bit-equality with in-process runs matters.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
