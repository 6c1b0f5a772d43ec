"""BEiT for semantic segmentation: the encoder at the segmentation resolution, a 4-level
feature pyramid and a UperNet (or FPN) decoder, pure PyTorch + timm (no mmcv / mmseg).

The recipe of the paper's ADE20K runs (unilm's beit/semantic_segmentation):
* the encoder is timm's `Beit` (as model/classifier.py: per-block relative position bias,
  parameter names `blocks.i.*`, so model/optim.py's layer-wise lr decay applies unchanged;
  the decoder's parameters get the top lr);
* built at the segmentation size: when its patch grid differs from the one the weights
  were trained at, the relative position bias tables are resized as unilm does
  (timm.layers.resize_rel_pos_bias_table: geometric-progression resampling of the offsets)
  and an absolute position embedding is interpolated (timm.layers.resample_abs_pos_embed);
  `fit_encoder_state`;
* features after four evenly spaced blocks (BEiT-B: 3, 5, 7, 11 of 12) -> a pyramid at
  strides P/4, P/2, P, 2P (P = patch size): x4 by two transposed convs (BN + GELU between),
  x2 by one, identity, /2 by max pooling (unilm's fpn1..fpn4);
* UperNet: pyramid pooling (PPM) on the coarsest level, FPN top-down, all levels fused at
  the finest; an auxiliary FCN head on level 3 (weight 0.4); cross-entropy that ignores 255.

Shapes: B batch, D embed dim, h x w patch grid, C decoder channels, K classes, S image side.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table

from model.beit import BeitConfig, beit_config_from_dict
from model.checkpoints import load_checkpoint
from model.classifier import BeitClassifier
from model.schema import SegHeadConfig

IGNORE_INDEX = 255  # pipeline.schema.IGNORE_INDEX (model/ imports nothing from pipeline/ but atomic.py)


def out_blocks(depth: int) -> tuple[int, int, int, int]:
    """Four evenly spaced block indices (0-based) ending at the last: unilm's 3, 5, 7, 11 for
    12 blocks and 7, 11, 15, 23 for 24 are depth/3 - 1 in steps of depth/6; 6 blocks: 1, 2, 3, 5."""
    first, step = max(0, round(depth / 3) - 1), max(1, round(depth / 6))
    picks = [min(first + i * step, depth - 1) for i in range(3)] + [depth - 1]
    return tuple(picks)  # type: ignore[return-value]


def fit_encoder_state(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm-layout encoder weights (any patch grid) -> the grid of `model` (a timm Beit):
    relative position bias tables resized, pos_embed interpolated, index buffers dropped
    (the model builds its own for its grid)."""
    own = model.state_dict()
    out = {}
    for k, v in sd.items():
        if "relative_position_index" in k:
            continue
        if k == "pos_embed" and getattr(model, "pos_embed", None) is not None and v.shape != model.pos_embed.shape:
            n = v.shape[1] - 1  # patches (one CLS prefix token)
            side = int(round(n ** 0.5))
            v = resample_abs_pos_embed(v, new_size=list(model.patch_embed.grid_size), old_size=[side, side],
                                       num_prefix_tokens=1)  # [1, 1+h*w, D]
        elif k.endswith("relative_position_bias_table") and k in own and v.shape != own[k].shape:
            window = model.get_submodule(k[: -len(".relative_position_bias_table")]).window_size
            v = resize_rel_pos_bias_table(v, new_window_size=window, new_bias_shape=tuple(own[k].shape))
        out[k] = v
    return out


def conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class Pyramid(nn.Module):
    """[B, D, h, w] x 4 (one per out block) -> [B, D, 4h, 4w], [B, D, 2h, 2w], [B, D, h, w], [B, D, h/2, w/2]."""

    def __init__(self, dim: int):
        super().__init__()
        self.fpn1 = nn.Sequential(nn.ConvTranspose2d(dim, dim, 2, 2), nn.BatchNorm2d(dim), nn.GELU(),
                                  nn.ConvTranspose2d(dim, dim, 2, 2))
        self.fpn2 = nn.ConvTranspose2d(dim, dim, 2, 2)
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(2, 2)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [op(x) for op, x in zip((self.fpn1, self.fpn2, self.fpn3, self.fpn4), feats)]


class UperHead(nn.Module):
    """UperNet (Xiao et al. 2018) as mmseg's UPerHead: PPM on the top level (kind upernet; a plain
    lateral conv for kind fpn), FPN top-down, the 4 levels upsampled to the finest and fused.
    levels [B, D, H_i, W_i] x 4 (finest first) -> logits [B, K, H_0, W_0]."""

    def __init__(self, dim: int, num_classes: int, cfg: SegHeadConfig):
        super().__init__()
        c = cfg.channels
        self.kind = cfg.kind
        if cfg.kind == "upernet":
            self.ppm = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv_bn_relu(dim, c, 1))
                                     for s in cfg.pool_scales)
            self.top = conv_bn_relu(dim + len(cfg.pool_scales) * c, c, 3)
        else:
            self.top = conv_bn_relu(dim, c, 1)
        self.lateral = nn.ModuleList(conv_bn_relu(dim, c, 1) for _ in range(3))
        self.fpn = nn.ModuleList(conv_bn_relu(c, c, 3) for _ in range(3))
        self.fuse = conv_bn_relu(4 * c, c, 3)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.cls = nn.Conv2d(c, num_classes, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        x = levels[3]  # [B, D, h/2, w/2]
        if self.kind == "upernet":
            pooled = [F.interpolate(p(x), size=x.shape[2:], mode="bilinear", align_corners=False) for p in self.ppm]
            x = torch.cat([x, *pooled], dim=1)  # [B, D + len(pool_scales) * C, h/2, w/2]
        lat = [conv(f) for conv, f in zip(self.lateral, levels[:3])] + [self.top(x)]  # [B, C, H_i, W_i] each
        for i in (2, 1, 0):  # top-down: coarser levels added to finer ones
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[2:], mode="bilinear", align_corners=False)
        outs = [conv(f) for conv, f in zip(self.fpn, lat[:3])] + [lat[3]]
        size = outs[0].shape[2:]
        outs = [outs[0]] + [F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outs[1:]]
        x = self.fuse(torch.cat(outs, dim=1))  # [B, C, H_0, W_0]
        return self.cls(self.dropout(x))  # [B, K, H_0, W_0]


class FCNHead(nn.Module):
    """Auxiliary head (mmseg's FCNHead, one conv): [B, D, H, W] -> [B, K, H, W]."""

    def __init__(self, dim: int, num_classes: int, cfg: SegHeadConfig):
        super().__init__()
        self.conv = conv_bn_relu(dim, cfg.channels, 3)
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.cls = nn.Conv2d(cfg.channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cls(self.dropout(self.conv(x)))


class BeitSegmenter(BeitClassifier):
    """forward(images [B, 3, S, S]) -> logits [B, K, S, S]; loss(images, masks [B, S, S]) -> (loss, metrics)."""

    def __init__(self, config: BeitConfig, num_classes: int, head: SegHeadConfig = SegHeadConfig(),
                 drop_path: Optional[float] = None):
        super().__init__(config, num_classes=0, drop_path=drop_path)
        self.fc_norm = nn.Identity()  # no pooling: the decoder reads the patch tokens
        self.seg_classes, self.head_config = num_classes, head
        self.out_blocks = head.out_blocks or out_blocks(config.depth)
        if max(self.out_blocks) >= config.depth:
            raise ValueError(f"out_blocks={list(self.out_blocks)}: the encoder has {config.depth} blocks")
        self.neck = Pyramid(config.embed_dim)
        self.decode_head = UperHead(config.embed_dim, num_classes, head)
        self.aux_head = FCNHead(config.embed_dim, num_classes, head) if head.aux_weight > 0 else None

    def pyramid(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The 4 pyramid levels: [B, D, 4h, 4w], [B, D, 2h, 2w], [B, D, h, w], [B, D, h/2, w/2]."""
        B = images.shape[0]
        h, w = self.patch_embed.grid_size
        want = set(self.out_blocks)
        feats = []
        for i, x in enumerate(self.block_outputs(images, max(want) + 1)):  # x: [B, 1+N, D]
            if i in want:
                feats.append(x[:, 1:].transpose(1, 2).reshape(B, -1, h, w))  # [B, D, h, w], CLS dropped
        return self.neck(feats)

    def forward_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(main, aux or None) logits at the input size: [B, K, S, S] each."""
        levels = self.pyramid(images)
        size = images.shape[2:]
        main = F.interpolate(self.decode_head(levels), size=size, mode="bilinear", align_corners=False)
        aux = None
        if self.aux_head is not None and self.training:
            aux = F.interpolate(self.aux_head(levels[2]), size=size, mode="bilinear", align_corners=False)
        return main, aux

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_logits(images)[0]

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Cross-entropy over labelled pixels (255 ignored) + aux_weight x the aux head's."""
        main, aux = self.forward_logits(images)
        loss = F.cross_entropy(main.float(), masks, ignore_index=IGNORE_INDEX)
        metrics = {}
        if aux is not None:
            aux_loss = F.cross_entropy(aux.float(), masks, ignore_index=IGNORE_INDEX)
            loss = loss + self.head_config.aux_weight * aux_loss
            metrics["aux_loss"] = aux_loss.detach()
        return loss, metrics

    def load_encoder(self, sd: dict[str, torch.Tensor]) -> None:
        """Encoder weights at any patch grid (resized to this one); the decoder stays fresh."""
        sd = {k: v for k, v in fit_encoder_state(sd, self).items() if not k.startswith(("fc_norm.", "head."))}
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith(("neck.", "decode_head.", "aux_head."))]
        if missing or unexpected:
            raise ValueError(f"encoder weights do not fit {self.config}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")

    def checkpoint_config(self, **extra) -> dict:
        return {"kind": "segmenter", "beit": dataclasses.asdict(self.config), "num_classes": self.seg_classes,
                "head": dataclasses.asdict(self.head_config), "drop_path": self.drop_path, **extra}


def classifier_encoder(ckpt_dir: str | Path) -> tuple[dict[str, torch.Tensor], BeitConfig]:
    """The encoder of a `beit finetune` checkpoint (intermediate fine-tuning): timm-layout
    weights without the classification head, and its BeitConfig."""
    sd, config = load_checkpoint(ckpt_dir, fix="rerun `beit finetune`")
    if config.get("kind") != "classifier":
        raise ValueError(f"{ckpt_dir}: not a `beit finetune` classifier (no kind=classifier in its config.json)")
    return ({k: v for k, v in sd.items() if not k.startswith(("fc_norm.", "head."))},
            beit_config_from_dict(config["beit"]))
