"""Typed, frozen configuration read once from params.yaml.

Every section of params.yaml maps to a frozen dataclass. Unknown keys and
wrong types are errors that name the offending key, so a typo in params.yaml
(or in `dvc exp run -S ...`) fails loudly instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from model.dvae import DVAEConfig, DVAESchedule
from pipeline.views import ViewConfig


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


@dataclasses.dataclass(frozen=True)
class ShardConfig:
    out: str = "data/shards"
    shard_size: int = 5000
    resize_short: Optional[int] = None
    workers: int = 2
    strict: bool = False
    max_pixels: int = 89_478_485
    jpeg_quality: int = 95
    verify: bool = False  # fully decode pass-through JPEGs too (slow; default checks header + EOI)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """`beit train-tokenizer`: train our dVAE (kind dvae), or adopt a converted DALL-E one (kind dalle)."""

    kind: Literal["dvae", "dalle"] = "dvae"
    dalle_path: Optional[str] = None  # kind dalle: a directory written by `beit convert-dalle`
    out: str = "models/tokenizer"  # what every downstream stage reads
    metrics: str = "metrics/tokenizer.json"
    curve: str = "plots/tokenizer.tsv"
    figure: str = "plots/tokenizer.png"
    recon: str = "plots/tokenizer_recon.png"
    model: DVAEConfig = DVAEConfig()
    schedule: DVAESchedule = DVAESchedule()
    steps: int = 250
    batch_size: int = 128
    num_workers: int = 1  # DataLoader workers decoding + rendering views
    shuffle_buffer: int = 2000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_samples: Optional[int] = None  # held-out images scored; None: the whole eval split
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.kind == "dalle" and not self.dalle_path:
            raise ConfigError("tokenizer.kind=dalle needs tokenizer.dalle_path (the folder `beit convert-dalle` wrote)")
        if self.steps < 1 or self.batch_size < 1 or self.log_every < 1:
            raise ConfigError("tokenizer.steps, .batch_size and .log_every must be >= 1")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ConfigError(f"tokenizer.eval_samples={self.eval_samples}: must be >= 1 or null (whole split)")


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    out: str = "data/tokens"
    views: int = 8  # V views per image, each tokenized once; the trainer cycles them by epoch
    format: Literal["zarr", "parquet"] = "zarr"
    batch_size: int = 64  # views per tokenizer forward
    workers: int = 2  # LocalCluster worker processes; 0: in-process without Dask (debugging)
    threads_per_worker: int = 1
    scheduler: Optional[str] = None  # "tcp://host:8786": an existing Dask cluster instead
    device: Literal["cpu", "cuda"] = "cpu"  # cuda: GPU workers, resources={"GPU": 1}

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ConfigError(f"tokenize.views={self.views}: must be >= 1")
        if self.batch_size < 1 or self.workers < 0 or self.threads_per_worker < 1:
            raise ConfigError("tokenize.batch_size and .threads_per_worker must be >= 1, .workers >= 0")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    out: str = "models/pretrain"
    runs: str = "runs"  # untracked: resumable checkpoints under runs/pretrain-<params fingerprint>
    metrics: str = "metrics/pretrain.json"
    curve: str = "plots/pretrain.tsv"  # per-step TSV (DVC plot)
    figure: str = "plots/pretrain.png"
    epochs: int = 10
    batch_size: int = 128  # global: per optimizer step, over all ranks and accumulation steps
    accum_steps: int = 1
    lr: float = 1.5e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: Optional[float] = 3.0
    drop_path: Optional[float] = None  # None: the model size's default
    min_block: Optional[int] = None  # None: 16 patches scaled to the grid (pipeline.masking)
    amp: Literal["none", "bf16", "fp16"] = "none"
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 2000
    checkpoint_every: int = 200  # optimizer steps
    log_every: int = 10
    eval_batches: int = 20  # held-out batches for the final masked-token accuracy

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.accum_steps < 1:
            raise ConfigError("pretrain.epochs, .batch_size and .accum_steps must be >= 1")
        if self.batch_size % self.accum_steps:
            raise ConfigError(f"pretrain.batch_size={self.batch_size} must be a multiple of "
                              f"pretrain.accum_steps={self.accum_steps}")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """`beit finetune` and `beit scratch`: one recipe and budget, two inits."""

    out: str = "models/finetune"
    scratch_out: str = "models/scratch"
    metrics: str = "metrics/finetune.json"
    scratch_metrics: str = "metrics/scratch.json"
    curve: str = "plots/finetune.tsv"  # per-step TSV (DVC plot)
    scratch_curve: str = "plots/scratch.tsv"
    figure: str = "plots/finetune.png"
    scratch_figure: str = "plots/scratch.png"
    runs: str = "runs"  # untracked resumable checkpoints: runs/{finetune,scratch}-<fingerprint>
    init: Optional[str] = None  # None: the pretrain checkpoint (pretrain.out); "unilm:PATH": an official .pth
    label_fraction: float = 0.1  # stratified, seeded subset of the train labels (low-label regime)
    epochs: int = 5
    batch_size: int = 128  # global, per optimizer step
    accum_steps: int = 1
    lr: float = 2e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 0.5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: Optional[float] = 0.75  # lr scale per block from the top; paper: 0.65 for base
    clip_grad: Optional[float] = None
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: float = 0.8  # Beta(a, a) mixing; 0 disables
    cutmix: float = 1.0  # 0 disables
    mix_prob: float = 1.0  # fraction of batches mixed at all
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (0.75, 1.333333)
    flip_p: float = 0.5
    color_jitter: float = 0.0  # brightness/contrast/saturation factor; 0: no jitter
    amp: Literal["none", "bf16", "fp16"] = "none"
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = 2
    shuffle_buffer: int = 2000
    eval_samples: Optional[int] = 2000  # per-epoch eval subset; the last epoch evaluates the whole split
    # None: score data.eval_split (the reported metric). N: score N train images outside the
    # label subset instead, so a recipe can be tuned without ever looking at the test split.
    validation: Optional[int] = None
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self) -> None:
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(f"finetune.label_fraction={self.label_fraction}: must be in (0, 1], e.g. 0.1")
        if self.validation is not None and (self.validation < 1 or self.label_fraction == 1.0):
            raise ConfigError(f"finetune.validation={self.validation}: needs label_fraction < 1 and N >= 1 "
                              "(train images outside the label subset), or null to score data.eval_split")
        if self.epochs < 1 or self.batch_size < 1 or self.accum_steps < 1:
            raise ConfigError("finetune.epochs, .batch_size and .accum_steps must be >= 1")
        if self.batch_size % self.accum_steps:
            raise ConfigError(f"finetune.batch_size={self.batch_size} must be a multiple of "
                              f"finetune.accum_steps={self.accum_steps}")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"finetune.layer_decay={self.layer_decay}: must be in (0, 1] or null")
        if not 0.0 <= self.drop_path < 1.0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("finetune.drop_path and .label_smoothing must be in [0, 1)")
        if min(self.mixup, self.cutmix) < 0 or not 0.0 <= self.mix_prob <= 1.0:
            raise ConfigError("finetune.mixup/.cutmix must be >= 0 and .mix_prob in [0, 1]")
        if self.init is not None and not self.init.startswith("unilm:"):
            raise ConfigError(f"finetune.init={self.init!r}: must be null (the pretrain checkpoint) "
                              "or unilm:PATH")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """`beit linear-probe` and `beit knn` on frozen pretrained features."""

    runs: str = "runs"  # feature cache: runs/features-<fingerprint>/<split>.safetensors
    linear_metrics: str = "metrics/linear_probe.json"
    knn_metrics: str = "metrics/knn.json"
    block: Optional[int] = None  # features after this many blocks (1..depth); None: all (paper: 9 of 12 for base)
    # Stratified share of the train split that fits the probe / is the kNN memory. None: the
    # fine-tuning label subset itself (finetune.label_fraction, same seed: the same images), so
    # probe, kNN and fine-tuning are compared on equal labels.
    train_fraction: Optional[float] = None
    # Also fit both probes on raw pixels (pixels_top1): the floor features must clear. Costs
    # N x 3*S*S floats of feature cache, so the ImageNet config turns it off.
    pixel_reference: bool = True
    batch_size: int = 256  # feature extraction
    num_workers: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    epochs: int = 30  # linear classifier on cached features
    lr: float = 1e-3
    weight_decay: float = 1e-4
    linear_batch_size: int = 512
    knn_k: int = 20
    knn_temperature: float = 0.07  # DINO's weighted vote: weight exp(cos / T)

    def __post_init__(self) -> None:
        if self.train_fraction is not None and not 0.0 < self.train_fraction <= 1.0:
            raise ConfigError(f"probe.train_fraction={self.train_fraction}: must be in (0, 1] or null "
                              "(finetune.label_fraction)")
        if self.block is not None and self.block < 1:
            raise ConfigError(f"probe.block={self.block}: must be >= 1 (blocks counted from 1) or null")
        if self.knn_k < 1 or self.knn_temperature <= 0:
            raise ConfigError("probe.knn_k must be >= 1 and probe.knn_temperature > 0")


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """`beit report`: this run's metrics beside the paper's, plus the DVC experiments table."""

    out: str = "reports/results.md"
    figure: str = "reports/results.png"
    experiments: bool = True  # add the `dvc exp show --json` ablation table (skipped with a note if dvc fails)


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
    probe: ProbeConfig = ProbeConfig()
    report: ReportConfig = ReportConfig()

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio={self.mask_ratio}: must be in (0, 1), e.g. 0.4")


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
        raise ConfigError(f"{where or 'params'}: {err}") from None


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
