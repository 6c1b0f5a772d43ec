"""The training step machinery shared by pretrain and finetune.

Distributed setup (torchrun env -> DDP, gloo on CPU, nccl on GPU), AdamW with
decay-free groups and lr scales, AMP (bf16 autocast; fp16 + GradScaler on
GPU), gradient accumulation with `no_sync`, clipping, optional torch.compile.
The loop itself stays in the stage so it reads top to bottom.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from typing import Callable, Optional

import torch
import torch.distributed as dist

from model.cpu import cpu_has_fast_bf16
from model.optim import lr_at, param_groups
from model.schema import OptimConfig


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's environment; init the process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        # fp32 matmuls (outside autocast: the optimizer, fp32 eval) on TF32 tensor cores;
        # CPU numbers are untouched by these flags.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def effective_amp(amp: str, device: torch.device, announce: bool = True) -> str:
    """The autocast mode a run really uses: `bf16` on a CPU without bf16 kernels trains in fp32
    (`none`), announced in one line, rather than an order of magnitude slower. The choice does not
    reach any output name or recipe: on a CPU with the kernels nothing changes. `announce`: only
    rank 0 of a CPU DDP run says it, once for the run, not once a process."""
    if amp == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        if announce:
            print(f"warning: optim.amp: bf16 has no native kernels on this CPU "
                  f"({torch.backends.cpu.get_cpu_capability()}; emulated bf16 ran ~11x slower than fp32), "
                  "so this run trains in fp32; set amp: none to make that explicit", file=sys.stderr, flush=True)
        return "none"
    return amp


class Stepper:
    """Owns model (maybe DDP-wrapped), optimizer, scaler; does one optimizer step
    from `accum` micro-batches."""

    def __init__(self, model: torch.nn.Module, cfg: OptimConfig, env: Dist,
                 num_layers: Optional[int] = None):
        self.cfg, self.env = cfg, env
        self.model = model.to(env.device)  # the plain module: state dicts, eval
        groups = param_groups(self.model, cfg.weight_decay, layer_decay=cfg.layer_decay,
                              num_layers=num_layers)
        fused = env.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)
        if cfg.amp == "fp16" and env.device.type != "cuda":
            raise ValueError("amp=fp16 needs a GPU (its GradScaler); use amp=bf16 or none on CPU")
        self.amp = effective_amp(cfg.amp, env.device, announce=env.main)  # what autocast() applies
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.amp == "fp16")
        net = self.model
        if env.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
        self.net = torch.compile(net) if cfg.compile else net

    def autocast(self):
        if self.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(self.env.device.type, dtype=dtype)

    def set_lr(self, step: int, total_steps: int, warmup_steps: int) -> float:
        lr = lr_at(step, total_steps, warmup_steps, self.cfg.lr, self.cfg.min_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr

    def step(self, micro_batches: list, loss_fn: Callable[[torch.nn.Module, dict], tuple]) -> dict:
        """loss_fn(net, batch) -> (loss, metrics). Averages over micro-batches."""
        n = len(micro_batches)
        # Device scalars are kept and read back once, after the optimizer step, so the GPU
        # never waits on the host mid-step (a .item() per micro-batch was a sync each).
        seen: list[tuple[str, torch.Tensor]] = []
        for i, batch in enumerate(micro_batches):
            # Skip the gradient all-reduce on all but the last micro-batch.
            sync = i == n - 1 or not isinstance(self.net, torch.nn.parallel.DistributedDataParallel)
            ctx = contextlib.nullcontext() if sync else self.net.no_sync()
            with ctx:
                with self.autocast():
                    loss, metrics = loss_fn(self.net, batch)
                self.scaler.scale(loss / n).backward()
            seen.append(("loss", loss.detach().float()))
            seen.extend((k, v.detach() if torch.is_tensor(v) else float(v)) for k, v in metrics.items())
        grad_norm = None
        if self.cfg.clip_grad:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        tensors = [v for _, v in seen if torch.is_tensor(v)] + ([] if grad_norm is None else [grad_norm])
        # float64 holds every fp32 / int64 scalar exactly: the same Python floats, summed in the
        # same order, as reading each one with .item()
        dev = tensors[0].device
        read = iter(torch.stack([t.to(dev, torch.float64).reshape(()) for t in tensors]).tolist())  # the one sync
        totals: dict[str, float] = {}
        for k, v in seen:
            totals[k] = totals.get(k, 0.0) + (next(read) if torch.is_tensor(v) else v) / n
        if grad_norm is not None:
            totals["grad_norm"] = next(read)
        return totals


def all_mean(values: dict[str, float], env: Dist) -> dict[str, float]:
    """Average logged scalars over ranks (for honest metrics under DDP)."""
    if env.world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return {k: float(v) / env.world for k, v in zip(keys, t.tolist())}
