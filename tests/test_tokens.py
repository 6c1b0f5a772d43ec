"""Token store: whole-chunk writes per data shard, resume marks, both formats."""
import numpy as np
import pytest
import zarr

from pipeline.tokens import (StoreSpec, TokenStoreMismatch, create_or_open, open_tokens,
                             store_path, write_index)


def spec(**over):
    base = dict(shards=("train-000000.tar", "train-000001.tar", "train-000002.tar"),
                counts=(5, 5, 3), views=2, grid=(3, 4), view_dim=7, vocab_size=1000,
                fingerprints={"shards": "a", "tokenizer": "b", "views": "c"})
    base.update(over)
    return StoreSpec(**base)


def fake_rows(s, n, sp, seed=0):
    rng = np.random.default_rng(seed + s)
    keys = [f"k{s}-{i}" for i in range(n)]
    tokens = rng.integers(0, sp.vocab_size, (n, sp.views, *sp.grid)).astype(np.uint16)
    views = rng.random((n, sp.views, sp.view_dim), dtype=np.float32)
    return keys, tokens, views


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_write_read_resume(tmp_path, fmt):
    sp = spec()
    store = create_or_open(tmp_path, "train", fmt, sp)
    assert store.done() == set()
    rows = {s: fake_rows(s, n, sp) for s, n in enumerate(sp.counts)}
    for s in (2, 0):  # out of order, as Dask finishes them
        store.write_shard(s, *rows[s])
    reopened = create_or_open(tmp_path, "train", fmt, sp)
    assert reopened.done() == {0, 2}
    reopened.write_shard(1, *rows[1])
    reader = open_tokens(store_path(tmp_path, "train", fmt))
    assert reader.spec == sp
    for s, (keys, tokens, views) in rows.items():
        part = reader.read_shard(s)
        assert list(part.keys) == keys
        np.testing.assert_array_equal(part.tokens, tokens)
        np.testing.assert_array_equal(part.views, views)


def test_zarr_readable_with_plain_zarr_and_corruption_detected(tmp_path):
    sp = spec()
    store = create_or_open(tmp_path, "train", "zarr", sp)
    for s, n in enumerate(sp.counts):
        store.write_shard(s, *fake_rows(s, n, sp))
    g = zarr.open(str(store_path(tmp_path, "train", "zarr")), mode="r")
    C = sp.capacity
    assert g["tokens"].shape == (3 * C, 2, 3, 4) and g["tokens"].dtype == np.uint16
    assert g.attrs["fingerprints"]["tokenizer"] == "b"
    np.testing.assert_array_equal(g["rows"][:], sp.counts)
    # Flip one stored token: the digest check must notice and redo that shard.
    arr = zarr.open_array(str(store_path(tmp_path, "train", "zarr") / "tokens"), mode="r+")
    arr[C + 1, 0, 0, 0] = (int(arr[C + 1, 0, 0, 0]) + 1) % 1000
    assert store.done() == {0, 2}


@pytest.mark.parametrize("fmt", ["zarr", "parquet"])
def test_mismatch_is_a_clear_error(tmp_path, fmt):
    create_or_open(tmp_path, "train", fmt, spec())
    other = spec(fingerprints={"shards": "a", "tokenizer": "CHANGED", "views": "c"})
    with pytest.raises(TokenStoreMismatch, match=r"fingerprints.tokenizer changed.*delete it"):
        create_or_open(tmp_path, "train", fmt, other)


def test_wrong_row_count_refused(tmp_path):
    sp = spec()
    store = create_or_open(tmp_path, "train", "zarr", sp)
    with pytest.raises(ValueError, match="train-000000.tar: 4 rows, index says 5"):
        store.write_shard(0, *fake_rows(0, 4, sp))


def test_index_maps_keys_to_rows(tmp_path):
    import pyarrow.parquet as pq
    sp = spec()
    write_index(tmp_path / "idx.parquet", sp, [[f"k{s}-{i}" for i in range(n)] for s, n in enumerate(sp.counts)])
    t = pq.read_table(tmp_path / "idx.parquet").to_pydict()
    i = t["key"].index("k2-1")
    assert (t["shard"][i], t["position"][i], t["row"][i]) == ("train-000002.tar", 1, 2 * sp.capacity + 1)
