"""Labelled image streams for fine-tuning, linear probing and kNN.

The same generator stages as the MIM dataset (pipeline/stream.py: seeded shard
permutation split over ranks and workers, tar samples, seeded shuffle buffer),
without tokens:

    ShardList -> epoch_shards -> tar samples -> keep subset -> shuffle buffer (train)
    -> decode + view -> {"image", "label"}

Train view: RandomResizedCrop + flip drawn by `views.sample_view` from
(seed, epoch, key), so an epoch's augmentations are reproducible and a resumed
run sees exactly what an uninterrupted one saw. Colour jitter only when the
ViewConfig enables it. Eval view: the whole image resized (`identity_view`).

`label_subset` picks the low-label training subset: stratified per class,
seeded, deterministic, a pure function of index.parquet; `holdout_subset`
the validation images outside it, for tuning without the test split.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from pipeline.fingerprint import index_fingerprint, stable_hash
from pipeline.augment import Augment
from pipeline.schema import AugmentConfig, LoaderConfig, ViewConfig
from pipeline.shardread import check_shards, image_bytes, index_file, read_index, sample_key, shard_keys
from pipeline.stream import ShardList, epoch_stream
from pipeline.render import Encoded, render_views
from pipeline.views import identity_view, sample_view


def _class_orders(index_path: str | Path, seed: int) -> dict[int, list[str]]:
    """Per class: its keys sorted (row order of the index must not matter), then
    permuted by an RNG seeded with (seed, class). The label subset is a prefix
    of each order and the validation holdout a suffix, so they never overlap."""
    table = read_index(index_path, ["key", "label"])
    by_class: dict[int, list[str]] = {}
    for key, label in zip(table["key"], table["label"]):
        by_class.setdefault(int(label), []).append(key)
    orders = {}
    for label, members in sorted(by_class.items()):
        members.sort()
        rng = np.random.default_rng(stable_hash("label-fraction", seed, label))
        orders[label] = [members[i] for i in rng.permutation(len(members))]
    return orders


def _kept_count(fraction: float, n: int) -> int:
    return n if fraction == 1.0 else max(1, int(round(fraction * n)))  # every class is seen


def label_subset(index_path: str | Path, fraction: float, seed: int) -> frozenset[str]:
    """Keys kept when training on `fraction` of the labels.

    Per class, the first round(fraction * n) keys of `_class_orders` (at least
    one per class). Stratified, seeded, a pure function of index.parquet;
    fraction 1.0 keeps all.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction={fraction}: must be in (0, 1], e.g. 0.1")
    orders = _class_orders(index_path, seed)
    return frozenset(k for order in orders.values() for k in order[:_kept_count(fraction, len(order))])


def holdout_subset(index_path: str | Path, fraction: float, seed: int, size: int) -> frozenset[str]:
    """`size` train keys outside label_subset(index, fraction, seed), stratified.

    A validation set for tuning a recipe without looking at the test split:
    per class, the last ~size * n_class / n keys of `_class_orders`.
    """
    orders = _class_orders(index_path, seed)
    total = sum(len(o) for o in orders.values())
    spare = total - sum(_kept_count(fraction, len(o)) for o in orders.values())
    if not 0 < size <= spare:
        raise ValueError(f"validation={size}: must be in [1, {spare}], the train images outside the "
                         f"label_fraction={fraction} subset")
    kept: list[str] = []
    for order in orders.values():
        take = min(int(round(size * len(order) / total)), len(order) - _kept_count(fraction, len(order)))
        kept.extend(order[len(order) - take:])
    return frozenset(kept)


@dataclasses.dataclass(frozen=True)
class LabelledSplit(ShardList):
    """A split's shards with the per-shard counts of *kept* samples: a `ShardList`,
    so `pipeline.stream.epoch_steps` plans its steps as for the MIM dataset."""

    keep: Optional[frozenset[str]]  # None: every sample
    num_classes: int  # classes.json's length when the shard stage wrote one
    fingerprint: str  # of the index (+ the subset), for run fingerprints and feature caches


def open_labelled(shard_dir: str | Path, fraction: float = 1.0, seed: int = 0,
                  num_classes: Optional[int] = None, holdout: Optional[int] = None,
                  verify: bool = False) -> LabelledSplit:
    """Read index.parquet and check the tars (`check_shards`: their sizes; with `verify`, every
    image's sha256); keep a stratified `fraction` of it (see label_subset), or with
    `holdout=N`, the N-image validation set outside that fraction."""
    shard_dir = Path(shard_dir)
    index = index_file(shard_dir)
    table = read_index(index, ["key", "shard", "label"])
    check_shards(shard_dir, tuple(dict.fromkeys(table["shard"])), verify)
    if holdout is not None:
        keep = holdout_subset(index, fraction, seed, holdout)
    else:
        keep = None if fraction == 1.0 else label_subset(index, fraction, seed)
    by_shard = shard_keys(table, keep)
    if num_classes is None:  # the shard stage's class list; else the labels seen
        classes = shard_dir / "classes.json"
        num_classes = (len(json.loads(classes.read_text())) if classes.exists()
                       else int(max(table["label"], default=-1)) + 1)
    fp = index_fingerprint(index) + ("" if keep is None else f"-{fraction}-{seed}")
    fp += "" if holdout is None else f"-holdout{holdout}"
    return LabelledSplit(shard_dir, tuple(by_shard), tuple(len(k) for k in by_shard.values()),
                         keep, num_classes, fp)


class ClassifyDataset(torch.utils.data.IterableDataset):
    """One epoch of {"image": float [3, S, S] normalised, "label": int} (S = `image_size`)
    for this rank and DataLoader worker; `set_epoch` first.

    train=True: shuffle buffer + a random view per (seed, epoch, key).
    train=False: shard order as stored, identity view, no shuffling."""

    def __init__(self, split: LabelledSplit, cfg: LoaderConfig, image_size: int, seed: int,
                 train: bool, views: Optional[ViewConfig] = None, augment: AugmentConfig = AugmentConfig()):
        super().__init__()
        if cfg.transport != "float":  # mixup and RandAugment work on float images in the worker
            raise ValueError(f"loader.transport={cfg.transport!r}: labelled streams ship float only")
        if train and views is None:
            raise ValueError("a training ClassifyDataset needs a ViewConfig")
        self.split, self.cfg, self.image_size = split, cfg, image_size
        self.seed, self.train, self.views = seed, train, views
        self.epoch = 0
        self._mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self._std = torch.tensor(cfg.std).view(3, 1, 1)
        # A seed of its own: tokenize's views are sample_view(seed, key, v) for v < V,
        # and epoch e must not replay pretraining view e.
        self._view_seed = stable_hash("classify-view", seed)
        self._augment = Augment(augment, image_size, cfg.mean)  # RandAugment / erasing; off by default

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def make_sample(self, sample: dict) -> dict:
        key = sample_key(sample)
        image = Encoded(image_bytes(sample))  # JPEG: decoded at the view's DCT scale
        w, h = image.width, image.height
        if self.train:
            view = sample_view(self._view_seed, key, self.epoch, w, h, self.views)
        else:
            view = identity_view(w, h)
        x = render_views([image], [view], self.image_size)[0]  # float [3, S, S] in [0, 1]
        if self.train and self._augment.active:
            x = self._augment(x, self._mean, self._std, self._view_seed, self.epoch, key)  # normalised
        else:
            x = (x - self._mean) / self._std  # [3, S, S]
        return {"image": x, "label": int(sample["cls"])}

    def _kept(self, samples: Iterator[dict]) -> Iterator[dict]:
        keep = self.split.keep
        return samples if keep is None else (s for s in samples if sample_key(s) in keep)

    def __iter__(self) -> Iterator[dict]:
        # train=False: fixed order, no buffer; ranks and workers still take disjoint shards
        stream = epoch_stream(self.split, self.seed, self.epoch, train=self.train,
                              buffer_size=self.cfg.shuffle_buffer, buffer_salt="cls-buffer", stages=(self._kept,))
        for sample in stream:
            yield self.make_sample(sample)
