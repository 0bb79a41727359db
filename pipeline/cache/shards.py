"""Generic sharded writing: plan storage shards, group them into work units, run a task.

One machinery for every store (``extract`` writes features with it, ``encode`` latents):
a *task* turns a storage shard's sample range into whole-shard arrays; the runner
writes each shard in one write per array (one writer per shard: zarr shards are
read-modify-write, so two writers of one shard lose data), then its completion record.
Work units (``--shards N``) are contiguous runs of whole storage shards; each unit is
one dask task, so the same code runs in-process, on a LocalCluster (``workers``) or on
any dask cluster (``scheduler``). A worker holds at most one storage shard in memory.

Stopping on a signal (``runtime.stop_signals``, passed as ``stop_signals``): while the
runner works, those signals only set a flag. In-process, the shard in flight finishes
(data, then its record) and the runner stops before the next shard; on dask, the
coordinator stops after the next work unit completes and cancels the others (a unit
already running on a worker may finish its shards, each with its record, or be cut off
when a LocalCluster shuts down: a shard without a record is redone next time). Either
way ``StopRequested`` is raised (exit code 75): running the same command again skips
the shards with records and writes the rest, bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import zarr
from tqdm import tqdm

from fae_pipe.artifacts import disk_write_error
from fae_pipe.cache import schema
from fae_pipe.cache import location
from fae_pipe.cache.bookkeeping import read_records, write_record
from fae_pipe.cache.location import StoreLocation
from fae_pipe.errors import StopRequested, StopSignals, UserError
from fae_pipe.phases import phase


@dataclass(frozen=True)
class ShardPlan:
    """Storage shards: contiguous sample ranges of ``shard_samples`` (the last may be short)."""

    num_samples: int
    shard_samples: int

    @property
    def num_shards(self) -> int:
        return schema.num_shards(self.num_samples, self.shard_samples)

    def bounds(self, shard_index: int) -> tuple[int, int]:
        return schema.shard_bounds(self.num_samples, self.shard_samples, shard_index)

    def units(self, requested: int) -> tuple[list[list[int]], str | None]:
        """Split the shards into ``requested`` contiguous units (clamped to the shard count)."""
        count = max(1, min(requested, self.num_shards))
        note = None
        if requested > self.num_shards:
            note = (f"note: {requested} work units requested but the store has {self.num_shards} storage "
                    f"shards; using {count} units (one per shard)")
        parts = np.array_split(np.arange(self.num_shards), count)
        return [[int(i) for i in part] for part in parts if len(part)], note


class ShardTask(Protocol):
    """What a stage supplies: picklable, cheap until ``setup`` builds the model.

    ``cache_key`` names the state ``setup`` builds (e.g. model + weights) so each worker
    process builds it once. ``compute`` returns the arrays of one storage shard (every
    per-sample array of the store, ``stop - start`` rows) and a dict of extras stored in
    the completion record; extras["failures"] (list of dicts) is kept as the record's
    failure list. ``progress(n)`` may be called as samples finish (None on dask).
    """

    cache_key: str

    def setup(self) -> None: ...

    def compute(self, shard_index: int, start: int, stop: int,
                progress: Callable[[int], None] | None = None) -> tuple[dict[str, np.ndarray], dict]: ...


REMOTE_WORKER = -1  # ``workers`` value meaning: a worker of an external cluster


def set_torch_threads(threads: int, workers: int) -> int:
    """Set torch's intra-op threads explicitly (dask's nanny forces OMP threads to 1).

    ``threads`` when given; else cores / ``workers`` (in-process: all cores); on an
    external cluster's worker, that worker's own dask thread count.
    """
    import torch

    from fae_pipe.threads import usable_cores

    if threads:
        n = threads
    elif workers == REMOTE_WORKER:
        from distributed import get_worker

        n = max(1, int(get_worker().state.nthreads))
    else:
        n = max(1, usable_cores() // max(1, workers))
    torch.set_num_threads(n)
    return n


class PreparedTasks:
    """The shard task whose ``setup`` (model + weights) already ran in this process.

    Why per process: a work unit runs in whichever dask worker the scheduler picks and
    its task arrives freshly unpickled, so the only way to build the model once per
    worker and reuse it for that worker's later units is state that lives in the
    worker process. This class is that state, and the only place it lives:
    ``PreparedTasks.of_process()`` is the registry of the current process (the runner
    passes it along explicitly; a work unit sent to dask looks it up on arrival). It
    holds one task: a task with another ``cache_key`` replaces it, so a long-lived
    process keeps only the latest stage's model.
    """

    _process: "PreparedTasks | None" = None

    def __init__(self):
        self.key: str | None = None
        self.task: ShardTask | None = None

    @classmethod
    def of_process(cls) -> "PreparedTasks":
        if cls._process is None:
            cls._process = cls()
        return cls._process

    def get(self, task: ShardTask, threads: int, workers: int) -> ShardTask:
        """``task`` with ``setup`` done, or the already prepared task of the same ``cache_key``."""
        if self.task is None or self.key != task.cache_key:
            self.key = self.task = None  # drop a previous stage's model before building the next
            set_torch_threads(threads, workers)
            task.setup()
            self.key, self.task = task.cache_key, task
        return self.task


def record_matches(record: dict | None, config_hash: str, start: int, stop: int) -> bool:
    return (record is not None and record.get("config_hash") == config_hash
            and record.get("start") == start and record.get("stop") == stop)


def write_shard(group: zarr.Group, store_path, shard_index: int, start: int, stop: int,
                arrays: dict[str, np.ndarray], extras: dict, config_hash: str, seconds: float) -> dict:
    """Write one storage shard whole (one write per array), then its completion record."""
    expected = schema.sample_array_names(group)
    if sorted(arrays) != sorted(expected):
        raise RuntimeError(f"shard task returned arrays {sorted(arrays)}, the store holds {sorted(expected)}")
    for name in expected:
        arr = group[name]
        want = (stop - start, *arr.shape[1:])
        if tuple(arrays[name].shape) != want:
            raise RuntimeError(f"shard task returned {name} of shape {arrays[name].shape}, expected {want}")
        # write_empty_chunks is runtime config (not stored): keep all-zero shards as files too
        try:
            arr.with_config({"write_empty_chunks": True})[start:stop] = np.asarray(arrays[name], dtype=arr.dtype)
        except Exception as e:
            # full disk / read-only: one line; no record is written, so a re-run redoes this shard
            loc = StoreLocation.of(store_path)
            if not loc.is_local:
                raise UserError(f"cannot write {loc.child(schema.shard_key(group, name, shard_index))}: "
                                f"{type(e).__name__}: {e}; check the bucket's permissions and storage.options, "
                                "then run the same command again (finished shards are kept)") from None
            friendly = disk_write_error(schema.shard_file(store_path, group, name, shard_index), e)
            if friendly is not None:
                raise friendly from None
            raise
    extras = dict(extras)
    failures = list(extras.pop("failures", []))
    valid = arrays.get(schema.VALID)
    record = {
        "shard": shard_index, "start": start, "stop": stop, "config_hash": config_hash,
        "samples": stop - start, "valid": int(np.count_nonzero(valid)) if valid is not None else stop - start,
        "failures": failures, "extras": extras, "seconds": round(seconds, 3),
    }
    with phase("shards: record write"):
        write_record(store_path, shard_index, record)
    return record


def run_unit(task: ShardTask, store_path: str, shard_ids: list[int], plan: ShardPlan, config_hash: str,
             threads: int = 0, workers: int = 0, progress: Callable[[int], None] | None = None,
             topic: str | None = None, prepared: PreparedTasks | None = None,
             stop: Callable[[], bool] | None = None, storage: dict | None = None) -> list[dict]:
    """Compute and write the storage shards of one work unit; returns their records.

    ``prepared``: where the built task is kept (None: this process's registry, as on a dask worker).
    ``stop``: polled before each shard; when true, the unit ends there (the shards before it are whole).
    ``storage``: the coordinator's storage options (``cache.location``), applied in this process
    first, so a worker of any cluster opens URL stores exactly as the coordinator does.
    """
    if storage is not None:
        location.configure(storage)
    ready = (prepared or PreparedTasks.of_process()).get(task, threads, workers)
    group = schema.open_group(store_path, "r+")
    records = []
    for shard_index in shard_ids:
        if stop is not None and stop():
            break
        start, stop_ = plan.bounds(shard_index)
        t0 = time.perf_counter()
        with phase("model: shard compute"):
            arrays, extras = ready.compute(shard_index, start, stop_, progress)
        records.append(write_shard(group, store_path, shard_index, start, stop_, arrays, extras,
                                   config_hash, time.perf_counter() - t0))
        if topic is not None:
            from distributed import get_worker

            get_worker().log_event(topic, {"samples": stop_ - start})
    return records


@dataclass
class RunResult:
    """What a sharded run did, for the stage's one-line summary and final attrs."""

    path: str
    num_samples: int
    shards_total: int
    shards_written: int
    shards_skipped: int
    samples_written: int
    seconds: float
    records: dict[int, dict] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.records) == self.shards_total

    @property
    def images_per_s(self) -> float:
        return self.samples_written / self.seconds if self.seconds > 0 else 0.0

    def failures(self) -> list[dict]:
        return [f for i in sorted(self.records) for f in self.records[i]["failures"]]

    def stored_bytes(self) -> int:
        return StoreLocation.of(self.path).data_bytes()

    def summary(self, label: str) -> str:
        return (f"{label}: {self.num_samples} samples, {self.shards_written} shards written, "
                f"{self.shards_skipped} skipped (of {self.shards_total}), {self.images_per_s:.1f} images/s, "
                f"{self.stored_bytes() / 2**20:.1f} MiB, {len(self.failures())} failed -> {self.path}")


def run_shards(store_path, task: ShardTask, plan: ShardPlan, config_hash: str, *, units: int = 1,
               workers: int = 0, scheduler: str = "", threads: int = 0, desc: str = "shards",
               prepared: PreparedTasks | None = None, stop_signals=("SIGTERM",)) -> RunResult:
    """Write every storage shard without a matching completion record; skip the rest.

    ``prepared`` keeps the built task of an in-process run (None: this process's
    registry, so a second run of the same task reuses its model); dask workers always
    use their own process's registry. ``stop_signals``: signal names that stop the run
    cleanly (see the module docstring); ``StopRequested`` names what was done.
    """
    path = StoreLocation.of(store_path).canonical()  # what workers open: absolute path or URL
    unit_list, note = plan.units(units)
    if note:
        print(note, file=sys.stderr)
    with phase("shards: plan (read records)"):
        before = read_records(path, range(plan.num_shards))
        todo = [[i for i in unit if not record_matches(before[i], config_hash, *plan.bounds(i))]
                for unit in unit_list]
    todo = [unit for unit in todo if unit]
    pending = [i for unit in todo for i in unit]
    total = sum(plan.bounds(i)[1] - plan.bounds(i)[0] for i in pending)
    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True, disable=total == 0)
    signals = StopSignals(stop_signals)
    stopped = lambda: signals.requested is not None  # noqa: E731
    try:
        signals.install()
        if not pending:
            seconds = 0.0
        elif scheduler or workers:
            seconds = _run_on_dask(task, path, todo, plan, config_hash, workers, scheduler, threads, bar, stopped)
        else:
            prepared = prepared or PreparedTasks.of_process()
            prepared.get(task, threads, 0)  # model build is not part of the throughput
            t0 = time.perf_counter()
            for unit in todo:
                run_unit(task, path, unit, plan, config_hash, threads, 0, progress=bar.update, prepared=prepared,
                         stop=stopped)
                if stopped():
                    break
            seconds = time.perf_counter() - t0
    finally:
        signals.restore()
        bar.close()  # ends the bar's line, so an error message starts on its own line
    with phase("shards: collect records"):
        after = read_records(path, range(plan.num_shards))
        records = {i: rec for i, rec in after.items() if record_matches(rec, config_hash, *plan.bounds(i))}
    done = len(records)
    if stopped() and done < plan.num_shards:  # a signal after the last shard: the run simply completed
        raise StopRequested(f"{desc}: stop signal ({signals.name(signals.requested)}): {done} of {plan.num_shards} "
                            f"storage shards complete, the rest left cleanly without records; run the same command "
                            f"again to continue")
    return RunResult(path, plan.num_samples, plan.num_shards, len(pending), plan.num_shards - len(pending),
                     total, seconds, records)


def _run_on_dask(task, path, todo, plan, config_hash, workers, scheduler, threads, bar, stopped) -> float:
    """One dask task per work unit; progress arrives per written shard as worker events."""
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    with phase("dask: cluster start"):
        if scheduler:
            client = Client(scheduler)
            n_workers = REMOTE_WORKER
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=40)
            client = Client(cluster)
            n_workers = workers
    topic = f"fae-pipe-progress-{uuid.uuid4().hex}"
    try:
        client.subscribe_topic(topic, lambda event: bar.update(event[1]["samples"]))
        t0 = time.perf_counter()
        storage = location.configured()
        futures = [client.submit(run_unit, task, path, unit, plan, config_hash, threads, n_workers,
                                 None, topic, storage=storage, pure=False,
                                 key=f"shard-unit-{unit[0]:05d}-{uuid.uuid4().hex[:8]}")
                   for unit in todo]
        try:
            for fut in as_completed(futures):
                fut.result()
                if stopped():  # the coordinator stops here; units still queued or running are cancelled
                    client.cancel(futures)
                    break
        except BaseException:
            client.cancel(futures)
            raise
        seconds = time.perf_counter() - t0
        bar.n = bar.total
        bar.refresh()
        return seconds
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
