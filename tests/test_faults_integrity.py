"""Read-side faults end in one clear line (issue 12): damaged shards, token stores and
checkpoints are named with the command that repairs them, and that command does repair them.

Every test damages a private copy of one small world (120 + 40 synthetic images, a tiny
dVAE tokenizer, its token stores), so they run in seconds and in any order."""
from __future__ import annotations

import dataclasses
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from click.testing import CliRunner
from safetensors.torch import load_file

from helpers import make_shards, save_tiny_tokenizer, tiny_params
from model.beit import create_model
from model.checkpoints import UnreadableCheckpoint, save_checkpoint
from pipeline.classify import ClassifyDataset, open_labelled
from pipeline.mim import open_split
from pipeline.schema import LoaderConfig
from pipeline.shardread import CorruptShard, tar_samples
from pipeline.stream import eval_batches
from pipeline.tokens import CorruptTokens, open_tokens, store_path
from stages.errors import DEBUG_ENV

pytestmark = pytest.mark.faults
torch.set_num_threads(1)

QUICK = {"tokenize": {"cluster": {"workers": 0}},  # in-process: no Dask cluster to start
         "pretrain": {"loop": {"epochs": 1, "checkpoint_every": 2}}}


def params_at(root: Path, **over):
    return tiny_params(root, **{**QUICK, **over})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards, tokenizer and token stores of both splits, made by the real stages."""
    from stages.tokenize import tokenize

    root = tmp_path_factory.mktemp("faults")
    params = params_at(root)
    make_shards(root, params, n_train=120, n_test=40)
    save_tiny_tokenizer(params.outputs.tokenizer.dir)
    for split in ("train", "test"):
        tokenize(params, split)
    return root


@pytest.fixture
def copy(world, tmp_path):
    """A private copy of the world: (root, params)."""
    root = tmp_path / "w"
    shutil.copytree(world, root)
    return root, params_at(root)


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def write_params(root: Path, params) -> str:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(params)))))
    return str(path)


def one_line(result) -> str:
    """The one error line of a failed command: exit 1, the last line on stderr, on a line of
    its own (after a progress bar too), no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "Error" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: "), result.output
    assert result.stderr.splitlines()[-1] == errors[0]
    return errors[0]


def image_offset(tar: Path, n: int = 0) -> tuple[int, int]:
    """(offset, size) of the n-th image member's data in `tar`."""
    with tarfile.open(tar) as t:
        images = [m for m in t.getmembers() if m.name.endswith((".png", ".jpg"))]
    return images[n].offset_data, images[n].size


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- shards


def test_truncated_shard_is_named_on_open_and_beit_shard_repairs_it(copy):
    root, params = copy
    train = root / "shards/train"
    tar = train / "train-000001.tar"
    whole = tar.read_bytes()
    tar.write_bytes(whole[:-3000])
    with pytest.raises(CorruptShard) as err:
        open_split(train, store_path(root / "tokens", "train", "zarr"))
    line = str(err.value)
    assert line.startswith(f"{tar}: truncated or altered ({len(whole) - 3000} bytes, train-000001.stats.json says "
                           f"{len(whole)})")
    assert "rerun `beit shard --split train` (or `dvc repro -f shard@train`)" in line
    with pytest.raises(CorruptShard, match="train-000001.tar: truncated"):
        open_labelled(train, 0.5, seed=0)
    assert isinstance(err.value, tarfile.ReadError)  # what code catching the tar reader's error expects

    from stages.shard import shard

    shard(params, ("train",), progress=False)  # the advice: `beit shard --split train`
    assert tar.read_bytes() == whole
    open_split(train, store_path(root / "tokens", "train", "zarr"), verify=True)  # the token store still fits


def test_missing_tar_or_sidecar_is_named(copy):
    root, _ = copy
    (root / "shards/test/test-000000.stats.json").unlink()
    with pytest.raises(CorruptShard, match=r"test-000000.tar: truncated or altered \(no test-000000.stats.json"):
        open_labelled(root / "shards/test")
    (root / "shards/train/train-000002.tar").unlink()
    with pytest.raises(CorruptShard, match=r"train-000002.tar: truncated or altered \(missing"):
        open_labelled(root / "shards/train")


def test_flipped_image_byte_is_caught_only_by_verify(copy):
    root, params = copy
    train = root / "shards/train"
    tar = train / "train-000000.tar"
    whole = tar.read_bytes()
    offset, size = image_offset(tar, 5)
    flip(tar, offset + size // 2)  # same size: the cheap check cannot see it
    tokens = store_path(root / "tokens", "train", "zarr")
    open_split(train, tokens)
    open_labelled(train)
    with pytest.raises(CorruptShard, match="image sha256 differs from index.parquet") as err:
        open_split(train, tokens, verify=True)
    assert str(err.value).endswith("delete it and rerun `beit shard --split train`")
    with pytest.raises(CorruptShard, match=f"{tar}: truncated or altered"):
        open_labelled(train, verify=True)

    from stages.shard import shard

    tar.unlink()  # the advice
    shard(params, ("train",), progress=False)
    assert tar.read_bytes() == whole
    open_split(train, tokens, verify=True)


def test_tar_that_fails_mid_stream_names_the_file(copy):
    root, _ = copy
    tar = root / "shards/test/test-000000.tar"
    offset, size = image_offset(tar, 7)
    tar.write_bytes(tar.read_bytes()[:offset + size // 2])  # inside a member
    with pytest.raises(CorruptShard, match=f"{tar}: truncated or altered \\(unexpected end of data\\)"):
        list(tar_samples([str(tar)]))


def test_tar_cut_at_a_member_boundary_stops_the_epoch_with_the_file_named(copy):
    """tarfile and webdataset end such a tar quietly; the stream counts what the plan counted."""
    root, _ = copy
    held = open_labelled(root / "shards/test")  # opened (and size-checked) before the damage
    tar = root / "shards/test/test-000000.tar"
    with tarfile.open(tar) as t:
        start = [m for m in t.getmembers() if m.name.endswith(".cls")][10].offset
    tar.write_bytes(tar.read_bytes()[:start])  # samples 10.. gone, and the end blocks
    data = ClassifyDataset(held, LoaderConfig(num_workers=0), 32, seed=0, train=False)
    with pytest.raises(CorruptShard, match=r"test-000000.tar: truncated or altered \(ends after 10 of the 40 samples"):
        list(eval_batches(data, 8, 0))


def test_truncated_shard_through_beit_pretrain_is_one_line(copy):
    from stages.pretrain import cli

    root, params = copy
    tar = root / "shards/train/train-000002.tar"
    tar.write_bytes(tar.read_bytes()[:4096])
    line = one_line(CliRunner().invoke(cli, ["--params", write_params(root, params)]))
    assert line.startswith(f"Error: {tar}: truncated or altered (4096 bytes")
    assert "`beit shard --split train`" in line
    assert not Path(params.outputs.pretrain.dir).exists() and not (root / "runs").exists()


def test_verify_flag_reaches_the_check(copy):
    from stages.tokenize import cli

    root, params = copy
    tar = root / "shards/test/test-000000.tar"
    offset, size = image_offset(tar, 0)
    flip(tar, offset + 1)
    path = write_params(root, params)
    assert CliRunner().invoke(cli, ["--params", path, "--split", "test"]).exit_code == 0  # sizes fine, store done
    line = one_line(CliRunner().invoke(cli, ["--params", path, "--split", "test", "--verify"]))
    assert "test-000000.tar: truncated or altered (sample" in line and "image sha256 differs" in line


# ---------------------------------------------------------------- token store


def chunk(store: Path, s: int) -> Path:
    """The Zarr chunk file of data shard `s`'s tokens."""
    return store / "tokens" / "c" / str(s) / "0" / "0" / "0"


@pytest.mark.parametrize("where", ["header", "middle", "last"])
def test_flipped_token_chunk_byte_is_named_and_not_done(copy, where):
    root, _ = copy
    store = store_path(root / "tokens", "train", "zarr")
    path = chunk(store, 1)
    n = path.stat().st_size
    flip(path, {"header": 0, "middle": n // 2, "last": n - 1}[where])
    tokens = open_tokens(store)
    with pytest.raises(CorruptTokens) as err:
        tokens.read_shard(1)
    line = str(err.value)
    assert line.startswith(f"{store}: token rows of train-000001.tar ")
    assert ("do not decode" in line) or ("do not match their digest" in line)
    assert line.endswith("rerun `beit tokenize --split train` (it redoes that shard)")
    tokens.read_shard(0)
    assert tokens.done() == {0, 2}  # so that rerun redoes exactly shard 1


def test_flipped_token_chunk_through_the_cli_and_beit_tokenize_repairs_it(copy):
    from stages.pretrain import cli as pretrain_cli
    from stages.tokenize import cli as tokenize_cli

    root, params = copy
    store = store_path(root / "tokens", "train", "zarr")
    group = zarr.open_group(str(store), mode="r")
    before = {name: group[name][:] for name in ("tokens", "views", "keys", "rows", "digest")}
    flip(chunk(store, 1), 0)
    path = write_params(root, params)
    line = one_line(CliRunner().invoke(pretrain_cli, ["--params", path]))
    assert line.startswith(f"Error: {store}: token rows of train-000001.tar do not decode")
    assert "rerun `beit tokenize --split train`" in line
    assert not Path(params.outputs.pretrain.dir).exists()

    result = CliRunner().invoke(tokenize_cli, ["--params", path, "--split", "train"])  # the advice
    assert result.exit_code == 0, result.output
    assert "skipped_done=2" in result.output
    group = zarr.open_group(str(store), mode="r")
    for name, array in before.items():
        np.testing.assert_array_equal(group[name][:], array)


def test_token_parquet_file_damage_is_named(copy):
    from stages.tokenize import tokenize

    root, params = copy
    p = dataclasses.replace(params, tokenize=dataclasses.replace(params.tokenize, format="parquet"))
    tokenize(p, "test")
    store = store_path(root / "tokens", "test", "parquet")
    flip(store / "test-000000.parquet", 10)
    with pytest.raises(CorruptTokens, match=f"{store}: token rows of test-000000.tar (do not decode|do not match)"):
        open_tokens(store).read_shard(0)
    assert tokenize(p, "test")["images"] == 40  # redone
    open_tokens(store).read_shard(0)


# ---------------------------------------------------------------- checkpoints


def pretrained(params, model: str = "micro") -> Path:
    """A stand-in `beit pretrain` output (what stages/pretrain.py saves)."""
    torch.manual_seed(1)
    mim = create_model(model, vocab_size=64)
    return save_checkpoint(params.outputs.pretrain.dir, mim.state_dict(),
                           {"model": model, **dataclasses.asdict(mim.config)})


def test_truncated_pretrained_model_is_one_line_and_nothing_is_written(copy):
    from stages.finetune import finetune_cli

    root, params = copy
    ckpt = pretrained(params)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100_000])
    line = one_line(CliRunner().invoke(finetune_cli, ["--params", write_params(root, params)]))
    assert line.startswith(f"Error: {weights}: unreadable checkpoint (not a valid safetensors file")
    assert line.endswith("; rerun `beit pretrain`")
    assert not Path(params.outputs.finetune.dir).exists() and not (root / "runs").exists()


def test_truncated_tokenizer_is_one_line(copy):
    from stages.tokenize import cli

    root, params = copy
    shutil.rmtree(root / "tokens")
    encoder = Path(params.outputs.tokenizer.dir) / "encoder.safetensors"
    encoder.write_bytes(encoder.read_bytes()[:-10])
    line = one_line(CliRunner().invoke(cli, ["--params", write_params(root, params), "--split", "test"]))
    assert line == (f"Error: {encoder}: unreadable checkpoint (does not match tokenizer.json: fingerprint "
                    "mismatch); rerun `beit train-tokenizer`")
    assert not (root / "tokens").exists()
    (Path(params.outputs.tokenizer.dir) / "tokenizer.json").write_text('{"format": 1, "ki')
    line = one_line(CliRunner().invoke(cli, ["--params", write_params(root, params), "--split", "test"]))
    assert "tokenizer.json: unreadable checkpoint (not valid JSON" in line and "`beit train-tokenizer`" in line


def run_checkpoints(root: Path) -> list[Path]:
    return sorted((root / "runs").glob("pretrain-*/step-*"))


def test_truncated_run_checkpoint_falls_back_to_the_previous_one(copy, capsys):
    from stages.pretrain import pretrain

    root, params = copy
    assert pretrain(params, stop_after=5) == {"stopped_at": 5}  # checkpoints at steps 4 and 5
    older, newest = run_checkpoints(root)
    assert (older.name, newest.name) == ("step-00000004", "step-00000005")
    weights = newest / "optim.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    metrics = pretrain(params)
    # the bf16 fallback's line (model/engine.py) depends on the CPU, not on the checkpoint
    warning = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("warning:") and not line.startswith("warning: optim.amp:")]
    assert len(warning) == 1
    assert warning[0].startswith(f"warning: {newest}: unreadable checkpoint (optim.safetensors: not a valid "
                                 "safetensors file: Error while deserializing header")
    assert warning[0].endswith("resuming from step-00000004 instead (the run ends the same; "
                               "delete step-00000005 to silence this)")
    assert metrics["steps"] == 7
    log = (newest.parent / "log.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in log] == list(range(1, 8))  # each step once
    # "the run ends the same": an uninterrupted run elsewhere gives the same weights
    record = dataclasses.replace(params.outputs.pretrain, dir=str(root / "straight"))
    pretrain(dataclasses.replace(params, outputs=dataclasses.replace(params.outputs, runs=str(root / "runs2"),
                                                                        pretrain=record)))
    a, b = load_file(root / "straight/model.safetensors"), load_file(Path(params.outputs.pretrain.dir) / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_only_run_checkpoint_unreadable_is_one_line(copy):
    from stages.pretrain import cli

    root, params = copy
    path = write_params(root, params)
    assert CliRunner().invoke(cli, ["--params", path, "--stop-after", "1"]).exit_code == 0
    (only,) = run_checkpoints(root)
    (only / "state.json").write_text('{"step": 1, "optim')
    line = one_line(CliRunner().invoke(cli, ["--params", path]))
    assert line.startswith(f"Error: {only}: unreadable checkpoint (state.json: not valid JSON")
    assert line.endswith(f"nothing older to resume from; delete {only.parent} to start the run over")
    assert not Path(params.outputs.pretrain.dir).exists()


def test_load_train_state_names_the_folder(copy):
    from model.train_state import load_train_state, save_train_state

    root, _ = copy
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = save_train_state(root / "run", 3, model, opt)
    (ckpt / "rng.safetensors").unlink()
    with pytest.raises(UnreadableCheckpoint, match=f"{ckpt}: unreadable checkpoint \\(rng.safetensors missing\\); "
                                                   "delete it to resume from the previous checkpoint"):
        load_train_state(ckpt, model, opt)


def test_pretrained_model_of_another_size_is_one_line(copy):
    from stages.finetune import finetune_cli

    root, params = copy
    ckpt = pretrained(params, "micro")
    other = dataclasses.replace(params, model="tiny")
    line = one_line(CliRunner().invoke(finetune_cli, ["--params", write_params(root, other)]))
    assert line == (f"Error: {ckpt}: pretrained as model=micro but params.model=tiny; "
                    "rerun `beit pretrain` with model=tiny (or set model: micro)")
    assert not (root / "runs").exists()


def test_pretrained_at_another_image_size_is_one_line(copy):
    from stages.probe import linear_probe_cli

    root, params = copy
    ckpt = pretrained(params)
    other = dataclasses.replace(params, data=dataclasses.replace(params.data, image_size=64))
    line = one_line(CliRunner().invoke(linear_probe_cli, ["--params", write_params(root, other)]))
    assert line == (f"Error: {ckpt}: pretrained at 32 px but data.image_size=64; "
                    "rerun `beit pretrain` at 64 px (or set data.image_size: 32)")
