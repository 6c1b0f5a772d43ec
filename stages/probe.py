"""`beit linear-probe` and `beit knn`: how good are the frozen pretrained features?

Features (paper App. D): the encoder from outputs.pretrain, frozen, run up to
block `probe.block` (default: all blocks); the patch tokens are averaged
(no CLS). Extracted once per (checkpoint, block, split, subset) into a cache
under <outputs.runs>/features-<fingerprint>/ that both commands share.

linear-probe: multinomial logistic regression on the cached features, solved to
convergence by L-BFGS (stages/convex_probe.py) on standardised (a BatchNorm without
affine, as MAE/BEiT probes use) or PCA-whitened features, l2 and whitening chosen on
the holdout; `probe.solver: adamw` trains the linear layer with AdamW + cosine
schedule instead (minibatches: feature sets too large for one batch).
knn: cosine similarity, k = probe.knn_k nearest train features, DINO's
temperature-weighted vote (each neighbour votes exp(cos / T) for its class).

With probe.grid, both also run on the token grid (every patch token in place, flattened; the
linear probe whitened only) and report it as `grid_top1`: mean pooling throws away where things
are, which the pixel floor keeps, so the grid is the like-for-like read of the same tokens.

With probe.pixel_reference, both also fit the same probe on raw pixels (the
normalised eval view the encoder sees, flattened) and report it as
`pixels_top1`: the floor a learned representation has to clear. On small, centred images like Fashion-MNIST that
floor is high, and a short pretraining run can sit below it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Optional

import click
from tqdm import tqdm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.beit import check_pretrained
from model.checkpoints import WEIGHTS
from model.classifier import BeitClassifier, Pool
from model.engine import setup_distributed
from model.optim import lr_at
from pipeline.atomic import atomic_file
from pipeline.classify import ClassifyDataset, LabelledSplit, open_labelled
from pipeline.fingerprint import file_fingerprint, json_fingerprint
from pipeline.schema import LoaderConfig
from pipeline.stream import eval_batches
from stages.config import ConfigError, Params, load_params
from stages.convex_probe import InputMap, prepare, solve
from stages.errors import one_line_errors
from stages.metrics import topk_hits, write_json


@torch.no_grad()
def extract_features(model: BeitClassifier, split: LabelledSplit, image_size: int, batch_size: int,
                     num_workers: int, blocks: tuple[int, ...], device: torch.device,
                     pools: tuple[Pool, ...] = ("mean",)) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """-> ({pool: features float [len(blocks), N, F]}, labels long [N]) over the (kept) split, stored
    order, every pool from the same encoder pass. "mean": the patch tokens averaged, F = D (paper
    App. D); "grid": every patch token kept in place, F = N_patches * D (`BeitClassifier.pooled_blocks`)."""
    model.eval().to(device)
    data = ClassifyDataset(split, LoaderConfig(num_workers=num_workers), image_size, seed=0, train=False)
    feats: dict[str, list] = {pool: [] for pool in pools}
    labels = []
    for batch in eval_batches(data, batch_size, num_workers):
        images = batch["image"].to(device)
        for pool, x in model.pooled_blocks_by(images, blocks, pools).items():
            feats[pool].append(x.float().cpu())  # [L, B, F]
        labels.append(batch["label"])  # [B]
    return {pool: torch.cat(x, dim=1) for pool, x in feats.items()}, torch.cat(labels)


def extract_pixels(split: LabelledSplit, image_size: int, batch_size: int, num_workers: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (pixels float [1, N, 3*S*S], labels long [N]): the encoder's input view, flattened."""
    data = ClassifyDataset(split, LoaderConfig(num_workers=num_workers), image_size, seed=0, train=False)
    pairs = [(b["image"].flatten(1), b["label"]) for b in eval_batches(data, batch_size, num_workers)]
    return torch.cat([x for x, _ in pairs])[None], torch.cat([y for _, y in pairs])


def probe_blocks(params: Params, depth: int) -> tuple[int, ...]:
    """The blocks whose features are extracted: all of them when the holdout chooses."""
    block = params.probe.block
    if block == "auto":
        return tuple(range(1, depth + 1))
    if block is not None and block > depth:
        raise ConfigError(f"probe.block={block}: the encoder has {depth} blocks")
    return (depth if block is None else block,)


def cached_features(params: Params, split: LabelledSplit, name: str, pixels: bool = False,
                    pool: Pool = "mean") -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(features [L, N, F], labels [N], the L blocks they come after; () for pixels) of `split`,
    computed once per fingerprint. pixels=True: the raw-pixel reference instead; `pool`: see
    `extract_features`. With probe.grid, the pass that extracts one pool caches the other too:
    the probes read both, and the encoder pass is most of an extraction (~14 s of the mean
    features' 10,000 test images, of ~25 s for the grid's, which also writes 1.5 GB)."""
    cfg = params.probe
    ckpt = Path(params.outputs.pretrain.dir)
    if not pixels and not (ckpt / WEIGHTS).exists():
        raise FileNotFoundError(f"{ckpt}: no pretrained checkpoint; run `beit pretrain` (or `dvc repro pretrain`)")
    blocks: tuple[int, ...] = ()
    if not pixels:  # before the feature cache: a cached result of another encoder is no answer either
        config = check_pretrained(ckpt, model=params.model, image_size=params.data.image_size)
        blocks = probe_blocks(params, int(config["depth"]))

    # hashed once: cache() names each pool's file, and a ViT-B checkpoint is 350 MB
    source = {"pixels": True} if pixels else {"ckpt": file_fingerprint(ckpt / WEIGHTS), "blocks": blocks}

    def cache(q: Pool) -> Path:
        # the mean-pooled caches keep the fingerprints they always had: no "pool" key
        pool_key = {"pool": q} if q != "mean" and not pixels else {}
        fp = json_fingerprint({**source, **pool_key, "split": split.fingerprint, "image_size": params.data.image_size})
        return Path(params.outputs.runs) / f"features-{fp}" / f"{name}.safetensors"

    path = cache(pool)
    if path.exists():
        t = load_file(str(path))
        return t["features"], t["labels"], blocks
    size = params.data.image_size
    t0 = time.perf_counter()
    if pixels:
        feats, labels = extract_pixels(split, size, cfg.batch_size, cfg.num_workers)
        pooled = {pool: feats}
    else:
        also = [q for q in (("mean", "grid") if cfg.grid else ()) if q != pool and not cache(q).exists()]
        model = BeitClassifier.from_pretrained(ckpt, num_classes=0, drop_path=0.0)
        pooled, labels = extract_features(model, split, size, cfg.batch_size, cfg.num_workers, blocks,
                                          setup_distributed(cfg.device).device, (pool, *also))
    for q, feats in pooled.items():
        what = "pixels" if pixels else q
        click.echo(f"features: {name} {what} {tuple(feats.shape)} in {time.perf_counter() - t0:.1f} s -> {cache(q)}")
        with atomic_file(cache(q)) as tmp:  # a killed run leaves no half-written cache
            save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(tmp))
    return pooled[pool], labels, blocks


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


@dataclasses.dataclass(frozen=True)
class ProbeData:
    """Cached features of the three sets: fit (the label subset), holdout (chooses), eval (scored once)."""

    fit: tuple[torch.Tensor, torch.Tensor]  # [L, N, D], [N]
    holdout: Optional[tuple[torch.Tensor, torch.Tensor]]  # [L, H, D], [H]; None without probe.validation
    eval: tuple[torch.Tensor, torch.Tensor]  # [L, M, D], [M]
    blocks: tuple[int, ...]  # the block of each of the L feature sets; () for pixels
    classes: int

    def block_name(self, i: int) -> int | str:
        """What the metrics call feature set i: its block, or "pixels"."""
        return self.blocks[i] if self.blocks else "pixels"


def probe_data(params: Params, pixels: bool = False, verify: bool = False, pool: Pool = "mean") -> ProbeData:
    p, shards = params.probe, Path(params.outputs.shards)
    fraction = params.finetune.label_fraction if p.train_fraction is None else p.train_fraction
    train_dir = shards / params.data.train_split
    if p.validation is not None and fraction == 1.0:
        raise ConfigError("probe.validation needs train images outside the probe's labels: lower "
                          "probe.train_fraction below 1, or set probe.validation: null with a fixed block and one lr")
    fit_split = open_labelled(train_dir, fraction, params.seed, verify=verify)
    fit_x, fit_y, blocks = cached_features(params, fit_split, params.data.train_split, pixels, pool)
    holdout = None
    if p.validation is not None:
        try:
            held = open_labelled(train_dir, fraction, params.seed, holdout=p.validation)
        except ValueError as err:  # "validation=N: must be in [1, M], ..." -> name the key in full
            raise ConfigError(f"probe.{err}") from None
        holdout = cached_features(params, held, f"{params.data.train_split}-holdout", pixels, pool)[:2]
    eval_split = open_labelled(shards / params.data.eval_split, verify=verify)
    eval_x, eval_y, _ = cached_features(params, eval_split, params.data.eval_split, pixels, pool)
    return ProbeData((fit_x, fit_y), holdout, (eval_x, eval_y), blocks, fit_split.num_classes)


def choose(data: ProbeData, options: list[tuple[int, float]], score) -> tuple[tuple[int, float], list[dict]]:
    """The (feature set, setting) with the best holdout top-1 -> (choice, one row per option).
    score(i, setting) -> holdout top-1 of feature set i fit on data.fit. Ties go to the earlier option."""
    if data.holdout is None:
        return options[0], []
    rows, best = [], None
    # each L-BFGS fit on 2,352 raw pixels takes seconds: the grid shows its progress (also under dvc repro)
    for i, setting in tqdm(options, desc="holdout fits", unit="fit", mininterval=2.0):
        top1 = score(i, setting)
        rows.append({"block": data.block_name(i), "setting": setting, "top1": top1})
        if best is None or top1 > best[1]:
            best = ((i, setting), top1)
    return best[0], rows


def fit_linear_scored(params: Params, data: ProbeData, settings: Optional[list] = None) -> dict:
    """Linear probe: block and setting (lr, or l2 and whitening; `settings`, default all of
    probe.linear_settings()) chosen on the holdout, then the eval split scored once."""
    p = params.probe
    settings = p.linear_settings() if settings is None else settings
    # lbfgs: the input map (standardise / whiten) of every feature set, and the mapped fit and
    # holdout features of the current one only, shared by its l2s (a grid's are ~90 MB, its map
    # ~50 MB). The maps are kept because a whitened grid's costs a 6,000 x 6,000 eigendecomposition
    # (~40 s), which the final fit of the chosen set would otherwise repeat; mapping is ~2 s.
    maps: dict[tuple[int, bool], InputMap] = {}
    mapped: dict[tuple[int, bool], tuple] = {}

    def inputs_of(i: int, whiten: bool) -> tuple:
        if not any(k[0] == i for k in mapped):
            mapped.clear()
        if (i, whiten) not in mapped:
            if (i, whiten) not in maps:
                maps[(i, whiten)] = prepare(data.fit[0][i], whiten)
            inputs = maps[(i, whiten)]
            held = None if data.holdout is None else inputs(data.holdout[0][i])
            mapped[(i, whiten)] = (inputs, inputs(data.fit[0][i]), held)  # InputMap, [N, D'], [H, D']
        return mapped[(i, whiten)]

    def fit(i: int, setting):
        if p.solver == "lbfgs":
            inputs, z, _ = inputs_of(i, setting["whiten"])
            return solve(inputs, z, data.fit[1], data.classes, setting["l2"], p.max_iter)
        linear, mean, std = train_linear(data.fit[0][i], data.fit[1], data.classes, p.epochs, setting,
                                         p.weight_decay, p.linear_batch_size, params.seed)
        return lambda z: linear((z - mean) / std)

    def score(i: int, setting) -> float:
        predict = fit(i, setting)
        with torch.no_grad():
            if p.solver == "lbfgs":  # the holdout already mapped: the same logits as predict(x)
                logits = predict.logits(inputs_of(i, setting["whiten"])[2])  # [H, K]
            else:
                logits = predict(data.holdout[0][i])
            return topk_accuracy(logits, data.holdout[1])["top1"]

    layers = range(len(data.eval[0]))
    (i, setting), rows = choose(data, [(j, s) for j in layers for s in settings], score)
    predict = fit(i, setting)
    with torch.no_grad():
        test = topk_accuracy(predict(data.eval[0][i]), data.eval[1])
        train = topk_accuracy(predict(data.fit[0][i]), data.fit[1])
    chosen = {"lr": setting} if p.solver == "adamw" else {**setting, "iterations": predict.iterations}
    return {**test, "train_top1": train["top1"], "block": data.block_name(i), "solver": p.solver, **chosen,
            "holdout": rows, "train_samples": len(data.fit[1]), "eval_samples": len(data.eval[1]),
            "feature_dim": data.eval[0].shape[-1]}


def knn_scored(params: Params, data: ProbeData) -> dict:
    """kNN: block chosen on the holdout, then the eval split scored once."""
    p = params.probe

    def top(tx, ty, x, y):
        return topk_accuracy(knn_scores(tx, ty, x, data.classes, p.knn_k, p.knn_temperature), y)

    (i, _), rows = choose(data, [(j, p.knn_k) for j in range(len(data.eval[0]))],
                          lambda j, _k: top(data.fit[0][j], data.fit[1], data.holdout[0][j], data.holdout[1])["top1"])
    test = top(data.fit[0][i], data.fit[1], data.eval[0][i], data.eval[1])
    return {**test, "block": data.block_name(i), "holdout": rows,
            "train_samples": len(data.fit[1]), "eval_samples": len(data.eval[1])}


# The token grid gets whitened fits only: on 6,272 columns a standardised L-BFGS fit runs its
# 500 iterations for minutes, and on learned features whitening won every holdout comparison
# (seed 0, 3x3-pooled grid, block 5, l2 0.1: 82.90 whitened against 80.54 standardised).
def grid_settings(p) -> list:
    settings = [s for s in p.linear_settings() if p.solver != "lbfgs" or s["whiten"]]
    return settings or p.linear_settings()


def _grid_metrics(m: dict) -> dict:
    """The token-grid probe's result under grid_ keys, beside the mean-pooled probe's."""
    keep = ("top1", "top5", "train_top1", "block", "lr", "l2", "whiten", "iterations", "holdout", "feature_dim")
    return {f"grid_{k}": m[k] for k in keep if k in m}


def linear_probe(params: Params, verify: bool = False) -> dict:
    metrics = fit_linear_scored(params, probe_data(params, verify=verify))
    if params.probe.grid:
        grid = fit_linear_scored(params, probe_data(params, pool="grid"), grid_settings(params.probe))
        metrics |= _grid_metrics(grid)
    if params.probe.pixel_reference:
        pixels = fit_linear_scored(params, probe_data(params, pixels=True))
        metrics |= {"pixels_top1": pixels["top1"],
                    **{f"pixels_{k}": pixels[k] for k in ("lr", "l2", "whiten") if k in pixels}}
    write_json(params.outputs.linear_probe.metrics, metrics)
    return metrics


def knn(params: Params, verify: bool = False) -> dict:
    p = params.probe
    metrics = {**knn_scored(params, probe_data(params, verify=verify)), "k": p.knn_k,
               "temperature": p.knn_temperature, "vote": "temperature-weighted (DINO)"}
    if p.grid:
        metrics |= _grid_metrics(knn_scored(params, probe_data(params, pool="grid")))
    if p.pixel_reference:
        metrics["pixels_top1"] = knn_scored(params, probe_data(params, pixels=True))["top1"]
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
