"""Pictures the stages write (PNG): shared stage infrastructure, like stages/metrics.py.

Drawing is reporting, not modelling, so it stays out of model/; and stages do not
import each other, so a figure more than one may draw lives here. torch-free at
import time (the tensors come from the caller; PIL loads when a picture is drawn).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from pipeline.atomic import atomic_file

if TYPE_CHECKING:
    import torch


def save_recon_grid(originals: torch.Tensor, recons: torch.Tensor, path: str | Path, cols: int = 8,
                    min_width: int = 512) -> Path:
    """PNG grid: each row pair is `cols` originals over their reconstructions ([N,3,S,S] in [0,1]),
    enlarged by a whole factor (nearest, every pixel a square) until it is `min_width` px wide:
    32 px tiles at their own size are too small to read."""
    from PIL import Image  # only needed for pictures

    if originals.shape != recons.shape:
        raise ValueError(f"originals {tuple(originals.shape)} and recons {tuple(recons.shape)} differ in shape")
    n, c, s, _ = originals.shape
    rows = math.ceil(n / cols)
    pad = 2
    canvas = np.ones((rows * 2 * (s + pad) + pad, cols * (s + pad) + pad, 3), dtype=np.uint8) * 255
    to_hwc = lambda t: (t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)  # noqa: E731
    for i in range(n):
        r, k = divmod(i, cols)
        x0 = pad + k * (s + pad)
        for j, img in enumerate((originals[i], recons[i])):
            y0 = pad + (2 * r + j) * (s + pad)
            tile = to_hwc(img)  # [3,S,S] -> [S,S,3]
            canvas[y0 : y0 + s, x0 : x0 + s] = tile if c == 3 else tile[..., :1]
    scale = math.ceil(min_width / canvas.shape[1])
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)  # [H*scale, W*scale, 3]
    with atomic_file(path) as tmp:
        Image.fromarray(canvas).save(tmp, format="PNG")
    return Path(path)


def plot_curves(tsv: str | Path, png: str | Path, ys: list[str], title: str,
                x: str = "step", logy: Optional[set[str]] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(tsv) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    fig, axes = plt.subplots(1, len(ys), figsize=(4.2 * len(ys), 3.2), squeeze=False)
    for ax, y in zip(axes[0], ys):
        pts = [(float(r[x]), float(r[y])) for r in rows if r.get(y) not in (None, "")]
        if pts:  # a lone point (fine-tuning scored once, after the last epoch) needs a marker to show
            ax.plot(*zip(*pts), lw=1.2, marker="o" if len(pts) == 1 else None)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logy and y in logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
