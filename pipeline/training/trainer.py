"""The one training setup every loop stands on: start-or-resume, prepare, guarded updates, EMA, logs, checkpoints.

A stage builds its data and models, hands them to ``Trainer.prepare`` and writes
only its step body; everything else is here, once:

    run = Trainer("train-sit", cfg, "sit", cfg.paths.sit_run, resume)
    model, opt = run.prepare({"model": net}, identity={...})
    for step in run.steps(evaluate):            # bar, eval, checkpoints, log windows
        loss = ...; run.backward(loss)
        run.update("model", loss)               # clip + skip-if-non-finite + scheduler
        run.log(loss=loss)
    run.finish(export)

Why it is shaped like this:
- Resume order is fixed: weights and EMA load into the raw modules, then
  ``accelerator.prepare``, then optimizer states (so their tensors land on the
  prepared parameters' device), then the RNG states, for every stage alike.
- No host sync per step. Losses are summed on the device and reduced every
  ``train.log_every`` steps. A non-finite loss or gradient is caught on the device
  too: the fused AdamW skips that update entirely (``found_inf``, as AMP's grad
  scaler does), so no update is ever applied from it; the run then stops at the
  next log row naming the step, and the last good checkpoint stays the newest.
- Randomness comes from generators seeded by ``(seed, rank, step, stream)``
  (``generator``) and data order from ``(seed, epoch)``, so a resumed run draws
  exactly what the uninterrupted one drew.
- One writer per run directory: the main process holds ``<run>/.lock`` (``DirLock``,
  the stores' lock) from construction until ``finish`` or any exception; a second
  ``train-*`` on the directory is refused naming the holder, a dead holder's lock is
  taken over. Only the main process locks, so the ranks of one run on several hosts
  never refuse each other. In one process, a new Trainer on a directory supersedes an
  earlier one that never reached ``finish`` (notebooks, tests).
- Preemption: from construction until the loop ends, ``runtime.stop_signals`` (default
  SIGTERM) only set a flag. After each step the flag is combined over the processes
  (one all-reduce of a CPU int on a gloo group, only when world size > 1; no device
  sync), so every rank stops after the same step; that step's checkpoint is written by
  the normal ``save`` and ``StopRequested`` ends the stage (exit code 75);
  ``--resume auto`` continues bit-exactly. The previous handlers are restored after.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm import tqdm

from fae_pipe.artifacts import seeded_generator
from fae_pipe.device import compile_in_place, note_emulated_bf16
from fae_pipe.errors import StopRequested, StopSignals, UserError
from fae_pipe.training.checkpoint import (capture_rng, check_finite_weights, clear_checkpoints, last_good,
                                          load_checkpoint, resolve_resume, restore_rng, save_checkpoint)
from fae_pipe.training.ema import EMA
from fae_pipe.training.logs import (LogWindow, StepLog, available_tracker, clear_rank_records, final_loss,
                                    tracker_config, write_metrics, write_rank_record)
from fae_pipe.training.preemption import agree_on_stop, lock_run_dir, release, stop_group
from fae_pipe.training.schedule import make_scheduler


def make_accelerator(precision: str, grad_accum: int, key: str, log_with: str | None = None,
                     run_dir=None) -> Accelerator:
    """Accelerator on CUDA when present, else CPU (``accelerate launch`` settings still apply)."""
    cpu = not torch.cuda.is_available()
    if precision == "fp16" and cpu:
        raise UserError(f"config error: {key}.precision = 'fp16' is invalid on CPU: expected 'fp32' or 'bf16'")
    mixed = "no" if precision in ("fp32", "no") else precision
    note_emulated_bf16(torch.device("cpu" if cpu else "cuda"), precision, f"{key}.precision")
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # Accelerate keeps one process-wide state; a second stage run in the same process (a
        # notebook, a test, a driver script) may ask for another precision. Single-process
        # state holds nothing worth keeping, so start it afresh; launched runs keep theirs.
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mixed, gradient_accumulation_steps=grad_accum, cpu=cpu,
                       log_with=log_with, project_dir=None if run_dir is None else str(run_dir))


def adamw(params, lr: float, weight_decay: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with the fused kernel: it can skip an update on the device (``found_inf``) without a host sync."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)


def cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class Trainer:
    """One run of one training stage, configured by ``cfg.<section>.train``.

    Args:
        stage: the command name, used in messages (``train-sit``).
        section: the config section holding the ``train`` group (``sit``).
        run_dir: checkpoints, ``loss.csv``, ``eval.csv``, trackers and rank records go here.
        resume: None (fresh), "latest", "auto" or a checkpoint path (``--resume``).
        log_fields / eval_fields: the columns of ``loss.csv`` (``lr`` is added; ``samples_per_s``,
            the window's throughput, is filled in when listed) / ``eval.csv``.
        metrics_name: the DVC metrics file ``<paths.metrics>/<metrics_name>.json``.
    """

    def __init__(self, stage: str, cfg, section: str, run_dir, resume: str | None, log_fields: list[str],
                 eval_fields: list[str] | None = None, metrics_name: str | None = None):
        self.t0 = time.perf_counter()
        self.stage, self.cfg, self.section, self.resume = stage, cfg, section, resume
        self.t = t = getattr(cfg, section).train
        self.run_dir = Path(run_dir)
        self.log_fields, self.eval_fields = list(log_fields), list(eval_fields or [])
        self.metrics_path = Path(cfg.paths.metrics) / f"{metrics_name or section}.json"
        tracker = available_tracker(t.log_with, stage)
        self.accelerator = acc = make_accelerator(t.precision, t.grad_accum, f"{section}.train", tracker,
                                                  self.run_dir)
        self.tracking = tracker is not None
        self.device, self.rank, self.world = acc.device, acc.process_index, acc.num_processes
        self.main = acc.is_main_process
        parts = self.world * t.grad_accum
        if t.batch_size % parts:
            raise UserError(f"config error: {section}.train.batch_size = {t.batch_size} is invalid: it must be "
                            f"divisible by processes x {section}.train.grad_accum = {self.world} x {t.grad_accum} "
                            f"= {parts}")
        self.micro_batch = t.batch_size // parts
        self.stop_signals = StopSignals(cfg.runtime.stop_signals)
        self.poll_stop = bool(cfg.runtime.stop_signals)
        self.stop_group = stop_group(self.world) if self.poll_stop else None  # collective: before the lock
        self.lock = lock_run_dir(self.run_dir, stage) if self.main else None
        self.stop_signals.install()
        # released by finish(), by any exception out of prepare()/steps(), else when the Trainer goes or at exit
        self._release = weakref.finalize(self, release, self.lock, self.stop_signals)
        self.memory_budget_bytes = int(t.memory_budget_gb * (1 << 30))
        self.start, self.step_count, self.samples = 0, 0, 0
        self.metrics: dict = {}
        self.models: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.ema: EMA | None = None

    # ---- setup ---------------------------------------------------------------------------------------------
    def loader_args(self) -> tuple:
        """``(batch, seed, rank, world, memory budget, shuffle buffer)``: this process's share of the data, as
        every generator loader (``LatentBatches``, ``FeatureBatches``) takes it, from ``train``."""
        return (self.micro_batch, self.t.seed, self.rank, self.world, self.memory_budget_bytes,
                self.t.shuffle_buffer)

    def generator(self, step: int, stream: str) -> torch.Generator:
        """The generator of one random stream of one step of this process."""
        return seeded_generator(self.t.seed, self.rank, step, stream, device=self.device)

    def prepare(self, models: dict[str, torch.nn.Module], optimizers: dict[str, torch.optim.Optimizer] | None = None,
                identity: dict | None = None) -> list:
        """Resume (or start fresh), wrap with Accelerate; returns the prepared models then optimizers.

        ``models``: name -> module; the first is the main one (EMA, LR schedule, exported
        weights). ``optimizers``: name -> optimizer (default: one AdamW over the main model
        from ``train``). ``identity``: what must match for a checkpoint to continue this
        run (model names, kwargs, latent statistics, source fingerprints).
        """
        try:
            return self._prepare(models, optimizers, identity)
        except BaseException:
            self._release()
            raise

    def _prepare(self, models, optimizers, identity) -> list:
        t, names = self.t, list(models)
        self.main_name = names[0]
        if optimizers is None:
            optimizers = {self.main_name: adamw(models[self.main_name].parameters(), t.lr, t.weight_decay)}
        self.scheduler = make_scheduler(optimizers[self.main_name], t.warmup, t.steps, t.schedule)
        self.identity = dict(identity or {})
        ck = self._checkpoint_to_resume()
        if ck is not None:
            for name, module in models.items():
                module.load_state_dict(ck["models"][name])
        if t.ema_decay > 0:
            self.ema = EMA(models[self.main_name], t.ema_decay)
            if ck is not None and (ck.get("ema") or {}).get(self.main_name) is not None:
                self.ema.load_state_dict(ck["ema"][self.main_name])
            elif ck is not None and self.main:
                print(f"{self.stage}: note: the checkpoint has no EMA weights; the EMA starts from the resumed "
                      "weights", file=sys.stderr)
        prepared = self.accelerator.prepare(*models.values(), *optimizers.values())
        prepared = prepared if isinstance(prepared, (list, tuple)) else [prepared]
        self.models = dict(zip(names, prepared[:len(models)]))
        self.optimizers = dict(zip(optimizers, prepared[len(models):]))
        if self.ema is not None:
            self.ema.model.to(self.device)
        self.compiled = bool(self.cfg.runtime.compile) and compile_in_place(
            [self.accelerator.unwrap_model(m) for m in self.models.values()], self.device, self.stage, self.main)
        if ck is not None:
            for name, opt in self.optimizers.items():
                opt.load_state_dict(ck["optimizers"][name])
            self.scheduler.load_state_dict(ck["schedulers"][self.main_name])
            restore_rng(ck["rng"])
            self.start = int(ck["step"])
        self.base_seconds = float((ck or {}).get("extra", {}).get("train_seconds", 0.0))
        self._open_logs(resumed=ck is not None)
        return [*self.models.values(), *self.optimizers.values()]

    def _checkpoint_to_resume(self) -> dict | None:
        """The checkpoint to continue from, or None after clearing an older run's checkpoints.

        ``--resume``/a path refuses a checkpoint made for another identity; ``auto``
        (``dvc repro``) starts fresh instead, saying why.
        """
        current = dataclasses.asdict(getattr(self.cfg, self.section))
        path = resolve_resume(self.run_dir, self.resume, self.section, current)
        ck = None if path is None else load_checkpoint(path)
        if ck is not None:
            saved = (ck.get("extra") or {}).get("identity")
            if saved != self.identity:
                diff = sorted(k for k in set(saved or {}) | set(self.identity)
                              if (saved or {}).get(k) != self.identity.get(k))
                reason = (f"checkpoint '{path}' was made for another run ({', '.join(diff)} differ); resume with "
                          "the config and inputs the run was started with")
                if self.resume != "auto":
                    raise UserError(f"--resume: {reason}")
                print(f"{self.stage}: resume auto: {reason}; starting a fresh run", file=sys.stderr)
                ck = None
        if ck is None:
            if self.main:
                clear_checkpoints(self.run_dir, self.stage)
            return None
        extra = ck.get("extra") or {}
        if self.main:
            print(f"{self.stage}: resuming from {path} (step {ck['step']})", file=sys.stderr)
            if (extra.get("world_size"), extra.get("micro_batch")) != (self.world, self.micro_batch):
                print(f"{self.stage}: note: checkpoint ran {extra.get('world_size')} process(es) x "
                      f"{extra.get('micro_batch')} samples, now {self.world} x {self.micro_batch}: the data order "
                      "differs from an uninterrupted run", file=sys.stderr)
        return ck

    def _open_logs(self, resumed: bool) -> None:
        start = self.start if resumed else None
        self.log_csv = StepLog(self.run_dir / "loss.csv", [*self.log_fields, "lr"], start) if self.main else None
        self.eval_csv = (StepLog(self.run_dir / "eval.csv", self.eval_fields, start)
                         if self.main and self.eval_fields else None)
        if self.main:
            clear_rank_records(self.run_dir)
        if self.tracking:
            section = dataclasses.asdict(getattr(self.cfg, self.section))
            # TensorBoard writes to <run>/tensorboard; the others file the run under a project per stage
            project = "tensorboard" if self.t.log_with == "tensorboard" else f"fae-pipe-{self.stage}"
            self.accelerator.init_trackers(project, config=tracker_config(section, self.section))
        self.accelerator.wait_for_everyone()
        self.window = LogWindow(self.device, self.start)

    def train_seconds(self) -> float:
        """Wall-clock seconds spent training this run, over all its resumes, evaluations excluded."""
        return self.base_seconds + time.perf_counter() - self.t_loop - self.eval_spent

    # ---- the step ------------------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def update(self, name: str, loss: torch.Tensor, clip: float | None = None) -> torch.Tensor:
        """Clip, then apply ``name``'s optimizer step unless the loss or gradients are non-finite.

        The decision is made on the device: the fused AdamW takes ``found_inf`` and skips
        the whole update (weights, moments, step count) when it is 1. Returns the gradient
        norm (a device tensor). ``clip``: max gradient norm (default ``train.grad_clip``; 0 = none).
        The main optimizer also advances the LR schedule and the EMA.
        """
        model, opt = self.models[name], self.optimizers[name]
        clip = self.t.grad_clip if clip is None else clip
        clip = clip if clip > 0 else math.inf
        norm = self.accelerator.clip_grad_norm_(model.parameters(), clip)
        loss = loss.detach().float()
        bad = ~(torch.isfinite(loss) & torch.isfinite(torch.as_tensor(norm, device=self.device)))
        self.window.flag(bad, loss, self.step_count + 1)
        inner = getattr(opt, "optimizer", opt)  # the torch optimizer inside Accelerate's wrapper
        inner.found_inf, inner.grad_scale = bad.float(), None
        try:
            inner.step()
        finally:
            del inner.found_inf, inner.grad_scale
        opt.zero_grad(set_to_none=True)
        if name == self.main_name:
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.accelerator.unwrap_model(model))
        return norm

    def log(self, **values) -> None:
        """Add this step's values to the log window: tensors are averaged over it on the device,
        plain numbers (epoch, ...) keep their last value; None means absent this step."""
        self.window.add(**values)

    def steps(self, evaluate: Callable[[], dict] | None = None) -> Iterator[int]:
        """Yield the 0-based steps still to run; around each: progress, evaluation, log windows, checkpoints.

        After each step but the last, a stop signal (any rank's) writes that step's
        checkpoint and raises ``StopRequested``; an exception here or in the step body
        (which closes this generator) releases the run-directory lock.
        """
        try:
            yield from self._steps(evaluate)
        except BaseException:
            self._release()
            raise
        self.stop_signals.restore()  # the loop is over: a signal now gets its usual action

    def _steps(self, evaluate) -> Iterator[int]:
        t = self.t
        self.t_loop, self.eval_spent = time.perf_counter(), 0.0
        bar = tqdm(total=t.steps, initial=self.start, desc=self.stage, unit="step", file=sys.stderr,
                   dynamic_ncols=True, disable=not self.main)
        for step in range(self.start, t.steps):
            self.step_count = step
            yield step
            done = step + 1
            self.samples += t.batch_size // self.world
            bar.update(1)
            last = done == t.steps
            if done % t.log_every == 0 or done % t.checkpoint_every == 0 or last:
                row = self._flush(done)
                if row and "loss" in row:
                    bar.set_postfix(loss=f"{row['loss']:.4g}", refresh=False)
            if evaluate is not None and (done % t.eval_every == 0 or last):
                e0 = time.perf_counter()
                self.metrics = evaluate()
                cost = time.perf_counter() - e0
                self.eval_spent += cost
                if self.metrics:  # the x axis of curves against wall-clock (evaluations excluded)
                    self.metrics["train_seconds"] = round(self.train_seconds(), 3)
                if self.main and self.metrics:
                    if self.eval_csv is not None:
                        self.eval_csv.log(done, **{k: self.metrics.get(k) for k in self.eval_fields})
                    shown = ", ".join(f"{k} {self.metrics[k]:.4g}" for k in self.eval_fields
                                      if isinstance(self.metrics.get(k), float) and k != "train_seconds")
                    bar.write(f"{self.stage}: step {done}: eval {shown} ({cost:.1f} s)", file=sys.stderr)
            if done % t.checkpoint_every == 0 or last:
                self.save(done)
            signum = agree_on_stop(self.stop_signals.requested or 0, self.world, self.stop_group) \
                if self.poll_stop and not last else 0
            if signum:
                if done % t.checkpoint_every:
                    self.save(done)
                bar.close()
                raise StopRequested(f"{self.stage}: stop signal ({StopSignals.name(signum)}) at step {done}: "
                                    "checkpoint written; continue with --resume auto" if self.main else "")
        bar.close()
        if evaluate is not None and not self.metrics:  # a finished run resumed: nothing trained, still report
            self.metrics = evaluate()
        self.accelerator.wait_for_everyone()

    def _flush(self, done: int) -> dict:
        """End a log window: one reduction (and host sync) for every value, the finiteness check, one CSV row."""
        row, bad, steps, seconds = self.window.close(done, self.accelerator.gather if self.world > 1 else None)
        if bad is not None:
            raise UserError(f"{self.stage}: non-finite loss ({bad[1]}) at step {bad[0]}; training stopped, "
                            f"{last_good(self.run_dir)}")
        rate = self.t.batch_size * steps / max(seconds, 1e-9) if steps else None
        row.update(lr=float(self.scheduler.get_last_lr()[0]), samples_per_s=rate)  # CSV: if a log field
        if self.main:
            self.log_csv.log(done, **row)
        if self.tracking:
            self.accelerator.log({k: v for k, v in row.items() if v is not None}, step=done)
        return row

    # ---- saving --------------------------------------------------------------------------------------------
    def weights(self, name: str | None = None) -> torch.nn.Module:
        """The weights to evaluate and export: the EMA of the main model when kept, else the raw ones."""
        name = name or self.main_name
        if name == self.main_name and self.ema is not None:
            return self.ema.model
        return self.accelerator.unwrap_model(self.models[name])

    def save(self, step: int) -> None:
        """Check every module is finite, then write the checkpoint of ``step`` (main process only)."""
        if self.window.pending():
            self._flush(step)
        raw = {n: self.accelerator.unwrap_model(m) for n, m in self.models.items()}
        for module in [*raw.values(), *([self.ema.model] if self.ema else [])]:
            check_finite_weights(module, step, self.stage, self.run_dir)
        if self.main:
            seconds = self.train_seconds()
            payload = {
                "models": {n: cpu_state(m) for n, m in raw.items()},
                "ema": {self.main_name: cpu_state(self.ema.model)} if self.ema else {},
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "schedulers": {self.main_name: self.scheduler.state_dict()},
                "rng": capture_rng(), "config": self.cfg.to_dict(),
                "extra": {"identity": self.identity, "world_size": self.world, "micro_batch": self.micro_batch,
                          "train_seconds": seconds},
            }
            save_checkpoint(self.run_dir, step, payload, self.t.keep_last)
        self.accelerator.wait_for_everyone()

    def finish(self, export: Callable[[dict], str] | None = None, note: str = "") -> dict:
        """Rank records, then on the main process: ``export(summary)`` (returns the written path), metrics, summary line."""
        t = self.t
        loop_s = time.perf_counter() - getattr(self, "t_loop", self.t0)
        ran = t.steps - self.start
        write_rank_record(self.run_dir, self.rank, self.world, t.steps, self.samples,
                          self.accelerator.unwrap_model(self.models[self.main_name]))
        self.accelerator.wait_for_everyone()
        summary = dict(self.metrics, steps=t.steps, start_step=self.start, steps_this_run=ran,
                       world_size=self.world, global_batch=t.batch_size, torch_threads=torch.get_num_threads(),
                       compiled=self.compiled,
                       wall_seconds=round(time.perf_counter() - self.t0, 3),
                       steps_per_second=round(ran / loop_s, 4) if ran and loop_s > 0 else None,
                       samples_per_second=round(ran * t.batch_size / loop_s, 2) if ran and loop_s > 0 else None)
        if self.main:
            self.log_csv.close()
            if self.eval_csv is not None:
                self.eval_csv.close()
            summary.update(final_loss(self.run_dir / "loss.csv"))
            out = export(summary) if export is not None else None
            write_metrics(self.metrics_path, summary)
            rate = f"{summary['steps_per_second']:.2f} steps/s" if summary["steps_per_second"] else "no steps"
            loss = f", final loss {summary['final_loss']:.4f}" if "final_loss" in summary else ""
            print(f"{self.stage}: steps {self.start}->{t.steps} ({rate}), world size {self.world}{loss}"
                  f"{', ' + note if note else ''}, {summary['wall_seconds']:.1f} s"
                  f"{' -> ' + str(out) if out else ''}", file=sys.stderr, flush=True)
        self.accelerator.wait_for_everyone()
        if self.tracking:  # not end_training(): that also tears down the process group
            for tracker in self.accelerator.trackers:
                tracker.finish()
        self._release()
        return summary
