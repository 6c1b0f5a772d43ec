"""The typed settings the data plane runs with; params.yaml sections are built from these.

Each class is the one the code takes (`shard_split` a `ShardConfig`, the views an
`ViewConfig`, the datasets a `LoaderConfig`, ...), and `stages/config.py` nests them
into the params.yaml sections as they are, so no field is ever restated or copied.
Values a stage derives at run time (a per-rank batch size, an image size read from
the model) are arguments, not fields. Validation lives in `__post_init__`, once.

This module imports no torch (and nothing heavy): `beit report --help`, `beit shard`
and the config loader stay light. tests/test_layers.py checks it.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

KINDS = ("block", "random")
DRAWS = ("per-sample", "batched")


def fingerprint_fields(config: object, **added: object) -> dict:
    """`dataclasses.asdict(config)` without the fields added later that still hold the value
    they were added with (`added`: name -> that value), so a run fingerprinted before a field
    existed keeps its fingerprint while the field stays at its old behaviour."""
    d = dataclasses.asdict(config)
    for name, value in added.items():
        if d[name] == value:
            del d[name]
    return d


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    """What `beit shard` does to an image; everything besides the entries that changes the stored bytes."""

    resize_short: Optional[int] = None  # shrink so the shorter side is <= N; never enlarge
    max_pixels: int = 89_478_485  # larger images are rejected as decompression bombs
    jpeg_quality: int = 95  # for images that must be re-encoded
    verify: bool = False  # fully decode pass-through JPEGs too (slow; default checks header + EOI)
    # Every stored JPEG gets a restart marker after each MCU, so a loader decodes only the MCUs a
    # view needs (pipeline/jpegregion.py). JPEGs without them are re-encoded (at jpeg_quality).
    restart_markers: bool = False

    def fingerprint(self) -> dict:
        """The settings in each shard's fingerprint. Fields added after the first release appear
        only when set, so shards written before them stay valid (and keep their fingerprints)."""
        return fingerprint_fields(self, restart_markers=False)

    def __post_init__(self) -> None:
        if self.resize_short is not None and self.resize_short < 1:
            raise ValueError(f"resize_short={self.resize_short}: must be >= 1 (e.g. 256) or null for no resize")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels={self.max_pixels}: must be >= 1")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality}: must be in 1..100 (e.g. 95)")


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    """`shard_split`: how a split is cut into tars and by how many processes."""

    shard_size: int = 5000  # samples per tar
    workers: int = 2  # worker processes, one shard each
    strict: bool = False  # stop at the first bad input instead of listing it in rejected.jsonl
    encode: EncodeConfig = EncodeConfig()

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size={self.shard_size}: must be >= 1 (samples per tar, e.g. 5000)")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """Augmentation ranges; the defaults are BEiT's pretraining recipe."""

    scale: tuple[float, float] = (0.08, 1.0)  # crop area / image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height, sampled log-uniformly
    flip_p: float = 0.5
    brightness: float = 0.4  # factor ~ U[max(0, 1-x), 1+x]; 0 disables
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0  # shift ~ U[-x, x] in [-0.5, 0.5]; 0 disables

    def __post_init__(self) -> None:
        s0, s1 = self.scale
        r0, r1 = self.ratio
        if not 0.0 < s0 <= s1 <= 1.0:
            raise ValueError(f"scale={self.scale}: need 0 < min <= max <= 1, e.g. (0.08, 1.0)")
        if not 0.0 < r0 <= r1:
            raise ValueError(f"ratio={self.ratio}: need 0 < min <= max, e.g. (0.75, 1.333)")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"flip_p={self.flip_p}: must be in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0 (0 disables)")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue={self.hue}: must be in [0, 0.5] (0 disables)")


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """The blockwise generator's block knobs (paper Algorithm 1); `pretrain.blocks` in params.yaml."""

    min_block: Optional[int] = None  # None: 16 patches scaled by grid area (pipeline/masking.py)
    max_block: Optional[int] = None  # None: the whole target, as the reference
    min_aspect: float = 0.3  # aspect ratios log-uniform in [min_aspect, 1/min_aspect]
    tries: int = 10  # placement attempts per block

    def __post_init__(self) -> None:
        if self.min_block is not None and self.min_block < 1:
            raise ValueError(f"min_block={self.min_block}: must be >= 1 or null")
        if self.max_block is not None and self.max_block < 1:
            raise ValueError(f"max_block={self.max_block}: must be >= 1 or null")
        if not 0.0 < self.min_aspect <= 1.0:
            raise ValueError(f"min_aspect={self.min_aspect}: must be in (0, 1], e.g. 0.3")
        if self.tries < 1:
            raise ValueError(f"tries={self.tries}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Fine-tuning's extra augmentation after the crop + flip view, both from timm (the paper's
    recipe: RandAugment 9 / 0.5 and random erasing 0.25). Off in the small default."""

    rand_augment: Optional[str] = None  # timm config string, e.g. "rand-m9-mstd0.5-inc1"; None: off
    erase_prob: float = 0.0  # timm RandomErasing probability (mode pixel, one box); 0: off

    def __post_init__(self) -> None:
        if self.rand_augment is not None and not self.rand_augment.startswith("rand"):
            raise ValueError(f"rand_augment={self.rand_augment!r}: must be a timm RandAugment string "
                             "such as rand-m9-mstd0.5-inc1, or null")
        if not 0.0 <= self.erase_prob <= 1.0:
            raise ValueError(f"erase_prob={self.erase_prob}: must be in [0, 1], e.g. 0.25")


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """The mask generator's settings: top-level `masking` and `mask_ratio` (so that
    `dvc exp run -S mask_ratio=0.3` works) plus the block shape."""

    kind: Literal["block", "random"] = "block"
    mask_ratio: float = 0.4
    blocks: BlockShape = BlockShape()
    # How a batch's masks are drawn (pipeline/masking.py: MaskGenerator.keyed): "per-sample",
    # one numpy Generator per key (the default's committed numbers were trained with these
    # masks); "batched", all of a batch at once from a counter-based stream per key
    # (pipeline/batchmask.py): the same algorithm and distribution, other draws, 4-5x faster (bench/masking.py).
    draw: Literal["per-sample", "batched"] = "per-sample"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"masking={self.kind!r}: must be one of {', '.join(KINDS)}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={self.mask_ratio}: must be in (0, 1), e.g. 0.4")
        if self.draw not in DRAWS:
            raise ValueError(f"mask_draw={self.draw!r}: must be one of {', '.join(DRAWS)}")

    def trajectory(self) -> dict:
        """The fields for run fingerprints (`draw` only when not the default)."""
        return fingerprint_fields(self, draw="per-sample")


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How a dataset is streamed: DataLoader workers per rank and the shuffle buffer.
    The batch size (per rank and micro-step) and the output size are arguments."""

    num_workers: int = 2
    shuffle_buffer: int = 2000
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # What a worker ships: float32 normalised views (as before), or uint8 views (4x fewer
    # bytes; pipeline/render.py: normalize runs once on the consuming device). uint8
    # quantises the rendered view (28 px float rendering changes), so float stays the default.
    transport: Literal["float", "uint8"] = "float"

    def __post_init__(self) -> None:
        if self.num_workers < 0 or self.shuffle_buffer < 1:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0 and "
                             f"shuffle_buffer={self.shuffle_buffer} >= 1")

    def trajectory(self) -> dict:
        """The fields for run fingerprints (`transport` only when not the default)."""
        return fingerprint_fields(self, transport="float")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Where Dask runs the per-shard tasks."""

    workers: int = 2  # LocalCluster processes (ignored with `scheduler`); 0: in-process, no Dask
    threads_per_worker: int = 1  # torch threads per worker process, too
    scheduler: Optional[str] = None  # e.g. "tcp://host:8786": use an existing cluster
    device: Literal["cpu", "cuda"] = "cpu"  # cuda: one worker per GPU, tasks ask for resources={"GPU": 1}
    retries: int = 2  # re-runs of a task whose worker died (its writes are idempotent)

    def __post_init__(self) -> None:
        if self.workers < 0 or self.threads_per_worker < 1 or self.retries < 0:
            raise ValueError("workers must be >= 0, threads_per_worker >= 1, retries >= 0")


SEG_SOURCES = ("scenes", "ade20k", "folder")
IGNORE_INDEX = 255  # the label-map value no loss or metric counts (ADE's reduce_zero_label target)


@dataclasses.dataclass(frozen=True)
class SegDataConfig:
    """`beit shard-seg`: which segmentation source, and how its scenes are composed / stored.

    scenes: deterministic scenes of Fashion-MNIST items (train scenes from train items, the
    eval scenes from test items only); ade20k / folder: ROOT/images/<split>/*.jpg with
    ROOT/annotations/<split>/<stem>.png (ADE20K's layout)."""

    source: Literal["scenes", "ade20k", "folder"] = "scenes"
    root: Optional[str] = None  # scenes: the Fashion-MNIST folder (None: the bundled copy); else the layout's root
    splits: tuple[str, ...] = ("train", "test")  # ade20k: [training, validation]
    train_split: str = "train"
    eval_split: str = "test"
    num_classes: Optional[int] = None  # None: 11 for scenes (background + 10), 150 for ade20k; folder: required
    reduce_zero_label: Optional[bool] = None  # mask 0 -> ignore, k -> k-1; None: true for ade20k only
    canvas: int = 56  # scenes: square canvas side (px)
    items: tuple[int, int] = (1, 4)  # scenes: items per scene, inclusive range
    item_size: tuple[int, int] = (20, 36)  # scenes: pasted item side (px), inclusive range (items are 28 px)
    train_scenes: int = 2000
    eval_scenes: int = 500
    scene_seed: int = 0  # the scenes are data: the same for every experiment seed
    encode: EncodeConfig = EncodeConfig()  # shard-time resize etc.; masks follow with nearest neighbour

    def __post_init__(self) -> None:
        if self.source == "folder" and self.num_classes is None:
            raise ValueError("source=folder needs num_classes (the label maps' class count)")
        if self.num_classes is not None and not 1 <= self.num_classes <= IGNORE_INDEX:
            raise ValueError(f"num_classes={self.num_classes}: must be in 1..{IGNORE_INDEX} (uint8 label maps, "
                             f"{IGNORE_INDEX} = ignore)")
        lo, hi = self.items
        if not 1 <= lo <= hi:
            raise ValueError(f"items={list(self.items)}: need 1 <= min <= max")
        lo, hi = self.item_size
        if not 4 <= lo <= hi <= self.canvas:
            raise ValueError(f"item_size={list(self.item_size)}: need 4 <= min <= max <= canvas={self.canvas}")
        if self.train_scenes < 1 or self.eval_scenes < 1:
            raise ValueError("train_scenes and eval_scenes must be >= 1")

    @property
    def classes(self) -> int:
        if self.num_classes is not None:
            return self.num_classes
        return 11 if self.source == "scenes" else 150

    @property
    def reduce_zero(self) -> bool:
        return self.source == "ade20k" if self.reduce_zero_label is None else self.reduce_zero_label
