"""A tiny Fashion-MNIST look-alike for tests, benchmarks and dry runs.

Writes the four idx .gz files in the real format, so the `fashion-mnist`
source reads them unchanged. Each class is a different simple shape with
random position, size and brightness, so a model can learn something from a
few hundred images in seconds.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def shape_image(rng: np.random.Generator, label: int, size: int = 28) -> np.ndarray:
    """A noisy shape of class `label` (disc, bars, diamond, ring; dimmer for labels >= 5): uint8 [size, size]."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)  # [28, 28] each
    cy, cx = rng.uniform(9, 19, size=2)
    r = rng.uniform(4, 9)
    kind = label % 5
    if kind == 0:
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2  # disc
    elif kind == 1:
        m = (abs(yy - cy) < r) & (abs(xx - cx) < r / 2)  # tall bar
    elif kind == 2:
        m = (abs(yy - cy) < r / 2) & (abs(xx - cx) < r)  # wide bar
    elif kind == 3:
        m = abs(yy - cy) + abs(xx - cx) < r  # diamond
    else:
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2) & ((yy - cy) ** 2 + (xx - cx) ** 2 > (r / 2) ** 2)
    img = m * rng.uniform(120, 255) * (1.0 if label < 5 else 0.6)
    img += rng.normal(0, 12, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, h, w = images.shape
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">IIII", 0x00000803, n, h, w))
        f.write(np.ascontiguousarray(images, np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">II", 0x00000801, len(labels)))
        f.write(np.asarray(labels, np.uint8).tobytes())


def write_fake_fashion_mnist(folder: str | Path, n_train: int = 200, n_test: int = 50,
                             seed: int = 0) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 10
        images = np.stack([shape_image(rng, int(y)) for y in labels])  # [n, 28, 28]
        img_file, lbl_file = FILES[split]
        write_idx_images(folder / img_file, images)
        write_idx_labels(folder / lbl_file, labels)
    return folder
