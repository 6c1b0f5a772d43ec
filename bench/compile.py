"""torch.compile (inductor) against eager for the micro ViT's training steps on this CPU.

    .venv/bin/python bench/compile.py [--repeats 3] [--steps 10]

Two steps, each forward + backward + AdamW under bf16 autocast at 28 px, batch 128 (the
default's): the fine-tuning classifier (mean pool + head, drop path 0.1) and the MIM step
(40% of patches masked, 1,024 tokens). Eager and compiled modules are built from the same
seed and timed interleaved, rotated each repeat; the table shows the median step time, the
speedup, and the one-off compile time the first compiled steps paid (a stage pays it once
per process, so it is set against the stage's whole run in the README).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.beit import create_model  # noqa: E402
from model.classifier import BeitClassifier  # noqa: E402

BATCH, IMG, GRID = 128, 28, 7


def build(kind: str, compiled: bool):
    """(step function, compile seconds) for one fresh model of `kind`."""
    torch.manual_seed(0)
    enc = create_model("micro", img_size=IMG, vocab_size=1024)
    model = BeitClassifier.from_encoder(enc, 10, drop_path=0.1) if kind == "finetune" else enc
    net = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, 3, IMG, IMG)  # [B, 3, S, S]
    labels = torch.randint(0, 10, (BATCH,))  # [B]
    mask = torch.rand(BATCH, GRID * GRID) < 0.4  # [B, N]
    targets = torch.randint(0, 1024, (BATCH, GRID, GRID))  # [B, h, w]

    def one() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if kind == "finetune":
                loss = torch.nn.functional.cross_entropy(net(x), labels, label_smoothing=0.1)
            else:
                loss, _ = net.forward_loss(x, mask, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(2):  # warm-up (and, compiled, the compilation itself)
        one()
    return one, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    modes = [(k, c) for k in ("finetune", "pretrain") for c in (False, True)]
    steps = {m: build(*m) for m in modes}
    times: dict[tuple, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats):
        for m in modes[r % len(modes):] + modes[:r % len(modes)]:
            one = steps[m][0]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                one()
            times[m].append((time.perf_counter() - t0) / args.steps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, {IMG} px, bf16 autocast")
    print("| step | eager ms | compiled ms | speedup | compile s (2 warm-up steps) | runs (eager / compiled) |")
    print("|---|---|---|---|---|---|")
    for kind in ("finetune", "pretrain"):
        e, c = statistics.median(times[(kind, False)]), statistics.median(times[(kind, True)])
        runs = " / ".join(",".join(f"{t * 1e3:.0f}" for t in times[(kind, a)]) for a in (False, True))
        print(f"| {kind} | {e * 1e3:.0f} | {c * 1e3:.0f} | {e / c:.2f}x | {steps[(kind, True)][1]:.0f} | {runs} |")


if __name__ == "__main__":
    main()
