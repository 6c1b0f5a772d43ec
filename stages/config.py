"""params.yaml, read once into typed, frozen dataclasses.

Each section is (or nests) the dataclass the code runs with: `shard` is
pipeline.schema.ShardConfig, `views` ViewConfig, `pretrain.optim` model.schema's
OptimConfig, `pretrain.loop` LoopConfig (stages/loop.py), and so on; nothing here
restates one of their fields. The experiment knobs (`seed`, `mask_ratio`, `masking`,
`target`, `model`) stay top level, because `dvc exp run -S mask_ratio=0.3` only
overrides top-level keys literally. Every output path lives in `outputs`, one record
per stage, so a stage declares its own outputs and its recipe as separate params.

Unknown keys and wrong types are errors that name the key, so a typo in params.yaml
(or in `dvc exp run -S ...`) fails loudly instead of being silently ignored. The
schema modules import no torch (tests/test_layers.py checks it).
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from model.schema import DVAEConfig, DVAESchedule, MixConfig, OptimConfig, SegHeadConfig
from pipeline.schema import (AugmentConfig, BlockShape, ClusterConfig, LoaderConfig, MaskingConfig,
                             SegDataConfig, ShardConfig, ViewConfig)

Device = Literal["auto", "cpu", "cuda"]


class ConfigError(ValueError):
    """A params.yaml problem; the message names the key and what to do."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: Literal["fashion-mnist", "imagefolder"] = "fashion-mnist"
    root: Optional[str] = None
    splits: tuple[str, ...] = ("train", "test")
    train_split: str = "train"
    eval_split: str = "test"
    image_size: int = 32


# ------------------------------------------------------------------ outputs, one record per stage


@dataclasses.dataclass(frozen=True)
class TrainOutputs:
    """What a training stage publishes: the model folder, its metrics, its curve (TSV) and plot."""

    dir: str
    metrics: str
    curve: str
    figure: str


@dataclasses.dataclass(frozen=True)
class TokenizerOutputs(TrainOutputs):
    recon: str = "plots/tokenizer_recon.png"  # originals over their reconstructions


@dataclasses.dataclass(frozen=True)
class MetricsOutput:
    metrics: str


@dataclasses.dataclass(frozen=True)
class ReportOutputs:
    markdown: str = "reports/results.md"
    figure: str = "reports/results.png"


@dataclasses.dataclass(frozen=True)
class VisualizeOutputs:
    """`beit visualize`: the attention-foreground numbers and three pictures."""

    metrics: str = "metrics/visualize.json"
    attention: str = "plots/attention.png"  # mean-over-heads CLS attention, one column per model
    heads: str = "plots/attention_heads.png"  # every head, per model
    recon: str = "plots/mim_recon.png"  # masked images and what the MIM head predicts there


def _train_outputs(name: str, folder: str = "models") -> TrainOutputs:
    return TrainOutputs(f"{folder}/{name}", f"metrics/{name}.json", f"plots/{name}.tsv", f"plots/{name}.png")


@dataclasses.dataclass(frozen=True)
class SegmentOutputs:
    """`beit segment`: the model, its metrics (mIoU, per-class IoU, pixel accuracy), curve, plots."""

    dir: str = "models/segment"
    metrics: str = "metrics/segment.json"
    curve: str = "plots/segment.tsv"
    figure: str = "plots/segment.png"  # loss / mIoU / lr curves
    samples: str = "plots/segment_samples.png"  # image / ground truth / prediction of fixed eval scenes


@dataclasses.dataclass(frozen=True)
class OutputsConfig:
    shards: str = "data/shards"  # <shards>/<split>/*.tar + index.parquet
    tokens: str = "data/tokens"  # <tokens>/<split>.zarr
    runs: str = "runs"  # untracked: resumable checkpoints and feature caches, keyed by fingerprints
    tokenizer: TokenizerOutputs = TokenizerOutputs(*dataclasses.astuple(_train_outputs("tokenizer")))
    pretrain: TrainOutputs = _train_outputs("pretrain")
    finetune: TrainOutputs = _train_outputs("finetune")
    scratch: TrainOutputs = _train_outputs("scratch")
    linear_probe: MetricsOutput = MetricsOutput("metrics/linear_probe.json")
    knn: MetricsOutput = MetricsOutput("metrics/knn.json")
    report: ReportOutputs = ReportOutputs()
    visualize: VisualizeOutputs = VisualizeOutputs()
    seg_shards: str = "data/seg_shards"  # <seg_shards>/<split>/*.tar (+ KEY.seg.png label maps)
    segment: SegmentOutputs = SegmentOutputs()


# ------------------------------------------------------------------ stage sections


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The training loop (stages/loop.py): budget, global batch, warmup, cadence, device."""

    epochs: int = 10
    batch_size: int = 128  # global: per optimizer step, over all ranks and accumulation steps
    accum_steps: int = 1
    warmup_epochs: float = 1.0
    checkpoint_every: int = 200  # optimizer steps
    log_every: int = 10
    device: Device = "auto"

    CADENCE = ("checkpoint_every", "log_every", "device")  # fields that leave the trajectory unchanged

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.accum_steps < 1:
            raise ValueError("epochs, batch_size and accum_steps must be >= 1")
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of accum_steps={self.accum_steps}")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.warmup_epochs < 0:
            raise ValueError("checkpoint_every and log_every must be >= 1, warmup_epochs >= 0")

    def trajectory(self) -> dict:
        """The fields that change what is trained (for run fingerprints)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.CADENCE}


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """`beit train-tokenizer`: train our dVAE (kind dvae), or adopt a converted DALL-E one (kind dalle)."""

    kind: Literal["dvae", "dalle"] = "dvae"
    dalle_path: Optional[str] = None  # kind dalle: a directory written by `beit convert-dalle`
    model: DVAEConfig = DVAEConfig()
    schedule: DVAESchedule = DVAESchedule()
    steps: int = 250
    batch_size: int = 128
    loader: LoaderConfig = LoaderConfig(num_workers=1)  # DataLoader workers decoding + rendering views
    device: Device = "auto"
    eval_samples: Optional[int] = None  # held-out images scored; None: the whole eval split
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.kind == "dalle" and not self.dalle_path:
            raise ValueError("kind=dalle needs dalle_path (the folder `beit convert-dalle` wrote)")
        if self.steps < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ValueError("steps, batch_size and log_every must be >= 1")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ValueError(f"eval_samples={self.eval_samples}: must be >= 1 or null (whole split)")


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    views: int = 8  # V views per image, each tokenized once; the trainer cycles them by epoch
    format: Literal["zarr", "parquet"] = "zarr"
    batch_size: int = 64  # views per tokenizer forward
    cluster: ClusterConfig = ClusterConfig()
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast, checked per shard against fp32 (>= 99.5% ids equal)

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"views={self.views}: must be >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    loop: LoopConfig = LoopConfig()
    optim: OptimConfig = OptimConfig()
    loader: LoaderConfig = LoaderConfig()
    blocks: BlockShape = BlockShape()  # with top-level masking + mask_ratio: the mask generator
    mask_draw: Literal["per-sample", "batched"] = "per-sample"  # pipeline/schema.py: MaskingConfig.draw
    drop_path: Optional[float] = None  # None: the model size's default
    eval_batches: int = 20  # held-out batches for the final masked-token accuracy
    attention: Literal["timm", "math", "sdpa", "flex"] = "timm"  # model/attention.py; timm: today's forward


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """`beit finetune` and `beit scratch`: one recipe and budget, two inits."""

    init: Optional[str] = None  # None: the pretrain checkpoint; "unilm:PATH": an official .pth (finetune only)
    label_fraction: float = 0.1  # stratified, seeded subset of the train labels (low-label regime)
    # None: score data.eval_split (the reported metric). N: score N train images outside the
    # label subset instead, so a recipe can be tuned without ever looking at the test split.
    validation: Optional[int] = None
    loop: LoopConfig = LoopConfig(epochs=5, warmup_epochs=0.5, checkpoint_every=100)
    optim: OptimConfig = OptimConfig(lr=2e-3, min_lr=1e-6, clip_grad=None, layer_decay=0.75)
    loader: LoaderConfig = LoaderConfig()
    views: ViewConfig = ViewConfig(brightness=0.0, contrast=0.0, saturation=0.0)  # train-time crop + flip
    augment: AugmentConfig = AugmentConfig()  # timm RandAugment + random erasing after the view
    mix: MixConfig = MixConfig()  # mixup / cutmix / label smoothing
    drop_path: float = 0.1
    # After each epoch but the last, score the eval split's first N images (a curve); 0: don't,
    # the split is scored once, after the last epoch (the reported metric); None: all of it.
    eval_samples: Optional[int] = 0

    def __post_init__(self) -> None:
        if self.eval_samples is not None and self.eval_samples < 0:
            raise ValueError(f"eval_samples={self.eval_samples}: must be >= 0 (0: score only after the last "
                             "epoch) or null (the whole split every epoch)")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction={self.label_fraction}: must be in (0, 1], e.g. 0.1")
        if self.validation is not None and (self.validation < 1 or self.label_fraction == 1.0):
            raise ValueError(f"validation={self.validation}: needs label_fraction < 1 and N >= 1 "
                             "(train images outside the label subset), or null to score data.eval_split")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path={self.drop_path}: must be in [0, 1)")
        if self.init is not None and not self.init.startswith("unilm:"):
            raise ValueError(f"init={self.init!r}: must be null (the pretrain checkpoint) or unilm:PATH")


@dataclasses.dataclass(frozen=True)
class ScratchConfig:
    """`beit scratch`: the finetune section's data, views, budget and seed, with its own optimiser.

    The paper's from-scratch baseline is DeiT's recipe, which has no layer-wise lr decay:
    decay 0.75 over 6 blocks would train a random patch embedding at 0.75^7 = 0.13x the lr,
    handicapping the baseline and inflating the reported gain. The lr is tuned for scratch on
    the same holdout (finetune.validation) with the same budget (finetune.loop)."""

    optim: OptimConfig = OptimConfig(lr=2e-3, min_lr=1e-6, clip_grad=None, layer_decay=None)


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """`beit linear-probe` and `beit knn` on frozen pretrained features.

    Where the probe reads (the block) and how hard it trains (the lr) are chosen on a holdout
    of `validation` train images outside the label subset, never on the eval split, which is
    then scored once. The raw-pixel floor gets the same lr search."""

    # Features after this many blocks (1..depth); "auto": the block the holdout prefers (each
    # probe chooses its own); None: the last. Paper App. D: 9 of 12 for ViT-B.
    block: int | Literal["auto"] | None = "auto"
    validation: Optional[int] = 5000  # holdout size; None: no holdout (block fixed, one lr)
    # Stratified share of the train split that fits the probe / is the kNN memory. None: the
    # fine-tuning label subset itself (finetune.label_fraction, same seed: the same images), so
    # probe, kNN and fine-tuning are compared on equal labels.
    train_fraction: Optional[float] = None
    # Also fit both probes on raw pixels (pixels_top1): the floor features must clear. Costs
    # N x 3*S*S floats of feature cache, so the ImageNet config turns it off.
    pixel_reference: bool = True
    # Also probe the patch-token grid (grid_top1 in both metrics files): every patch token of the
    # block kept in place, flattened (N x D per image, 49 x 128 for micro at 28 px), whitened. Mean
    # pooling (the paper's feature) discards the layout that the raw-pixel floor keeps; the grid
    # asks whether the tokens hold more than the pixels they replace. Costs N x D floats per image
    # and block of feature cache (3.2 GB for the default), so the ImageNet config turns it off.
    grid: bool = True
    batch_size: int = 256  # feature extraction
    num_workers: int = 2
    device: Device = "auto"
    # How the linear classifier is fit on the cached features. lbfgs: logistic regression solved
    # to convergence (stages/convex_probe.py: why), choosing l2 x whiten on the holdout; adamw:
    # minibatch AdamW over `epochs` with a cosine lr from `lrs` (for feature sets too large for
    # one full batch in memory, as ImageNet's).
    solver: Literal["lbfgs", "adamw"] = "lbfgs"
    l2s: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)  # lbfgs: penalties tried on the holdout
    whiten: tuple[bool, ...] = (False, True)  # lbfgs: standardised and/or PCA-whitened features
    max_iter: int = 1000  # lbfgs iterations at most (it stops earlier when converged)
    epochs: int = 100  # adamw: linear classifier on cached (standardised) features
    lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)  # adamw: peak lrs tried on the holdout
    weight_decay: float = 1e-4
    linear_batch_size: int = 512
    knn_k: int = 20
    knn_temperature: float = 0.07  # DINO's weighted vote: weight exp(cos / T)

    def __post_init__(self) -> None:
        if self.train_fraction is not None and not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction={self.train_fraction}: must be in (0, 1] or null "
                             "(finetune.label_fraction)")
        if isinstance(self.block, int) and self.block < 1:
            raise ValueError(f"block={self.block}: must be >= 1 (blocks counted from 1), auto or null")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs={list(self.lrs)}: must be one or more positive learning rates")
        if not self.l2s or any(l2 < 0 for l2 in self.l2s) or not self.whiten or self.max_iter < 1:
            raise ValueError(f"l2s={list(self.l2s)}, whiten={list(self.whiten)}, max_iter={self.max_iter}: "
                             "need one or more l2 >= 0, one or more whiten flags and max_iter >= 1")
        if self.validation is not None and self.validation < 1:
            raise ValueError(f"validation={self.validation}: must be >= 1 or null")
        if self.validation is None and (self.block == "auto" or len(self.linear_settings()) > 1):
            raise ValueError("validation=null leaves nothing to choose block=auto or among several probe settings "
                             "on; fix block and give one lr (adamw) or one l2 and whiten flag (lbfgs), or set validation: N")
        if self.knn_k < 1 or self.knn_temperature <= 0:
            raise ValueError("knn_k must be >= 1 and knn_temperature > 0")

    def linear_settings(self) -> list:
        """What the holdout chooses among for the linear probe: lrs (adamw), or {"l2", "whiten"} (lbfgs)."""
        if self.solver == "adamw":
            return list(self.lrs)
        return [{"l2": l2, "whiten": w} for w in self.whiten for l2 in self.l2s]


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """`beit report`: this run's metrics beside the paper's, plus the DVC experiments table."""

    experiments: bool = True  # add the `dvc exp show --json` ablation table (skipped with a note if dvc fails)
    # Recorded experiment rows (stages/ledger.py), read beside the live ones; `beit report --record`
    # writes the live ones in. None: no ledger.
    ledger: Optional[str] = "reports/experiments.jsonl"


@dataclasses.dataclass(frozen=True)
class VisualizeConfig:
    """`beit visualize`: last-layer CLS attention of the pretrained, randomly initialised and
    fine-tuned encoders against foreground patches (model/foreground.py), and MIM
    reconstructions, on the first `images` of the eval split (stored order: fixed images)."""

    images: int = 1000  # scored for metrics/visualize.json
    show: int = 8  # the first `show` of them are drawn
    pixel_threshold: float = 0.1  # foreground pixel: brightness in [0, 1] above this
    patch_share: float = 0.5  # foreground patch: at least this share of its pixels foreground
    batch_size: int = 250
    device: Device = "auto"

    def __post_init__(self) -> None:
        if self.images < 1 or self.show < 1 or self.show > self.images or self.batch_size < 1:
            raise ValueError(f"images={self.images}, show={self.show}, batch_size={self.batch_size}: "
                             "need images >= 1, 1 <= show <= images, batch_size >= 1")
        if not 0.0 <= self.pixel_threshold < 1.0 or not 0.0 < self.patch_share <= 1.0:
            raise ValueError(f"pixel_threshold={self.pixel_threshold} must be in [0, 1) and "
                             f"patch_share={self.patch_share} in (0, 1]")


@dataclasses.dataclass(frozen=True)
class SegAugment:
    """Train-time geometry, applied identically to image and label map (pipeline/segdata.py)."""

    scale: tuple[float, float] = (0.5, 2.0)  # rescale range of the long side relative to `image_size` (mmseg)
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1] or not 0 <= self.flip_p <= 1:
            raise ValueError(f"scale={list(self.scale)} must be 0 < lo <= hi and flip_p in [0, 1]")


@dataclasses.dataclass(frozen=True)
class SegmentConfig:
    """`beit shard-seg` (data) and `beit segment` (the rest): semantic segmentation (paper Table 3)."""

    init: Literal["pretrain", "intermediate", "scratch"] = "pretrain"  # intermediate: outputs.finetune's encoder
    init_path: Optional[str] = None  # another checkpoint folder of that kind (None: outputs.pretrain / .finetune)
    data: SegDataConfig = SegDataConfig()
    image_size: Optional[int] = None  # train / eval side; None: segment.data.canvas
    head: SegHeadConfig = SegHeadConfig()
    augment: SegAugment = SegAugment()
    loop: LoopConfig = LoopConfig(epochs=2, batch_size=16, warmup_epochs=0.2, checkpoint_every=100)
    optim: OptimConfig = OptimConfig(lr=2e-3, min_lr=0.0, clip_grad=None, layer_decay=0.9)
    loader: LoaderConfig = LoaderConfig(num_workers=0)
    drop_path: float = 0.1
    eval_samples: Optional[int] = None  # per-epoch eval subset; the last epoch scores the whole split
    figure_scenes: int = 8  # first N eval scenes drawn as image / ground truth / prediction

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size={self.image_size}: must be >= 1 or null (the canvas)")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path={self.drop_path}: must be in [0, 1)")
        if self.figure_scenes < 1:
            raise ValueError(f"figure_scenes={self.figure_scenes}: must be >= 1")

    @property
    def size(self) -> int:
        return self.image_size or self.data.canvas


@dataclasses.dataclass(frozen=True)
class Params:
    seed: int = 0
    mask_ratio: float = 0.4
    masking: Literal["block", "random"] = "block"
    target: Literal["tokens", "pixels"] = "tokens"
    model: str = "micro"
    data: DataConfig = DataConfig()
    shard: ShardConfig = ShardConfig()
    views: ViewConfig = ViewConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    scratch: ScratchConfig = ScratchConfig()
    probe: ProbeConfig = ProbeConfig()
    report: ReportConfig = ReportConfig()
    visualize: VisualizeConfig = VisualizeConfig()
    outputs: OutputsConfig = OutputsConfig()
    segment: SegmentConfig = SegmentConfig()

    def __post_init__(self) -> None:
        _ = self.mask  # validates masking and mask_ratio, once, where the generator does

    @property
    def mask(self) -> MaskingConfig:
        """The mask generator's settings: the top-level knobs + `pretrain.blocks`."""
        return MaskingConfig(kind=self.masking, mask_ratio=self.mask_ratio, blocks=self.pretrain.blocks,
                             draw=self.pretrain.mask_draw)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and
    nested dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}={value!r}: must be one of {', '.join(map(str, choices))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r}: expected a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r}: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r}: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r}: expected a string")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover - programming error


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]} in params: valid keys here are {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # a section's own validation (e.g. ViewConfig ranges)
        msg = str(err)
        if where:  # name the keys in full: "views=0: must be >= 1" -> "tokenize.views=0: must be >= 1"
            qualified = re.sub(rf"(?<![\w.])({'|'.join(map(re.escape, names))})(?![\w(])", rf"{where}.\1", msg)
            if qualified != msg:
                raise ConfigError(qualified) from None
        raise ConfigError(f"{where or 'params'}: {msg}" if where or msg.split("=", 1)[0] not in names
                          else msg) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read params.yaml once into a frozen `Params`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found; run from the repository root or pass --params PATH")
    with path.open() as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    try:
        return from_dict(Params, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
