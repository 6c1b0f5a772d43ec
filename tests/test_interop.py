"""Weights out to timm and in from microsoft/unilm layouts: same features after each hop."""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from safetensors.torch import load_file

from model.beit import create_model
from model.checkpoints import save_checkpoint
from model.classifier import BeitClassifier
from model.interop import create_timm, export_timm, load_unilm, unilm_classifier

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mim():
    torch.manual_seed(0)
    m = create_model("micro", depth=2).eval()
    with torch.no_grad():  # non-trivial relative bias and LayerScale, so a mix-up would show
        m.rel_pos_bias.relative_position_bias_table.normal_(0, 0.5)
        for blk in m.blocks:
            blk.gamma_1.normal_(1.0, 0.2)
    return m


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _pretrain_ckpt(tmp_path, mim):
    return save_checkpoint(tmp_path / "pretrain", mim.state_dict(), {"model": "micro", **dataclasses.asdict(mim.config)})


def test_pretrain_checkpoint_exports_to_timm_strictly_with_same_features(tmp_path, mim, images):
    out, sidecar = export_timm(_pretrain_ckpt(tmp_path, mim), tmp_path / "timm/beit.safetensors")
    model = create_timm(sidecar).eval()
    assert isinstance(model, timm.models.beit.Beit) and sidecar["kwargs"]["num_classes"] == 0
    model.load_state_dict(load_file(out), strict=True)
    with torch.no_grad():
        ours = BeitClassifier.from_pretrained(tmp_path / "pretrain", num_classes=0).eval()
        tokens = model.forward_features(images)  # [B, 1+N, D], timm: no final norm with avg pooling
        torch.testing.assert_close(tokens, ours.forward_blocks(images))
        # ... and through the MIM model's own final norm, our pretraining features.
        torch.testing.assert_close(mim.norm(tokens), mim.features(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(images), ours(images))  # pooled + fc_norm


def test_classifier_checkpoint_exports_with_its_head(tmp_path, mim, images):
    clf = BeitClassifier.from_encoder(mim, num_classes=7).eval()
    with torch.no_grad():
        clf.head.weight.normal_()  # a "trained" head
    save_checkpoint(tmp_path / "ft", clf.state_dict(), clf.checkpoint_config(model="micro"))
    out, sidecar = export_timm(tmp_path / "ft", tmp_path / "ft.safetensors")
    model = timm.create_model(sidecar["model_name"], pretrained=False, **sidecar["kwargs"]).eval()
    model.load_state_dict(load_file(out), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(images), clf(images))


def _unilm_layout(mim) -> dict:
    """What unilm's pretraining saves: our names plus persistent relative_position_index buffers."""
    sd = {k: v.clone() for k, v in mim.state_dict().items()}
    sd["rel_pos_bias.relative_position_index"] = mim.rel_pos_bias.relative_position_index.clone()
    return sd


def test_unilm_pretraining_checkpoint_imports_with_same_features(tmp_path, mim, images):
    path = tmp_path / "beit_micro_pt.pth"
    torch.save({"model": _unilm_layout(mim), "epoch": 799}, path)
    config, sd = load_unilm(path)
    for field in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias",
                  "abs_pos_emb", "vocab_size"):
        assert getattr(config, field) == getattr(mim.config, field), field
    assert not any(k.startswith(("mask_token", "lm_head", "norm.", "rel_pos_bias")) for k in sd)
    clf = unilm_classifier(path, num_classes=10).eval()
    ref = BeitClassifier.from_encoder(mim, num_classes=10).eval()
    with torch.no_grad():
        torch.testing.assert_close(clf.forward_blocks(images), ref.forward_blocks(images))
        torch.testing.assert_close(mim.norm(clf.forward_blocks(images)), mim.features(images),
                                   atol=1e-5, rtol=1e-5)


def test_unilm_finetuned_checkpoint_keeps_per_block_tables_and_head(tmp_path, mim, images):
    clf = BeitClassifier.from_encoder(mim, num_classes=4).eval()
    with torch.no_grad():
        clf.blocks[1].attn.relative_position_bias_table.normal_()  # layers diverged in fine-tuning
        clf.head.weight.normal_()
    sd = {k: v.clone() for k, v in clf.state_dict().items()}
    for i, blk in enumerate(clf.blocks):
        sd[f"blocks.{i}.attn.relative_position_index"] = blk.attn.relative_position_index.clone()
    path = tmp_path / "beit_micro_ft.pth"
    torch.save({"module": {f"encoder.{k}": v for k, v in sd.items()}}, path)
    loaded = unilm_classifier(path, num_classes=4).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), clf(images))
    # Another number of classes: the head is left fresh, the encoder still loads.
    other = unilm_classifier(path, num_classes=3)
    torch.testing.assert_close(other.blocks[1].attn.relative_position_bias_table,
                               clf.blocks[1].attn.relative_position_bias_table)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_unilm_loader_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_unilm(path)
    torch.save({"model": {"foo": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="missing cls_token"):
        load_unilm(tmp_path / "other.pth")
