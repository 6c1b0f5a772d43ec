"""One `beit segment` training step against one fine-tuning step, side by side on this CPU.

    OMP_NUM_THREADS=1 .venv/bin/python bench/segment.py [--repeats 3] [--steps 4] [--threads 1]

Both run forward + backward + AdamW under bf16 autocast on random batches of 16: the
segmenter (micro encoder at 56 px = 14x14 patches, UperNet with segment.head's defaults +
aux head) and the classifier fine-tuning trains (micro at 28 px, 7x7). Interleaved and
rotated each repeat, so a loaded machine slows both alike; the ratio of their per-image
times, times the fine-tuning img/s the README measured on the idle 2-core machine, is the
estimate of the segment stage's speed there.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.beit import model_config  # noqa: E402
from model.classifier import BeitClassifier  # noqa: E402
from model.schema import SegHeadConfig  # noqa: E402
from model.segmentation import BeitSegmenter  # noqa: E402
from stages.config import load_params  # noqa: E402


def make(kind: str, channels: int):
    torch.manual_seed(0)
    if kind == "segment":
        model = BeitSegmenter(model_config("micro", img_size=56), 11, SegHeadConfig(channels=channels))
        x, y = torch.randn(16, 3, 56, 56), torch.randint(0, 11, (16, 56, 56))  # [B, 3, S, S], [B, S, S]
        loss = lambda: model.loss(x, y)[0]  # noqa: E731
    else:
        model = BeitClassifier(model_config("micro", img_size=28), 10, drop_path=0.1)
        x, y = torch.randn(16, 3, 28, 28), torch.randint(0, 10, (16,))
        loss = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), loss


def step_time(kind: str, steps: int, channels: int) -> float:
    model, opt, loss = make(kind, channels)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = loss()
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    channels = load_params(Path(__file__).resolve().parents[1] / "params.yaml").segment.head.channels
    kinds = ["segment", "finetune"]
    res: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.repeats):
        for k in kinds[r % 2:] + kinds[:r % 2]:
            res[k].append(step_time(k, args.steps, channels))
    seg, fine = statistics.median(res["segment"]), statistics.median(res["finetune"])
    print(f"segment (56 px, UperNet {channels} ch + aux): {seg:.3f} s / step of 16 ({16 / seg:.1f} img/s)")
    print(f"finetune (28 px classifier):             {fine:.3f} s / step of 16 ({16 / fine:.1f} img/s)")
    print(f"ratio: a segment image costs {seg / fine:.2f}x a fine-tuning image")


if __name__ == "__main__":
    main()
