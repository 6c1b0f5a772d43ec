"""The loader's fast paths give the same bits as the pre-change implementation
(tests/reference_loader.py): the shard reader (vs webdataset's), block masks,
and whole MIM batches."""
from __future__ import annotations

import dataclasses
import gzip
import io
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from helpers import mim_world
from pipeline.masking import MaskGenerator
from pipeline.mim import MIMDataset, view_of, views_of
from pipeline.schema import BlockShape, LoaderConfig, MaskingConfig
from pipeline.shardread import tar_samples
from pipeline.stream import batches
from pipeline.tarwriter import TarWriter
from pipeline.views import View
from reference_loader import LegacyMIMDataset, ref_mask


def wds_samples(urls):
    return list(wds.tarfile_to_samples()(iter([{"url": str(u)} for u in urls])))


def same_samples(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert list(x) == list(y) and x == y


def ours(path, members):
    with open(path, "wb", buffering=0) as f:
        w = TarWriter(f)
        for name, data in members:
            w.add(name, data)
        w.close()
    return path


def foreign(path, members, fmt=tarfile.GNU_FORMAT, mode="w", dirs=()):
    with tarfile.open(path, mode, format=fmt) as t:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            t.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.uname = len(data), 1_700_000_000, "someone"
            t.addfile(info, io.BytesIO(data))
    return path


MEMBERS = [("a-000.cls", b"3"), ("a-000.jpg", b"\xff\xd8\xff" + bytes(700)), ("a-000.json", b"{}"),
           ("a-001.cls", b"4"), ("a-001.PNG", bytes(512)), ("__meta__", b"skip me"),
           ("dir/b-002.cls", b"5"), ("dir/b-002.tar.gz", b"x" * 1025), ("noext", b"?"),
           (".hidden", b"?"), ("c-003.cls", b"")]


def test_tar_reader_equals_webdataset_on_our_and_foreign_tars(tmp_path):
    long = "x" * 120 + ".cls"  # > 100 bytes: GNU longname / PAX header, not our template
    tars = [
        ours(tmp_path / "ours.tar", MEMBERS),
        ours(tmp_path / "empty.tar", []),
        foreign(tmp_path / "gnu.tar", MEMBERS + [(long, b"1")], dirs=("dir",)),
        foreign(tmp_path / "pax.tar", MEMBERS + [(long, b"1"), ("é-1.cls", b"2")], fmt=tarfile.PAX_FORMAT),
        foreign(tmp_path / "ustar.tar", MEMBERS, fmt=tarfile.USTAR_FORMAT),
        foreign(tmp_path / "z.tar.gz", MEMBERS, mode="w:gz"),
    ]
    # ours, then foreign members appended (a PAX header in the middle of the file)
    mixed = tmp_path / "mixed.tar"
    with open(mixed, "wb", buffering=0) as f:
        w = TarWriter(f)
        for name, data in MEMBERS[:4]:
            w.add(name, data)
    with open(tmp_path / "pax.tar", "rb") as f:
        tail = f.read()
    with open(mixed, "ab") as f:
        f.write(tail)
    tars.append(mixed)
    for t in tars:
        same_samples(list(tar_samples([str(t)])), wds_samples([t]))
    same_samples(list(tar_samples(str(t) for t in tars)), wds_samples(tars))
    # an archive without its end blocks, cut at a member boundary
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "ours.tar").read_bytes()[:512 + 512 + 512 + 1024])
    same_samples(list(tar_samples([str(cut)])), wds_samples([cut]))


def test_tar_reader_fails_like_webdataset(tmp_path):
    good = (ours(tmp_path / "ours.tar", MEMBERS)).read_bytes()
    cases = {"truncated": good[:512 + 512 + 512 + 300], "empty": b"", "garbage": b"not a tar" * 100,
             "dup": ours(tmp_path / "dup.tar", [("k.cls", b"1"), ("k.CLS", b"2")]).read_bytes()}
    for name, data in cases.items():
        p = tmp_path / f"{name}.tar"
        p.write_bytes(data)
        with pytest.raises(Exception) as want:
            wds_samples([p])
        with pytest.raises(type(want.value)):
            list(tar_samples([str(p)]))


def test_webdataset_still_reads_our_shards(world):
    _, _, split = world
    urls = [split.shard_dir / s for s in split.shards]
    fast = list(tar_samples(str(u) for u in urls))
    assert len(fast) == split.num_samples and {"cls", "png", "json"} <= set(fast[0])
    same_samples(fast, wds_samples(urls))


@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (7, 12), (1, 9), (3, 3)])
def test_block_masks_equal_the_reference(grid):
    n = 0
    for ratio in (0.01, 0.1, 0.4, 0.75, 0.99):
        for extra in ({}, {"blocks": BlockShape(min_block=1)}, {"blocks": BlockShape(min_block=4, max_block=30)},
                      {"blocks": BlockShape(min_aspect=0.9)}, {"blocks": BlockShape(tries=1)}, {"kind": "random"}):
            try:
                gen = MaskGenerator(grid, MaskingConfig(mask_ratio=ratio, **extra))
            except ValueError:
                continue
            for seed in range(40):
                got = gen(np.random.Generator(np.random.PCG64(seed)))
                want = ref_mask(gen, np.random.default_rng(seed))
                assert got.dtype == want.dtype and np.array_equal(got, want), (grid, ratio, extra, seed)
                n += 1
    assert n > 500


def test_view_of_equals_from_array():
    rng = np.random.default_rng(0)
    rows = rng.uniform(0, 300, (200, View.K)).astype(np.float32)
    rows[:, :6] = np.round(rows[:, :6])
    rows[::3, :6] += 0.5  # half-way cases round like from_array
    for row in rows:
        assert view_of(row) == View.from_array(row)
    assert views_of(rows) == [View.from_array(row) for row in rows]  # a shard's rows at once
    with pytest.raises(ValueError):
        view_of(rows[0, :5])
    rows[7, 2] = np.nan  # a corrupt row is an error, not a garbage box
    with pytest.raises(ValueError):
        views_of(rows)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return mim_world(tmp_path_factory.mktemp("fast"))


@pytest.mark.parametrize("kind", ["block", "random"])
def test_batches_equal_the_legacy_loader(world, kind):
    _, params, split = world
    cfg, bs = LoaderConfig(num_workers=0, shuffle_buffer=50), 16
    masks = MaskGenerator((8, 8), MaskingConfig(kind=kind, mask_ratio=0.4))
    for epoch in (0, 1):
        want = list(batches(LegacyMIMDataset(split, cfg, 32, masks, params.seed), bs, cfg.num_workers, epoch))
        for chunk in (1, 7, 32):
            fast = MIMDataset(split, cfg, 32, masks, params.seed)
            fast.render_chunk = chunk
            got = list(batches(fast, bs, cfg.num_workers, epoch))
            assert len(got) == len(want) > 0
            for x, y in zip(got, want):
                assert list(x) == list(y)
                for k in x:
                    assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (epoch, chunk, k)
    # and per sample, without masks, in a DataLoader worker process
    cfg1 = dataclasses.replace(cfg, num_workers=1)
    a = list(batches(MIMDataset(split, cfg1, 32, None, params.seed), bs, cfg1.num_workers, 0))
    b = list(batches(LegacyMIMDataset(split, cfg1, 32, None, params.seed), bs, cfg1.num_workers, 0))
    assert len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert "mask" not in a[0]


@pytest.mark.parametrize("draw", ["per-sample", "batched"])
def test_epoch_rows_are_functions_of_seed_epoch_and_key(world, draw):
    """MIMDataset computes a shard's views, token grids and masks when its tokens are read
    (hashes, views and masks in a few calls per shard); each must still be a function of
    (seed, epoch, key) alone, i.e. equal to what one key computed on its own gets."""
    from pipeline.fingerprint import stable_hash
    from pipeline.mim import MASK_CHUNK
    from pipeline.tokens import open_tokens

    _, params, split = world
    gen = MaskGenerator((8, 8), MaskingConfig(kind="block", mask_ratio=0.4, draw=draw))
    ds = MIMDataset(split, LoaderConfig(num_workers=0), 32, gen, params.seed)
    store = open_tokens(split.token_path)
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        for s in range(len(split.shards)):
            part = store.read_shard(s)
            keys = part.keys.tolist()
            rows = ds.epoch_rows(keys, part)
            assert rows["__grid__"].dtype == np.int64 and rows["__mask__"].shape == (len(keys), 64)
            for i, key in enumerate(keys):
                v = (epoch + stable_hash("view", key)) % part.tokens.shape[1]  # the per-sample rule
                assert rows["__view__"][i] == View.from_array(part.views[i, v])
                assert np.array_equal(rows["__grid__"][i], part.tokens[i, v])
                assert np.array_equal(rows["__mask__"][i], ds._masks([key])[0])
            assert rows["__mask__"].sum(1).tolist() == [gen.num_masked] * len(keys)
    # calls of MASK_CHUNK keys: a split key list gives the same rows
    keys = keys * (MASK_CHUNK // len(keys) + 2)
    whole = ds._masks(keys)
    assert whole.shape == (len(keys), 64) and (whole == np.concatenate([ds._masks(keys[:7]), ds._masks(keys[7:])])).all()


def test_gzip_shards_still_load(world, tmp_path):
    """A shard re-packed by another tool (gzip'ed) reads through the fallback."""
    _, _, split = world
    src = split.shard_dir / split.shards[0]
    dst = tmp_path / "x.tar.gz"
    dst.write_bytes(gzip.compress(src.read_bytes()))
    same_samples([{**s, "__url__": None} for s in tar_samples([str(dst)])],
                 [{**s, "__url__": None} for s in wds_samples([src])])
