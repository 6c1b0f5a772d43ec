"""Streaming loader: view parity with the stored tokens, determinism, rank split, staleness."""
import dataclasses

import pytest
import torch

from helpers import fake_encode, mim_world
from pipeline.masking import MaskGenerator
from pipeline.mim import MIMDataset, StaleTokens, open_split
from pipeline.schema import LoaderConfig, MaskingConfig
from pipeline.stream import batches, epoch_shards, epoch_steps
from pipeline.tokens import store_path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return mim_world(tmp_path_factory.mktemp("loader"))


def dataset(world, workers=0, batch=16):
    _, params, split = world
    cfg = LoaderConfig(num_workers=workers, shuffle_buffer=50)
    masks = MaskGenerator((8, 8), MaskingConfig(kind="block", mask_ratio=0.4))
    return MIMDataset(split, cfg, 32, masks, params.seed), cfg, batch


def test_tokens_recomputed_from_the_trainers_view_equal_stored(world):
    data, cfg, bs = dataset(world)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    n = 0
    for epoch in (0, 1):
        for batch in batches(data, bs, cfg.num_workers, epoch):
            pixels = batch["image"] * std + mean  # undo normalisation: [B, 3, 32, 32] in [0, 1]
            recomputed = fake_encode(pixels)
            assert torch.equal(recomputed, batch["tokens"])
            n += len(pixels)
    assert n >= 200  # two epochs of 120 images, minus dropped partial batches


def test_batches_shapes_masks_and_determinism(world):
    data, cfg, bs = dataset(world)
    first = list(batches(data, bs, cfg.num_workers, epoch=0))
    again = list(batches(data, bs, cfg.num_workers, epoch=0))
    other = list(batches(data, bs, cfg.num_workers, epoch=1))
    b = first[0]
    assert b["image"].shape == (16, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["tokens"].shape == (16, 8, 8) and b["tokens"].dtype == torch.int64
    assert b["mask"].shape == (16, 64) and b["mask"].dtype == torch.bool
    assert (b["mask"].sum(1) == round(0.4 * 64)).all()
    for x, y in zip(first, again):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not torch.equal(first[0]["image"], other[0]["image"])
    assert len(first) == epoch_steps(data.split, bs, cfg.num_workers, 0, 0, world=1)
    # resuming mid-epoch yields exactly the remaining batches
    resumed = list(batches(data, bs, cfg.num_workers, epoch=0, skip=3))
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(first[3:], resumed))


def test_worker_processes_see_every_sample_once(world):
    data, cfg, bs = dataset(world, workers=2, batch=8)
    labels = torch.cat([b["label"] for b in batches(data, bs, cfg.num_workers, epoch=0)])
    serial = torch.cat([b["label"] for b in batches(data, bs, 0, 0)])
    # same multiset of samples (order differs by worker interleaving); partial batches dropped
    assert len(labels) == 120 == len(serial)
    assert sorted(labels.tolist()) == sorted(serial.tolist())


def test_ranks_get_disjoint_shards():
    shards = tuple(f"s{i}" for i in range(7))
    seen = [s for r in range(2) for w in range(2) for s in epoch_shards(shards, 0, 3, r, 2, w, 2)]
    assert sorted(seen) == list(range(7))
    assert epoch_shards(shards, 0, 3, 0, 2, 0, 1) != epoch_shards(shards, 0, 4, 0, 2, 0, 1)


def test_stale_tokens_are_refused_with_what_to_rerun(world, tmp_path):
    tmp, params, _ = world
    from stages.shard import shard

    other = dataclasses.replace(params, seed=1,
                                outputs=dataclasses.replace(params.outputs, shards=str(tmp_path / "s")))
    shard(other, ("train",), progress=False)  # same images, other order
    with pytest.raises(StaleTokens, match="rerun `beit tokenize`"):
        open_split(tmp_path / "s/train", store_path(tmp / "tokens", "train", "zarr"))
