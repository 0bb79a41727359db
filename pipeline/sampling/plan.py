"""Which sample gets which label, noise and process: the bookkeeping that makes sampling reproducible.

Why it is separate from the model code: the guarantee "same seed, same images" must
hold whatever the batch size on one process and whatever the number of processes
under ``accelerate launch``. So nothing here depends on who computes a sample:

* labels are a function of the global sample index (round-robin over the requested
  classes, so every prefix of the sample list is as balanced as it can be and the
  first ``k * len(classes)`` samples hold ``k`` of each class, which the grid uses);
* the starting noise of sample ``i`` comes from its own generator seeded by
  ``(seed, i)``, drawn on the CPU so CPU and GPU runs start from the same numbers;
* work is cut into global batches ``[k B, (k + 1) B)`` and process ``r`` of ``W``
  takes batches ``r, r + W, ...``: the union over processes is every index exactly
  once. The SDE sampler's per-step noise is drawn per batch from a generator seeded
  by ``(seed, batch start)``, so SDE results depend on ``sample.batch_size`` (not on
  the process count); ODE results depend on neither beyond floating-point rounding.
"""

from __future__ import annotations

import numpy as np
import torch

from fae_pipe.artifacts import derived_seed
from fae_pipe.errors import UserError


def resolve_classes(requested: list, num_classes: int, class_names: list[str] | None = None) -> list[int]:
    """Class indices from ``sample.classes``: ints, digit strings or class names; empty = all classes."""
    if not requested:
        return list(range(num_classes))
    names = {name: i for i, name in enumerate(class_names or [])}
    out = []
    for item in requested:
        if isinstance(item, bool):
            raise UserError(f"config error: sample.classes item {item!r} is invalid: expected a class index or name")
        if isinstance(item, int) or (isinstance(item, str) and item.strip().lstrip("-").isdigit()):
            idx = int(item)
        elif isinstance(item, str) and item in names:
            idx = names[item]
        else:
            known = f"; names: {', '.join(list(names)[:5])}{' ...' if len(names) > 5 else ''}" if names else ""
            raise UserError(f"config error: sample.classes item {item!r} is invalid: expected an index in "
                            f"[0, {num_classes}) or a class name{known}")
        if not 0 <= idx < num_classes:
            raise UserError(f"config error: sample.classes item {item!r} is invalid: expected an index in "
                            f"[0, {num_classes})")
        out.append(idx)
    if len(set(out)) != len(out):
        raise UserError(f"config error: sample.classes = {requested} is invalid: classes must not repeat")
    return out


def balanced_labels(classes: list[int], num_samples: int) -> np.ndarray:
    """int64 (num_samples,) labels: sample ``i`` gets ``classes[i % len(classes)]``."""
    if not classes:
        raise UserError("sampling needs at least one class")
    return np.asarray(classes, np.int64)[np.arange(num_samples) % len(classes)]


def global_batches(num_samples: int, batch_size: int) -> list[range]:
    """The fixed global batches ``[k B, min(N, (k + 1) B))`` covering ``0..num_samples``."""
    if batch_size < 1:
        raise UserError(f"config error: sample.batch_size = {batch_size} is invalid: expected a value >= 1")
    return [range(lo, min(num_samples, lo + batch_size)) for lo in range(0, num_samples, batch_size)]


def process_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """The global batches process ``rank`` of ``world_size`` computes (round-robin, disjoint)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return global_batches(num_samples, batch_size)[rank::world_size]


def sample_noise(seed: int, indices, shape) -> torch.Tensor:
    """float32 (len(indices), *shape) starting noise; row j depends only on (seed, indices[j])."""
    rows = []
    for i in indices:
        g = torch.Generator().manual_seed(derived_seed(seed, "noise", i))
        rows.append(torch.randn(tuple(shape), generator=g))
    return torch.stack(rows) if rows else torch.zeros((0, *shape))


def batch_generator(seed: int, batch: range) -> torch.Generator:
    """CPU generator for the SDE's per-step noise of one global batch (seeded by its first index).

    On the CPU so a GPU run draws the same numbers as a CPU run (the sampler moves them).
    """
    return torch.Generator().manual_seed(derived_seed(seed, "sde", batch.start))
