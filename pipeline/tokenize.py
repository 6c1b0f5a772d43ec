"""Tokenize one data shard: every image x V views -> token grids.

Pure data plane: the tokenizer comes in as an `encode` callable
(float [B, 3, S, S] in [0, 1] -> int [B, h, w]), so pipeline/ never imports model/.
Batches are cut the same way whatever the worker or cluster, so the result of
a shard never depends on where it ran.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from pipeline.schema import ViewConfig
from pipeline.render import Encoded, render_views
from pipeline.shardread import CorruptShard, image_bytes, tar_samples
from pipeline.views import View, sample_view

Encode = Callable[[torch.Tensor], torch.Tensor]


def tar_images(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) in tar order, through the same reader as the trainer."""
    for sample in tar_samples([str(path)]):
        yield sample["__key__"], image_bytes(sample)


def tokenize_shard(
    tar_path: str | Path,
    encode: Encode,
    input_size: int,
    view_cfg: ViewConfig,
    seed: int,
    num_views: int,
    batch_size: int = 256,
    expected_keys: Sequence[str] | None = None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """-> keys [n], tokens uint16 [n, V, h, w], view params float32 [n, V, K]."""
    keys: list[str] = []
    views: list[View] = []
    token_batches: list[np.ndarray] = []
    pending_images: list[Encoded] = []
    pending_views: list[View] = []

    def flush() -> None:
        x = render_views(pending_images, pending_views, input_size)  # [B, 3, S, S], as the trainer renders
        ids = encode(x)  # [B, h, w]
        token_batches.append(ids.to("cpu", torch.int64).numpy().astype(np.uint16))
        pending_images.clear()
        pending_views.clear()

    for key, data in tar_images(tar_path):
        image = Encoded(data)  # decoded once per DCT scale its views need (JPEG), else once
        keys.append(key)
        for v in range(num_views):
            view = sample_view(seed, key, v, image.width, image.height, view_cfg)
            views.append(view)
            pending_images.append(image)
            pending_views.append(view)
            if len(pending_views) == batch_size:
                flush()
    if pending_views:
        flush()
    if expected_keys is not None and list(expected_keys) != keys:
        raise CorruptShard.at(tar_path, f"its {len(keys)} samples are not the {len(expected_keys)} index.parquet lists")
    n = len(keys)
    if n == 0:
        raise ValueError(f"{tar_path}: no images")
    tokens = np.concatenate(token_batches)  # [n*V, h, w]
    tokens = tokens.reshape(n, num_views, *tokens.shape[1:])  # [n, V, h, w]
    params = np.stack([v.to_array() for v in views]).reshape(n, num_views, View.K)  # [n, V, K]
    return keys, tokens, params
