"""torch.compile (inductor, C++/OpenMP kernels) against eager for the default's CPU training steps.

    .venv/bin/python bench/compile_cpu.py [--repeats 3] [--steps 8]

Two steps of the default at 28 px, batch 128, fp32, as `optim.compile: true` would run them
(model/engine.py compiles the module, the optimiser stays eager):
  mim:      the micro ViT's forward_loss (40% of the 7x7 patches masked, 1,024 tokens) + backward + AdamW
  finetune: the micro classifier (drop path 0.1) on soft targets + backward + AdamW
Each mode builds its model from the same seed; compile time (the first steps) is printed apart
from the steady state. Modes are interleaved and rotated each repeat; medians.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.beit import create_model  # noqa: E402
from model.classifier import BeitClassifier  # noqa: E402

BATCH, IMG, GRID, VOCAB, CLASSES = 128, 28, 7, 1024, 10


def make_step(task: str, compiled: bool):
    torch.manual_seed(0)
    encoder = create_model("micro", img_size=IMG, vocab_size=VOCAB)
    model = encoder if task == "mim" else BeitClassifier.from_encoder(encoder, CLASSES, drop_path=0.1)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, IMG, IMG, generator=g)  # [B, 3, S, S]
    mask = torch.rand(BATCH, GRID * GRID, generator=g) < 0.4  # [B, N]
    tokens = torch.randint(0, VOCAB, (BATCH, GRID, GRID), generator=g)  # [B, h, w]
    soft = torch.softmax(torch.randn(BATCH, CLASSES, generator=g), 1)  # [B, K] mixup-like targets

    def one() -> float:
        if task == "mim":
            loss, _ = net(x, mask, tokens)  # BeitMIM.forward is forward_loss, as the trainer calls it
        else:
            loss = torch.sum(-soft * F.log_softmax(net(x), dim=-1), dim=-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return one


def run(task: str, compiled: bool, steps: int) -> tuple[float, float, float]:
    """-> (seconds of the first two steps, steady s/step, first loss)."""
    one = make_step(task, compiled)
    t = time.perf_counter()
    first = one()
    one()
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        one()
    return warm, (time.perf_counter() - t) / steps, first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    modes = [(task, c) for task in ("mim", "finetune") for c in (False, True)]
    res: dict[tuple, list] = {m: [] for m in modes}
    for r in range(args.repeats):
        for m in modes[r % len(modes):] + modes[:r % len(modes)]:
            torch._dynamo.reset()  # every compiled run pays its own compile
            res[m].append(run(*m, args.steps))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, {IMG} px, fp32")
    print("| step | eager ms/step | compiled ms/step | speed-up | compile (first 2 steps, s) | first loss eager / compiled |")
    print("|---|---|---|---|---|---|")
    for task in ("mim", "finetune"):
        e, c = res[(task, False)], res[(task, True)]
        me, mc = statistics.median(s for _, s, _ in e), statistics.median(s for _, s, _ in c)
        print(f"| {task} | {me * 1e3:.0f} | {mc * 1e3:.0f} | {me / mc:.2f}x | "
              f"{statistics.median(w for w, _, _ in c):.1f} | {e[0][2]:.5f} / {c[0][2]:.5f} |")


if __name__ == "__main__":
    main()
