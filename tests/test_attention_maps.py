"""Explicit attention weights (model/attention_maps.py) and the foreground scores (model/foreground.py)."""
import math

import pytest
import torch

from model.attention_maps import (AttentionRecorder, attention_output, attention_qkv, attention_weights,
                                  cls_attention)
from model.beit import create_model
from model.classifier import BeitClassifier
from model.foreground import foreground_patches, foreground_scores, mean_se, normalised_entropy


def _trained_like(model):
    """Non-trivial biases (fresh ones are zero: a sum that forgot a term would still match)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "gamma" in name:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["mim", "classifier"])
def test_explicit_weights_reproduce_the_block(kind):
    torch.manual_seed(0)
    mim = _trained_like(create_model("micro", img_size=16, depth=2))
    model = _trained_like(BeitClassifier.from_encoder(mim, 0)) if kind == "classifier" else mim
    run = model.features if kind == "mim" else model.forward_blocks
    images = torch.randn(3, 3, 16, 16)
    block = model.blocks[-1]
    seen = {}
    block.register_forward_hook(lambda m, a, kw, out: seen.update(x=a[0], kw=kw, out=out), with_kwargs=True)
    with AttentionRecorder(block) as rec:
        run(images)
    w = rec.weights  # [B, H, T, T]
    assert w.shape == (3, 4, 17, 17)
    assert torch.allclose(w.sum(-1), torch.ones(3, 4, 17))
    x = seen["x"]
    shared = seen["kw"].get("shared_rel_pos_bias")
    assert (shared is not None) == (kind == "mim")  # both bias paths are exercised
    # The block's actual output, rebuilt from the explicit weights times v.
    h = x + block.gamma_1 * attention_output(block.attn, block.norm1(x), w)
    rebuilt = h + block.gamma_2 * block.mlp(block.norm2(h))
    assert torch.allclose(rebuilt, seen["out"], atol=1e-5)
    # The CLS row alone (what cls_attention records) is the full matrix's first row.
    assert torch.allclose(attention_weights(block.attn, block.norm1(x), shared, slice(0, 1)), w[:, :, :1], atol=1e-6)
    # Leaving the relative bias out changes the output: the test would notice a missing term.
    q, k, _ = attention_qkv(block.attn, block.norm1(x))
    unbiased = ((q * block.attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # [B, H, T, T]
    assert not torch.allclose(attention_output(block.attn, block.norm1(x), unbiased),
                              block.attn(block.norm1(x), shared_rel_pos_bias=shared), atol=1e-3)


def test_cls_attention_is_a_distribution_over_patches():
    torch.manual_seed(0)
    model = create_model("micro", img_size=16, depth=2).eval()
    maps = cls_attention(model, model.features, torch.randn(2, 3, 16, 16))
    assert maps.shape == (2, 4, 16)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4))
    assert not model.blocks[-1].attn._forward_hooks  # the hook is removed afterwards


def test_foreground_patches_rule():
    img = torch.zeros(1, 3, 8, 8)
    img[:, :, :4, :4] = 1.0  # patch 0 fully foreground
    img[:, :, :2, 4:8] = 1.0  # patch 1 half foreground -> counts at share 0.5
    img[:, :, 4, 4] = 1.0  # patch 3: 1 of 16 pixels -> background
    img[:, :, 6:8, 0:4] = 0.05  # patch 2: below the pixel threshold
    fg = foreground_patches(img, 4, pixel_threshold=0.1, patch_share=0.5)
    assert fg.tolist() == [[True, True, False, False]]
    assert foreground_patches(img, 4, 0.1, 0.6).tolist() == [[True, False, False, False]]


def test_foreground_scores_known_answer():
    fg = torch.tensor([[True, True, False, False],
                       [True, False, False, False],
                       [False, False, False, False],  # no foreground: left out
                       [True, False, False, False]])
    maps = torch.tensor([[0.4, 0.3, 0.2, 0.1],  # top-2 = {0, 1} = F: mass 0.7, IoU 1
                         [0.1, 0.6, 0.2, 0.1],  # top-1 = {1}, F = {0}: mass 0.1, IoU 0
                         [0.25, 0.25, 0.25, 0.25],
                         [0.25, 0.25, 0.25, 0.25]])  # uniform: mass = chance = 0.25
    s = foreground_scores(maps, fg)
    assert s["kept"].tolist() == [True, True, False, True]
    assert torch.allclose(s["mass"], torch.tensor([0.7, 0.1, 0.25]))
    assert torch.allclose(s["chance_mass"], torch.tensor([0.5, 0.25, 0.25]))
    assert s["iou"][:2].tolist() == [1.0, 0.0]
    # top-2 of [0.2, 0.5, 0.3, 0] against F = {0, 2}: top = {1, 2}, |∩| 1, |∪| 3
    s2 = foreground_scores(torch.tensor([[0.2, 0.5, 0.3, 0.0]]), torch.tensor([[True, False, True, False]]))
    assert s2["iou"].item() == pytest.approx(1 / 3)
    assert s2["mass"].item() == pytest.approx(0.5)
    assert s2["chance_iou"].item() == pytest.approx(0.5 / 1.5)


def test_mean_se():
    m, se = mean_se(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert math.isnan(mean_se(torch.tensor([1.0]))[1])


def test_normalised_entropy():
    e = normalised_entropy(torch.tensor([[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]))
    assert torch.allclose(e, torch.tensor([1.0, 0.0, 0.5]), atol=1e-6)
