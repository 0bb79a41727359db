"""One way to build the Accelerator, so every loop runs the same on CPU, GPU and many nodes.

Randomness in the training loops is drawn from generators seeded by
``(seed, rank, step)`` (see ``step_generator``): a resumed run then draws
exactly the numbers the uninterrupted run drew, whatever happened to global RNG
state, and each process of a multi-process run draws different noise.
"""

from __future__ import annotations

import hashlib

import torch
from accelerate import Accelerator

from fae_pipe.errors import UserError


def make_accelerator(precision: str = "fp32", grad_accum: int = 1, section: str = "") -> Accelerator:
    """Accelerator on CUDA when present, else CPU (``accelerate launch`` settings still apply)."""
    cpu = not torch.cuda.is_available()
    if precision == "fp16" and cpu:
        raise UserError(f"config error: {section}.precision = 'fp16' is invalid on CPU: expected 'fp32' or 'bf16'")
    mixed = "no" if precision in ("fp32", "no") else precision
    return Accelerator(mixed_precision=mixed, gradient_accumulation_steps=grad_accum, cpu=cpu)


def step_seed(seed: int, rank: int, step: int, stream: str = "") -> int:
    """A 63-bit seed that depends only on (seed, rank, step, stream)."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def step_generator(seed: int, rank: int, step: int, device: torch.device, stream: str = "") -> torch.Generator:
    """A fresh generator for one training step of one process."""
    g = torch.Generator(device=device)
    g.manual_seed(step_seed(seed, rank, step, stream))
    return g
