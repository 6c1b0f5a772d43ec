"""Mixup / CutMix with label smoothing, as one pure function (timm's Mixup, batch mode).

Randomness comes from the caller's `numpy.random.Generator`, so a training step's mix
is a function of (seed, step) and a resumed run replays it exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from model.schema import MixConfig


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """long [B] -> float [B, K]: 1 - smoothing + smoothing/K on the label, smoothing/K elsewhere."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)  # [B, K]


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cfg: MixConfig,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """images [B, C, H, W], labels long [B] -> (mixed images [B, C, H, W], soft targets [B, K]).

    Mixes each sample with the batch reversed (timm's batch mode). CutMix pastes
    a box of area ~(1 - lam) and corrects lam to the box actually pasted.
    """
    target = smooth_one_hot(labels, num_classes, cfg.smoothing)  # [B, K]
    if not cfg.enabled or float(rng.random()) >= cfg.prob:
        return images, target
    use_cutmix = cfg.cutmix_alpha > 0 and (
        cfg.mixup_alpha <= 0 or float(rng.random()) < cfg.switch_prob)
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    flipped = images.flip(0)  # [B, C, H, W]: sample i mixes with sample B-1-i
    if use_cutmix:
        H, W = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy = int(rng.integers(0, H))
        cx = int(rng.integers(0, W))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        images = images * lam + flipped * (1.0 - lam)
    return images, target * lam + target.flip(0) * (1.0 - lam)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """logits [B, K], soft target [B, K] -> scalar mean cross-entropy."""
    return torch.sum(-target * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
