"""The segmentation stage's picture: image / ground truth / prediction of fixed eval scenes (PNG).

torch-free at import time, like stages/figures.py; label maps are coloured with a fixed
palette (class 0 black, ignore 255 white), so one colour is one class in every run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.atomic import atomic_file

IGNORE_INDEX = 255  # pipeline.schema.IGNORE_INDEX


def palette(num_classes: int) -> np.ndarray:
    """uint8 [256, 3]: class 0 black, classes 1.. spread around the hue circle, 255 white."""
    import colorsys

    pal = np.zeros((256, 3), np.uint8)
    for k in range(1, 255):
        h = ((k - 1) * 0.618034) % 1.0  # golden-ratio steps: neighbours in id differ in colour
        pal[k] = [round(255 * v) for v in colorsys.hsv_to_rgb(h, 0.85, 0.95)]
    pal[IGNORE_INDEX] = 255
    return pal


def save_seg_grid(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, path: str | Path,
                  num_classes: int, min_width: int = 512) -> Path:
    """Three rows (image, ground truth, prediction) of N columns: images uint8 [N, S, S, 3], truth and pred
    uint8 [N, S, S] class ids; enlarged by a whole factor (nearest) until at least `min_width` px wide."""
    from PIL import Image

    n, s = truth.shape[:2]
    pad = 2
    pal = palette(num_classes)
    rows = [images, pal[truth], pal[pred]]  # [N, S, S, 3] each
    canvas = np.full((3 * (s + pad) + pad, n * (s + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for i in range(n):
            y0, x0 = pad + r * (s + pad), pad + i * (s + pad)
            canvas[y0:y0 + s, x0:x0 + s] = row[i]
    scale = max(1, -(-min_width // canvas.shape[1]))
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return path
