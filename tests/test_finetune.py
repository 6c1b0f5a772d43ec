"""Fine-tune / scratch stage: end to end on the tiny fixture, resume equality, init-only difference."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import make_shards, save_stand_in_encoder, tiny_params
from model.classifier import load_classifier
from model.optim import param_groups
from stages.finetune import build_classifier, finetune

torch.set_num_threads(1)

FT = dict(label_fraction=0.5, eval_samples=10, loader={"num_workers": 0, "shuffle_buffer": 50},
          loop={"epochs": 2, "batch_size": 16, "checkpoint_every": 1000, "log_every": 1, "warmup_epochs": 0.5})


def params_for(tmp: Path, name: str, runs=None, **over):
    outputs = {"runs": runs or str(tmp / name / "runs"),
               "finetune": {"dir": str(tmp / name / "model"), "metrics": "metrics/finetune.json",
                            "curve": "plots/finetune.tsv", "figure": "plots/finetune.png"},
               "scratch": {"dir": str(tmp / name / "scratch")}}
    return tiny_params(tmp, finetune={**FT, **over}, outputs=outputs)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ft")
    params = tiny_params(tmp)
    make_shards(tmp, params, n_train=120, n_test=40)
    save_stand_in_encoder(params)
    return tmp


@pytest.fixture(scope="module")
def uninterrupted(world):
    params = params_for(world, "full")
    cwd = Path.cwd()
    (world / "full").mkdir()
    try:
        import os
        os.chdir(world / "full")
        metrics = finetune(params)
    finally:
        os.chdir(cwd)
    return params, metrics


def test_finetune_runs_end_to_end_and_writes_metrics(world, uninterrupted):
    params, metrics = uninterrupted
    written = json.loads((world / "full/metrics/finetune.json").read_text())
    assert written == json.loads(json.dumps(metrics))
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 1.0
    assert metrics["eval_samples"] == 40  # the last epoch scores the whole eval split
    assert metrics["train_samples"] == 60 and metrics["init"] == "pretrain"
    assert len(metrics["epoch_top1"]) == 2
    assert (world / "full/plots/finetune.tsv").exists() and (world / "full/plots/finetune.png").exists()
    model = load_classifier(params.outputs.finetune.dir)
    assert model.num_classes == 10 and len(model.blocks) == 6
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resume_after_stop_equals_uninterrupted(world, uninterrupted, monkeypatch):
    full_params, full = uninterrupted
    params = params_for(world, "resumed")
    (world / "resumed").mkdir()
    monkeypatch.chdir(world / "resumed")
    assert finetune(params, stop_after=3) == {"stopped_at": 3}  # mid epoch 1
    resumed = finetune(params)
    assert resumed["top1"] == pytest.approx(full["top1"])
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-4)
    a = load_classifier(full_params.outputs.finetune.dir).state_dict()
    b = load_classifier(params.outputs.finetune.dir).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_scoring_only_after_the_last_epoch_trains_the_same_weights(world, uninterrupted, monkeypatch):
    """eval_samples 0 (the default) scores the test split once, at the end; the per-epoch
    scoring it skips has no effect on training: the same weights, to the bit."""
    full_params, full = uninterrupted
    params = params_for(world, "once", eval_samples=0)
    (world / "once").mkdir()
    monkeypatch.chdir(world / "once")
    once = finetune(params)
    assert once["epoch_top1"] == full["epoch_top1"][-1:] and len(full["epoch_top1"]) == 2
    assert {k: once[k] for k in ("top1", "top5", "eval_loss", "train_loss", "eval_samples")} == \
        {k: full[k] for k in ("top1", "top5", "eval_loss", "train_loss", "eval_samples")}
    a = load_classifier(full_params.outputs.finetune.dir).state_dict()
    b = load_classifier(params.outputs.finetune.dir).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_scores_a_train_holdout_not_the_test_split(world, uninterrupted, monkeypatch):
    from pipeline.classify import open_labelled
    full_params, full = uninterrupted
    # Same runs dir, but a run of its own (its log must hold holdout scores only); the
    # trajectory is the same as the test-scored run's.
    params = params_for(world, "val", validation=20, runs=full_params.outputs.runs)
    (world / "val").mkdir()
    monkeypatch.chdir(world / "val")
    metrics = finetune(params)
    want = open_labelled(Path(params.outputs.shards) / "train", 0.5, params.seed, holdout=20).num_samples
    assert metrics["eval_samples"] == want and 15 <= want <= 25
    assert metrics["eval_on"] == f"train holdout of {want}" and full["eval_on"] == "test"
    assert metrics["steps"] == full["steps"] and metrics["train_loss"] == pytest.approx(full["train_loss"])
    assert len(metrics["epoch_top1"]) == 2 and len(list((world / "full/runs").glob("finetune-*"))) == 2


def test_finetune_and_scratch_differ_in_init_only(world):
    params = params_for(world, "cmp")
    ft, ft_fp = build_classifier(params, "finetune", init=None, classes=10)
    sc, sc_fp = build_classifier(params, "scratch", init=None, classes=10)
    assert ft_fp.startswith("pretrain-") and sc_fp == "scratch"
    # Same head init; different encoders.
    for k in ("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"):
        torch.testing.assert_close(ft.state_dict()[k], sc.state_dict()[k], msg=k)
    assert not torch.equal(ft.patch_embed.proj.weight, sc.patch_embed.proj.weight)
    assert ft.drop_path == sc.drop_path == params.finetune.drop_path
    # Same recipe: identical parameter groups (names, lr scales, weight decay).
    def summary(m):
        return [(tuple(g["param_names"]), g["lr_scale"], g["weight_decay"])
                for g in param_groups(m, 0.05, layer_decay=params.finetune.optim.layer_decay)]
    assert summary(ft) == summary(sc)
    # Same data order: the run fingerprints differ only through the kind and the init.
    from pipeline.classify import open_labelled
    from stages.finetune import run_fingerprint
    train = open_labelled(Path(params.outputs.shards) / "train", params.finetune.label_fraction, params.seed)
    assert run_fingerprint(params, "scratch", "scratch", train) != run_fingerprint(params, "finetune", ft_fp, train)


def test_classifier_layer_decay_covers_every_parameter_once(world):
    params = params_for(world, "groups")
    model = build_classifier(params, "scratch", init=None, classes=10)[0]
    groups = param_groups(model, 0.05, layer_decay=0.65)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    depth = len(model.blocks)
    for i in range(depth):  # per-block relative bias tables follow their block, decay-free
        assert scale[f"blocks.{i}.attn.relative_position_bias_table"] == pytest.approx(0.65 ** (depth - i))
    assert scale["head.weight"] == scale["fc_norm.weight"] == 1.0
    assert scale["cls_token"] == pytest.approx(0.65 ** (depth + 1))
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert wd["blocks.0.attn.relative_position_bias_table"] == 0.0 and wd["head.weight"] == 0.05
