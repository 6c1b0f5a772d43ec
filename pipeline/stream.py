"""The generator stages both datasets are built from, in WebDataset's style.

    ShardList -> epoch_shards (this rank's and worker's share) -> tar samples
    -> dataset stages (attach tokens / keep a subset) -> seeded shuffle buffer (train)

A split is a `ShardList`: its shards in index order with the samples each one
streams (`counts`). `epoch_shards` is the one rule that deals the shards of an
epoch to (rank, DataLoader worker): a seeded permutation for training, the
stored order for evaluation, strided over ranks, then over workers. The
datasets iterate with it (`epoch_stream`) and `epoch_steps` counts with it, so
the step plan is always what the datasets deliver.

Every random choice is a function of (seed, epoch, rank, worker, key), so an
epoch's batch sequence is reproducible and a resumed run can skip to where it
stopped (`batches(..., skip=)`).
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from pipeline.fingerprint import stable_hash
from pipeline.ring import BatchRing
from pipeline.shardread import CorruptShard, tar_samples

# Batches a DataLoader worker renders ahead (torch's default); a worker's ring has one slot more,
# the one the main process is copying out.
PREFETCH = 2

Stage = Callable[[Iterator[dict]], Iterator[dict]]


@dataclasses.dataclass(frozen=True)
class ShardList:
    """A split's shards (in index order) and how many samples each one streams."""

    shard_dir: Path
    shards: tuple[str, ...]
    counts: tuple[int, ...]

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def rank_worker() -> tuple[int, int, int, int]:
    """(rank, world size, DataLoader worker id, workers) of the calling process."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = torch.utils.data.get_worker_info()
    worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank, world, worker, workers


def epoch_shards(shards: tuple[str, ...], seed: int, epoch: int, rank: int, world: int,
                 worker: int, workers: int, shuffle: bool = True) -> list[int]:
    """Shard indices this (rank, worker) reads in this epoch: a seeded permutation
    (shuffle=False: the stored order), strided over ranks, then over workers."""
    if shuffle:
        order = np.random.default_rng(stable_hash("shards", seed, epoch)).permutation(len(shards))
    else:
        order = np.arange(len(shards))
    return [int(s) for s in order[rank::world][worker::workers]]


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


def epoch_stream(split: ShardList, seed: int, epoch: int, train: bool, buffer_size: int,
                 buffer_salt: str, stages: Iterable[Stage] = ()) -> Iterator[dict]:
    """The tar samples of this process's shards, through `stages` in order, then (train)
    a shuffle buffer seeded by (buffer_salt, seed, epoch, rank, worker)."""
    rank, world, worker, workers = rank_worker()
    ids = epoch_shards(split.shards, seed, epoch, rank, world, worker, workers, shuffle=train)
    stream = tar_samples(str(split.shard_dir / split.shards[i]) for i in ids)
    for stage in stages:
        stream = stage(stream)
    stream = counted(stream, [(str(split.shard_dir / split.shards[i]), split.counts[i]) for i in ids])
    if train:
        rng = random.Random(stable_hash(buffer_salt, seed, epoch, rank, worker))
        stream = shuffle_buffer(stream, buffer_size, rng)
    return stream


def counted(samples: Iterator[dict], expected: list[tuple[str, int]]) -> Iterator[dict]:
    """`samples` unchanged, checking that the shards (url, count) in `expected` deliver
    exactly `count` samples each, in that order: what the step plan counted. A tar cut at
    a member boundary (or with a broken header checksum) ends quietly, as tarfile and
    webdataset end it; here that is CorruptShard, not an epoch that runs out of batches.
    One comparison per sample."""
    todo = iter(expected)
    url, count, seen = None, 0, 0
    for sample in samples:
        while sample["__url__"] != url:
            if seen != count:
                raise CorruptShard.at(url, f"ends after {seen} of the {count} samples index.parquet lists")
            (url, count), seen = next(todo), 0  # StopIteration cannot happen: the urls come from `expected`
        seen += 1
        if seen > count:
            raise CorruptShard.at(url, f"more than the {count} samples index.parquet lists")
        yield sample
    for url, count in [(url, count - seen), *todo]:
        if count:
            raise CorruptShard.at(url, f"ends after {seen} of the {seen + count} samples index.parquet lists")
        seen = 0


def epoch_steps(split: ShardList, batch_size: int, num_workers: int, seed: int, epoch: int,
                world: int) -> int:
    """Full batches every rank can deliver this (training) epoch. DDP needs the same
    number of steps on every rank (or the all-reduce hangs), so the epoch is cut to the
    poorest rank; its leftover samples come back in other epochs' permutations.
    Each DataLoader worker drops its own last partial batch (see `batches`)."""
    workers = max(1, num_workers)
    per_rank = []
    for rank in range(world):
        total = 0
        for worker in range(workers):
            ids = epoch_shards(split.shards, seed, epoch, rank, world, worker, workers)
            total += sum(split.counts[i] for i in ids) // batch_size
        per_rank.append(total)
    return min(per_rank)


def batches(dataset: torch.utils.data.IterableDataset, batch_size: int, num_workers: int,
            epoch: int, skip: int = 0, ring: bool = True) -> Iterator[dict]:
    """This epoch's batches (each worker drops its last partial batch, so every
    batch has the same shape); `skip` resumes mid-epoch. Stop after
    `epoch_steps(...)` batches to keep DDP ranks in step. `ring=False`: a self-batching
    dataset's workers ship new tensors per batch (the same batches; bench/pretrain.py times both)."""
    dataset.set_epoch(epoch)
    pin = torch.cuda.is_available()
    if getattr(dataset, "make_batch", None) is None:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                             drop_last=True, persistent_workers=False, pin_memory=pin)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        return
    # The dataset batches itself (pipeline/mim.py: rendered straight into the batch): the same
    # batches without a per-sample collate; its workers fill a ring of shared buffers and hand
    # over slot numbers (pipeline/ring.py says why; bench/README.md measures it).
    dataset.batch_size = batch_size
    shared = BatchRing(dataset.batch_spec(batch_size), num_workers, PREFETCH + 1) if num_workers and ring else None
    dataset.ring = shared  # the workers are started (fork or spawn) below, with the ring
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                             persistent_workers=False, pin_memory=pin and shared is None,
                                             prefetch_factor=PREFETCH if num_workers else None)
        for i, item in enumerate(loader):
            if shared is not None and i < skip:
                shared.release(item)  # a skipped batch is not copied out
            elif i >= skip:
                yield shared.take(item, pin) if shared is not None else item
    finally:
        if shared is not None:
            shared.close()
        dataset.ring = None


def eval_batches(dataset: torch.utils.data.IterableDataset, batch_size: int, num_workers: int,
                 limit: Optional[int] = None) -> Iterator[dict]:
    """Every sample of the split once (no drop_last), at most `limit` samples."""
    if getattr(dataset, "make_batch", None) is not None:
        dataset.batch_size = None  # samples, collated here (a training loader may have set it)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                         num_workers=num_workers, drop_last=False)
    seen = 0
    for batch in loader:
        if limit is not None and seen >= limit:
            break
        if limit is not None and seen + len(batch["label"]) > limit:
            batch = {k: v[: limit - seen] for k, v in batch.items()}
        seen += len(batch["label"])
        yield batch
