"""Parameter groups (no-decay set, layer-wise lr decay) and the warmup + cosine schedule."""
from __future__ import annotations

import math

import pytest
import torch

from model.beit import create_model
from model.optim import layer_id, lr_at, param_groups

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("micro", depth=3)


def assert_partition(model, groups):
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)), "a parameter is in two groups"
    assert set(seen) == {id(p) for p in model.parameters()}, "a parameter is in no group"
    for g in groups:
        assert len(g["param_names"]) == len(g["params"])


def group_of(groups, name):
    (g,) = [g for g in groups if name in g["param_names"]]
    return g


def test_two_groups_without_layer_decay(model):
    groups = param_groups(model, weight_decay=0.05)
    assert_partition(model, groups)
    assert len(groups) == 2 and all(g["lr_scale"] == 1.0 for g in groups)
    no_decay = {"cls_token", "pos_embed", "rel_pos_bias.relative_position_bias_table",
                "patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.attn.q_bias",
                "blocks.0.gamma_1", "norm.bias", "lm_head.bias"}
    decay = {"mask_token", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.2.mlp.fc2.weight", "lm_head.weight"}
    for name in no_decay:
        assert group_of(groups, name)["weight_decay"] == 0.0, name
    for name in decay:
        assert group_of(groups, name)["weight_decay"] == 0.05, name


def test_layer_decay_scales_per_block(model):
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    assert_partition(model, groups)
    n = 3  # depth
    expected = {
        "cls_token": 0.5 ** (n + 1), "patch_embed.proj.weight": 0.5 ** (n + 1),
        "rel_pos_bias.relative_position_bias_table": 0.5 ** (n + 1),
        "blocks.0.attn.qkv.weight": 0.5 ** n, "blocks.1.norm2.bias": 0.5 ** (n - 1),
        "blocks.2.mlp.fc1.weight": 0.5 ** 1, "norm.weight": 1.0, "lm_head.weight": 1.0,
    }
    for name, scale in expected.items():
        assert group_of(groups, name)["lr_scale"] == pytest.approx(scale), name
    # Each layer id holds a decay and a no-decay group with the same scale.
    assert sorted({g["layer_id"] for g in groups}) == [0, 1, 2, 3, 4]
    assert len(groups) == 10


def test_groups_feed_adamw_and_skip_frozen(model):
    model.patch_embed.proj.weight.requires_grad_(False)
    try:
        groups = param_groups(model, 0.05, layer_decay=0.65)
        names = [n for g in groups for n in g["param_names"]]
        assert "patch_embed.proj.weight" not in names
        opt = torch.optim.AdamW(groups, lr=1e-3)
        assert opt.param_groups[0]["lr_scale"] == pytest.approx(0.65 ** 4)
    finally:
        model.patch_embed.proj.weight.requires_grad_(True)


def test_layer_id_rules():
    assert layer_id("mask_token", 12) == 0
    assert layer_id("blocks.11.attn.proj.weight", 12) == 12
    assert layer_id("fc_norm.weight", 12) == 13
    assert layer_id("head.weight", 12) == 13


def test_param_group_errors(model):
    with pytest.raises(ValueError, match="layer_decay=1.5"):
        param_groups(model, 0.05, layer_decay=1.5)
    with pytest.raises(ValueError, match="weight_decay=-1"):
        param_groups(model, -1)


def test_schedule_endpoints_and_shape():
    kw = dict(total_steps=100, warmup_steps=10, base_lr=1e-3, min_lr=1e-5)
    assert lr_at(0, **kw) == pytest.approx(1e-4)  # the first step already learns
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(55, **kw) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # cosine midpoint
    assert lr_at(100, **kw) == pytest.approx(1e-5)
    assert lr_at(150, **kw) == pytest.approx(1e-5)
    lrs = [lr_at(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone after warmup
    assert lr_at(0, total_steps=10, warmup_steps=0, base_lr=1.0, min_lr=0.0) == 1.0
    assert lr_at(5, total_steps=10, warmup_steps=0, base_lr=1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_schedule_errors():
    with pytest.raises(ValueError, match="warmup_steps=20"):
        lr_at(0, total_steps=10, warmup_steps=20, base_lr=1e-3, min_lr=0)
    with pytest.raises(ValueError, match="min_lr=0.1"):
        lr_at(0, total_steps=10, warmup_steps=0, base_lr=1e-3, min_lr=0.1)
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, total_steps=10, warmup_steps=0, base_lr=1e-3)
    with pytest.raises(ValueError, match="total_steps=0"):
        lr_at(0, total_steps=0, warmup_steps=0, base_lr=1e-3)
