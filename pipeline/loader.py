"""Streaming MIM loader: WebDataset shards + precomputed tokens -> batches.

    shard list -> seeded shard shuffle -> split by rank -> split by worker
    -> tar samples -> attach tokens (one contiguous read per shard)
    -> seeded shuffle buffer -> decode + the stored view + mask -> batches

Every stage is a generator (an iterator in, an iterator out). Every random
choice is a function of (seed, epoch, rank, worker, key), so an epoch's batch
sequence is reproducible and a resumed run can skip to where it stopped.

View parity: the sample's view for this epoch is `(epoch + hash(key)) % V`,
and its parameters are read from the token store (exactly what the tokenize
stage used), then rendered by the same `apply_view` at the patch resolution.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.fingerprint import index_fingerprint, stable_hash
from pipeline.images import decode_rgb
from pipeline.masking import MaskGenerator
from pipeline.tarread import image_bytes, tar_samples  # noqa: F401 - image_bytes re-exported
from pipeline.tokens import open_tokens
from pipeline.views import View, apply_views



class StaleTokens(RuntimeError):
    """Shards and token store do not belong together."""


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    batch_size: int = 128
    num_workers: int = 2
    shuffle_buffer: int = 2000
    image_size: int = 32
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class SplitData:
    """A split's shards (in index order) and its token store, checked to match."""

    shard_dir: Path
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    token_path: Path

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def open_split(shard_dir: str | Path, token_path: str | Path) -> SplitData:
    """Read the shard index and check the token store was built from these shards."""
    shard_dir = Path(shard_dir)
    index = shard_dir / "index.parquet"
    if not index.exists():
        raise FileNotFoundError(f"{index}: missing; run `beit shard` (or `dvc repro shard`)")
    shard_col = pq.read_table(index, columns=["shard"]).column("shard").to_pylist()
    shards = tuple(dict.fromkeys(shard_col))  # first-appearance order == shard order
    counts = tuple(shard_col.count(s) for s in shards)
    store = open_tokens(token_path)
    want = index_fingerprint(index)
    have = store.spec.fingerprints.get("shards")
    if have != want or tuple(store.spec.shards) != shards:
        raise StaleTokens(
            f"{token_path}: tokens were computed from other shards than {shard_dir} "
            f"(fingerprint {have} != {want}); rerun `beit tokenize` (or `dvc repro`)")
    return SplitData(shard_dir, shards, counts, Path(token_path))


# ---------------------------------------------------------------- generator stages


def _rank_worker() -> tuple[int, int, int, int]:
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world, worker, workers


def epoch_shards(shards: tuple[str, ...], seed: int, epoch: int, rank: int, world: int,
                 worker: int, workers: int) -> list[int]:
    """Shard indices this (rank, worker) reads in this epoch: a seeded permutation,
    strided over ranks, then over workers."""
    order = np.random.default_rng(stable_hash("shards", seed, epoch)).permutation(len(shards))
    return [int(s) for s in order[rank::world][worker::workers]]


def attach_tokens(samples: Iterator[dict], store: Any, shard_names: tuple[str, ...]) -> Iterator[dict]:
    """Add `__tokens__` [V, h, w] and `__views__` [V, K] to each tar sample; reads a
    shard's rows in one contiguous slice when its first sample arrives."""
    position = {name: i for i, name in enumerate(shard_names)}
    current_url, name, keys, tokens, views, row = None, None, None, None, None, 0
    for sample in samples:
        url = sample["__url__"]
        if url != current_url:
            name = Path(url).name
            part = store.read_shard(position[name])
            current_url, keys, tokens, views, row = url, part.keys.tolist(), part.tokens, part.views, 0
        key = sample["__key__"]
        if "/" in key:
            key = key.rsplit("/", 1)[1]
        if row >= len(keys) or keys[row] != key:
            have = keys[row] if row < len(keys) else None
            raise StaleTokens(f"{name}: token row {row} is {have!r} but the tar has "
                              f"{sample['__key__']!r}; rerun `beit tokenize`")
        sample["__tokens__"], sample["__views__"] = tokens[row], views[row]
        row += 1
        yield sample


def shuffle_buffer(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buf: list[dict] = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = rng.randrange(len(buf))
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def view_of(row: np.ndarray) -> View:
    """`View.from_array(row)` for a float32 [K] row of the token store, without the
    float64 array round trip (float32 -> Python float is the same exact widening)."""
    if row.shape != (View.K,):
        return View.from_array(row)  # raises the shape error
    a = row.tolist()
    return View(int(round(a[0])), int(round(a[1])), int(round(a[2])), int(round(a[3])),
                int(round(a[4])), int(round(a[5])), a[6] >= 0.5, a[7], a[8], a[9], a[10])


class MIMDataset(torch.utils.data.IterableDataset):
    """One epoch of MIM samples for this rank and DataLoader worker; `set_epoch` first."""

    def __init__(self, split: SplitData, cfg: LoaderConfig, masks: Optional[MaskGenerator],
                 seed: int):
        super().__init__()
        self.split, self.cfg, self.masks, self.seed = split, cfg, masks, seed
        self.epoch = 0
        self._mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self._std = torch.tensor(cfg.std).view(3, 1, 1)
        # Samples rendered per apply_views call (1: one at a time; same output either way).
        # Measured (bench/pretrain.py): at 32 px chunks of 32 cut decode+augment from
        # ~180 to ~80 us/img (per-call tensor set-up dominates); at 224 px they do not
        # help (2.5 ms/img either way, more memory traffic), so large views go one by one.
        self.render_chunk = 32 if cfg.image_size <= 64 else 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def make_sample(self, sample: dict) -> dict:
        return self.make_samples([sample])[0]

    def make_samples(self, samples: list[dict]) -> list[dict]:
        """`make_sample` of each sample, the views rendered in one `apply_views` call.

        Same bits as rendering one at a time (apply_views works per image up to the
        resize, then per sample over the batch; tests/test_loader.py checks it): the
        per-call tensor set-up of the crop/flip/jitter ops is paid once per chunk."""
        images, views, outs, keys = [], [], [], []
        epoch = self.epoch
        for sample in samples:
            key = sample["__key__"]
            if "/" in key:
                key = key.rsplit("/", 1)[1]
            images.append(decode_rgb(image_bytes(sample)))  # uint8 [H, W, 3]
            tokens = sample["__tokens__"]  # [V, h, w]
            v = (epoch + stable_hash("view", key)) % tokens.shape[0]
            views.append(view_of(sample["__views__"][v]))
            outs.append({"label": int(sample["cls"]),
                         "tokens": torch.from_numpy(tokens[v].astype(np.int64))})  # [h, w]
            keys.append(key)
        x = apply_views(images, views, self.cfg.image_size)  # float [B, 3, S, S] in [0, 1]
        x.sub_(self._mean).div_(self._std)  # in place: same bits as (x - mean) / std
        for out, image, key in zip(outs, x.unbind(0), keys):
            out["image"] = image  # [3, S, S]
            if self.masks is not None:
                # default_rng(s) is Generator(PCG64(s)); the direct form skips a dispatch.
                rng = np.random.Generator(np.random.PCG64(stable_hash("mask", self.seed, epoch, key)))
                out["mask"] = torch.from_numpy(self.masks(rng).reshape(-1))  # bool [h*w]
        return outs

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = _rank_worker()
        ids = epoch_shards(self.split.shards, self.seed, self.epoch, rank, world, worker, workers)
        stream = tar_samples(str(self.split.shard_dir / self.split.shards[i]) for i in ids)
        stream = attach_tokens(stream, open_tokens(self.split.token_path), self.split.shards)
        rng = random.Random(stable_hash("buffer", self.seed, self.epoch, rank, worker))
        chunk: list[dict] = []
        for sample in shuffle_buffer(stream, self.cfg.shuffle_buffer, rng):
            chunk.append(sample)
            if len(chunk) >= self.render_chunk:
                yield from self.make_samples(chunk)
                chunk = []
        if chunk:
            yield from self.make_samples(chunk)


def epoch_steps(split: SplitData, cfg: LoaderConfig, seed: int, epoch: int, world: int) -> int:
    """Batches every rank can deliver this epoch. DDP needs the same number of
    steps on every rank (or the all-reduce hangs), so the epoch is cut to the
    poorest rank; its leftover samples come back in other epochs' permutations."""
    workers = max(1, cfg.num_workers)
    per_rank = []
    for rank in range(world):
        total = 0
        for worker in range(workers):
            ids = epoch_shards(split.shards, seed, epoch, rank, world, worker, workers)
            total += sum(split.counts[i] for i in ids) // cfg.batch_size
        per_rank.append(total)
    return min(per_rank)


def batches(dataset: MIMDataset, cfg: LoaderConfig, epoch: int, skip: int = 0) -> Iterator[dict]:
    """This epoch's batches (each worker drops its last partial batch, so every
    batch has the same shape); `skip` resumes mid-epoch. Stop after
    `epoch_steps(...)` batches to keep DDP ranks in step."""
    dataset.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=True,
        persistent_workers=False, pin_memory=torch.cuda.is_available())
    for i, batch in enumerate(loader):
        if i >= skip:
            yield batch
