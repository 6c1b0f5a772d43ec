"""Stepper: AMP on CPU (bf16) and gradient accumulation give sane, finite steps."""
import pytest
import torch

from model import engine
from model.beit import create_model
from model.engine import Dist, Stepper
from model.schema import OptimConfig


def batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, 64, dtype=torch.bool)
    mask[:, :26] = True
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "mask": mask,
            "tokens": torch.randint(0, 32, (n, 8, 8), generator=g)}


def loss_fn(net, b):
    return net(b["image"], b["mask"], b["tokens"])


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_steps_reduce_the_loss(amp, monkeypatch):
    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: True)  # bf16 kernels even where they are emulated
    torch.manual_seed(0)
    stepper = Stepper(create_model("micro", vocab_size=32, depth=2), OptimConfig(lr=3e-3, amp=amp), Dist())
    first = stepper.step([batch()], loss_fn)
    for _ in range(15):
        last = stepper.step([batch()], loss_fn)
    assert torch.isfinite(torch.tensor(last["loss"])) and last["loss"] < first["loss"] - 0.5
    assert "grad_norm" in last


def test_accumulation_equals_one_big_batch():
    def run(micro):
        torch.manual_seed(0)
        s = Stepper(create_model("micro", vocab_size=32, depth=2), OptimConfig(lr=1e-3), Dist())
        b = batch(n=8)
        parts = [{k: v[i:i + 8 // micro] for k, v in b.items()} for i in range(0, 8, 8 // micro)]
        stats = s.step(parts, loss_fn)
        return stats, s.model.state_dict()
    (s1, one), (s2, two) = run(1), run(2)
    # Equal masked counts per sample, so the mean of micro-batch means is the batch mean:
    # same loss and the same gradient (its norm would double if micro-losses were summed).
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-5)
    assert s1["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-4)
    for k in one:  # Adam amplifies float noise on near-zero gradients: lr-scale tolerance
        torch.testing.assert_close(one[k], two[k], rtol=1e-3, atol=1e-5)


def test_fp16_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="amp=fp16 needs a GPU"):
        Stepper(create_model("micro", vocab_size=32, depth=1), OptimConfig(amp="fp16"), Dist())


def test_bf16_on_a_cpu_without_bf16_kernels_trains_in_fp32_and_says_so(monkeypatch, capsys):
    """Emulated bf16 is ~11x slower than fp32 on an AVX2 CPU: such a run falls back to fp32, in
    one warning line, and then steps exactly as amp none does."""
    def run(amp):
        torch.manual_seed(0)
        s = Stepper(create_model("micro", vocab_size=32, depth=2), OptimConfig(lr=3e-3, amp=amp), Dist())
        return s, [s.step([batch(i)], loss_fn)["loss"] for i in range(3)]

    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: False)
    fallback, losses = run("bf16")
    err = capsys.readouterr().err.strip().splitlines()
    assert fallback.amp == "none" and len(err) == 1 and "optim.amp: bf16" in err[0] and "fp32" in err[0]
    assert losses == run("none")[1]
    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: True)
    native, _ = run("bf16")
    assert native.amp == "bf16" and not capsys.readouterr().err
    assert isinstance(native.autocast(), torch.autocast)


def test_only_rank_0_announces_the_bf16_fallback(monkeypatch, capsys):
    """Under CPU DDP every rank falls back; one line for the run, not one per process."""
    monkeypatch.setattr(engine, "cpu_has_fast_bf16", lambda: False)
    other = Stepper(create_model("micro", vocab_size=32, depth=2), OptimConfig(amp="bf16"), Dist(rank=1))
    assert other.amp == "none" and not capsys.readouterr().err
    assert engine.effective_amp("bf16", torch.device("cpu"), announce=True) == "none"
    assert "optim.amp: bf16" in capsys.readouterr().err
