"""What the pretrain and finetune loops share: batch split, step plan, resume, per-step RNG."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from model.engine import Dist, Stepper
from model.train_state import latest_checkpoint, load_train_state, save_train_state
from pipeline.fingerprint import stable_hash
from pipeline.loader import LoaderConfig, epoch_steps
from stages.config import ConfigError


@dataclasses.dataclass(frozen=True)
class StepPlan:
    steps: tuple[int, ...]  # optimizer steps in each epoch (the same on every rank)
    warmup: int

    @property
    def total(self) -> int:
        return sum(self.steps)


def micro_batch(batch_size: int, accum_steps: int, env: Dist, section: str) -> int:
    """Per-rank, per-micro-step batch of a global `batch_size`."""
    micro = batch_size // (env.world * accum_steps)
    if micro < 1 or micro * env.world * accum_steps != batch_size:
        raise ConfigError(f"{section}.batch_size={batch_size} must split evenly over "
                          f"{env.world} rank(s) x {accum_steps} accumulation step(s)")
    return micro


def plan_steps(split, lcfg: LoaderConfig, seed: int, epochs: int, accum_steps: int,
               warmup_epochs: float, env: Dist, section: str) -> StepPlan:
    steps = tuple(epoch_steps(split, lcfg, seed, e, env.world) // accum_steps for e in range(epochs))
    if sum(steps) == 0:
        raise ConfigError(f"{section}.batch_size is larger than an epoch of "
                          f"{split.num_samples} images; lower it")
    return StepPlan(steps, int(round(warmup_epochs * steps[0])))


def resume(run_dir: Path, stepper: Stepper) -> tuple[int, int, int]:
    """(step, epoch, step within epoch) of the newest complete checkpoint, or zeros."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return 0, 0, 0
    state = load_train_state(ckpt, stepper.model, stepper.optimizer, stepper.scaler)
    return state["step"], state["extra"]["epoch"], state["extra"]["in_epoch"]


def seed_step(seed: int, step: int, rank: int) -> None:
    """Drop path draws from torch's global RNG, which DataLoader start-up also consumes:
    seeding it per step makes a resumed run replay exactly the same paths."""
    torch.manual_seed(stable_hash("drop-path", seed, step, rank) % 2**63)


def require_finite(stats: dict, step: int, section: str) -> None:
    if not all(math.isfinite(v) for v in stats.values()):
        raise FloatingPointError(f"non-finite loss at step {step}: {stats}; lower {section}.lr")


def checkpoint(run_dir: Path, step: int, stepper: Stepper, env: Dist, epoch: int,
               in_epoch: int, epoch_len: int) -> None:
    """Save on rank 0 (data position: the next step's epoch and offset), then sync ranks."""
    done_epoch = in_epoch == epoch_len
    extra = {"epoch": epoch + 1 if done_epoch else epoch, "in_epoch": 0 if done_epoch else in_epoch}
    if env.main:
        save_train_state(run_dir, step, stepper.model, stepper.optimizer, stepper.scaler, extra)
    if env.world > 1:
        torch.distributed.barrier()
