"""How far the JPEG render moves from the float reference: PSNR per view of `render_views`
(DCT-scaled / region decode, uint8 resize and colour jitter) against a full decode +
`views.apply_views` (float torch), on photo-like 500x375 JPEGs stored the way the shard
stage stores them (as they are, and re-encoded with a restart marker after every MCU),
with configs/imagenet-base.yaml's views (scale 0.08-1, jitter 0.4/0.4/0.4), at the patch
(224 px) and tokenizer (112 px) sizes. About 20 s on one core.

Usage: .venv/bin/python bench/render_psnr.py [--images 40] [--views 3]
"""
from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np
import simplejpeg
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.prepare import prepare  # noqa: E402
from pipeline.render import render_views  # noqa: E402
from pipeline.schema import ViewConfig  # noqa: E402
from pipeline.shardread import decode_rgb  # noqa: E402
from pipeline.views import apply_views, sample_view  # noqa: E402

CFG = ViewConfig(scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.4)


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth gradients + noise (tests/conftest.py's photo_like)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    img = np.stack([127 + 100 * np.sin(x / (7 + 5 * c) + y / (11 + 3 * c) + phase[c]) for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


@click.command()
@click.option("--images", default=40, show_default=True)
@click.option("--views", default=3, show_default=True)
def main(images: int, views: int) -> None:
    torch.set_num_threads(1)
    scores: dict[tuple[bool, int], list[float]] = {}
    for i in range(images):
        w, h = (500, 375) if i % 2 else (375, 500)
        raw = simplejpeg.encode_jpeg(photo(h, w, i), quality=90)
        for marked in (False, True):
            data = prepare(raw, resize_short=None, max_pixels=10**8, jpeg_quality=90, restart_markers=marked).data
            full = decode_rgb(data)
            for v in range(views):
                view = sample_view(0, f"p{i}", v, w, h, CFG)
                for size in (224, 112):
                    mse = float(((render_views([data], [view], size) - apply_views([full], [view], size)) ** 2).mean())
                    scores.setdefault((marked, size), []).append(float("inf") if mse == 0 else -10 * np.log10(mse))
    for (marked, size), ps in sorted(scores.items()):
        print(f"{'restart markers' if marked else 'as stored      '}  {size:3d} px: {len(ps)} views, "
              f"PSNR min {min(ps):.1f} dB, mean {np.mean(ps):.1f} dB")


if __name__ == "__main__":
    main()
