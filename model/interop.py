"""Weights in and out: export to timm, import official microsoft/unilm BEiT checkpoints.

export_timm(ckpt_dir, out): our pretrain or classifier checkpoint -> a timm
`beit_*` state dict (safetensors) + a JSON sidecar with the arguments for
`timm.create_model(name, pretrained=False, **kwargs)`; `load_state_dict(strict=True)`
then accepts it and computes the same features.

load_unilm(path): a unilm `.pth` (BEiT pretraining or fine-tuning checkpoint)
-> (BeitConfig, classifier/timm-layout state dict). unilm's layout is timm's
(timm's Beit was ported from it) except for what fine-tuning remaps
(unilm run_class_finetuning.py; timm's beit checkpoint_filter_fn):
  * "model" or "module" wraps the weights; some exports prefix "encoder.";
  * `relative_position_index` buffers are saved (persistent in unilm): dropped;
  * a shared `rel_pos_bias.relative_position_bias_table` is copied into every
    `blocks.i.attn.relative_position_bias_table`;
  * pretraining-only `mask_token`, `lm_head.*` and the final `norm.*` (mean
    pooling uses a fresh `fc_norm`) are dropped; `fc_norm.*`/`head.*` of a
    fine-tuned checkpoint are kept.
The `.pth` is read with torch.load(weights_only=True): tensors and plain
containers only, never arbitrary pickled objects.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.beit import (
    BeitConfig, beit_config_from_dict, copy_rel_pos_bias_per_layer, load_encoder, state_depth, timm_export,
    timm_kwargs,
)
from model.checkpoints import load_checkpoint
from pipeline.atomic import atomic_file, atomic_write

# timm variant whose constructor hosts every size; kwargs override its architecture.
TIMM_NAMES = {"base": "beit_base_patch16_224", "large": "beit_large_patch16_224"}
DEFAULT_TIMM_NAME = "beit_base_patch16_224"


def export_timm(ckpt_dir: str | Path, out_path: str | Path) -> tuple[Path, dict]:
    """Write `out_path` (.safetensors) and `out_path`.json -> (out_path, sidecar dict).

    A pretrain checkpoint exports the encoder with a fresh fc_norm and no head
    (num_classes=0); a classifier exports as it is (its own num_classes)."""
    sd, config = load_checkpoint(ckpt_dir)
    if config.get("kind") == "classifier":
        beit, num_classes = beit_config_from_dict(config["beit"]), int(config["num_classes"])
    else:
        encoder = load_encoder(ckpt_dir)
        beit, num_classes = encoder.config, 0
        sd, _ = timm_export(encoder, per_layer_rel_pos=True)
        # timm's avg-pool model always has fc_norm; an identity-initialised one (fresh
        # LayerNorm) keeps strict loading possible and is what fine-tuning starts from.
        sd["fc_norm.weight"] = torch.ones(beit.embed_dim)
        sd["fc_norm.bias"] = torch.zeros(beit.embed_dim)
    name = TIMM_NAMES.get(config.get("model", ""), DEFAULT_TIMM_NAME)
    sidecar = {"model_name": name, "kwargs": {**timm_kwargs(beit), "num_classes": num_classes}}
    out_path = Path(out_path)
    with atomic_file(out_path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
    atomic_write(out_path.with_suffix(".json"), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return out_path, sidecar


def create_timm(sidecar: dict):
    """timm model for an export_timm sidecar (pretrained=False: weights come from the file)."""
    import timm

    return timm.create_model(sidecar["model_name"], pretrained=False, **sidecar["kwargs"])


# ---------------------------------------------------------------- unilm import

def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: not a BEiT checkpoint (expected a state dict, or one under 'model'/'module')")
    sd = dict(obj)
    if sd and all(k.startswith("encoder.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items()}
    return sd


def _infer_config(sd: dict[str, torch.Tensor], path: Path, vocab: int | None) -> BeitConfig:
    need = ("cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight",
            "blocks.0.attn.relative_position_bias_table")
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"{path}: missing {missing[0]} (not a BEiT checkpoint with relative position bias?)")
    D, C, P, _ = sd["patch_embed.proj.weight"].shape  # [D, C, P, P]
    depth = state_depth(sd)
    table = sd["blocks.0.attn.relative_position_bias_table"]  # [(2h-1)^2 + 3, heads]
    side = (math.isqrt(table.shape[0] - 3) + 1) // 2  # the patch grid side h
    if (2 * side - 1) ** 2 + 3 != table.shape[0]:
        raise ValueError(f"{path}: relative position table of {table.shape[0]} rows is not a square grid's")
    return BeitConfig(
        img_size=side * P, patch_size=P, in_chans=C, embed_dim=D, depth=depth,
        num_heads=table.shape[1], mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / D,
        qkv_bias="blocks.0.attn.q_bias" in sd, vocab_size=vocab or BeitConfig.vocab_size,
        layer_scale_init=0.1 if "blocks.0.gamma_1" in sd else None,  # the value is loaded anyway
        abs_pos_emb="pos_embed" in sd, drop_path=0.0,
    )


def load_unilm(path: str | Path) -> tuple[BeitConfig, dict[str, torch.Tensor]]:
    """An official unilm BEiT .pth -> (BeitConfig, timm/classifier-layout state dict)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such unilm checkpoint file")
    sd = _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)
    vocab = sd["lm_head.weight"].shape[0] if "lm_head.weight" in sd else None
    sd = {k: v for k, v in sd.items()
          if "relative_position_index" not in k and not k.startswith(("mask_token", "lm_head.", "norm."))}
    copy_rel_pos_bias_per_layer(sd)
    return _infer_config(sd, path, vocab), sd


def unilm_classifier(path: str | Path, num_classes: int, drop_path=None):
    """A BeitClassifier initialised from an official unilm checkpoint (head kept only
    when it has `num_classes` outputs)."""
    from model.classifier import BeitClassifier

    config, sd = load_unilm(path)
    model = BeitClassifier(config, num_classes, drop_path)
    model.load_encoder(sd)
    return model
