"""The MIM loader of this revision beside another revision's `pipeline/mim.py`, on the same shards.

    git show REV:pipeline/mim.py > /tmp/old_mim.py
    .venv/bin/python bench/loader_against.py --against /tmp/old_mim.py [--images 6000] [--rounds 6]

Builds bench/pretrain.py's 28 px fixture (real Fashion-MNIST shard subsets if `data/shards/train`
exists, else synthetic; a token store with the real stored views), then times one epoch of each
loader (batch 128, batched block masks, after the first batch) in-process and with one DataLoader
worker, the two revisions interleaved (order swapped every round), one torch thread. First it checks
that both revisions deliver the same batches, bit for bit, so the timing compares equal work.
Prints µs per image (medians), other / this, and every round's ratio.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import click
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from against import load_module  # noqa: E402  (bench/against.py: a script's folder is on sys.path)
from pipeline.masking import MaskGenerator  # noqa: E402
from pipeline.mim import MIMDataset  # noqa: E402
from pipeline.schema import LoaderConfig, MaskingConfig  # noqa: E402
from pipeline.stream import batches  # noqa: E402


@click.command()
@click.option("--against", "against_path", required=True, help="another revision's pipeline/mim.py")
@click.option("--images", default=6000, show_default=True)
@click.option("--rounds", default=6, show_default=True, help="interleaved rounds per worker setting")
@click.option("--batch", default=128, show_default=True)
def main(against_path: str, images: int, rounds: int, batch: int) -> None:
    torch.set_num_threads(1)
    other = load_module(against_path, "other_mim")
    bench_pretrain = load_module(ROOT / "bench" / "pretrain.py", "bench_pretrain")
    source, split = bench_pretrain.loader_fixture(Path(tempfile.mkdtemp()), images, 2, 2, "fashion")
    gen = MaskGenerator((8, 8), MaskingConfig(kind="block", mask_ratio=0.4, draw="batched"))
    size = 32  # bench/pretrain.py's fashion size: 28 px images rendered at 32

    def epoch(cls, workers: int, measure: bool):
        cfg = LoaderConfig(num_workers=workers, shuffle_buffer=500)
        it = batches(cls(split, cfg, size, gen, seed=0), batch, workers, epoch=0)
        if not measure:
            return list(it)
        next(it)  # worker start-up and the shuffle buffer's fill: not counted
        t = time.perf_counter()
        k = sum(1 for _ in it)
        return (time.perf_counter() - t) / (k * batch) * 1e6

    a, b = epoch(MIMDataset, 0, False), epoch(other.MIMDataset, 0, False)
    if len(a) != len(b) or any(x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x)
                               for x, y in zip(a, b)):
        raise SystemExit("the two revisions deliver different batches: the timing would compare unequal work")
    print(f"{source}; {split.num_samples} images, {size} px, batch {batch}, batched block masks 8x8; "
          f"the same {len(a)} batches from both revisions")
    for workers in (0, 1):
        us = {"this": [], "other": []}
        for r in range(rounds):
            for name in (("this", "other") if r % 2 == 0 else ("other", "this")):
                us[name].append(epoch(MIMDataset if name == "this" else other.MIMDataset, workers, True))
        med = {k: statistics.median(v) for k, v in us.items()}
        where = "in-process" if workers == 0 else "1 worker"
        print(f"  {where:<10} this {med['this']:7.1f} us/img   other {med['other']:7.1f} us/img   "
              f"other / this {med['other'] / med['this']:.3f}x   rounds "
              + " ".join(f"{o / t:.2f}" for o, t in zip(us["other"], us["this"])))


if __name__ == "__main__":
    main()
