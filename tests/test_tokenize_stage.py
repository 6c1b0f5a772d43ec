"""The tokenize stage through Dask: determinism across worker counts, resume,
plain-zarr readability, Parquet format, and refusing to mix stale stores."""
import dataclasses
import os

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from helpers import save_tiny_tokenizer, shards_with_tokenizer
from model.tokenizer import load_tokenizer
from pipeline.mim import open_split
from pipeline.tokens import TokenStoreMismatch, open_tokens, store_path
from stages.tokenize import tokenize




@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return shards_with_tokenizer(tmp_path_factory.mktemp("tokenize"), n_train=100, n_test=20)


def with_out(params, out, tokenizer, workers=None, **kw):
    """`params` writing tokens to `out` with the tokenizer in folder `tokenizer`."""
    tokenize = dataclasses.replace(params.tokenize, **kw)
    if workers is not None:
        tokenize = dataclasses.replace(tokenize, cluster=dataclasses.replace(tokenize.cluster, workers=workers))
    outputs = dataclasses.replace(params.outputs, tokens=str(out),
                                  tokenizer=dataclasses.replace(params.outputs.tokenizer, dir=str(tokenizer)))
    return dataclasses.replace(params, tokenize=tokenize, outputs=outputs)


def arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {name: g[name][:] for name in ("tokens", "views", "keys", "rows", "digest")}


def test_in_process_one_and_two_dask_workers_give_identical_stores(setup):
    tmp, params = setup
    zero = with_out(params, tmp / "w0", tmp / "tok", workers=0)
    one = with_out(params, tmp / "w1", tmp / "tok", workers=1)
    two = with_out(params, tmp / "w2", tmp / "tok", workers=2)
    tokenize(zero, "train")
    s1 = tokenize(one, "train")
    s2 = tokenize(two, "train")
    assert s1["images"] == s2["images"] == 100 and s1["shards"] == 3
    a, b = arrays(store_path(tmp / "w1", "train", "zarr")), arrays(store_path(tmp / "w2", "train", "zarr"))
    c = arrays(store_path(tmp / "w0", "train", "zarr"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], c[name])
    # plain zarr: shapes and attributes a user can rely on
    g = zarr.open(str(store_path(tmp / "w1", "train", "zarr")), mode="r")
    assert g["tokens"].shape[1:] == (3, 8, 8) and g["tokens"].dtype == np.uint16
    assert g.attrs["fingerprints"]["tokenizer"] == load_tokenizer(tmp / "tok").fingerprint
    assert a["tokens"].max() < 64 and len(np.unique(a["tokens"])) > 1
    # the loader accepts the store for these shards
    open_split(tmp / "shards/train", store_path(tmp / "w1", "train", "zarr"))


def test_resume_redoes_only_unfinished_shards(setup):
    tmp, params = setup
    p = with_out(params, tmp / "resume", tmp / "tok", workers=0)
    tokenize(p, "train")
    path = store_path(tmp / "resume", "train", "zarr")
    done = arrays(path)
    # A task killed mid-write: its chunk is garbage and its completion mark missing.
    g = zarr.open_group(str(path), mode="r+")
    C = g["tokens"].shape[0] // 3
    g["tokens"][C:2 * C] = np.full((C, 3, 8, 8), 7, np.uint16)
    g["rows"][1:2] = np.array([-1], np.int32)
    chunk0 = path / "tokens" / "c" / "0" / "0" / "0" / "0"
    before = os.stat(chunk0).st_mtime_ns
    summary = tokenize(p, "train")
    assert summary["skipped_done"] == 2 and summary["images"] == 40  # shard 1 only
    after = arrays(path)
    for name in done:
        np.testing.assert_array_equal(done[name], after[name])
    assert os.stat(chunk0).st_mtime_ns == before  # finished shards were not rewritten


def test_parquet_format_holds_the_same_rows(setup):
    tmp, params = setup
    z = with_out(params, tmp / "fmt", tmp / "tok", workers=0)
    pq_params = with_out(params, tmp / "fmt", tmp / "tok", workers=0, format="parquet")
    tokenize(z, "test")
    tokenize(pq_params, "test")
    a, b = open_tokens(store_path(tmp / "fmt", "test", "zarr")), open_tokens(store_path(tmp / "fmt", "test", "parquet"))
    for s in range(len(a.spec.shards)):
        x, y = a.read_shard(s), b.read_shard(s)
        assert list(x.keys) == list(y.keys)
        np.testing.assert_array_equal(x.tokens, y.tokens)
        np.testing.assert_array_equal(x.views, y.views)
    assert (tmp / "fmt" / "test.index.parquet").exists()


def test_changed_tokenizer_is_an_error_or_a_clean_rebuild(setup):
    tmp, params = setup
    p = with_out(params, tmp / "stale", tmp / "tok", workers=0)
    tokenize(p, "test")
    save_tiny_tokenizer(tmp / "tok2", seed=1)
    p2 = with_out(p, tmp / "stale", tmp / "tok2")
    with pytest.raises(TokenStoreMismatch, match="fingerprints.tokenizer"):
        tokenize(p2, "test")
    tokenize(p2, "test", replace_stale=True)
    store = open_tokens(store_path(tmp / "stale", "test", "zarr"))
    assert store.spec.fingerprints["tokenizer"] == load_tokenizer(tmp / "tok2").fingerprint


def test_cli_without_tokenizer_is_one_line(tmp_path):
    from stages.cli import main

    result = CliRunner().invoke(main, ["tokenize", "--tokenizer", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert "no tokenizer; run `beit train-tokenizer`" in result.output


def test_cli_reads_the_tokenizer_from_outputs_tokenizer_dir(tmp_path):
    """Regression: the tokenizer folder was hard-coded to models/tokenizer."""
    import yaml

    from stages.cli import main

    raw = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "..", "params.yaml")))
    raw["outputs"]["tokenizer"]["dir"] = str(tmp_path / "elsewhere" / "tok")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["tokenize", "--params", str(tmp_path / "p.yaml")])
    assert result.exit_code == 1
    assert str(tmp_path / "elsewhere" / "tok") in result.output and "models/tokenizer" not in result.output
