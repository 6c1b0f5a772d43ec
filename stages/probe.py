"""`beit linear-probe` and `beit knn`: how good are the frozen pretrained features?

Features (paper App. D): the encoder from outputs.pretrain, frozen, run up to
block `probe.block` (default: all blocks); the patch tokens are averaged
(no CLS). Extracted once per (checkpoint, block, split, subset) into a cache
under <outputs.runs>/features-<fingerprint>/ that both commands share.

linear-probe: features standardised with the train mean/std (a BatchNorm
without affine, as MAE/BEiT probes use), then one linear layer trained with
AdamW + cosine schedule on the cached features (seconds, not minutes).
knn: cosine similarity, k = probe.knn_k nearest train features, DINO's
temperature-weighted vote (each neighbour votes exp(cos / T) for its class).

With probe.pixel_reference, both also fit the same probe on raw pixels (the
normalised eval view the encoder sees, flattened) and report it as
`pixels_top1`: the floor a learned representation has to clear. On small, centred images like Fashion-MNIST that
floor is high, and a short pretraining run can sit below it.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import click
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.beit import check_pretrained
from model.checkpoints import WEIGHTS
from model.classifier import BeitClassifier
from model.engine import setup_distributed
from model.optim import lr_at
from pipeline.atomic import atomic_file
from pipeline.classify import ClassifyDataset, LabelledSplit, open_labelled
from pipeline.fingerprint import file_fingerprint, json_fingerprint
from pipeline.schema import LoaderConfig
from pipeline.stream import eval_batches
from stages.config import Params, load_params
from stages.errors import one_line_errors
from stages.metrics import topk_hits, write_json


@torch.no_grad()
def extract_features(model: BeitClassifier, split: LabelledSplit, image_size: int, batch_size: int,
                     num_workers: int, block: Optional[int], device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (features float [N, D], labels long [N]) over the (kept) split, stored order."""
    model.eval().to(device)
    data = ClassifyDataset(split, LoaderConfig(num_workers=num_workers), image_size, seed=0, train=False)
    feats, labels = [], []
    for batch in eval_batches(data, batch_size, num_workers):
        feats.append(model.pooled(batch["image"].to(device), block).float().cpu())  # [B, D]
        labels.append(batch["label"])  # [B]
    return torch.cat(feats), torch.cat(labels)


def extract_pixels(split: LabelledSplit, image_size: int, batch_size: int, num_workers: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (pixels float [N, 3*S*S], labels long [N]): the encoder's input view, flattened."""
    data = ClassifyDataset(split, LoaderConfig(num_workers=num_workers), image_size, seed=0, train=False)
    pairs = [(b["image"].flatten(1), b["label"]) for b in eval_batches(data, batch_size, num_workers)]
    return torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])


def cached_features(params: Params, split_name: str, fraction: float, pixels: bool = False,
                    verify: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of `split_name` (stratified `fraction` of it), computed once per fingerprint.
    pixels=True: the raw-pixel reference instead of the pretrained encoder's features.
    verify: check every shard image's sha256 first (the tar sizes are always checked)."""
    cfg = params.probe
    ckpt = Path(params.outputs.pretrain.dir)
    if not pixels and not (ckpt / WEIGHTS).exists():
        raise FileNotFoundError(f"{ckpt}: no pretrained checkpoint; run `beit pretrain` (or `dvc repro pretrain`)")
    if not pixels:  # before the feature cache: a cached result of another encoder is no answer either
        check_pretrained(ckpt, model=params.model, image_size=params.data.image_size)
    split = open_labelled(Path(params.outputs.shards) / split_name, fraction, params.seed, verify=verify)
    source = {"pixels": True} if pixels else {"ckpt": file_fingerprint(ckpt / WEIGHTS), "block": cfg.block}
    fp = json_fingerprint({**source, "split": split.fingerprint, "image_size": params.data.image_size})
    path = Path(params.outputs.runs) / f"features-{fp}" / f"{split_name}.safetensors"
    if path.exists():
        t = load_file(str(path))
        return t["features"], t["labels"]
    size = params.data.image_size
    t0 = time.perf_counter()
    if pixels:
        feats, labels = extract_pixels(split, size, cfg.batch_size, cfg.num_workers)
    else:
        model = BeitClassifier.from_pretrained(ckpt, num_classes=0, drop_path=0.0)
        feats, labels = extract_features(model, split, size, cfg.batch_size, cfg.num_workers, cfg.block,
                                         setup_distributed(cfg.device).device)
    click.echo(f"features: {split_name} {tuple(feats.shape)} in {time.perf_counter() - t0:.1f} s -> {path}")
    with atomic_file(path) as tmp:  # a killed run leaves no half-written cache
        save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(tmp))
    return feats, labels


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """scores [M, K], labels [M] -> {"top1", "top5"} (top-k capped at K)."""
    top1, top5 = topk_hits(scores, labels)  # bool [M] each
    return {"top1": top1.float().mean().item(), "top5": top5.float().mean().item()}


def train_linear(x: torch.Tensor, y: torch.Tensor, classes: int, epochs: int, lr: float,
                 weight_decay: float, batch_size: int, seed: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Fit standardise -> Linear on features x [N, D], labels y [N] -> (linear, mean [D], std [D])."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # [D], [D]
    z = (x - mean) / std  # [N, D]
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.AdamW(linear.parameters(), lr=lr, weight_decay=weight_decay)
    per_epoch = math.ceil(len(z) / batch_size)
    total = epochs * per_epoch
    for step in range(total):
        if step % per_epoch == 0:
            order = torch.randperm(len(z), generator=g)
        idx = order[(step % per_epoch) * batch_size:(step % per_epoch + 1) * batch_size]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, 0, lr)
        loss = F.cross_entropy(linear(z[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return linear, mean, std


@torch.no_grad()
def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, classes: int,
               k: int, temperature: float, chunk: int = 1024) -> torch.Tensor:
    """DINO's weighted kNN: train [N, D] / [N], test [M, D] -> class scores [M, K]."""
    train_n = F.normalize(train_x, dim=1)  # [N, D]
    k = min(k, len(train_n))
    out = []
    for start in range(0, len(test_x), chunk):
        q = F.normalize(test_x[start:start + chunk], dim=1)  # [m, D]
        sim, idx = (q @ train_n.T).topk(k, dim=1)  # [m, k] cosine similarities, neighbour ids
        votes = torch.zeros(len(q), classes)  # [m, K]
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())  # each neighbour votes exp(cos/T)
        out.append(votes)
    return torch.cat(out)  # [M, K]


def _data(params: Params, pixels: bool = False, verify: bool = False):
    p = params.probe
    fraction = params.finetune.label_fraction if p.train_fraction is None else p.train_fraction
    train_x, train_y = cached_features(params, params.data.train_split, fraction, pixels, verify)
    test_x, test_y = cached_features(params, params.data.eval_split, 1.0, pixels, verify)
    classes = open_labelled(Path(params.outputs.shards) / params.data.train_split).num_classes
    return train_x, train_y, test_x, test_y, classes


def _fit_linear(params: Params, pixels: bool, verify: bool = False) -> tuple[dict, dict, int, int, int]:
    """-> (test top-k, train top-k, train size, eval size, feature dim)."""
    p = params.probe
    train_x, train_y, test_x, test_y, classes = _data(params, pixels, verify)
    linear, mean, std = train_linear(train_x, train_y, classes, p.epochs, p.lr, p.weight_decay,
                                     p.linear_batch_size, params.seed)
    with torch.no_grad():
        test = topk_accuracy(linear((test_x - mean) / std), test_y)
        train = topk_accuracy(linear((train_x - mean) / std), train_y)
    return test, train, len(train_x), len(test_x), train_x.shape[1]


def linear_probe(params: Params, verify: bool = False) -> dict:
    p = params.probe
    test, train, n_train, n_eval, dim = _fit_linear(params, pixels=False, verify=verify)
    metrics = {**test, "train_top1": train["top1"], "block": p.block or "last",
               "train_samples": n_train, "eval_samples": n_eval, "feature_dim": dim}
    if p.pixel_reference:
        metrics["pixels_top1"] = _fit_linear(params, pixels=True)[0]["top1"]
    write_json(params.outputs.linear_probe.metrics, metrics)
    return metrics


def _knn_top(params: Params, pixels: bool, verify: bool = False) -> tuple[dict, int, int]:
    p = params.probe
    train_x, train_y, test_x, test_y, classes = _data(params, pixels, verify)
    scores = knn_scores(train_x, train_y, test_x, classes, p.knn_k, p.knn_temperature)
    return topk_accuracy(scores, test_y), len(train_x), len(test_x)


def knn(params: Params, verify: bool = False) -> dict:
    p = params.probe
    top, n_train, n_eval = _knn_top(params, pixels=False, verify=verify)
    metrics = {**top, "k": p.knn_k, "temperature": p.knn_temperature,
               "vote": "temperature-weighted (DINO)", "block": p.block or "last",
               "train_samples": n_train, "eval_samples": n_eval}
    if p.pixel_reference:
        metrics["pixels_top1"] = _knn_top(params, pixels=True)[0]["top1"]
    write_json(params.outputs.knn.metrics, metrics)
    return metrics


def _cli(fn, name: str, help_text: str):
    @click.command(name=name, help=help_text)
    @click.option("--params", "params_path", default="params.yaml", show_default=True)
    @click.option("--verify", is_flag=True, help="Check every shard image's sha256 against index.parquet first.")
    @one_line_errors
    def command(params_path: str, verify: bool) -> None:
        metrics = fn(load_params(params_path), verify)
        click.echo(json.dumps(metrics, sort_keys=True))

    return command


linear_probe_cli = _cli(linear_probe, "linear-probe",
                        "Linear classifier on frozen, average-pooled pretrained features.")
knn_cli = _cli(knn, "knn", "Cosine kNN (k=probe.knn_k, temperature-weighted vote) on frozen features.")
