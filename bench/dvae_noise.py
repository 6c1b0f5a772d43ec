"""The dVAE's Gumbel noise: torch's F.gumbel_softmax against model/dvae.py's gumbel_softmax.

    .venv/bin/python bench/dvae_noise.py [--repeats 5] [--steps 6]

Both modes train the default tokenizer (params.yaml: model, schedule, batch 128 at 28 px) for
`--steps` updates on the same fixed batches, in the thread count the stage uses (all cores:
it decodes in-process), interleaved and rotated each repeat. The table shows the median s/step,
the process's CPU use over those steps ((user + sys) / wall, 200% = both of 2 cores busy) and
the noise draw alone on one step's logits [128, 1024, 7, 7]. Only the noise differs between
the modes (the same distribution, other draws), so the losses differ by sampling, not by kind.
"""
from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model.dvae as dvae  # noqa: E402
from model.dvae_train import train_dvae  # noqa: E402
from stages.config import load_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def torch_gumbel(logits: torch.Tensor, tau: float, hard: bool = False, dim: int = 1) -> torch.Tensor:
    return F.gumbel_softmax(logits, tau=tau, hard=hard, dim=dim)


def run(mode: str, steps: int) -> tuple[float, float]:
    """(s/step, CPU %) of `steps` dVAE updates with the noise of `mode` (torch | ours)."""
    params = load_params(ROOT / "params.yaml")
    cfg = params.tokenizer
    ours = dvae.gumbel_softmax
    dvae.gumbel_softmax = torch_gumbel if mode == "torch" else ours  # what loss_and_codes calls
    try:
        torch.manual_seed(0)
        model = dvae.DVAE(cfg.model)
        g = torch.Generator().manual_seed(1)
        size = cfg.model.image_size
        xs = [torch.rand(cfg.batch_size, 3, size, size, generator=g) for _ in range(4)]  # [B, 3, S, S]
        train_dvae(model, (xs[i % 4] for i in range(2)), 2, cfg.schedule)  # warm-up (k-means++ init)
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        # init_codes off: the k-means++ codebook init ran in the warm-up and is not a step's cost
        timed = dataclasses.replace(cfg.schedule, init_codes=False)
        train_dvae(model, (xs[i % 4] for i in range(steps)), steps, timed)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    finally:
        dvae.gumbel_softmax = ours
    cpu = (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / wall
    return wall / steps, 100 * cpu


def noise_ms(mode: str, repeats: int = 5) -> float:
    logits = torch.randn(128, 1024, 7, 7)  # [B, V, h, w]: one default step's logits
    if mode == "torch":
        draw = lambda: -torch.empty_like(logits).exponential_().log()  # what F.gumbel_softmax draws
    else:
        draw = lambda: dvae.gumbel_noise(logits.shape, logits.device)
    draw()
    t0 = time.perf_counter()
    for _ in range(repeats):
        draw()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    modes = ["torch", "ours"]
    step: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    noise: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for m in modes[r % 2:] + modes[:r % 2]:
            s, c = run(m, args.steps)
            step[m].append(s)
            cpu[m].append(c)
            noise[m].append(noise_ms(m))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats of {args.steps} steps")
    print("| noise | s/step | CPU | noise draw ms | runs s/step |\n|---|---|---|---|---|")
    for m in modes:
        runs = ", ".join(f"{s:.3f}" for s in step[m])
        print(f"| {m} | {statistics.median(step[m]):.3f} | {statistics.median(cpu[m]):.0f}% "
              f"| {statistics.median(noise[m]):.1f} | {runs} |")
    t, o = statistics.median(step["torch"]), statistics.median(step["ours"])
    print(f"step speed-up ours / torch: {t / o:.2f}x")


if __name__ == "__main__":
    main()
