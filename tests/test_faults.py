"""kill -9 of every stage at a seeded random point, then a rerun: the outputs equal an
uninterrupted run's (bytes or arrays, not exit codes), and nothing partial looks complete.

Each stage runs as a real `beit` subprocess in its own session; the whole process group
(Dask or DataLoader workers included) gets SIGKILL once a progress marker shows the stage
is mid-way (the k-th shard, token shard or checkpoint, k drawn from a seeded RNG), after a
further seeded delay. Run alone with `pytest -m faults`.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
import torch
import yaml
import zarr
from safetensors.torch import load_file

from helpers import fake_tokens, make_shards, merge, save_stand_in_encoder, save_tiny_tokenizer, tiny_raw
from model.tokenizer import load_tokenizer
from stages.config import Params, from_dict

pytestmark = [pytest.mark.faults, pytest.mark.slow]

THROUGHPUT = ("img_per_s", "train_img_per_s", "train_seconds")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards (many small ones, so a kill lands between two), fake tokens, a random
    'pretrained' encoder and a tiny tokenizer, shared by every stage's runs."""
    tmp = tmp_path_factory.mktemp("faults")
    raw = tiny_raw(tmp, shard={"shard_size": 20},
                   tokenizer={"steps": 40, "batch_size": 16, "loader": {"num_workers": 0}, "eval_samples": 32,
                              "log_every": 5, "model": {"hidden": 8, "vocab_size": 64, "codebook_dim": 8}},
                   tokenize={"batch_size": 32, "cluster": {"workers": 0}},
                   pretrain={"loop": {"checkpoint_every": 2}},
                   finetune={"label_fraction": 0.5, "eval_samples": 20, "loader": {"num_workers": 0},
                             "loop": {"epochs": 2, "batch_size": 16, "checkpoint_every": 2, "log_every": 1}})
    params = from_dict(Params, raw)
    make_shards(tmp, params, n_train=400, n_test=40)
    for split in ("train", "test"):
        fake_tokens(params, split)
    save_stand_in_encoder(params)
    save_tiny_tokenizer(params.outputs.tokenizer.dir)
    return tmp, raw


def run(raw: dict, where: Path, args: list[str], kill_when: Optional[Callable[[], bool]] = None,
        delay: float = 0.0, timeout: float = 300) -> int:
    """`beit ARGS --params where/params.yaml` in `where`; with `kill_when`, SIGKILL the whole
    process group `delay` s after it first holds. Returns the exit status (-9: killed)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stages.cli", *args, "--params", str(where / "params.yaml")],
                            cwd=where, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    if kill_when is not None:
        while proc.poll() is None and not kill_when() and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    if proc.returncode not in (0, -signal.SIGKILL):
        pytest.fail(f"beit {' '.join(args)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return proc.returncode


def rng_for(name: str) -> random.Random:
    return random.Random(f"faults-{name}")  # the "random point" is the same on every run


def count(pattern: str, root: Path) -> Callable[[], int]:
    return lambda: len(list(root.glob(pattern)))


def last_checkpoint_step(root: Path) -> int:
    """The newest complete checkpoint's step under root/runs/*/ (0: none yet)."""
    steps = [int(p.parent.name.removeprefix("step-")) for p in root.glob("runs/*/step-*/state.json")]
    return max(steps, default=0)


def metrics_without_throughput(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in THROUGHPUT}


def same_tensors(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert sorted(x) == sorted(y)
    for k in x:
        assert torch.equal(x[k], y[k]), k


def test_shard_killed_then_rerun_is_byte_identical(world):
    tmp, raw = world
    ref, cut = tmp / "shard-ref", tmp / "shard-cut"
    paths = lambda where: merge(raw, {"outputs": {"shards": str(where / "shards")}})  # noqa: E731
    assert run(paths(ref), ref, ["shard", "--split", "train", "--no-progress"]) == 0
    k = rng_for("shard").randint(2, 8)  # of 20 shards
    done = count("shards/train/*.stats.json", cut)
    assert run(paths(cut), cut, ["shard", "--split", "train", "--no-progress"],
               kill_when=lambda: done() >= k) == -signal.SIGKILL
    assert not (cut / "shards/train/index.parquet").exists()  # the split does not look complete
    kept = {p.name: p.stat().st_mtime_ns for p in (cut / "shards/train").glob("*.tar")}
    assert 0 < len(kept) < 20
    assert run(paths(cut), cut, ["shard", "--split", "train", "--no-progress"]) == 0
    files = sorted(p.name for p in (ref / "shards/train").iterdir())
    assert files == sorted(p.name for p in (cut / "shards/train").iterdir())
    for name in files:
        assert (ref / "shards/train" / name).read_bytes() == (cut / "shards/train" / name).read_bytes(), name
    for name, mtime in kept.items():  # complete shards were kept, not rewritten
        assert (cut / "shards/train" / name).stat().st_mtime_ns == mtime, name


def test_tokenize_killed_then_rerun_equals_an_uninterrupted_store(world):
    tmp, raw = world
    ref, cut = tmp / "tok-ref", tmp / "tok-cut"
    paths = lambda where: merge(raw, {"outputs": {"tokens": str(where / "tokens")}})  # noqa: E731
    args = ["tokenize", "--split", "train"]
    assert run(paths(ref), ref, args) == 0
    k = rng_for("tokenize").randint(1, 10)  # of 20 shards; `rows` is one chunk file per shard
    rows = count("tokens/train.zarr/rows/c/*", cut)
    assert run(paths(cut), cut, args, kill_when=lambda: rows() >= k) == -signal.SIGKILL
    assert run(paths(cut), cut, args) == 0
    a, b = zarr.open_group(str(ref / "tokens/train.zarr"), mode="r"), zarr.open_group(str(cut / "tokens/train.zarr"), mode="r")
    for name in ("tokens", "views", "keys", "rows", "digest"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


def test_train_tokenizer_killed_leaves_no_partial_tokenizer_and_rerun_is_identical(world):
    tmp, raw = world
    ref, cut = tmp / "dvae-ref", tmp / "dvae-cut"
    record = lambda where: {k: str(where / f"tokenizer.{k}") for k in ("metrics", "curve", "figure", "recon")}  # noqa: E731
    paths = lambda where: merge(raw, {"outputs": {"tokenizer": {"dir": str(where / "tokenizer"), **record(where)}}})  # noqa: E731
    start = time.monotonic()
    assert run(paths(ref), ref, ["train-tokenizer", "--no-progress"]) == 0
    took = time.monotonic() - start
    t0 = time.monotonic()
    when = rng_for("train-tokenizer").uniform(0.4, 0.7) * took  # mid-training, after the imports
    assert run(paths(cut), cut, ["train-tokenizer", "--no-progress"],
               kill_when=lambda: time.monotonic() - t0 >= when) == -signal.SIGKILL
    if (cut / "tokenizer").exists():  # swapped in whole, or not at all
        load_tokenizer(cut / "tokenizer")
    assert run(paths(cut), cut, ["train-tokenizer", "--no-progress"]) == 0
    for name in ("encoder.safetensors", "decoder.safetensors"):
        same_tensors(ref / "tokenizer" / name, cut / "tokenizer" / name)
    assert load_tokenizer(ref / "tokenizer").fingerprint == load_tokenizer(cut / "tokenizer").fingerprint
    assert metrics_without_throughput(ref / "tokenizer.metrics") == metrics_without_throughput(cut / "tokenizer.metrics")


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_training_killed_then_resumed_equals_uninterrupted(world, stage):
    tmp, raw = world
    ref, cut = tmp / f"{stage}-ref", tmp / f"{stage}-cut"

    def paths(where: Path) -> dict:
        record = {"dir": str(where / "model"), "metrics": str(where / "m.json"),
                  "curve": str(where / "c.tsv"), "figure": str(where / "c.png")}
        return merge(raw, {"outputs": {"runs": str(where / "runs"), stage: record}})

    assert run(paths(ref), ref, [stage]) == 0
    rng = rng_for(stage)
    k, delay = rng.randint(1, 4), rng.uniform(0.0, 0.3)  # after the k-th checkpoint, maybe mid-step
    assert run(paths(cut), cut, [stage], kill_when=lambda: last_checkpoint_step(cut) >= 2 * k,
               delay=delay) == -signal.SIGKILL
    assert not (cut / "model").exists() and not (cut / "m.json").exists()  # no final output from a cut run
    assert run(paths(cut), cut, [stage]) == 0
    same_tensors(ref / "model/model.safetensors", cut / "model/model.safetensors")
    assert metrics_without_throughput(ref / "m.json") == metrics_without_throughput(cut / "m.json")
    steps = [int(line.split("\t")[0]) for line in (cut / "c.tsv").read_text().splitlines()[1:]]
    assert steps == sorted(steps) and len(steps) == len((ref / "c.tsv").read_text().splitlines()) - 1
