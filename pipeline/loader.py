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
import json
import random
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds

from pipeline.fingerprint import index_fingerprint, stable_hash
from pipeline.images import decode_rgb
from pipeline.masking import MaskGenerator
from pipeline.tokens import open_tokens
from pipeline.views import View, apply_view

IMAGE_EXTS = ("jpg", "png")


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


def image_bytes(sample: dict) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"{sample.get('__url__')}: sample {sample.get('__key__')} has no image")


class MIMDataset(torch.utils.data.IterableDataset):
    """One epoch of MIM samples for this rank and DataLoader worker; `set_epoch` first."""

    def __init__(self, split: SplitData, cfg: LoaderConfig, masks: Optional[MaskGenerator],
                 seed: int):
        super().__init__()
        self.split, self.cfg, self.masks, self.seed = split, cfg, masks, seed
        self.epoch = 0
        self._mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self._std = torch.tensor(cfg.std).view(3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def make_sample(self, sample: dict) -> dict:
        key = sample["__key__"].split("/")[-1]
        image = decode_rgb(image_bytes(sample))  # uint8 [H, W, 3]
        V = sample["__tokens__"].shape[0]
        v = (self.epoch + stable_hash("view", key)) % V
        view = View.from_array(sample["__views__"][v])
        out = {"label": int(sample["cls"]),
               "tokens": torch.from_numpy(sample["__tokens__"][v].astype(np.int64))}  # [h, w]
        x = apply_view(image, view, self.cfg.image_size)  # float [3, S, S] in [0, 1]
        out["image"] = (x - self._mean) / self._std
        if self.masks is not None:
            rng = np.random.default_rng(stable_hash("mask", self.seed, self.epoch, key))
            out["mask"] = torch.from_numpy(self.masks(rng).reshape(-1))  # bool [h*w]
        return out

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = _rank_worker()
        ids = epoch_shards(self.split.shards, self.seed, self.epoch, rank, world, worker, workers)
        urls = [str(self.split.shard_dir / self.split.shards[i]) for i in ids]
        stream = wds.tarfile_to_samples()(iter([{"url": u} for u in urls]))
        stream = attach_tokens(stream, open_tokens(self.split.token_path), self.split.shards)
        rng = random.Random(stable_hash("buffer", self.seed, self.epoch, rank, worker))
        for sample in shuffle_buffer(stream, self.cfg.shuffle_buffer, rng):
            yield self.make_sample(sample)


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
