"""The MIM loader and blockwise masking as they were before the speed work (2026-11),
kept verbatim as the reference that tests/test_loader_fast.py compares the fast
paths with, bit for bit, and that bench/pretrain.py times side by side
(mode "legacy loader").

    webdataset.tarfile_to_samples -> attach_tokens (Path(url).name per sample)
    -> shuffle buffer -> per sample: decode, View.from_array, apply_view,
    (x - mean) / std, np.random.default_rng(...) + numpy make_mask
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds

from pipeline.fingerprint import stable_hash
from pipeline.masking import MaskGenerator, default_min_block
from pipeline.mim import MIMDataset, StaleTokens
from pipeline.shardread import decode_rgb, image_bytes
from pipeline.stream import epoch_shards, rank_worker, shuffle_buffer
from pipeline.tokens import open_tokens
from pipeline.views import View, apply_view


def ref_mask(gen: MaskGenerator, rng: np.random.Generator) -> np.ndarray:
    """MaskGenerator.__call__ with the pre-change numpy block placement and growth."""
    c = gen.config
    grid, num_masked = gen.grid, gen.num_masked
    if c.kind == "random":
        n = grid[0] * grid[1]
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, size=num_masked, replace=False)] = True
        return mask.reshape(grid)
    b = c.blocks
    min_block = default_min_block(grid) if b.min_block is None else b.min_block
    max_block = num_masked if b.max_block is None else b.max_block
    mask = np.zeros(grid, dtype=bool)
    count = ref_place_blocks(rng, mask, num_masked, min_block, max_block, b.min_aspect, b.tries)
    if count < num_masked:
        ref_grow(rng, mask, num_masked - count)
    return mask


def ref_place_blocks(rng, mask, target, min_block, max_block, min_aspect, tries) -> int:
    """Paper Algorithm 1: add rectangles until no block fits the remainder. Returns the count."""
    gh, gw = mask.shape
    log_lo, log_hi = math.log(min_aspect), -math.log(min_aspect)
    count = 0
    while True:
        budget = min(target - count, max_block)  # new patches this block may add
        if budget < min_block:
            return count  # the tail (< min_block) is grown from block borders
        added = 0
        for _ in range(tries):
            area = rng.uniform(min_block, budget)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            h = max(1, round(math.sqrt(area * aspect)))
            w = max(1, round(math.sqrt(area / aspect)))
            if h > gh or w > gw:
                continue
            top = int(rng.integers(0, gh - h + 1))
            left = int(rng.integers(0, gw - w + 1))
            window = mask[top:top + h, left:left + w]  # [h, w] view
            new = h * w - int(window.sum())
            if 0 < new <= budget:  # adds something, never overshoots the target
                window[...] = True
                added = new
                break
        if added == 0:
            return count  # crowded grid: border growth finishes the job
        count += added


def ref_grow(rng, mask, k) -> None:
    """Add exactly k patches 4-adjacent to masked ones, in place.

    Cells are drawn with probability proportional to (masked neighbours)^2, so
    notches fill first and the tail hugs the existing blocks instead of forming
    a ragged fringe. An empty mask is seeded with one random cell.
    """
    gh, gw = mask.shape
    if not mask.any():
        mask[rng.integers(gh), rng.integers(gw)] = True
        k -= 1
    m = mask.astype(np.int64)  # [h, w]
    nb = np.zeros_like(m)  # [h, w] masked 4-neighbours per cell
    nb[1:] += m[:-1]
    nb[:-1] += m[1:]
    nb[:, 1:] += m[:, :-1]
    nb[:, :-1] += m[:, 1:]
    nb[mask] = 0  # only unmasked cells are candidates
    nb = nb.reshape(-1)  # [h*w]
    flat = mask.reshape(-1)  # [h*w] view into mask
    for _ in range(k):
        # A non-empty, non-full mask on a connected grid always has a border
        # cell, so the total weight is > 0; integer draws keep zero-weight cells
        # unreachable (searchsorted 'right' skips their repeated cumsum values).
        cum = np.cumsum(nb * nb)  # [h*w]
        idx = int(np.searchsorted(cum, rng.integers(cum[-1]), side="right"))
        flat[idx] = True
        nb[idx] = 0
        i, j = divmod(idx, gw)  # update neighbour counts incrementally
        for ni, nj in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
            if 0 <= ni < gh and 0 <= nj < gw and not flat[ni * gw + nj]:
                nb[ni * gw + nj] += 1



def ref_attach_tokens(samples, store, shard_names) -> Iterator[dict]:
    position = {name: i for i, name in enumerate(shard_names)}
    current, part, row = None, None, 0
    for sample in samples:
        name = Path(sample["__url__"]).name
        if name != current:
            current, part, row = name, store.read_shard(position[name]), 0
        if part.keys[row] != sample["__key__"].split("/")[-1]:
            raise StaleTokens(f"{name}: token row {row} is {part.keys[row]!r} but the tar has "
                              f"{sample['__key__']!r}; rerun `beit tokenize`")
        sample["__tokens__"], sample["__views__"] = part.tokens[row], part.views[row]
        row += 1
        yield sample


class LegacyMIMDataset(MIMDataset):
    """MIMDataset with the pre-change stages and per-sample make_sample, batched by the
    DataLoader's collate (it predates the dataset-side batches)."""

    make_batch = None

    def make_sample(self, sample: dict) -> dict:
        key = sample["__key__"].split("/")[-1]
        image = decode_rgb(image_bytes(sample))  # uint8 [H, W, 3]
        V = sample["__tokens__"].shape[0]
        v = (self.epoch + stable_hash("view", key)) % V
        view = View.from_array(sample["__views__"][v])
        out = {"label": int(sample["cls"]),
               "tokens": torch.from_numpy(sample["__tokens__"][v].astype(np.int64))}  # [h, w]
        x = apply_view(image, view, self.image_size)  # float [3, S, S] in [0, 1]
        out["image"] = (x - self._mean) / self._std
        if self.masks is not None:
            rng = np.random.default_rng(stable_hash("mask", self.seed, self.epoch, key))
            out["mask"] = torch.from_numpy(ref_mask(self.masks, rng).reshape(-1))  # bool [h*w]
        return out

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = rank_worker()
        ids = epoch_shards(self.split.shards, self.seed, self.epoch, rank, world, worker, workers)
        urls = [str(self.split.shard_dir / self.split.shards[i]) for i in ids]
        stream = wds.tarfile_to_samples()(iter([{"url": u} for u in urls]))
        stream = ref_attach_tokens(stream, open_tokens(self.split.token_path), self.split.shards)
        rng = random.Random(stable_hash("buffer", self.seed, self.epoch, rank, worker))
        for sample in shuffle_buffer(stream, self.cfg.shuffle_buffer, rng):
            yield self.make_sample(sample)
