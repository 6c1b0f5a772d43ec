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
