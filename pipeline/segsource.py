"""Segmentation sources for the shard stage: image + label map per sample.

Each sample is stored as WebDataset members `KEY.png` / `KEY.jpg` (the image, through the
shard stage's own `prepare`), `KEY.seg.png` (uint8 class ids, 255 = ignore), `KEY.cls`
and `KEY.json`, by the same plan / writer / index as classification shards
(pipeline/shards.py, shardwrite.py): a source here has the `list` / `read` of
pipeline/sources.py plus `prepare(raw, encode)`, which the writer calls instead of the
image-only `prepare` and which adds the label map. `Entry.label` is 0 (a scene has no
single class); the pixel classes are the split's classes.json.

- `scenes` (the bundled default): 1..4 Fashion-MNIST items pasted at seeded positions and
  sizes onto a black square canvas; label = item class + 1 on the item's foreground pixels
  (grey level > FOREGROUND), 0 elsewhere, later items over earlier ones. Train scenes use
  train items, eval scenes test items only. The whole recipe of a scene (canvas, item rows,
  positions, sizes) is its `Entry.path`, so the shard fingerprint covers it and `read`
  needs nothing else.
- `ade20k` / `folder`: ROOT/images/<split>/<stem>.<ext> with ROOT/annotations/<split>/<stem>.png.
  ade20k: 150 classes, mask 0 -> 255 (ignore) and k -> k-1 (mmseg's reduce_zero_label).

Bad samples never reach a shard: no label map (`mask-missing`, found when listing), a map of
another size than its image (`mask-size`), a class id outside 0..K-1 that is not 255
(`mask-class`); they go to rejected.jsonl like any unreadable image. Shard-time resizing
(`encode.resize_short`) resizes the image with the shard stage's filter and the map with
nearest neighbour to exactly the stored image size, so the two stay aligned.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
from PIL import Image

from pipeline.fingerprint import stable_hash
from pipeline.prepare import Rejected, Stored, prepare
from pipeline.schema import IGNORE_INDEX, EncodeConfig, SegDataConfig
from pipeline.sources import (FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, IMAGE_EXTENSIONS, Entry,
                              FashionMnistSource, Listing, Skipped, SourceError, check_unique, read_idx)

FOREGROUND = 24  # grey level (of 255) above which an item's pixel is the item, not its black background
SEG_EXT = "seg.png"  # the label map's tar member extension (a sample dict's key)


class SegRaw(NamedTuple):
    image: Union[bytes, np.ndarray]  # encoded bytes or uint8 [H, W] / [H, W, 3]
    mask: Union[bytes, np.ndarray, None]  # encoded PNG or uint8 [H, W]


# ---------------------------------------------------------------------------
# label maps


def decode_mask(data: Union[bytes, np.ndarray]) -> np.ndarray:
    """A label map -> uint8 [H, W]; a stored or source map that is not single-channel 8-bit is Rejected."""
    if isinstance(data, np.ndarray):
        arr = data
    else:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode not in ("L", "P"):
                    raise Rejected("undecodable", f"label map mode {im.mode}: expected 8-bit single channel (L or P)")
                arr = np.asarray(im)  # P: the palette indices are the class ids
        except Rejected:
            raise
        except Exception as err:  # noqa: BLE001 - a broken PNG can raise anything
            raise Rejected("undecodable", f"label map: {type(err).__name__}: {err}") from None
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise Rejected("undecodable", f"label map {arr.dtype} {arr.shape}: expected uint8 [H, W]")
    return arr


def encode_mask(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG", compress_level=6)  # no timestamps: reproducible
    return buf.getvalue()


def check_mask(mask: np.ndarray, width: int, height: int, num_classes: int, reduce_zero: bool) -> np.ndarray:
    """The stored class ids of a source label map for an image of (width, height): size checked,
    reduce_zero_label applied (0 -> ignore, k -> k-1, as mmseg), every id in 0..K-1 or 255."""
    if mask.shape != (height, width):
        raise Rejected("mask-size", f"label map {mask.shape[1]}x{mask.shape[0]} but image {width}x{height}")
    if reduce_zero:
        m = mask.astype(np.int16) - 1  # [H, W]
        m[(mask == 0) | (mask == IGNORE_INDEX)] = IGNORE_INDEX
        mask = m.astype(np.uint8)
    bad = np.unique(mask[(mask >= num_classes) & (mask != IGNORE_INDEX)])
    if bad.size:
        shown = ", ".join(map(str, bad[:5].tolist()))
        raise Rejected("mask-class", f"class ids {shown} outside 0..{num_classes - 1} ({IGNORE_INDEX} = ignore)")
    return mask


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest-neighbour resize (class ids must never blend): uint8 [H, W] -> [height, width]."""
    if mask.shape == (height, width):
        return mask
    return np.asarray(Image.fromarray(mask, mode="L").resize((width, height), Image.NEAREST))


def prepare_pair(raw: SegRaw, encode: EncodeConfig, num_classes: int, reduce_zero: bool
                 ) -> tuple[Stored, tuple[tuple[str, bytes], ...]]:
    """(the stored image, ((SEG_EXT, label map PNG),)): what write_shard stores for one sample."""
    if raw.mask is None:
        raise Rejected("mask-missing", "no label map")
    mask = decode_mask(raw.mask)  # before the image: a broken map costs no image decode
    img = prepare(raw.image, resize_short=encode.resize_short, max_pixels=encode.max_pixels,
                  jpeg_quality=encode.jpeg_quality, verify=encode.verify,
                  restart_markers=encode.restart_markers)
    # The map belongs to the upright source image; EXIF-rotated photos with maps are not expected.
    mask = check_mask(mask, img.orig_width, img.orig_height, num_classes, reduce_zero)
    mask = resize_mask(mask, img.width, img.height)  # [height, width]: the stored image's grid
    return img, ((SEG_EXT, encode_mask(mask)),)


# ---------------------------------------------------------------------------
# scenes of Fashion-MNIST items


def scene_recipe(seed: int, split: str, index: int, n_items: int, cfg: SegDataConfig) -> str:
    """The recipe of scene `index`: "C|row,x,y,s;row,x,y,s;..." (canvas C, item rows of the
    split, top-left corner, side). A pure function of (scene_seed, split, index)."""
    rng = np.random.default_rng(stable_hash("seg-scene", seed, split, index))
    k = int(rng.integers(cfg.items[0], cfg.items[1] + 1))
    parts = []
    for _ in range(k):
        row = int(rng.integers(n_items))
        s = int(rng.integers(cfg.item_size[0], cfg.item_size[1] + 1))
        x, y = (int(v) for v in rng.integers(0, cfg.canvas - s + 1, size=2))
        parts.append(f"{row},{x},{y},{s}")
    return f"{cfg.canvas}|" + ";".join(parts)


def compose_scene(recipe: str, items: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Render a recipe: items uint8 [N, 28, 28], labels [N] -> (image uint8 [C, C], label map uint8 [C, C])."""
    head, _, body = recipe.partition("|")
    c = int(head)
    image = np.zeros((c, c), np.uint8)  # [C, C]
    mask = np.zeros((c, c), np.uint8)  # [C, C]: 0 = background
    for part in filter(None, body.split(";")):
        row, x, y, s = (int(v) for v in part.split(","))
        item = np.asarray(Image.fromarray(items[row]).resize((s, s), Image.BILINEAR))  # [s, s]
        fg = item > FOREGROUND  # [s, s]: the item's own pixels, not its black surround
        image[y:y + s, x:x + s][fg] = item[fg]
        mask[y:y + s, x:x + s][fg] = labels[row] + 1
    return image, mask


class SceneSource:
    """Fashion-MNIST scenes (see the module docstring); splits are Fashion-MNIST's (train, test)."""

    name = "fashion-mnist-scenes"

    def __init__(self, cfg: SegDataConfig) -> None:
        self.cfg = cfg
        self.root = FashionMnistSource(cfg.root).root  # finds the files (or says how to get them)
        self._arrays: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {"cfg": self.cfg, "root": self.root, "_arrays": {}}  # workers load the pixels themselves

    def _array(self, split: str, which: int) -> np.ndarray:
        """which 0: the split's items uint8 [N, 28, 28]; 1: their labels [N]. Read once per process."""
        if split not in FASHION_MNIST_FILES:
            raise SourceError(f"segment.data.splits: scenes have splits {', '.join(FASHION_MNIST_FILES)}; "
                              f"got {split!r}")
        name = FASHION_MNIST_FILES[split][which]
        if name not in self._arrays:
            self._arrays[name] = read_idx(self.root / name)
        return self._arrays[name]

    def _split_labels(self, split: str) -> np.ndarray:
        return self._array(split, 1)

    def list(self, split: str) -> Listing:
        n_items = len(self._split_labels(split))
        count = self.cfg.train_scenes if split == self.cfg.train_split else self.cfg.eval_scenes
        entries = [Entry(f"{split}-scene-{i:06d}", f"{split}:" + scene_recipe(self.cfg.scene_seed, split, i,
                                                                              n_items, self.cfg), 0, 0)
                   for i in range(count)]
        return Listing(entries, ("background", *FASHION_MNIST_CLASSES))

    def read(self, entry: Entry) -> SegRaw:
        split, _, recipe = entry.path.partition(":")
        image, mask = compose_scene(recipe, self._array(split, 0), self._array(split, 1))  # [C, C] each
        return SegRaw(image, mask)

    def prepare(self, raw: SegRaw, encode: EncodeConfig):
        return prepare_pair(raw, encode, self.cfg.classes, reduce_zero=False)


# ---------------------------------------------------------------------------
# ADE20K layout


def path_key(path: str) -> str:
    """As pipeline/sources.py keys image folders: 20 hex digits of sha256 of the relative path."""
    return hashlib.sha256(path.encode()).hexdigest()[:20]


class PairFolderSource:
    """ROOT/images/<split>/* + ROOT/annotations/<split>/<stem>.png (ADE20K's layout, any dataset in it)."""

    name = "seg-folder"

    def __init__(self, cfg: SegDataConfig) -> None:
        if cfg.root is None:
            raise SourceError(f"segment.data.source={cfg.source} needs segment.data.root "
                              "(ROOT/images/<split>/ and ROOT/annotations/<split>/)")
        self.cfg, self.root = cfg, Path(cfg.root)
        if not self.root.is_dir():
            raise SourceError(f"segment.data.root {self.root}: not a directory")

    def list(self, split: str) -> Listing:
        images, masks = self.root / "images" / split, self.root / "annotations" / split
        if not images.is_dir():
            raise SourceError(f"{images}: no such folder; expected ROOT/images/<split>/ (ADE20K layout)")
        have = {os.path.splitext(n)[0]: n for n in (os.listdir(masks) if masks.is_dir() else ())
                if n.lower().endswith(".png")}
        entries, skipped, ignored = [], [], 0
        for name in sorted(os.listdir(images)):
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            path = f"images/{split}/{name}"
            if stem not in have:
                skipped.append(Skipped(path_key(path), path, "mask-missing",
                                       f"no annotations/{split}/{stem}.png"))
                continue
            size = (images / name).stat().st_size + (masks / have[stem]).stat().st_size
            entries.append(Entry(path_key(path), f"{path}|annotations/{split}/{have[stem]}", 0, size))
        if not entries:
            raise SourceError(f"{images}: no image with a label map in {masks}")
        check_unique(entries)
        names = tuple(f"class-{i}" for i in range(self.cfg.classes))
        return Listing(entries, names, ignored, tuple(skipped))

    def read(self, entry: Entry) -> SegRaw:
        image, _, mask = entry.path.partition("|")
        with open(self.root / image, "rb") as f:
            data = f.read()
        try:
            with open(self.root / mask, "rb") as f:
                return SegRaw(data, f.read())
        except FileNotFoundError:
            return SegRaw(data, None)  # gone since it was listed

    def prepare(self, raw: SegRaw, encode: EncodeConfig):
        return prepare_pair(raw, encode, self.cfg.classes, self.cfg.reduce_zero)


def make_seg_source(cfg: SegDataConfig) -> Union[SceneSource, PairFolderSource]:
    return SceneSource(cfg) if cfg.source == "scenes" else PairFolderSource(cfg)


def seg_sample(sample: dict) -> Optional[bytes]:
    """The label map member of a shard sample (None if the sample has none)."""
    return sample.get(SEG_EXT)
