"""Masks per second: our blockwise/random generators beside the unilm reference.

    .venv/bin/python bench/masking.py
    .venv/bin/python bench/masking.py --against F   # batched masks beside F, another revision's
                                                    # pipeline/batchmask.py (git show REV:pipeline/batchmask.py > F)

The reference (unilm beit/masking_generator.py, np.int -> bool, `random` module)
is copied below only to compare speed and show its shortfall: it returns fewer
patches than asked, and an empty mask when the target is below min_block.

Measured on the shared 2-core dev box (one thread), mask_ratio 0.4 (the `keyed` lines: what the
loader calls per batch of 128, per-sample vs batched draw: 4.3x at 14x14 block, 5.5x at 8x8, with
a DVC experiment running beside it):
  14x14 (78 patches): block ~15.5k masks/s (~65 us), random ~120k/s;
                      reference ~8.4k/s, short of the target in 30% of masks
  8x8   (26 patches): block ~26k masks/s (~39 us), random ~110k/s;
                      reference ~20k/s, short in 6%
  reference with target 10 < min block 16 on 14x14: 12% empty masks.
All far below JPEG decode + augment (~1-3 ms per 224 px image).
"""
from __future__ import annotations

import math
import random
import sys
import time

import numpy as np

from pipeline.masking import MaskGenerator

from pipeline.schema import MaskingConfig


class ReferenceMaskingGenerator:  # unilm, trimmed; kept verbatim in logic
    def __init__(self, input_size, num_masking_patches, min_num_patches=16, max_num_patches=None,
                 min_aspect=0.3, max_aspect=None):
        self.height, self.width = input_size
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _ in range(10):
            target_area = random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = random.randint(0, self.height - h)
                left = random.randint(0, self.width - w)
                num_masked = mask[top: top + h, left: left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = np.zeros((self.height, self.width), dtype=bool)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - mask_count, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask


def rate(fn, n: int) -> tuple[float, list[int]]:
    t = time.perf_counter()
    counts = [int(fn().sum()) for _ in range(n)]
    return n / (time.perf_counter() - t), counts


def timed(fn) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(n: int = 3000) -> None:
    rng = np.random.default_rng(0)
    random.seed(0)
    for grid in [(14, 14), (8, 8)]:
        for kind in ("block", "random"):
            gen = MaskGenerator(grid, MaskingConfig(kind=kind, mask_ratio=0.4))
            r, counts = rate(lambda: gen(rng), n)
            print(f"ours      {grid[0]:>2}x{grid[1]:<2} {kind:6s} target {gen.num_masked:3d}: "
                  f"{r:9.0f} masks/s, counts {min(counts)}..{max(counts)}")
        for kind in ("block", "random"):  # what the loader calls: one keyed call per batch of 128
            ids = np.random.default_rng(1).integers(0, 2**63, n, dtype=np.uint64)
            per = MaskGenerator(grid, MaskingConfig(kind=kind, mask_ratio=0.4))
            bat = MaskGenerator(grid, MaskingConfig(kind=kind, mask_ratio=0.4, draw="batched"))
            r_per, r_bat = (n / timed(lambda: [g.keyed(ids[i:i + 128]) for i in range(0, n, 128)])
                            for g in (per, bat))
            print(f"keyed     {grid[0]:>2}x{grid[1]:<2} {kind:6s} batches of 128: per-sample {r_per:9.0f} masks/s "
                  f"(seeding included), batched {r_bat:9.0f} masks/s: {r_bat / r_per:.1f}x")
        gen = MaskGenerator(grid)
        ref = ReferenceMaskingGenerator(grid, gen.num_masked, min_num_patches=gen.min_block)
        r, counts = rate(ref, n)
        print(f"reference {grid[0]:>2}x{grid[1]:<2} block  target {gen.num_masked:3d}: "
              f"{r:9.0f} masks/s, counts {min(counts)}..{max(counts)} "
              f"(short of target in {np.mean(np.array(counts) < gen.num_masked):.0%})")
    ref = ReferenceMaskingGenerator((14, 14), 10)  # target below min block 16
    _, counts = rate(ref, 1000)
    print(f"reference 14x14 target 10 (< min 16): empty masks {np.mean(np.array(counts) == 0):.0%}")


def against(path: str, rounds: int = 5, n: int = 5120) -> None:
    """Batched block masks of this checkout beside those of another revision's
    pipeline/batchmask.py (`git show REV:pipeline/batchmask.py > F`), interleaved rounds in one
    process, batches of 128 (what the loader calls); checks that both draw the same masks."""
    import statistics

    from against import load_module  # bench/against.py (a script's folder is on sys.path)
    from pipeline import batchmask
    from pipeline.masking import default_min_block, num_masked_for

    other = load_module(path, "batchmask_other")
    for grid in [(7, 7), (8, 8), (14, 14)]:
        k, mb = num_masked_for(grid, 0.4), default_min_block(grid)
        ids = np.random.default_rng(1).integers(0, 2**63, n, dtype=np.uint64)
        same = all((batchmask.block_masks(ids[i:i + 128], grid, k, mb) ==
                    other.block_masks(ids[i:i + 128], grid, k, mb)).all() for i in range(0, n, 128))
        rates: dict[str, list[float]] = {"this": [], "other": []}
        for r in range(rounds):
            for name in (("this", "other") if r % 2 == 0 else ("other", "this")):
                mod = batchmask if name == "this" else other
                rates[name].append(n / timed(lambda: [mod.block_masks(ids[i:i + 128], grid, k, mb)
                                                      for i in range(0, n, 128)]))
        this, that = statistics.median(rates["this"]), statistics.median(rates["other"])
        print(f"batched block {grid[0]:>2}x{grid[1]:<2} target {k:3d}: this {1e6 / this:6.1f} us/mask, "
              f"{path} {1e6 / that:6.1f} us/mask: {this / that:.2f}x; same masks: {same}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--against":
        against(sys.argv[2])
    else:
        main()
