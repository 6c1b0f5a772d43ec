"""Semantic segmentation scores from a confusion matrix (mmseg's mIoU / aAcc definitions).

Pixels whose ground truth is the ignore value count nowhere. A class's IoU is
TP / (TP + FP + FN); mIoU averages the classes that occur at all (in the ground truth or
the prediction, union > 0), as mmseg's nanmean over per-class IoU; pixel accuracy is the
share of labelled pixels predicted right (mmseg's aAcc).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

IGNORE_INDEX = 255  # pipeline.schema.IGNORE_INDEX


def confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """pred, target long [...] (same shape) -> int64 [K, K], rows = ground truth, columns = prediction."""
    keep = target != IGNORE_INDEX
    t, p = target[keep].long(), pred[keep].long()  # [M] labelled pixels
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(conf: torch.Tensor, classes: Optional[Sequence[str]] = None) -> dict:
    """{"miou", "pixel_acc", "per_class_iou": {name: IoU or None (class absent)}, "pixels"} from `confusion`."""
    conf = conf.double()
    tp = conf.diag()  # [K]
    union = conf.sum(0) + conf.sum(1) - tp  # [K]: predicted + true - both
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.zeros_like(tp))  # [K]
    names = list(classes) if classes is not None else [str(i) for i in range(conf.shape[0])]
    total = conf.sum().item()
    return {
        "miou": iou[present].mean().item() if present.any() else 0.0,
        "pixel_acc": tp.sum().item() / total if total else 0.0,
        "per_class_iou": {n: (iou[i].item() if present[i] else None) for i, n in enumerate(names)},
        "pixels": int(total),
    }
