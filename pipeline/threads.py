"""The CPU thread policy: how many threads torch uses and how idle ones wait. Set here only.

Why a policy at all: on a shared 2-core machine, OpenMP's default wait (threads spin
for a while before sleeping) makes a training step stall whenever another CPU-bound
process holds one of the cores: the spinning thread waits for a partner that is not
scheduled. Measured with ``fae-pipe bench stages --competitor`` (docs/performance.md,
demo config, one busy process beside the run): train-fae / train-decoder / train-sit slow
down 1.69x / 1.41x / 1.28x under ``OMP_WAIT_POLICY=PASSIVE`` and 3.2x / 3.2x / 3.9x under
ACTIVE (the target is <= 2x). PASSIVE's price is paid on a quiet machine by models this
small (a sleep and wake-up per parallel region); at paper shapes the regions are long and
it vanishes. A dedicated node may set ``OMP_WAIT_POLICY=ACTIVE``: a user's value is kept.

Two parts, applied at two moments:

* ``apply_wait_policy()`` sets ``OMP_WAIT_POLICY=PASSIVE`` unless the user set it. The
  OpenMP runtime reads it once, when torch is imported, so ``fae_pipe`` calls this on
  import (``fae_pipe/__init__.py``) and it reaches every ``fae-pipe`` process,
  including those ``accelerate launch`` and dask start. It is inherited by children.
* ``configure_threads(runtime.threads)`` sets torch's intra-op thread count when a
  stage starts: an explicit ``runtime.threads`` wins; 0 (auto) keeps an
  ``OMP_NUM_THREADS`` set by the user or a launcher, else uses the usable cores divided
  by the processes on this machine (``LOCAL_WORLD_SIZE`` under ``accelerate launch`` /
  torchrun), so two ranks on two cores do not oversubscribe them.
"""

from __future__ import annotations

import os

WAIT_POLICY = "PASSIVE"


def apply_wait_policy() -> None:
    """Default ``OMP_WAIT_POLICY`` to PASSIVE (a user's own value is kept). Effective before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and SLURM restrict)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def auto_threads() -> int:
    """The thread count ``runtime.threads = 0`` means for this process (see the module docstring)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    procs = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, usable_cores() // procs)


def configure_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads (``requested``, or ``auto_threads()`` for 0); returns the count."""
    import torch

    n = requested if requested > 0 else auto_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def describe() -> str:
    """One line for run logs: the thread count and the wait policy in effect."""
    import torch

    return f"{torch.get_num_threads()} torch thread(s), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')}"
