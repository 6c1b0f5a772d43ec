"""Several encoders' last-layer CLS attention against foreground patches, over a stream of images.

The `visualize` stage's work: for each batch, each encoder's CLS attention map
(model/attention_maps.py) is scored against the batch's foreground patches
(model/foreground.py); the scores become means with standard errors, and the first `show`
images and their per-head maps are kept for the pictures. The images come in as the
encoders see them (normalised); `mean`/`std` turn them back into [0, 1] for the foreground.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch

from model.attention_maps import cls_attention
from model.foreground import foreground_patches, foreground_scores, mean_se, normalised_entropy

Encoder = tuple[torch.nn.Module, Callable[[torch.Tensor], object]]  # (model, forward through all its blocks)


@dataclasses.dataclass(frozen=True)
class ForegroundRule:
    patch: int
    pixel_threshold: float = 0.1
    patch_share: float = 0.5

    def __call__(self, images01: torch.Tensor) -> torch.Tensor:
        return foreground_patches(images01, self.patch, self.pixel_threshold, self.patch_share)  # [B, N]


@dataclasses.dataclass
class Shown:
    """The first images (in [0, 1]) and each encoder's per-head maps on them, for the pictures."""

    images01: torch.Tensor  # [show, C, S, S]
    maps: dict[str, torch.Tensor]  # name -> [show, heads, N]


@torch.no_grad()
def score_encoders(encoders: dict[str, Encoder], batches: Iterable[torch.Tensor], mean: torch.Tensor,
                   std: torch.Tensor, rule: ForegroundRule, show: int) -> tuple[dict, Shown]:
    """-> (metrics, Shown). metrics: images, images_scored (with 0 < |F| < N), and per encoder
    name and for "chance": <name>_mass, <name>_iou (+ _se); per encoder <name>_entropy; and the
    paired differences of the first two encoders (`<a>_minus_<b>_mass`, `_iou`)."""
    rows: dict[str, list[dict]] = {name: [] for name in encoders}
    kept_images: list[torch.Tensor] = []
    kept_maps: dict[str, list[torch.Tensor]] = {name: [] for name in encoders}
    seen = 0
    for images in batches:  # [B, C, S, S] normalised
        images01 = images * std + mean  # [B, C, S, S] in [0, 1]
        fg = rule(images01)  # [B, N]
        take = max(0, show - seen)
        kept_images.append(images01[:take].cpu())
        for name, (model, run) in encoders.items():
            maps = cls_attention(model, run, images)  # [B, heads, N]
            s = foreground_scores(maps.mean(1), fg)
            s["entropy"] = normalised_entropy(maps.mean(1))  # [B]: every image, foreground or not
            rows[name].append({k: v.cpu() for k, v in s.items()})
            kept_maps[name].append(maps[:take].cpu())
        seen += len(images)
    if seen == 0:
        raise ValueError("no images to score")

    def cat(name: str, key: str) -> torch.Tensor:
        return torch.cat([r[key] for r in rows[name]])

    first = next(iter(encoders))  # chance_* and kept depend on the foreground only
    metrics: dict = {"images": seen, "images_scored": int(cat(first, "kept").sum())}
    for key in ("mass", "iou"):
        metrics[f"chance_{key}"], metrics[f"chance_{key}_se"] = mean_se(cat(first, f"chance_{key}"))
        for name in encoders:
            metrics[f"{name}_{key}"], metrics[f"{name}_{key}_se"] = mean_se(cat(name, key))
    for name in encoders:
        metrics[f"{name}_entropy"], metrics[f"{name}_entropy_se"] = mean_se(cat(name, "entropy"))
    if len(encoders) >= 2:  # paired over the same images: e.g. what pretraining adds to its own init
        a, b = list(encoders)[:2]
        for key in ("mass", "iou"):
            diff = cat(a, key) - cat(b, key)
            metrics[f"{a}_minus_{b}_{key}"], metrics[f"{a}_minus_{b}_{key}_se"] = mean_se(diff)
    shown = Shown(torch.cat(kept_images), {n: torch.cat(m) for n, m in kept_maps.items()})
    return metrics, shown
