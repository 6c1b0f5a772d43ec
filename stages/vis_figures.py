"""The `visualize` stage's pictures (PNG): attention maps and MIM reconstructions.

As stages/figures.py: drawing is reporting, so it lives in stages/, torch-free at import
(tensors come from the caller), written through atomic_file, and at least `min_width` px
wide so 28 px images stay readable. A grid of labelled tiles needs titles per column and
row, which matplotlib gives for free; pixels are shown nearest (every patch a square).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from pipeline.atomic import atomic_file

if TYPE_CHECKING:
    import torch

DPI = 110


def to_hwc(image: "torch.Tensor") -> np.ndarray:
    """float [C, S, S] in [0, 1] -> [S, S, 3] for imshow (grey images repeated)."""
    a = image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0)  # [S, S, C]
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def patch_map(values: "torch.Tensor", grid: tuple[int, int], top: float) -> np.ndarray:
    """[N] per-patch values -> [h, w] divided by `top`. One `top` per row of tiles, so the models
    (or heads) of one image share a colour scale, and never below twice the uniform value 1/N,
    so a near-uniform map stays one flat mid colour instead of having its noise stretched."""
    a = values.detach().float().cpu().numpy().reshape(grid)  # [h, w]
    return a / max(float(top), 2.0 / a.size)


def row_top(*maps: "torch.Tensor") -> float:
    """The largest value of one image's maps (each [..., N])."""
    return max(float(m.max()) for m in maps)


def _figure(rows: int, cols: int, min_width: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(1.25 * cols, math.ceil(min_width / DPI * 10 + 1) / 10)  # inches, >= min_width px
    cell = width / cols
    fig, axes = plt.subplots(rows, cols, figsize=(width, cell * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes, plt


SCALE_NOTE = "colour: CLS attention per patch, one scale per row (its largest value, at least twice uniform)"


def _save(fig, plt, path: str | Path, caption: Optional[str] = None) -> Path:
    if caption:
        fig.suptitle(caption, fontsize=7)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 0.985 if caption else 1))
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    return Path(path)


def _tile(ax, image: np.ndarray, heat: Optional[np.ndarray] = None) -> None:
    """The image in grey, with a per-patch heat map (nearest, [h, w] in [0, 1]) over it."""
    s = image.shape[0]
    ax.imshow(image, interpolation="nearest", extent=(0, s, s, 0))
    if heat is not None:
        ax.imshow(heat, cmap="inferno", alpha=0.75, vmin=0, vmax=1, interpolation="nearest", extent=(0, s, s, 0))


def save_attention_grid(images01: "torch.Tensor", foreground: "torch.Tensor",
                        columns: Sequence[tuple[str, "torch.Tensor"]], grid: tuple[int, int], path: str | Path,
                        notes: Optional[Sequence[Sequence[str]]] = None, min_width: int = 512) -> Path:
    """One row per image [B, C, S, S]: the image, its foreground patches (bool [B, N]), then one
    heat map per column (title, maps [B, N]) on a colour scale shared along the row;
    `notes[c][b]`, when given, is written under tile (b, c)."""
    B = images01.shape[0]
    fig, axes, plt = _figure(B, 2 + len(columns), min_width)
    for b in range(B):
        img = to_hwc(images01[b])
        _tile(axes[b][0], img)
        _tile(axes[b][1], img, foreground[b].float().cpu().numpy().reshape(grid))
        top = row_top(*(maps[b] for _, maps in columns))
        for c, (title, maps) in enumerate(columns):
            ax = axes[b][c + 2]
            _tile(ax, img, patch_map(maps[b], grid, top))
            if notes is not None and notes[c][b]:
                ax.set_xlabel(notes[c][b], fontsize=7, labelpad=1)
            if b == 0:
                ax.set_title(title, fontsize=8)
    axes[0][0].set_title("image", fontsize=8)
    axes[0][1].set_title("foreground patches", fontsize=8)
    return _save(fig, plt, path, SCALE_NOTE)


def save_head_grid(images01: "torch.Tensor", models: Sequence[tuple[str, "torch.Tensor"]],
                   grid: tuple[int, int], path: str | Path, min_width: int = 512) -> Path:
    """Per model (name, per-head maps [B, heads, N]) a block of rows, one per image: the image,
    the mean over heads, then each head (one colour scale per row)."""
    B = images01.shape[0]
    heads = models[0][1].shape[1]
    fig, axes, plt = _figure(B * len(models), 2 + heads, min_width)
    for m, (name, maps) in enumerate(models):
        for b in range(B):
            row = axes[m * B + b]
            img = to_hwc(images01[b])
            _tile(row[0], img)
            row[0].set_ylabel(f"{name} #{b}", fontsize=7)
            top = row_top(maps[b])
            _tile(row[1], img, patch_map(maps[b].mean(0), grid, top))
            for h in range(heads):
                _tile(row[2 + h], img, patch_map(maps[b, h], grid, top))
    for c, title in enumerate(["image", "mean of heads", *(f"head {h + 1}" for h in range(heads))]):
        axes[0][c].set_title(title, fontsize=8)
    return _save(fig, plt, path, SCALE_NOTE)


def save_image_rows(columns: Sequence[tuple[str, "torch.Tensor"]], path: str | Path, min_width: int = 512) -> Path:
    """Columns (title, images [B, C, S, S] in [0, 1], all the same B): one row per image."""
    B = columns[0][1].shape[0]
    fig, axes, plt = _figure(B, len(columns), min_width)
    for c, (title, images) in enumerate(columns):
        axes[0][c].set_title(title, fontsize=8)
        for b in range(B):
            _tile(axes[b][c], to_hwc(images[b]))
    return _save(fig, plt, path)
