"""The MIM dataset: WebDataset shards + precomputed tokens -> masked-image samples.

    pipeline/stream.py's prefix (seeded shard shuffle, split by rank and worker, tar samples)
    -> attach tokens (one contiguous read per shard) -> seeded shuffle buffer
    -> decode + the stored view + mask

View parity: the sample's view for this epoch is `(epoch + hash(key)) % V`,
and its parameters are read from the token store (exactly what the tokenize
stage used), then rendered by the same `render_views` (pipeline/render.py) at the patch
resolution. With `loader.transport: uint8` the samples' "image" is uint8 [3, S, S]; the
training step calls `pipeline.render.normalize` on the batch (stages/pretrain.py: to_device).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from pipeline.fingerprint import index_fingerprint, stable_hash
from pipeline.masking import MaskGenerator
from pipeline.schema import LoaderConfig
from pipeline.shardread import check_shards, image_bytes, index_file, read_index, sample_key, shard_keys
from pipeline.stream import ShardList, epoch_stream
from pipeline.tokens import open_tokens
from pipeline.render import Encoded, render_views
from pipeline.ring import BatchRing, Spec
from pipeline.views import View


MASK_CHUNK = 512  # keys per batched mask draw (MIMDataset._masks)


class StaleTokens(RuntimeError):
    """Shards and token store do not belong together."""


@dataclasses.dataclass(frozen=True)
class SplitData(ShardList):
    """A split's shards (in index order) and its token store, checked to match."""

    token_path: Path


def open_split(shard_dir: str | Path, token_path: str | Path, verify: bool = False) -> SplitData:
    """Read the shard index, check the tars (`check_shards`: their sizes; with `verify`, every
    image's sha256) and that the token store was built from these shards (with `verify`, every
    shard's rows against their digest too; otherwise each is checked when the trainer reads it)."""
    shard_dir = Path(shard_dir)
    by_shard = shard_keys(read_index(shard_dir, ["key", "shard"]))
    shards = tuple(by_shard)
    check_shards(shard_dir, shards, verify)
    counts = tuple(len(keys) for keys in by_shard.values())
    store = open_tokens(token_path)
    want = index_fingerprint(index_file(shard_dir))
    have = store.spec.fingerprints.get("shards")
    if have != want or tuple(store.spec.shards) != shards:
        raise StaleTokens(
            f"{token_path}: tokens were computed from other shards than {shard_dir} "
            f"(fingerprint {have} != {want}); rerun `beit tokenize` (or `dvc repro`)")
    if verify:
        for s in range(len(shards)):
            store.read_shard(s)  # CorruptTokens naming the store, the shard and the rerun
    return SplitData(shard_dir, shards, counts, Path(token_path))


def attach_tokens(samples: Iterator[dict], store: Any, shard_names: tuple[str, ...],
                  masks: Optional[Callable[[list[str]], np.ndarray]] = None) -> Iterator[dict]:
    """Add `__tokens__` [V, h, w] and `__views__` [V, K] to each tar sample; reads a
    shard's rows in one contiguous slice when its first sample arrives. `masks(keys)` (bool
    [n, h*w] for n keys), if given, is called once per shard on all of its keys, and each
    sample gets its row as `__mask__`."""
    position = {name: i for i, name in enumerate(shard_names)}
    current_url, name, keys, tokens, views, shard_masks, row = None, None, None, None, None, None, 0
    for sample in samples:
        url = sample["__url__"]
        if url != current_url:
            name = Path(url).name
            part = store.read_shard(position[name])
            current_url, keys, tokens, views, row = url, part.keys.tolist(), part.tokens, part.views, 0
            shard_masks = masks(keys) if masks is not None else None  # bool [n, h*w]
        key = sample_key(sample)
        if row >= len(keys) or keys[row] != key:
            have = keys[row] if row < len(keys) else None
            raise StaleTokens(f"{name}: token row {row} is {have!r} but the tar has "
                              f"{sample['__key__']!r}; rerun `beit tokenize`")
        sample["__tokens__"], sample["__views__"] = tokens[row], views[row]
        if shard_masks is not None:
            sample["__mask__"] = shard_masks[row]  # [h*w]
        row += 1
        yield sample


def view_of(row: np.ndarray) -> View:
    """`View.from_array(row)` for a float32 [K] row of the token store, without the
    float64 array round trip (float32 -> Python float is the same exact widening)."""
    if row.shape != (View.K,):
        return View.from_array(row)  # raises the shape error
    a = row.tolist()
    return View(int(round(a[0])), int(round(a[1])), int(round(a[2])), int(round(a[3])),
                int(round(a[4])), int(round(a[5])), a[6] >= 0.5, a[7], a[8], a[9], a[10])


class MIMDataset(torch.utils.data.IterableDataset):
    """One epoch of MIM samples for this rank and DataLoader worker; `set_epoch` first.
    `image_size`: the side of the rendered views (the model's input)."""

    def __init__(self, split: SplitData, cfg: LoaderConfig, image_size: int,
                 masks: Optional[MaskGenerator], seed: int):
        super().__init__()
        self.split, self.cfg, self.image_size, self.masks, self.seed = split, cfg, image_size, masks, seed
        self.epoch = 0
        self.grid = tuple(open_tokens(split.token_path).spec.grid)  # (h, w) of the token grids
        self._mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self._std = torch.tensor(cfg.std).view(3, 1, 1)
        # Samples rendered per render_views call (1: one at a time; same output either way).
        # Measured (bench/pretrain.py): at 32 px chunks of 32 cut decode+augment from
        # ~180 to ~80 us/img (per-call tensor set-up dominates); at 224 px they do not
        # help (2.5 ms/img either way, more memory traffic), so large views go one by one.
        self.render_chunk = 32 if image_size <= 64 else 1
        # Set by stream.batches: yield batches of this size (make_batch), not samples, and
        # in DataLoader workers fill this ring's slots (pipeline/ring.py) instead of new tensors.
        self.batch_size: Optional[int] = None
        self.ring: Optional[BatchRing] = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def make_sample(self, sample: dict) -> dict:
        return self.make_samples([sample])[0]

    def _gather(self, samples: list[dict]) -> tuple[list, list, list, list, list]:
        """(encoded images, this epoch's views, token grids [h, w], labels, keys) of the samples."""
        images, views, tokens, labels, keys = [], [], [], [], []
        epoch = self.epoch
        for sample in samples:
            key = sample_key(sample)
            images.append(Encoded(image_bytes(sample)))  # decoded at the view's DCT scale (JPEG)
            grids = sample["__tokens__"]  # [V, h, w]
            v = (epoch + stable_hash("view", key)) % grids.shape[0]
            views.append(view_of(sample["__views__"][v]))
            tokens.append(grids[v])
            labels.append(int(sample["cls"]))
            keys.append(key)
        return images, views, tokens, labels, keys

    def _masks(self, keys: list[str]) -> np.ndarray:
        """bool [B, h*w]: each key's mask for this epoch, a function of (seed, epoch, key) only,
        so the same whichever batch (or shard, `_tokens`) the key is drawn with."""
        ids = np.array([stable_hash("mask", self.seed, self.epoch, k) for k in keys], dtype=np.uint64)  # [B]
        # Batched draws cost ~11.5 us a mask in calls of 128 and ~6.4 us in calls of 512 (8x8 grid,
        # one core; per-step numpy overhead amortised), little less beyond: a shard's keys go 512 at a time.
        out = np.empty((len(ids), self.grid[0] * self.grid[1]), dtype=bool)  # [B, h*w]
        for i in range(0, len(ids), MASK_CHUNK):
            part = ids[i:i + MASK_CHUNK]
            out[i:i + len(part)] = self.masks.keyed(part).reshape(len(part), -1)  # [b, h, w] -> [b, h*w]
        return out

    def _sample_masks(self, samples: list[dict], keys: list[str]) -> np.ndarray:
        """bool [B, h*w]: the masks `_tokens` drew with each sample's shard, else drawn now."""
        if all("__mask__" in s for s in samples):
            return np.stack([s["__mask__"] for s in samples])
        return self._masks(keys)

    def _render(self, images: list, views: list, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.cfg.transport == "uint8":
            return render_views(images, views, self.image_size, torch.uint8, out=out)  # [B, 3, S, S]; normalize() later
        x = render_views(images, views, self.image_size, out=out)  # float [B, 3, S, S] in [0, 1]
        return x.sub_(self._mean).div_(self._std)  # in place: same bits as (x - mean) / std

    def make_samples(self, samples: list[dict]) -> list[dict]:
        """`make_sample` of each sample, the views rendered in one `render_views` call.

        Same bits as rendering one at a time (render_views works per image up to the
        resize, then per sample over the batch; tests/test_loader.py checks it): the
        per-call tensor set-up of the crop/flip/jitter ops is paid once per chunk."""
        images, views, tokens, labels, keys = self._gather(samples)
        x = self._render(images, views)
        masks = self._sample_masks(samples, keys) if self.masks is not None else None  # bool [B, h*w]
        outs = []
        for i, (label, grid, image) in enumerate(zip(labels, tokens, x.unbind(0))):
            out = {"label": label, "tokens": torch.from_numpy(grid.astype(np.int64)), "image": image}  # [h, w], [3, S, S]
            if masks is not None:
                out["mask"] = torch.from_numpy(masks[i])  # bool [h*w]
            outs.append(out)
        return outs

    def batch_spec(self, batch_size: int) -> Spec:
        """The tensors of one `make_batch` (for a `BatchRing`): name -> (shape, dtype)."""
        grid = self.grid
        dtype = torch.uint8 if self.cfg.transport == "uint8" else torch.float32
        spec = {"label": ((batch_size,), torch.int64),
                "tokens": ((batch_size, *grid), torch.int64),
                "image": ((batch_size, 3, self.image_size, self.image_size), dtype)}
        if self.masks is not None:
            spec["mask"] = ((batch_size, grid[0] * grid[1]), torch.bool)
        return spec

    def make_batch(self, samples: list[dict], out: Optional[dict[str, torch.Tensor]] = None) -> dict:
        """The samples as one batch, the same tensors `default_collate(make_samples(samples))`
        gives (tests/test_loader_fast.py), built without per-sample tensors: the views are
        rendered straight into the batch (`out`, a ring slot in a DataLoader worker, else new
        tensors shaped by `batch_spec`), tokens and masks stacked once."""
        images, views, tokens, labels, keys = self._gather(samples)
        if out is None:
            out = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in self.batch_spec(len(samples)).items()}
        out["label"].copy_(torch.as_tensor(labels))  # [B]
        out["tokens"].copy_(torch.from_numpy(np.stack(tokens)))  # [B, h, w]
        self._render(images, views, out["image"])  # [B, 3, S, S]
        if self.masks is not None:
            out["mask"].copy_(torch.from_numpy(self._sample_masks(samples, keys)))  # bool [B, h*w]
        return out

    def _tokens(self, samples: Iterator[dict]) -> Iterator[dict]:
        # masks drawn per shard (512 keys a call), not per batch: fewer, larger batched draws
        return attach_tokens(samples, open_tokens(self.split.token_path), self.split.shards,
                             masks=self._masks if self.masks is not None else None)

    def __iter__(self) -> Iterator[dict]:
        stream = epoch_stream(self.split, self.seed, self.epoch, train=True, buffer_size=self.cfg.shuffle_buffer,
                              buffer_salt="buffer", stages=(self._tokens,))
        # whole batches (stream.batches sets batch_size; this worker's last partial one is dropped),
        # else samples rendered render_chunk at a time
        size = self.batch_size or self.render_chunk
        info = torch.utils.data.get_worker_info()
        ring = self.ring if self.batch_size and info is not None else None
        chunk: list[dict] = []
        for sample in stream:
            chunk.append(sample)
            if len(chunk) < size:
                continue
            if ring is not None:  # in a worker: fill the ring's next free slot, hand over its name
                slot, out = ring.acquire(info.id)
                self.make_batch(chunk, out)
                yield slot
            else:
                yield from ([self.make_batch(chunk)] if self.batch_size else self.make_samples(chunk))
            chunk = []
        if chunk and not self.batch_size:
            yield from self.make_samples(chunk)
