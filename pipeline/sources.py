"""Image sources: list a split as (key, path, label) entries, then read one entry.

A source is split in two on purpose: `list()` runs once in the main process
and must be cheap and deterministic (it defines the shard plan); `read()` runs
in worker processes, so a source object is small to pickle and loads any bulk
data lazily, once per process.

- `imagefolder`: ROOT/<split>/<class>/**/<file>, the ImageNet / torchvision
  layout. Class index = position in the sorted class folder names; the class
  list is the union over the splits asked for (so a validation folder that
  lacks a class cannot shift the indices). Files are found recursively, by
  extension (case-insensitive). Key = first 20 hex digits of sha256 of the
  path relative to ROOT: stable, dot-free, and checked unique.
- `fashion-mnist`: the four idx .gz files; `train` and `test` (t10k) splits;
  key = "<split>-NNNNNN" (row index). Pixels are handed over as uint8
  [28, 28] arrays, not bytes, so nothing is encoded twice.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.fetch import DatasetUnavailable, find_fashion_mnist
from pipeline.prepare import Raw

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SOURCES = ("fashion-mnist", "imagefolder")


class SourceError(ValueError):
    """A source that cannot be listed; the message is one line naming what to fix."""


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str  # sample key in the shards: unique, no dots
    path: str  # where it came from, relative to the source root (for humans and the json)
    label: int
    size: int  # bytes on disk (0 for array sources); part of the shard fingerprint


@dataclasses.dataclass(frozen=True)
class Listing:
    entries: list[Entry]  # sorted by path
    classes: tuple[str, ...]
    ignored: int = 0  # files skipped because of their extension / place


class Source(Protocol):
    name: str

    def list(self, split: str) -> Listing: ...

    def read(self, entry: Entry) -> Raw: ...


def check_unique(entries: list[Entry]) -> None:
    seen: dict[str, str] = {}
    for e in entries:
        if "." in e.key or "/" in e.key:
            raise SourceError(f"key {e.key!r} of {e.path}: keys must not contain '.' or '/'")
        other = seen.setdefault(e.key, e.path)
        if other != e.path:
            raise SourceError(f"key collision: {other} and {e.path} both map to {e.key!r}")


class ImageFolderSource:
    name = "imagefolder"

    def __init__(self, root: str | os.PathLike, class_splits: tuple[str, ...] = ()) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise SourceError(f"data.root {self.root}: not a directory; pass --root or set data.root")
        self.class_splits = class_splits  # splits whose class folders form the class list

    def classes(self, split: str) -> tuple[str, ...]:
        names: set[str] = set()
        for s in {split, *self.class_splits}:
            folder = self.root / s
            if folder.is_dir():
                names.update(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))
        return tuple(sorted(names))

    def list(self, split: str) -> Listing:
        folder = self.root / split
        if not folder.is_dir():
            raise SourceError(f"{folder}: no such split folder; expected ROOT/<split>/<class>/<image>")
        classes = self.classes(split)
        index = {c: i for i, c in enumerate(classes)}
        entries: list[Entry] = []
        ignored = 0
        for top in os.scandir(folder):
            if not top.is_dir():
                ignored += top.is_file()  # an image outside a class folder has no label
                continue
            if top.name not in index:  # hidden folder
                continue
            for rel, size in _walk(Path(top.path)):
                if os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
                    ignored += 1
                    continue
                path = f"{split}/{top.name}/{rel}"
                key = hashlib.sha256(path.encode()).hexdigest()[:20]
                entries.append(Entry(key, path, index[top.name], size))
        entries.sort(key=lambda e: e.path)
        if not entries:
            raise SourceError(f"{folder}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        check_unique(entries)
        return Listing(entries, classes, ignored)

    def read(self, entry: Entry) -> bytes:
        # os.path.join, not Path: a pathlib join costs as much as hashing the image (~10 us)
        with open(os.path.join(self.root, entry.path), "rb", buffering=0) as f:
            return f.readall()


def _walk(folder: Path, prefix: str = ""):
    """Yield (relative posix path, size) of files under `folder`, following links."""
    with os.scandir(folder) as it:
        items = sorted(it, key=lambda d: d.name)
    for d in items:
        if d.name.startswith("."):
            continue
        rel = f"{prefix}{d.name}"
        if d.is_dir():
            yield from _walk(Path(d.path), rel + "/")
        elif d.is_file():
            yield rel, d.stat().st_size


def read_idx(path: Path) -> np.ndarray:
    """An idx(.gz) file -> uint8 array: [N] labels or [N, H, W] images."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise SourceError(f"{path}: not a uint8 idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise SourceError(f"{path}: idx header says {shape} but holds {body.size} bytes (truncated?)")
    return body.reshape(shape)


class FashionMnistSource:
    name = "fashion-mnist"

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        try:
            self.root = find_fashion_mnist(root)
        except DatasetUnavailable as err:
            raise SourceError(str(err)) from None
        self._images: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"root": self.root, "_images": {}}  # workers load the pixels themselves

    def _files(self, split: str) -> tuple[str, str]:
        if split not in FASHION_MNIST_FILES:
            raise SourceError(f"fashion-mnist has splits {', '.join(FASHION_MNIST_FILES)}; got {split!r}")
        return FASHION_MNIST_FILES[split]

    def list(self, split: str) -> Listing:
        images, labels = self._files(split)
        y = read_idx(self.root / labels)  # [N]
        if y.size == 0:
            raise SourceError(f"{self.root / labels}: empty")
        entries = [Entry(f"{split}-{i:06d}", f"{images}#{i}", int(c), 0) for i, c in enumerate(y)]
        return Listing(entries, FASHION_MNIST_CLASSES)

    def read(self, entry: Entry) -> np.ndarray:
        name, _, row = entry.path.partition("#")
        if name not in self._images:
            self._images[name] = read_idx(self.root / name)  # [N, 28, 28]
        return self._images[name][int(row)]  # [28, 28]


def make_source(name: str, root: str | None, splits: tuple[str, ...] = ()) -> Source:
    if name == "fashion-mnist":
        return FashionMnistSource(root)
    if name == "imagefolder":
        if root is None:
            raise SourceError("source imagefolder needs a root: pass --root PATH or set data.root")
        return ImageFolderSource(root, splits)
    raise SourceError(f"unknown source {name!r}: use one of {', '.join(SOURCES)}")
