"""The one training loop: pretrain, finetune and scratch (and any new training stage) call `fit`.

A stage describes its job as a `Task` (where micro-batches come from, how a batch is
prepared on the device, the loss, an optional per-epoch evaluation); `fit` owns
everything they share, once:

- the step plan: optimizer steps per epoch from the split code the datasets iterate
  with (`pipeline.stream.epoch_steps`), cut to the poorest DDP rank;
- the lr schedule (warmup + cosine) and per-step seeding of torch's RNG (drop path);
- logging (TSV + progress bar), the finite-loss check;
- checkpoints (every `checkpoint_every` steps, at each epoch end before the last, and
  at `stop_after`), exact resume from the newest complete one, and the stop rule.

Every random choice is a function of (seed, step) or (seed, epoch, key), so a run resumed
after `--stop-after` continues exactly where an uninterrupted run would be.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import click
import torch
from tqdm import tqdm

from model.engine import Dist, Stepper, all_mean
from model.checkpoints import UnreadableCheckpoint
from model.train_state import complete_checkpoints, load_train_state, save_train_state
from pipeline.fingerprint import stable_hash
from stages.config import ConfigError, LoopConfig
from stages.metrics import TsvLog


@dataclasses.dataclass(frozen=True)
class StepPlan:
    steps: tuple[int, ...]  # optimizer steps in each epoch (the same on every rank)
    warmup: int

    @property
    def total(self) -> int:
        return sum(self.steps)


def micro_batch(loop: LoopConfig, env: Dist, section: str) -> int:
    """Per-rank, per-micro-step batch of the global `loop.batch_size`."""
    micro = loop.batch_size // (env.world * loop.accum_steps)
    if micro < 1 or micro * env.world * loop.accum_steps != loop.batch_size:
        raise ConfigError(f"{section}.loop.batch_size={loop.batch_size} must split evenly over "
                          f"{env.world} rank(s) x {loop.accum_steps} accumulation step(s)")
    return micro


def plan_steps(batches_in_epoch: Callable[[int], int], loop: LoopConfig, num_samples: int,
               section: str) -> StepPlan:
    """`batches_in_epoch(e)`: micro-batches every rank can deliver in epoch e."""
    steps = tuple(batches_in_epoch(e) // loop.accum_steps for e in range(loop.epochs))
    if sum(steps) == 0:
        raise ConfigError(f"{section}.loop.batch_size is larger than an epoch of "
                          f"{num_samples} images; lower it")
    return StepPlan(steps, int(round(loop.warmup_epochs * steps[0])))


@dataclasses.dataclass(frozen=True)
class Task:
    """What one training stage plugs into `fit`."""

    name: str  # log prefix and run-dir kind: "pretrain", "finetune", "scratch"
    columns: tuple[str, ...]  # TSV columns of the step log
    batches: Callable[[int, int], Iterator[dict]]  # (epoch, micro-batches to skip) -> raw micro-batches
    prepare: Callable[[dict, int, int], dict]  # (raw micro-batch, step, micro index) -> batch on the device
    loss: Callable[[torch.nn.Module, dict], tuple]  # (net, batch) -> (loss, {metric: float})
    # after every epoch, True on the last one -> scores, or {} where the task scores nothing then
    evaluate: Optional[Callable[[bool], dict]] = None


@dataclasses.dataclass(frozen=True)
class FitResult:
    last: dict  # the last logged step row (loss, lr, img_per_s, task metrics)
    scores: dict  # the last evaluation, {} when the task has none or it ran before a resume
    # the arithmetic every process that trained this run applied (`Stepper.amp`), in the order they
    # did, "+"-joined: "bf16", or "none+bf16" for a run stopped on a CPU without bf16 kernels and
    # resumed on one with them; "unknown" stands for steps from a checkpoint that did not record it
    amp: str = ""
    stopped_at: Optional[int] = None  # set when `stop_after` interrupted the run

# What a checkpoint written before checkpoints recorded their arithmetic stands for in FitResult.amp.
UNRECORDED_AMP = "unknown"


def resume(run_dir: Path, stepper: Stepper, warn: bool = True) -> tuple[int, int, int, dict, list[str]]:
    """(step, epoch, step within epoch, last logged row, the arithmetic of the steps so far) of the
    newest readable complete checkpoint, or zeros, {} and [].

    A damaged newest checkpoint (truncated copy, disk error) falls back to the one before it,
    with a warning line, rather than stopping: resume is exact from any checkpoint, so the
    run ends with the same weights and only the steps in between are recomputed, and
    save_train_state keeps two for this. When none is readable it stops with one line naming
    the newest and saying to delete the run folder: silently starting over from step 0 could
    throw away hours of work."""
    bad: list[UnreadableCheckpoint] = []
    for ckpt in reversed(complete_checkpoints(run_dir)):
        try:
            state = load_train_state(ckpt, stepper.model, stepper.optimizer, stepper.scaler)
        except UnreadableCheckpoint as err:
            bad.append(err)
            continue
        if bad and warn:
            click.echo(f"warning: {bad[0].path}: unreadable checkpoint ({bad[0].why}); resuming from "
                       f"{ckpt.name} instead (the run ends the same; delete {bad[0].path.name} to silence this)", err=True)
        extra = state["extra"]
        amps = list(extra.get("amps", [UNRECORDED_AMP] if state["step"] else []))
        return state["step"], extra["epoch"], extra["in_epoch"], extra.get("last", {}), amps
    if bad:
        older = f" and {len(bad) - 1} older one(s)" if len(bad) > 1 else ""
        raise UnreadableCheckpoint(f"{bad[0].path}: unreadable checkpoint ({bad[0].why}){older}, nothing older "
                                   f"to resume from; delete {run_dir} to start the run over")
    return 0, 0, 0, {}, []


def seed_step(seed: int, step: int, rank: int) -> None:
    """Drop path draws from torch's global RNG, which DataLoader start-up also consumes:
    seeding it per step makes a resumed run replay exactly the same paths."""
    torch.manual_seed(stable_hash("drop-path", seed, step, rank) % 2**63)


def require_finite(stats: dict, step: int, section: str) -> None:
    if not all(math.isfinite(v) for v in stats.values()):
        raise FloatingPointError(f"non-finite loss at step {step}: {stats}; lower {section}.optim.lr")


def checkpoint(run_dir: Path, step: int, stepper: Stepper, env: Dist, epoch: int,
               in_epoch: int, epoch_len: int, last: dict, amps: list[str]) -> None:
    """Save on rank 0 (data position: the next step's epoch and offset; the last logged row,
    so a run resumed at its end still reports it exactly; the arithmetic of its steps), then
    sync ranks."""
    done_epoch = in_epoch == epoch_len
    extra = {"epoch": epoch + 1 if done_epoch else epoch, "in_epoch": 0 if done_epoch else in_epoch,
             "last": last, "amps": amps}
    if env.main:
        save_train_state(run_dir, step, stepper.model, stepper.optimizer, stepper.scaler, extra)
    if env.world > 1:
        torch.distributed.barrier()


def fit(task: Task, stepper: Stepper, plan: StepPlan, loop: LoopConfig, run_dir: Path, env: Dist,
        seed: int, stop_after: Optional[int] = None, header: str = "") -> FitResult:
    """Train `stepper.model` through `plan`, resuming from `run_dir`; see the module docstring."""
    step, epoch, in_epoch, last, amps = resume(run_dir, stepper, warn=env.main)
    total, accum = plan.total, loop.accum_steps
    if step < total and stepper.amp not in amps:  # this process trains: its arithmetic joins the record
        amps.append(stepper.amp)
    log = TsvLog(run_dir / "log.tsv", list(task.columns)) if env.main else None
    if log is not None:
        log.truncate_after(step)
        click.echo(f"{task.name}: {header}{total} steps, run dir {run_dir}"
                   + (f", resumed at step {step}" if step else ""))
    scores: dict = {}
    t0, seen = time.perf_counter(), 0
    # closed on the way out, an error included, so the error's line starts on a line of its own
    with tqdm(total=total, initial=step, unit="step", disable=not env.main, smoothing=0.05) as bar:
        while epoch < loop.epochs:
            it = task.batches(epoch, in_epoch * accum)
            while in_epoch < plan.steps[epoch]:
                micro = [task.prepare(next(it), step, j) for j in range(accum)]
                seed_step(seed, step, env.rank)
                lr = stepper.set_lr(step, total, plan.warmup)
                stats = stepper.step(micro, task.loss)
                step, in_epoch, seen = step + 1, in_epoch + 1, seen + loop.batch_size
                require_finite(stats, step, task.name)
                if step % loop.log_every == 0 or step == total:
                    stats = all_mean(stats, env)
                    last = {"step": step, "epoch": epoch, "lr": lr,
                            "img_per_s": seen / (time.perf_counter() - t0), **stats}
                    if log is not None:
                        log.append(last)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items() if k in ("loss", "acc")}
                                    | {"img_s": f"{last['img_per_s']:.0f}"})
                bar.update(1)
                done_epoch = in_epoch == plan.steps[epoch]
                if done_epoch and task.evaluate is not None:
                    # before the checkpoint, so a resumed run never skips an evaluation
                    new = task.evaluate(epoch == loop.epochs - 1)  # {}: nothing scored this epoch
                    if new and log is not None:
                        log.append({"step": step, "epoch": epoch, **new})
                        bar.write(f"{task.name} epoch {epoch + 1}/{loop.epochs}: "
                                  + " ".join(f"{k} {v:.4f}" for k, v in new.items() if isinstance(v, float)))
                    scores = new or scores
                if step % loop.checkpoint_every == 0 or step == stop_after or (done_epoch and step < total):
                    checkpoint(run_dir, step, stepper, env, epoch, in_epoch, plan.steps[epoch], last, amps)
                if stop_after is not None and step >= stop_after and step < total:
                    return FitResult(last, scores, "+".join(amps), stopped_at=step)
            epoch, in_epoch = epoch + 1, 0
    return FitResult(last, scores, "+".join(amps))
