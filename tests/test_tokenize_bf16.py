"""tokenize.precision: bf16 only where its argmax ids match fp32 (checked per shard)."""
import dataclasses

import pytest
import torch

import model.tokenizer as tokenizer_mod
from helpers import shards_with_tokenizer
from model.tokenizer import bf16_agreement, load_tokenizer
from pipeline.tokens import open_tokens, store_path
from stages.tokenize import BF16Mismatch, tokenize


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return shards_with_tokenizer(tmp_path_factory.mktemp("tokenize_bf16"), n_train=40, n_test=8)


def with_precision(params, tmp, out, precision):
    tokenize_cfg = dataclasses.replace(params.tokenize, precision=precision,
                                       cluster=dataclasses.replace(params.tokenize.cluster, workers=0))
    outputs = dataclasses.replace(params.outputs, tokens=str(tmp / out),
                                  tokenizer=dataclasses.replace(params.outputs.tokenizer, dir=str(tmp / "tok")))
    return dataclasses.replace(params, tokenize=tokenize_cfg, outputs=outputs)


def test_agreement_is_a_share_of_positions(setup):
    tmp, _ = setup
    tok = load_tokenizer(tmp / "tok")
    x = torch.rand(4, 3, tok.input_size, tok.input_size, generator=torch.Generator().manual_seed(0))
    ids, share = bf16_agreement(tok, x)
    assert ids.shape == (4, *tok.grid) and 0.0 <= share <= 1.0
    assert share == float((ids == tok.encode(x)).float().mean())


def test_bf16_below_the_threshold_fails_with_one_line(setup, monkeypatch):
    tmp, params = setup
    monkeypatch.setattr(tokenizer_mod, "BF16_MIN_AGREEMENT", 1.01)  # nothing can pass
    with pytest.raises(BF16Mismatch, match="set tokenize.precision: fp32"):
        tokenize(with_precision(params, tmp, "strict", "bf16"), "test")


def test_bf16_store_is_fingerprinted_apart_from_fp32(setup, monkeypatch):
    tmp, params = setup
    monkeypatch.setattr(tokenizer_mod, "BF16_MIN_AGREEMENT", 0.0)
    tokenize(with_precision(params, tmp, "bf16", "bf16"), "test")
    tokenize(with_precision(params, tmp, "fp32", "fp32"), "test")
    bf16 = open_tokens(store_path(tmp / "bf16", "test", "zarr")).spec.fingerprints
    fp32 = open_tokens(store_path(tmp / "fp32", "test", "zarr")).spec.fingerprints
    assert bf16.get("precision") == "bf16" and "precision" not in fp32  # today's stores keep their fingerprints


def test_bf16_on_a_cpu_without_bf16_kernels_keeps_bf16_and_warns_once(setup, monkeypatch, capsys):
    """The store's fingerprint says bf16, so the ids stay bf16 ones; the user hears, in one line,
    that this CPU emulates it (an order of magnitude slower than fp32 on an AVX2 EPYC)."""
    import stages.tokenize as stage
    tmp, params = setup
    monkeypatch.setattr(tokenizer_mod, "BF16_MIN_AGREEMENT", 0.0)
    monkeypatch.setattr(stage, "cpu_has_fast_bf16", lambda: False)
    tokenize(with_precision(params, tmp, "emulated", "bf16"), "test")
    warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 1 and "tokenize.precision: bf16" in warnings[0] and "fp32" in warnings[0]
    spec = open_tokens(store_path(tmp / "emulated", "test", "zarr")).spec
    assert spec.fingerprints.get("precision") == "bf16"
    tokenize(with_precision(params, tmp, "emulated", "bf16"), "test")  # nothing left to do: no warning
    assert "warning:" not in capsys.readouterr().err
    cluster = dataclasses.replace(params.tokenize.cluster, scheduler="tcp://elsewhere:8786")
    assert not stage.bf16_emulated_here("bf16", cluster)  # remote workers' CPUs are not this one's
    assert not stage.bf16_emulated_here("fp32", params.tokenize.cluster)
