"""The typed settings the networks and their optimisation run with.

As in pipeline/schema.py: these are the classes the code takes, nested as they are
into params.yaml sections by stages/config.py. No torch here, so the config loader
(and `beit report`, `beit shard`) never import it; tests/test_layers.py checks it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional


@dataclasses.dataclass(frozen=True)
class DVAEConfig:
    """Sizes. Defaults: 32 px -> 8x8 codes, the patch grid of the default ViT (patch 4)."""

    image_size: int = 32
    in_channels: int = 3
    vocab_size: int = 1024
    downsample: int = 4  # power of two; grid = image_size // downsample
    hidden: int = 32  # width at full resolution; doubles after each 2x downsample
    blocks_per_group: int = 1
    codebook_dim: int = 32  # cosine logits compare l2-normalised d-dim features with d-dim codes

    def __post_init__(self) -> None:
        d = self.downsample
        if d < 1 or d & (d - 1):
            raise ValueError(f"dvae downsample={d}: must be a power of two (4 for 32 px -> 8x8)")
        if self.image_size % d:
            raise ValueError(f"dvae image_size={self.image_size} is not divisible by downsample={d}")
        if self.vocab_size < 2 or self.hidden < 1 or self.blocks_per_group < 1 or self.codebook_dim < 1:
            raise ValueError("dvae vocab_size >= 2, hidden, blocks_per_group and codebook_dim >= 1 are required")

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.downsample
        return g, g

    @property
    def widths(self) -> list[int]:
        """Channel width of each resolution level, finest first."""
        return [self.hidden * 2**i for i in range(int(math.log2(self.downsample)) + 1)]


@dataclasses.dataclass(frozen=True)
class DVAESchedule:
    """Optimisation knobs; *_frac are fractions of the total step count (DALL-E's shapes, cosine)."""

    lr: float = 2e-3
    lr_min_ratio: float = 0.01  # final lr = lr * ratio
    warmup_frac: float = 0.02
    weight_decay: float = 1e-4
    temp_start: float = 1.0
    temp_end: float = 1 / 16
    temp_anneal_frac: float = 0.7
    kl_weight: float = 1e-4  # relative to per-pixel MSE; larger spreads codes, smaller sharpens recon
    kl_warmup_frac: float = 0.1
    grad_clip: float = 1.0
    straight_through: bool = False  # decoder sees hard one-hots (soft gradients)
    entropy_weight: float = 0.01  # x (log V - H(batch-mean q)); spreads codes over the batch; 0 disables
    init_codes: bool = True  # k-means++ codebook init on the first batch's features
    restart_every: int = 20  # steps between dead-code restarts; 0 disables
    restart_until_frac: float = 0.8  # no restarts after this fraction of steps (codes settle)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW, its lr schedule's end points, clipping, AMP and compilation (model/engine.py's Stepper)."""

    lr: float = 1.5e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: Optional[float] = 3.0
    layer_decay: Optional[float] = None  # finetune: lr scale per block
    amp: Literal["none", "bf16", "fp16"] = "none"
    compile: bool = False

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError(f"lr={self.lr} must be > 0, min_lr and weight_decay >= 0")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"layer_decay={self.layer_decay}: must be in (0, 1] or null")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"clip_grad={self.clip_grad}: must be > 0 or null")


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """Mixup / CutMix and label smoothing (model/mixup.py's mix_batch)."""

    mixup_alpha: float = 0.8  # 0 disables mixup
    cutmix_alpha: float = 1.0  # 0 disables cutmix
    switch_prob: float = 0.5  # P(cutmix) when both are enabled
    prob: float = 1.0  # P(mixing a batch at all)
    smoothing: float = 0.1

    def __post_init__(self) -> None:
        if min(self.mixup_alpha, self.cutmix_alpha) < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0 (0 disables)")
        if not 0.0 <= self.prob <= 1.0 or not 0.0 <= self.switch_prob <= 1.0:
            raise ValueError("prob and switch_prob must be in [0, 1]")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing={self.smoothing}: must be in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclasses.dataclass(frozen=True)
class SegHeadConfig:
    """The segmentation decoder on the encoder's 4-level pyramid (model/segmentation.py)."""

    kind: Literal["upernet", "fpn"] = "upernet"  # upernet: pyramid pooling on the top level + FPN; fpn: FPN only
    channels: int = 64  # decoder width (BEiT-B's UperNet: 768)
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)  # PPM bins
    aux_weight: float = 0.4  # auxiliary FCN head on pyramid level 3 (mmseg's in_index 2); 0: no aux head
    dropout: float = 0.1  # before the classifier, as mmseg's decode heads
    out_blocks: Optional[tuple[int, ...]] = None  # 4 block indices (0-based); None: evenly spaced (BEiT-B: 3,5,7,11)
    schedule: Literal["poly", "cosine"] = "poly"  # lr after warmup: mmseg's poly (power 1) or cosine

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"channels={self.channels}: must be >= 1")
        if not self.pool_scales or any(s < 1 for s in self.pool_scales):
            raise ValueError(f"pool_scales={list(self.pool_scales)}: must be one or more sizes >= 1")
        if self.aux_weight < 0 or not 0 <= self.dropout < 1:
            raise ValueError("aux_weight must be >= 0 and dropout in [0, 1)")
        if self.out_blocks is not None and (len(self.out_blocks) != 4 or any(b < 0 for b in self.out_blocks)):
            raise ValueError(f"out_blocks={list(self.out_blocks)}: must be 4 block indices >= 0, or null")
