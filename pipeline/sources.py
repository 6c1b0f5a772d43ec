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
  path relative to ROOT: stable, dot-free, and checked unique. What cannot be
  listed (a link to nothing or one that loops, a file or folder that may not be
  read) is `Listing.skipped`, with its reason, never an error, and not part of
  the plan, so the shards of the readable images stay what they were.
- `fashion-mnist`: the four idx .gz files; `train` and `test` (t10k) splits;
  key = "<split>-NNNNNN" (row index). Pixels are handed over as uint8
  [28, 28] arrays, not bytes, so nothing is encoded twice.
"""
from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import os
from pathlib import Path
from typing import Iterator, Optional, Protocol

import numpy as np

from pipeline.fetch import DatasetUnavailable, find_fashion_mnist
from pipeline.prepare import REASONS, Raw

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
class Skipped:
    """An input found when listing that cannot be read: it goes to rejected.jsonl, not to a shard."""

    key: Optional[str]  # the key it would have had; None for a folder (or a broken link that may be one)
    path: str  # relative to the source root, as Entry.path
    reason: str  # one of pipeline.prepare.REASONS
    detail: str


@dataclasses.dataclass(frozen=True)
class Listing:
    entries: list[Entry]  # sorted by path
    classes: tuple[str, ...]
    ignored: int = 0  # files skipped because of their extension / place
    skipped: tuple[Skipped, ...] = ()  # sorted by path


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
                names.update(d.name for d in os.scandir(folder) if not d.name.startswith(".") and _kind(d)[0] == "dir")
        return tuple(sorted(names))

    def list(self, split: str) -> Listing:
        folder = self.root / split
        if not folder.is_dir():
            raise SourceError(f"{folder}: no such split folder; expected ROOT/<split>/<class>/<image>")
        classes = self.classes(split)
        index = {c: i for i, c in enumerate(classes)}
        entries: list[Entry] = []
        skipped: list[Skipped] = []
        ignored = 0
        split_id = _folder_id(os.stat(folder))
        for top in os.scandir(folder):
            kind, info = _kind(top)
            if kind == "file":
                ignored += 1  # an image outside a class folder has no label
            elif kind in REASONS and not top.name.startswith("."):  # a broken link: a class folder, if no extension
                if os.path.splitext(top.name)[1]:
                    ignored += 1
                else:
                    skipped.append(Skipped(None, f"{split}/{top.name}", kind, info))
            elif kind == "dir" and top.name in index:  # not a hidden folder
                for path, reason, info in _walk(top.path, f"{split}/{top.name}/", frozenset({split_id})):
                    ext = os.path.splitext(path)[1].lower()
                    if reason is None and ext in IMAGE_EXTENSIONS:
                        entries.append(Entry(_key(path), path, index[top.name], info))
                    elif reason is None or (ext and ext not in IMAGE_EXTENSIONS):
                        ignored += 1  # not an image by its name
                    else:  # a folder that cannot be listed, or what may be an image and cannot be read
                        skipped.append(Skipped(None if path.endswith("/") else _key(path), path, reason, info))
        entries.sort(key=lambda e: e.path)
        if not entries:
            raise SourceError(f"{folder}: no images found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        check_unique(entries)
        return Listing(entries, classes, ignored, tuple(sorted(skipped, key=lambda e: e.path)))

    def read(self, entry: Entry) -> bytes:
        # os.path.join, not Path: a pathlib join costs as much as hashing the image (~10 us)
        with open(os.path.join(self.root, entry.path), "rb", buffering=0) as f:
            return f.readall()


def _key(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()[:20]


def _folder_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _reason(err: OSError, link: bool) -> tuple[str, str]:
    """(REASONS item, detail) for an entry that could not be followed or read."""
    if link and err.errno in (errno.ENOENT, errno.ENOTDIR):
        try:
            return "dangling-link", f"links to {os.readlink(err.filename)}, which does not exist"
        except (OSError, TypeError):
            return "dangling-link", "links to a file that does not exist"
    if err.errno == errno.ELOOP:
        return "link-loop", f"{type(err).__name__}: {err.strerror or err}"
    return "unreadable", f"{type(err).__name__}: {err.strerror or err}"


def _kind(d: os.DirEntry) -> tuple[str, str]:
    """("dir" | "file" | "other", "") of `d`, following links, or (REASONS item, detail) for an
    entry that leads nowhere (a dangling link, a loop) or may not be looked at."""
    try:
        if d.is_dir():
            return "dir", ""
        if d.is_file():
            return "file", ""
        if not d.is_symlink():
            return "other", ""  # a fifo, socket or device: never read
        os.stat(d.path)  # a link that is neither: why (is_dir/is_file say False for a dangling one)
        return "other", ""
    except OSError as err:
        return _reason(err, d.is_symlink())


def _walk(folder: str, prefix: str, above: frozenset) -> Iterator[tuple[str, Optional[str], object]]:
    """Yield (path, None, size) for each file under `folder`, following links, in name order, and
    (path, reason, detail) for each entry that cannot be followed or read; the path of a folder
    ends in "/". `above`: (device, inode) of the folders above `folder`, so a link back up is a
    "link-loop" instead of an endless walk."""
    try:
        ident = _folder_id(os.stat(folder))
        if ident in above:
            yield prefix, "link-loop", "a link back to a folder above it"
            return
        with os.scandir(folder) as it:
            items = sorted(it, key=lambda d: d.name)
    except OSError as err:
        yield prefix, *_reason(err, os.path.islink(folder))
        return
    above = above | {ident}
    for d in items:
        if d.name.startswith("."):
            continue
        path = prefix + d.name
        kind, info = _kind(d)
        if kind == "dir":
            yield from _walk(d.path, path + "/", above)
        elif kind == "file":
            try:
                size = d.stat().st_size
            except OSError as err:  # gone since it was listed, or a link we may not follow
                yield path, *_reason(err, d.is_symlink())
                continue
            yield path, None, size
        elif kind != "other":
            yield path, kind, info


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
