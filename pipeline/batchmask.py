"""Masks for a whole batch at once: the same generators as pipeline/masking.py, vectorised.

`make_mask` draws one mask from one `np.random.Generator`: at 14x14 that costs ~100 us per
sample in the loader, most of it numpy's per-call overhead (a `Generator(PCG64(seed))` per
key, then ~20 scalar `random()` / `integers()` calls), i.e. more than the rest of a 28 px
sample's decode + render. Here every mask of a batch advances together, one numpy op over
the batch per step of the algorithm.

Same algorithms, same distribution, different draws:

* blockwise (paper Algorithm 1 with this project's exact-count tail, pipeline/masking.py):
  each still-active sample makes one placement attempt per step (area uniform in
  [min_block, budget], log-uniform aspect, uniform position); a sample stops placing when
  its remaining budget is below min_block or `tries` attempts in a row failed; the tail is
  then grown from the blocks' border, cells drawn with weight (masked neighbours)^2.
* random: the first `num_masked` cells of a uniform random order.

The uniforms come from a counter-based generator: uniform j of attempt t for a sample is
SplitMix64's output number (t * 4 + j) for the sample's 64-bit stream id (a hash of seed,
epoch and key; pipeline/mim.py). So a key's mask depends on nothing but its stream id: not on
the batch it lands in, its position there, or the DataLoader's worker count.

This module imports numpy only.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GROW = 1 << 40  # counters of the tail growth start here, far past any placement attempt


def uniforms(streams: np.ndarray, counter: int, n: int) -> np.ndarray:
    """float64 [B, n] in [0, 1): SplitMix64 outputs counter .. counter+n-1 of each stream.

    SplitMix64 (Steele, Lea, Flood 2014) is a counter hashed by a 64-bit finaliser, so any
    output is computed directly, for all streams at once (numpy's uint64 ops wrap mod 2^64)."""
    c = np.arange(counter + 1, counter + n + 1, dtype=np.uint64)  # [n]
    with np.errstate(over="ignore"):
        z = streams[:, None] + c[None, :] * _GAMMA  # [B, n]
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # 53 bits, as numpy's random()


def random_masks(streams: np.ndarray, grid: tuple[int, int], num_masked: int) -> np.ndarray:
    """bool [B, h, w]: `num_masked` uniformly chosen cells per sample."""
    gh, gw = grid
    order = np.argsort(uniforms(streams, 0, gh * gw), axis=1, kind="stable")  # [B, h*w]
    mask = np.zeros((len(streams), gh * gw), dtype=bool)  # [B, h*w]
    np.put_along_axis(mask, order[:, :num_masked], True, axis=1)
    return mask.reshape(len(streams), gh, gw)  # [B, h, w]


def block_masks(streams: np.ndarray, grid: tuple[int, int], num_masked: int, min_block: int,
                max_block: Optional[int] = None, min_aspect: float = 0.3, tries: int = 10) -> np.ndarray:
    """bool [B, h, w], exactly `num_masked` True per sample; arguments as `make_mask`'s
    (validated there: MaskGenerator checks them once)."""
    gh, gw = grid
    b = len(streams)
    max_block = num_masked if max_block is None else max_block
    mask = np.zeros((b, gh, gw), dtype=bool)  # [B, h, w]
    count = np.zeros(b, dtype=np.int64)  # [B] masked so far
    _place(streams, mask, count, num_masked, min_block, max_block, min_aspect, tries)
    _grow(streams, mask.reshape(b, gh * gw), num_masked - count, grid)
    return mask


def _place(streams, mask, count, target, min_block, max_block, min_aspect, tries) -> None:
    """Algorithm 1 over the batch, in place: one attempt per active sample per step.

    The masks live as bitboards while blocks are placed (uint64 [B, words], cell r * w + c
    at bit (r * w + c) % 64 of word (r * w + c) // 64) and a block is the AND of two bands,
    so an attempt costs a handful of ops on [A, words] instead of [A, h, w] boolean grids;
    the uniforms are computed 16 attempts at a time. Same draws, same masks as attempt-by-
    attempt boolean grids (tests/test_batchmask.py pins them); speed: bench/README.md."""
    b, gh, gw = mask.shape
    row_bands, col_bands = _band_tables(gh, gw)  # uint64 [gh, gh+1, words], [gw, gw+1, words]
    words = np.zeros((b, row_bands.shape[-1]), dtype=np.uint64)  # [B, words]
    log_lo = math.log(min_aspect)
    log_span = -2.0 * log_lo
    fails = np.zeros(b, dtype=np.int64)  # [B] failed attempts since the last placed block
    live = np.arange(b)  # samples still placing blocks
    step = 0
    while True:
        budget = np.minimum(target - count[live], max_block)  # [A] patches the next block may add
        keep = (budget >= min_block) & (fails[live] < tries)
        live, budget = live[keep], budget[keep]
        if len(live) == 0:
            break
        # uniform j of attempt t is SplitMix64 output 4t + j + 1, drawn for the live samples only:
        # most stop after a few attempts, so drawing 16 attempts ahead for all was ~5x the work
        u = uniforms(streams[live], 4 * step, 4)  # [A, 4]: area, aspect, top, left
        step += 1
        area = min_block + (budget - min_block) * u[:, 0]
        aspect = np.exp(log_lo + log_span * u[:, 1])
        h = np.maximum(1, np.rint(np.sqrt(area * aspect))).astype(np.int64)  # [A] rint: half to even, as round()
        w = np.maximum(1, np.rint(np.sqrt(area / aspect))).astype(np.int64)
        fits = (h <= gh) & (w <= gw)
        top = np.floor(u[:, 2] * np.maximum(gh - h + 1, 1)).astype(np.int64)  # uniform in [0, gh - h]
        left = np.floor(u[:, 3] * np.maximum(gw - w + 1, 1)).astype(np.int64)
        # a block that does not fit looks up clipped bands at 0: valid indices, rejected by `fits`
        rect = row_bands[top, np.minimum(h, gh)] & col_bands[left, np.minimum(w, gw)]  # [A, words]
        sub = words[live]  # [A, words] (a copy)
        new = np.bitwise_count(rect & ~sub).sum(axis=1, dtype=np.int64)  # [A] cells the block would add
        ok = fits & (new > 0) & (new <= budget)  # adds something, never overshoots the target
        placed = live[ok]
        words[placed] = sub[ok] | rect[ok]
        count[placed] += new[ok]
        fails[placed] = 0
        fails[live[~ok]] += 1
    bits = np.unpackbits(words.astype("<u8").view(np.uint8), axis=1, bitorder="little")  # [B, 64 * words]
    mask |= bits[:, :gh * gw].reshape(b, gh, gw).astype(bool)


@functools.lru_cache(maxsize=8)
def _band_tables(gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
    """Bitboards (uint64 [..., words]) of bands of the grid: rows [gh, gh+1, words], where
    rows[t, h] holds every cell of rows t .. t+h-1, and cols [gw, gw+1, words] likewise for
    columns. A block is rows[top, h] & cols[left, w]: tables of a few KB at any grid size
    (one bitboard per block would take 1.4 MB at 14x14 and 140 MB at 32x32)."""
    nwords = -(-(gh * gw) // 64)

    def pack(cells: np.ndarray) -> np.ndarray:  # bool [..., gh, gw] -> uint64 [..., words]
        flat = np.zeros((*cells.shape[:-2], 64 * nwords), dtype=bool)
        flat[..., :gh * gw] = cells.reshape(*cells.shape[:-2], gh * gw)
        return np.ascontiguousarray(np.packbits(flat, axis=-1, bitorder="little")).view("<u8").astype(np.uint64)

    rows = np.zeros((gh, gh + 1, gh, gw), dtype=bool)  # [top, h, row, col]
    cols = np.zeros((gw, gw + 1, gh, gw), dtype=bool)  # [left, w, row, col]
    for t in range(gh):
        for h in range(gh + 1):
            rows[t, h, t:t + h] = True
    for t in range(gw):
        for w in range(gw + 1):
            cols[t, w, :, t:t + w] = True
    return pack(rows), pack(cols)


def _grow(streams, flat, remaining, grid) -> None:
    """Add `remaining[i]` cells 4-adjacent to sample i's mask (flat: bool [B, h*w]), in place,
    each drawn with weight (masked neighbours)^2; an empty mask is seeded with one uniform cell.

    The neighbour counts live on a grid padded by one cell each side (flattened), so a cell's
    neighbours are at -1, +1, -W, +W without bounds checks; they are updated incrementally
    from each pick (recounting them each step took 3x as long)."""
    gh, gw = grid
    n = gh * gw
    empty = ~flat.any(axis=1) & (remaining > 0)
    if empty.any():
        idx = np.flatnonzero(empty)
        u = uniforms(streams[idx], _GROW - 1, 1)[:, 0]  # [E]
        flat[idx, np.minimum((u * n).astype(np.int64), n - 1)] = True
        remaining = remaining - empty
    live = np.flatnonzero(remaining > 0)
    if len(live) == 0:
        return
    W = gw + 2
    # int8 counts (at most 4 neighbours, weights at most 16) and int32 prefix sums: the same
    # integers as int64, at an eighth of the memory traffic (the grow was most of a 28 px mask)
    m = np.zeros((len(live), gh + 2, W), dtype=np.int8)  # [A, h+2, w+2]; the frame is unmasked here
    m[:, 1:-1, 1:-1] = flat[live].reshape(-1, gh, gw)
    nb = np.zeros_like(m)  # [A, h+2, w+2] masked 4-neighbours (inner cells only)
    nb[:, 1:-1, 1:-1] = m[:, :-2, 1:-1] + m[:, 2:, 1:-1] + m[:, 1:-1, :-2] + m[:, 1:-1, 2:]
    taken = m.astype(bool)  # [A, h+2, w+2] and the frame counts as taken: never drawn
    taken[:, 0], taken[:, -1], taken[:, :, 0], taken[:, :, -1] = True, True, True, True
    taken = taken.reshape(len(live), -1)  # [A, (h+2)(w+2)]
    nb = nb.reshape(len(live), -1)
    weight = np.where(taken, 0, nb * nb)  # [A, (h+2)(w+2)]; 0 on masked cells and the frame
    size = taken.shape[1]
    # flat views: one 1-D fancy index per update is ~2x faster than (row, col) pairs
    taken1, nb1, weight1 = taken.reshape(-1), nb.reshape(-1), weight.reshape(-1)
    left = remaining[live].copy()  # [A]
    u_all = uniforms(streams[live], _GROW, int(left.max()))  # [A, max picks]: pick s uses column s
    around = np.array([-1, 1, -W, W])  # the 4 neighbours' offsets; the frame absorbs a step outside
    step = 0
    while True:
        act = np.flatnonzero(left > 0)
        if len(act) == 0:
            break
        acc = np.cumsum(weight[act] if len(act) < len(left) else weight, axis=1, dtype=np.int32)  # [a, (h+2)(w+2)]
        u = u_all[act, step]  # [a]
        step += 1
        # A non-empty, non-full mask has a border cell, so the total is > 0.
        r = np.minimum((u * acc[:, -1]).astype(np.int64), acc[:, -1] - 1)  # [a] in [0, total)
        at = act * size + (acc > r[:, None]).argmax(axis=1)  # [a] flat index of the first cell past r
        taken1[at] = True
        weight1[at] = 0
        # [a * 4] cells next to the picks, all distinct (other samples' cells lie in other rows),
        # so one fancy-indexed update does what one per direction did
        q = (at[:, None] + around).reshape(-1)
        nb1[q] += 1
        q = q[~taken1[q]]
        weight1[q] = nb1[q] * nb1[q]
        left[act] -= 1
    inner = taken.reshape(len(live), gh + 2, W)[:, 1:-1, 1:-1]  # [A, h, w]
    flat[live] = inner.reshape(len(live), n)
