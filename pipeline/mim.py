"""The MIM dataset: WebDataset shards + precomputed tokens -> masked-image samples.

    pipeline/stream.py's prefix (seeded shard shuffle, split by rank and worker, tar samples)
    -> attach this epoch's rows (one contiguous token read per shard; the shard's views,
       token grids and masks computed at once) -> seeded shuffle buffer
    -> decode + render the view, a batch at a time

View parity: the sample's view for this epoch is `(epoch + hash(key)) % V`,
and its parameters are read from the token store (exactly what the tokenize
stage used), then rendered by the same `render_views` (pipeline/render.py) at the patch
resolution. With `loader.transport: uint8` the samples' "image" is uint8 [3, S, S]; the
training step calls `pipeline.render.normalize` on the batch (stages/pretrain.py: to_device).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from pipeline.fingerprint import index_fingerprint, stable_hashes
from pipeline.masking import MaskGenerator
from pipeline.schema import LoaderConfig
from pipeline.shardread import check_shards, image_bytes, index_file, read_index, sample_key, shard_keys
from pipeline.stream import ShardList, epoch_stream
from pipeline.tokens import ShardTokens, open_tokens
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
                  rows: Callable[[list[str], ShardTokens], dict[str, Sequence]]) -> Iterator[dict]:
    """Add each tar sample's fields from the token store, reading a shard's rows in one
    contiguous slice when its first sample arrives (and checking they are the tar's keys, in
    order). `rows(keys, part)` turns a shard's rows into {field: one entry per row}
    (MIMDataset.epoch_rows: this epoch's view, grid and mask)."""
    position = {name: i for i, name in enumerate(shard_names)}
    current_url, name, keys, fields, row = None, None, None, None, 0
    for sample in samples:
        url = sample["__url__"]
        if url != current_url:
            name = Path(url).name
            part = store.read_shard(position[name])
            current_url, keys, row = url, part.keys.tolist(), 0
            fields = rows(keys, part)
        key = sample_key(sample)
        if row >= len(keys) or keys[row] != key:
            have = keys[row] if row < len(keys) else None
            raise StaleTokens(f"{name}: token row {row} is {have!r} but the tar has "
                              f"{sample['__key__']!r}; rerun `beit tokenize`")
        for field, column in fields.items():
            sample[field] = column[row]
        row += 1
        yield sample


def view_of(row: np.ndarray) -> View:
    """`View.from_array(row)` for a float32 [K] row of the token store."""
    if row.shape != (View.K,):
        return View.from_array(row)  # raises the shape error
    return views_of(row[None])[0]


def views_of(rows: np.ndarray) -> list[View]:
    """`View.from_array` of each float32 [n, K] row, a column at a time (a shard's views at
    once: per-row conversion was ~a tenth of the 28 px loader's time). np.rint rounds half to
    even like `round`; float32 -> Python float is the same exact widening as via float64."""
    if rows.ndim != 2 or rows.shape[1] != View.K or not np.isfinite(rows).all():
        raise ValueError(f"view rows must be finite float [n, {View.K}], got {rows.dtype} {rows.shape}")
    ints = np.rint(rows[:, :6]).astype(np.int64).tolist()  # [n, 6] box and source size
    flips = (rows[:, 6] >= 0.5).tolist()  # [n]
    factors = rows[:, 7:].tolist()  # [n, 4] jitter factors
    return [View(*box, flip, *f) for box, flip, f in zip(ints, flips, factors)]


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

    def epoch_rows(self, keys: list[str], part: ShardTokens) -> dict[str, Sequence]:
        """A shard's fields for this epoch, computed at once (`attach_tokens` attaches them):
        `__view__` the sample's view (View) and `__grid__` its tokens (int64 [h, w]), view
        (epoch + stable_hash("view", key)) % V of its stored ones; with masking `__mask__`
        (bool [h*w]). Each is a function of (seed, epoch, key) only, so a sample gets the
        same ones whatever shard order, worker or batch it comes in."""
        n, num_views = part.tokens.shape[:2]
        # (epoch + hash) % V, reduced first so uint64 never wraps
        v = (stable_hashes(keys, "view") % num_views + self.epoch % num_views) % num_views  # [n]
        at = np.arange(n)
        fields = {"__view__": views_of(part.views[at, v]),  # [n, K] -> n Views
                  "__grid__": part.tokens[at, v].astype(np.int64)}  # [n, h, w]
        if self.masks is not None:
            fields["__mask__"] = self._masks(keys)  # bool [n, h*w]
        return fields

    def _gather(self, samples: list[dict]) -> tuple[list, list, np.ndarray, list, Optional[np.ndarray]]:
        """(encoded images, views, token grids int64 [B, h, w], labels, masks bool [B, h*w] or
        None) of samples that went through `attach`."""
        images = [Encoded(image_bytes(s)) for s in samples]  # decoded at the view's DCT scale (JPEG)
        views = [s["__view__"] for s in samples]
        grids = np.stack([s["__grid__"] for s in samples])  # [B, h, w]
        labels = [int(s["cls"]) for s in samples]
        masks = np.stack([s["__mask__"] for s in samples]) if self.masks is not None else None  # [B, h*w]
        return images, views, grids, labels, masks

    def _masks(self, keys: list[str]) -> np.ndarray:
        """bool [B, h*w]: each key's mask for this epoch, a function of (seed, epoch, key) only,
        so the same whichever batch (or shard, `epoch_rows`) the key is drawn with."""
        ids = stable_hashes(keys, "mask", self.seed, self.epoch)  # [B]
        # Batched draws cost ~11.5 us a mask in calls of 128 and ~6.4 us in calls of 512 (8x8 grid,
        # one core; per-step numpy overhead amortised), little less beyond: a shard's keys go 512 at a time.
        out = np.empty((len(ids), self.grid[0] * self.grid[1]), dtype=bool)  # [B, h*w]
        for i in range(0, len(ids), MASK_CHUNK):
            part = ids[i:i + MASK_CHUNK]
            out[i:i + len(part)] = self.masks.keyed(part).reshape(len(part), -1)  # [b, h, w] -> [b, h*w]
        return out

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
        images, views, grids, labels, masks = self._gather(samples)
        x = self._render(images, views)
        outs = []
        for i, (label, image) in enumerate(zip(labels, x.unbind(0))):
            out = {"label": label, "tokens": torch.from_numpy(grids[i].copy()), "image": image}  # [h, w], [3, S, S]
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
        images, views, grids, labels, masks = self._gather(samples)
        if out is None:
            out = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in self.batch_spec(len(samples)).items()}
        out["label"].copy_(torch.as_tensor(labels))  # [B]
        out["tokens"].copy_(torch.from_numpy(grids))  # [B, h, w]
        self._render(images, views, out["image"])  # [B, 3, S, S]
        if masks is not None:
            out["mask"].copy_(torch.from_numpy(masks))  # bool [B, h*w]
        return out

    def attach(self, samples: Iterator[dict]) -> Iterator[dict]:
        """The stream stage that gives tar samples their fields for this epoch (`epoch_rows`),
        a shard at a time: hashes, views and masks (512 keys a call) in a few large calls."""
        return attach_tokens(samples, open_tokens(self.split.token_path), self.split.shards, rows=self.epoch_rows)

    def __iter__(self) -> Iterator[dict]:
        stream = epoch_stream(self.split, self.seed, self.epoch, train=True, buffer_size=self.cfg.shuffle_buffer,
                              buffer_salt="buffer", stages=(self.attach,))
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
