"""The GPU-minded training step, checked on CPU: the sync-free masked gather, one host read
per step, and torch.compile on a tiny model."""
import copy

import numpy as np
import pytest
import torch

from model.beit import create_model
from model.engine import Dist, Stepper
from model.schema import OptimConfig
from pipeline.masking import MaskGenerator
from pipeline.schema import MaskingConfig


def batch(target="tokens", seed=1):
    masks = MaskGenerator((4, 4), MaskingConfig(kind="block", mask_ratio=0.4))
    g = torch.Generator().manual_seed(seed)
    mask = torch.from_numpy(masks.batch(np.random.default_rng(seed), 3))  # [3, 4, 4], same count each
    return masks.num_masked, {"image": torch.randn(3, 3, 16, 16, generator=g), "mask": mask,
                              "tokens": torch.randint(0, 32, (3, 4, 4), generator=g)}


def tiny(target="tokens"):
    torch.manual_seed(0)
    return create_model("micro", img_size=16, depth=2, vocab_size=32, target=target)


@pytest.mark.parametrize("target", ["tokens", "pixels"])
def test_static_gather_gives_todays_loss_and_gradients(target):
    k, b = batch()
    ref, fast = tiny(target), tiny(target)
    fast.masked_per_image = k
    ref_loss, ref_m = ref(b["image"], b["mask"], b["tokens"])
    loss, m = fast(b["image"], b["mask"], b["tokens"])
    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert int(m["num_masked"]) == int(ref_m["num_masked"]) == 3 * k
    ref_loss.backward()
    loss.backward()
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), name


def test_static_gather_keeps_row_order():
    model = tiny()
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    x = torch.arange(8.0).reshape(2, 4, 1)  # [B, N, 1]
    model.masked_per_image = 2
    assert torch.equal(model.masked(x, mask), x[mask])


def test_step_reads_the_same_numbers_as_before():
    k, b = batch()
    _, b2 = batch(seed=2)
    model = tiny()
    # what the per-item .item() reads gave: the same weights see both micro-batches
    l1, m1 = copy.deepcopy(model)(b["image"], b["mask"], b["tokens"])
    l2, m2 = copy.deepcopy(model)(b2["image"], b2["mask"], b2["tokens"])
    stepper = Stepper(model, OptimConfig(clip_grad=None), Dist())
    stats = stepper.step([b, b2], lambda net, x: net(x["image"], x["mask"], x["tokens"]))
    assert stats["loss"] == 0.0 + l1.item() / 2 + l2.item() / 2  # bit for bit, same order
    assert stats["acc"] == 0.0 + float(m1["acc"]) / 2 + float(m2["acc"]) / 2
    model = tiny()
    stepper = Stepper(model, OptimConfig(clip_grad=1.0), Dist())
    stats = stepper.step([b, b], lambda net, x: net(x["image"], x["mask"], x["tokens"]))
    assert set(stats) == {"loss", "acc", "num_masked", "grad_norm"}
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["num_masked"] == 3 * k  # mean over 2 micro-batches of the same count
    assert stats["grad_norm"] > 0


def test_compile_trains_a_tiny_model_like_eager():
    # inductor compiles C++ on this CPU (gcc); aot_eager checks the same graph capture in a
    # fraction of the time, so the suite stays in seconds
    k, b = batch()
    losses = {}
    for compiled in (False, True):
        model = tiny()
        model.masked_per_image = k  # static shapes: one graph, no recompiles
        net = torch.compile(model, backend="aot_eager", fullgraph=False) if compiled else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        out = []
        for _ in range(3):
            loss, _ = net(b["image"], b["mask"], b["tokens"])
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(float(loss.detach()))
        losses[compiled] = out
    assert np.allclose(losses[True], losses[False], rtol=1e-4)
    assert losses[True][-1] < losses[True][0]  # it trains
