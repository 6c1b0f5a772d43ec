"""`dvc repro` end to end on a tiny synthetic Fashion-MNIST: the real dvc.yaml, the real
stage commands, params shrunk to seconds. Checks the DAG runs through pretrain and the
report, that outputs and metrics land where params say, and that a rerun is a no-op."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.synthetic import write_fake_fashion_mnist

REPO = Path(__file__).resolve().parents[1]


def tiny(raw: dict, root: Path) -> dict:
    from helpers import merge

    return merge(raw, {
        "data": {"root": str(root)},
        "shard": {"shard_size": 60, "workers": 1},
        "tokenizer": {"steps": 6, "batch_size": 16, "loader": {"num_workers": 0}, "eval_samples": 40,
                      "log_every": 2},
        "tokenize": {"views": 2, "batch_size": 32, "cluster": {"workers": 1}},
        "pretrain": {"loop": {"epochs": 1, "batch_size": 16, "log_every": 2, "checkpoint_every": 4},
                     "loader": {"num_workers": 0, "shuffle_buffer": 20}, "eval_batches": 1},
        "finetune": {"loop": {"epochs": 1, "batch_size": 16, "log_every": 2},
                     "loader": {"num_workers": 0, "shuffle_buffer": 20}, "label_fraction": 0.5,
                     "eval_samples": 20},
        "probe": {"batch_size": 32, "num_workers": 0, "epochs": 2, "train_fraction": None, "validation": 10},
        "segment": {"data": {"root": str(root), "train_scenes": 16, "eval_scenes": 8, "canvas": 32,
                             "item_size": [12, 24]},
                    "head": {"channels": 8}, "loop": {"epochs": 1, "batch_size": 8, "log_every": 1}},
    })


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvc")
    for name in ("pipeline", "model", "stages", "dvc.yaml"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    write_fake_fashion_mnist(root / "fm", n_train=120, n_test=40)
    raw = tiny(yaml.safe_load((REPO / "params.yaml").read_text()), root / "fm")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TQDM_DISABLE": "1", "PYTHONPATH": str(root)}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=root, check=True, env=env)
    return root, env


def dvc(root, env, *args):
    return subprocess.run([str(Path(sys.executable).parent / "dvc"), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)


def test_dvc_repro_runs_the_pipeline_and_is_idempotent(project):
    root, env = project
    run = dvc(root, env, "repro", "pretrain", "report")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for out in ("data/shards/train/index.parquet", "data/tokens/train.zarr/zarr.json",
                "models/tokenizer/tokenizer.json", "models/pretrain/model.safetensors",
                "models/finetune/model.safetensors", "models/segment/model.safetensors",
                "data/seg_shards/test/index.parquet", "reports/results.md", "dvc.lock",
                "metrics/visualize.json", "plots/attention.png", "plots/mim_recon.png"):
        assert (root / out).exists(), out
    pre = json.loads((root / "metrics/pretrain.json").read_text())
    assert pre["steps"] == 120 // 16 and 0.0 <= pre["eval_acc"] <= 1.0
    fine = json.loads((root / "metrics/finetune.json").read_text())
    assert 0.0 <= fine["top1"] <= fine["top5"] <= 1.0
    assert "BEiT-B" in (root / "reports/results.md").read_text()
    assert "| pretrained |" in (root / "reports/results.md").read_text()  # the visualize section
    again = dvc(root, env, "repro", "pretrain", "report")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout


def test_changing_a_top_level_param_reruns_only_what_reads_it(project):
    root, env = project
    status = dvc(root, env, "status", "--json")
    assert json.loads(status.stdout or "{}") == {}, status.stdout
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["mask_ratio"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    changed = set(json.loads(dvc(root, env, "status", "--json").stdout))
    assert "pretrain" in changed
    assert not any(s.startswith(("shard", "tokenize", "train-tokenizer")) for s in changed)
