"""Pieces both FAE training loops (``train-fae``, ``train-decoder``) share around the step itself.

Resume policy, the per-process batch, the progress bar, loader construction and
the checkpoint write with its weight check are the same for both stages; keeping
them here keeps the stage files about their losses.
"""

from __future__ import annotations

import dataclasses
import sys

from tqdm import tqdm

from fae_pipe.data.sharded import ShardedLoader
from fae_pipe.errors import UserError
from fae_pipe.training.checkpoint import capture_rng, load_checkpoint, resolve_resume, save_checkpoint
from fae_pipe.training.finite import check_finite_weights
from fae_pipe.training.fresh import clear_checkpoints

# Feature stores of the paper scale are terabytes: they always stream by shard. A
# store below this size (the demo's, a few hundred MB) is read once and held in RAM.
MEMORY_BUDGET_BYTES = 4 << 30
SHUFFLE_BUFFER_SHARDS = 8


def start_or_resume(run_dir, resume: str | None, cfg, section: str, stage: str) -> dict | None:
    """The checkpoint to continue from (``--resume``), or None after clearing a previous run's checkpoints."""
    path = resolve_resume(run_dir, resume, section, dataclasses.asdict(getattr(cfg, section)))
    if path is None:
        clear_checkpoints(run_dir, stage)
        return None
    ck = load_checkpoint(path)
    print(f"{stage}: resuming from {path} (step {ck['step']})", file=sys.stderr)
    return ck


def per_process_batch(global_batch: int, accelerator, key: str) -> int:
    world = accelerator.num_processes
    if global_batch % world:
        raise UserError(f"config error: {key} = {global_batch} is invalid: expected a multiple of the "
                        f"{world} processes")
    return global_batch // world


def make_loader(store_path, arrays, batch_size: int, seed: int, accelerator, train_mask) -> ShardedLoader:
    return ShardedLoader(store_path, arrays=arrays, batch_size=batch_size, seed=seed,
                         rank=accelerator.process_index, world_size=accelerator.num_processes,
                         memory_budget_bytes=MEMORY_BUDGET_BYTES, shuffle_buffer=SHUFFLE_BUFFER_SHARDS,
                         sample_mask=train_mask, random_view=True)


def progress_bar(total: int, initial: int, desc: str, accelerator) -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True,
                disable=not accelerator.is_main_process)


def save_training_state(run_dir, step: int, payload: dict, keep_last: int, check: list, stage: str,
                        accelerator) -> None:
    """Check every module in ``check`` is finite, then write the checkpoint (main process only)."""
    for module in check:
        check_finite_weights(module, step, stage, run_dir)
    if accelerator.is_main_process:
        save_checkpoint(run_dir, step, {**payload, "rng": capture_rng()}, keep_last)
    accelerator.wait_for_everyone()
