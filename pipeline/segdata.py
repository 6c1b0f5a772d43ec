"""Segmentation samples streamed from `beit shard-seg` shards: image + label map, aligned.

The same generator stages as the classification stream (pipeline/stream.py): seeded shard
permutation over ranks and workers, tar samples, a seeded shuffle buffer for training.

Train view (mmseg's recipe, on small images): a random rescale of the whole scene by a
factor in `scale`, a random crop (or pad, image with 0 and the map with 255 = ignore) to
`size`, a horizontal flip with probability `flip_p`. One draw per (seed, epoch, key),
applied to both: bilinear for the image, nearest for the map, so every label stays on its
pixel. Eval: the image resized to `size` (nearest for the map; a no-op at the shard size).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.fingerprint import index_fingerprint, stable_hash
from pipeline.schema import IGNORE_INDEX, LoaderConfig
from pipeline.segsource import SEG_EXT, decode_mask
from pipeline.shardread import (CorruptShard, check_shards, decode_rgb, image_bytes, index_file, read_index,
                                sample_key, shard_keys)
from pipeline.stream import ShardList, epoch_stream


@dataclasses.dataclass(frozen=True)
class SegSplit(ShardList):
    num_classes: int
    classes: tuple[str, ...]
    fingerprint: str


def open_seg_split(shard_dir: str | Path, verify: bool = False) -> SegSplit:
    """A `beit shard-seg` split: its index, its tars checked (sizes; sha256 with `verify`)."""
    import json

    shard_dir = Path(shard_dir)
    table = read_index(index_file(shard_dir), ["key", "shard"])
    check_shards(shard_dir, tuple(dict.fromkeys(table["shard"])), verify)
    by_shard = shard_keys(table)
    classes = tuple(json.loads((shard_dir / "classes.json").read_text()))
    return SegSplit(shard_dir, tuple(by_shard), tuple(len(k) for k in by_shard.values()), len(classes), classes,
                    index_fingerprint(index_file(shard_dir)))


@dataclasses.dataclass(frozen=True)
class SegView:
    scale: tuple[float, float] = (0.5, 2.0)
    flip_p: float = 0.5


def train_view(image: torch.Tensor, mask: torch.Tensor, size: int, view: SegView,
               rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """image float [3, H, W], mask long [H, W] -> the same random rescale / crop-or-pad / flip
    of both: ([3, size, size], [size, size])."""
    h, w = mask.shape
    r = float(rng.uniform(*view.scale)) * size / max(h, w)  # the long side at scale x size, as mmseg's ratio_range
    nh, nw = max(1, round(h * r)), max(1, round(w * r))
    image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]  # [3, nh, nw]
    mask = F.interpolate(mask[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()  # [nh, nw]
    y0 = int(rng.integers(0, max(nh - size, 0) + 1))
    x0 = int(rng.integers(0, max(nw - size, 0) + 1))
    image, mask = image[:, y0:y0 + size, x0:x0 + size], mask[y0:y0 + size, x0:x0 + size]  # crop (no-op if smaller)
    ph, pw = size - image.shape[1], size - image.shape[2]
    if ph or pw:  # pad bottom / right: the padding is ignored by the loss
        image = F.pad(image, (0, pw, 0, ph), value=0.0)  # [3, size, size]
        mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)  # [size, size]
    if rng.random() < view.flip_p:
        image, mask = image.flip(-1), mask.flip(-1)
    return image, mask


def eval_view(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize both to [3, size, size] / [size, size] (bilinear / nearest); identity at that size."""
    if mask.shape == (size, size):
        return image, mask
    image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    return image, mask


class SegDataset(torch.utils.data.IterableDataset):
    """One epoch of {"image": float [3, S, S] normalised, "mask": long [S, S] (255 = ignore), "key"}."""

    def __init__(self, split: SegSplit, cfg: LoaderConfig, size: int, seed: int, train: bool,
                 view: SegView = SegView()):
        super().__init__()
        self.split, self.cfg, self.size, self.seed, self.train, self.view = split, cfg, size, seed, train, view
        self.epoch = 0
        self._mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self._std = torch.tensor(cfg.std).view(3, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def make_sample(self, sample: dict) -> dict:
        key = sample_key(sample)
        if SEG_EXT not in sample:
            raise CorruptShard.at(sample["__url__"], f"sample {key} has no {SEG_EXT}; rerun `beit shard-seg`")
        image = torch.from_numpy(decode_rgb(image_bytes(sample))).permute(2, 0, 1).float() / 255  # [3, H, W]
        mask = torch.from_numpy(decode_mask(sample[SEG_EXT]).astype(np.int64))  # [H, W]
        if self.train:
            rng = np.random.default_rng(stable_hash("seg-view", self.seed, self.epoch, key))
            image, mask = train_view(image, mask, self.size, self.view, rng)
        else:
            image, mask = eval_view(image, mask, self.size)
        return {"image": (image - self._mean) / self._std, "mask": mask, "label": 0}

    def __iter__(self) -> Iterator[dict]:
        stream = epoch_stream(self.split, self.seed, self.epoch, train=self.train,
                              buffer_size=self.cfg.shuffle_buffer, buffer_salt="seg-buffer")
        for sample in stream:
            yield self.make_sample(sample)
