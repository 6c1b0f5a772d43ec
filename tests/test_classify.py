"""Labelled data for fine-tuning: the label-fraction subset, train/eval streams, mixup."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import make_shards, tiny_params
from model.mixup import mix_batch, smooth_one_hot
from model.schema import MixConfig
from pipeline.classify import ClassifyDataset, holdout_subset, label_subset, open_labelled
from pipeline.schema import LoaderConfig, ViewConfig
from pipeline.stream import batches, epoch_steps, eval_batches

torch.set_num_threads(1)


def write_index(path: Path, keys, labels) -> Path:
    pq.write_table(pa.table({"key": keys, "label": labels, "shard": ["s-000000.tar"] * len(keys)}), path)
    return path


def test_label_subset_is_stratified_deterministic_and_order_free(tmp_path):
    counts = {0: 500, 1: 300, 2: 100, 3: 7}  # imbalanced on purpose
    keys = [f"{c}-{i:04d}" for c, n in counts.items() for i in range(n)]
    labels = [int(k.split("-")[0]) for k in keys]
    index = write_index(tmp_path / "a.parquet", keys, labels)
    kept = label_subset(index, 0.1, seed=0)
    per_class = Counter(int(k.split("-")[0]) for k in kept)
    assert per_class == {0: 50, 1: 30, 2: 10, 3: 1}  # round(0.1 n), at least one per class
    assert label_subset(index, 0.1, seed=0) == kept  # deterministic
    perm = np.random.default_rng(1).permutation(len(keys))
    shuffled = write_index(tmp_path / "b.parquet", [keys[i] for i in perm], [labels[i] for i in perm])
    assert label_subset(shuffled, 0.1, seed=0) == kept  # row order of the index does not matter
    assert label_subset(index, 0.1, seed=1) != kept  # the seed does
    assert label_subset(index, 1.0, seed=0) == frozenset(keys)
    # Nested budgets are not promised, but a larger fraction keeps more per class.
    assert all(Counter(int(k.split("-")[0]) for k in label_subset(index, 0.5, 0))[c] > per_class[c] for c in (0, 1, 2))
    with pytest.raises(ValueError, match="label_fraction"):
        label_subset(index, 0.0, 0)


def test_validation_holdout_is_disjoint_stratified_and_bounded(tmp_path):
    counts = {0: 500, 1: 300, 2: 100}
    keys = [f"{c}-{i:04d}" for c, n in counts.items() for i in range(n)]
    index = write_index(tmp_path / "a.parquet", keys, [int(k.split("-")[0]) for k in keys])
    train = label_subset(index, 0.1, seed=0)
    val = holdout_subset(index, 0.1, seed=0, size=180)
    assert not train & val  # tuning never scores an image it trained on
    assert Counter(int(k.split("-")[0]) for k in val) == {0: 100, 1: 60, 2: 20}  # class shares kept
    assert holdout_subset(index, 0.1, seed=0, size=180) == val
    assert holdout_subset(index, 0.1, seed=1, size=180) != val
    assert not label_subset(index, 0.1, seed=1) & holdout_subset(index, 0.1, seed=1, size=810)  # all spare
    with pytest.raises(ValueError, match=r"validation=811: must be in \[1, 810\]"):
        holdout_subset(index, 0.1, seed=0, size=811)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cls")
    params = tiny_params(tmp)
    make_shards(tmp, params, n_train=80, n_test=30)
    return Path(params.outputs.shards)


CFG, BS, SIZE = LoaderConfig(num_workers=0, shuffle_buffer=20), 8, 32
VIEWS = ViewConfig(scale=(0.3, 1.0), brightness=0, contrast=0, saturation=0)


def test_subset_counts_feed_epoch_steps(shards):
    split = open_labelled(shards / "train", 0.5, seed=0)
    assert split.num_samples == 40 and split.num_classes <= 10
    data = ClassifyDataset(split, CFG, SIZE, seed=0, train=True, views=VIEWS)
    labels = [int(x) for b in batches(data, BS, CFG.num_workers, epoch=0) for x in b["label"]]
    assert len(labels) == epoch_steps(split, BS, CFG.num_workers, 0, 0, 1) * BS
    seen = [s for s in iter(data)]
    assert len(seen) == 40  # only the kept keys stream through


def test_train_views_are_seeded_per_epoch_and_eval_is_fixed(shards):
    split = open_labelled(shards / "train")
    data = ClassifyDataset(split, CFG, SIZE, seed=0, train=True, views=VIEWS)
    a = next(batches(data, BS, CFG.num_workers, epoch=0))
    b = next(batches(data, BS, CFG.num_workers, epoch=0))
    c = next(batches(data, BS, CFG.num_workers, epoch=1))
    torch.testing.assert_close(a["image"], b["image"])  # same (seed, epoch): same crops, same order
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (8, 3, 32, 32)

    held = open_labelled(shards / "test")
    ev = ClassifyDataset(held, CFG, SIZE, seed=0, train=False)
    first = torch.cat([x["label"] for x in eval_batches(ev, BS, CFG.num_workers)])
    again = torch.cat([x["label"] for x in eval_batches(ev, BS, CFG.num_workers)])
    assert len(first) == 30 and torch.equal(first, again)  # every sample once, stable order
    assert sum(len(x["label"]) for x in eval_batches(ev, BS, CFG.num_workers, limit=13)) == 13
    two = LoaderConfig(num_workers=2)
    assert sorted(torch.cat([x["label"] for x in eval_batches(ev, BS, two.num_workers)]).tolist()) == sorted(first.tolist())


def test_eval_view_is_the_whole_image_resized(shards):
    from pipeline.shardread import decode_rgb, image_bytes
    import webdataset as wds
    import torch.nn.functional as F

    held = open_labelled(shards / "test")
    ev = ClassifyDataset(held, CFG, SIZE, seed=0, train=False)
    raw = next(iter(wds.tarfile_to_samples()(iter([{"url": str(held.shard_dir / held.shards[0])}]))))
    img = torch.from_numpy(decode_rgb(image_bytes(raw)).copy()).permute(2, 0, 1).float()[None] / 255  # [1,3,H,W]
    want = F.interpolate(img, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)[0]
    got = next(iter(ev))["image"] * 0.5 + 0.5  # undo the (0.5, 0.5) normalisation
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_mixup_cutmix_targets_are_convex_and_reproducible():
    x = torch.arange(4 * 3 * 8 * 8, dtype=torch.float32).view(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    cfg = MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0, smoothing=0.1)
    for seed in range(6):
        xa, ta = mix_batch(x, y, 5, cfg, np.random.default_rng(seed))
        xb, tb = mix_batch(x, y, 5, cfg, np.random.default_rng(seed))
        torch.testing.assert_close(xa, xb)
        torch.testing.assert_close(ta, tb)
        torch.testing.assert_close(ta.sum(-1), torch.ones(4))
        lam = (ta[0, 0] - 0.02) / 0.9  # own label's share of the smoothed mass
        assert 0.0 <= lam <= 1.0 + 1e-6
        assert torch.allclose(ta[0, 3], (1 - lam) * 0.9 + 0.02, atol=1e-5)  # partner = reversed batch
    off = MixConfig(mixup_alpha=0.0, cutmix_alpha=0.0, smoothing=0.1)
    xo, to = mix_batch(x, y, 5, off, np.random.default_rng(0))
    assert torch.equal(xo, x) and torch.equal(to, smooth_one_hot(y, 5, 0.1))
    assert to[0].tolist() == pytest.approx([0.92, 0.02, 0.02, 0.02, 0.02])
