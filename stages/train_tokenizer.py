"""`beit train-tokenizer`: the visual tokenizer every later stage reads from `outputs.tokenizer.dir`.

kind dvae (default): train our discrete VAE (model/dvae.py) on the train shards,
through the same augmented views as BEiT (params `views`), then score it on the
eval split: hard-code recon MSE, codebook usage (% of codes used) and perplexity.
kind dalle: adopt a DALL-E tokenizer that `beit convert-dalle` wrote (no training):
validate it, copy it, and score it the same way (recon only with a decoder).

Outputs are replaced whole: the tokenizer directory is built beside its final name
and swapped in by rename (pipeline/atomic.py); metrics, curve and pictures are each
written atomically.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import click
import torch
from tqdm import tqdm

from model.dvae import DVAE
from model.dvae_train import evaluate_dvae, recon_floors, train_dvae
from model.tokenizer import CONFIG_NAME, Tokenizer, load_tokenizer, save_tokenizer
from pipeline.atomic import atomic_dir, atomic_write
from pipeline.classify import ClassifyDataset, open_labelled
from pipeline.schema import LoaderConfig
from pipeline.stream import batches, eval_batches
from stages.config import ConfigError, Params, load_params
from stages.errors import one_line_errors
from stages.figures import plot_curves, save_recon_grid
from stages.metrics import tsv_text, write_json

COLUMNS = ["step", "loss", "mse", "kl", "entropy_deficit", "codes_in_batch", "restarted",
           "lr", "temperature", "kl_weight", "img_per_s"]
TOKENIZER_FILES = (CONFIG_NAME, "encoder.safetensors", "decoder.safetensors")
GRID_IMAGES = 16  # originals shown over their reconstructions in the PNG


class TokenizerError(RuntimeError):
    """A tokenizer directory that cannot be used; the message says which and why."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("tokenizer.device=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(name)


def pixel_loader(params: Params) -> LoaderConfig:
    # mean 0 / std 1: the tokenizers take pixels in [0,1], not the ViT's normalised ones.
    return dataclasses.replace(params.tokenizer.loader, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def train_batches(params: Params, image_size: int) -> Iterator[torch.Tensor]:
    """Endless float [B,3,S,S] batches in [0,1]: a fresh random view per (seed, epoch, image)."""
    cfg, lcfg = params.tokenizer, pixel_loader(params)
    data = ClassifyDataset(open_labelled(Path(params.outputs.shards) / params.data.train_split), lcfg,
                           image_size, params.seed, train=True, views=params.views)
    for epoch in itertools.count():
        empty = True
        for batch in batches(data, cfg.batch_size, lcfg.num_workers, epoch):
            empty = False
            yield batch["image"]
        if empty:
            raise ConfigError(f"tokenizer.batch_size={cfg.batch_size} is larger than the train split")


def heldout_batches(params: Params, image_size: int) -> Callable[[], Iterator[torch.Tensor]]:
    """The eval split's whole images (identity view), at most tokenizer.eval_samples; re-iterable."""
    cfg, lcfg = params.tokenizer, pixel_loader(params)
    data = ClassifyDataset(open_labelled(Path(params.outputs.shards) / params.data.eval_split), lcfg,
                           image_size, params.seed, train=False)
    return lambda: (b["image"] for b in eval_batches(data, cfg.batch_size, lcfg.num_workers, cfg.eval_samples))


def _token_picture(ids: torch.Tensor, vocab: int, size: int) -> torch.Tensor:
    """long [B,h,w] -> float [B,3,size,size]: one fixed random colour per code, for tokenizers
    without a decoder (the grid then shows which regions share a token)."""
    palette = torch.rand(vocab, 3, generator=torch.Generator().manual_seed(0))  # [V,3]
    pic = palette[ids.cpu()].permute(0, 3, 1, 2)  # [B,h,w,3] -> [B,3,h,w]
    return torch.nn.functional.interpolate(pic, size=(size, size), mode="nearest")


def score(tok: Tokenizer, params: Params) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Held-out metrics, plus the first GRID_IMAGES images and their reconstructions [n,3,S,S]."""
    has_decoder = getattr(tok.model, "decoder", None) is not None
    batches = heldout_batches(params, tok.input_size)
    metrics = evaluate_dvae(tok.model, batches(), recon=has_decoder)
    metrics |= recon_floors(batches(), tok.input_size // tok.grid[0])  # what recon_mse must beat
    first = next(batches())[:GRID_IMAGES]
    with torch.inference_mode():
        ids = tok.encode(first)
        recon = tok.decode(ids).cpu() if has_decoder else _token_picture(ids, tok.vocab_size, tok.input_size)
    usage = metrics["codebook_usage"]
    metrics = {**metrics, "codebook_usage_pct": 100 * usage, "codes_used": round(usage * tok.vocab_size),
               "vocab_size": tok.vocab_size, "grid": tok.grid[0], "input_size": tok.input_size}
    return metrics, first, recon


def adopt_dalle(path: str | Path, out: Path) -> Tokenizer:
    """Validate a `beit convert-dalle` directory and copy its files into `out`."""
    src = Path(path)
    if not (src / CONFIG_NAME).is_file():
        raise TokenizerError(f"tokenizer.dalle_path={src}: no {CONFIG_NAME}; run "
                             f"`beit convert-dalle encoder.pkl [decoder.pkl] {src} --trust-pickle` first")
    try:
        tok = load_tokenizer(src)
    except (ValueError, KeyError, FileNotFoundError) as err:  # bad JSON, wrong shapes, fingerprint
        raise TokenizerError(f"tokenizer.dalle_path={src}: not a valid tokenizer ({err})".replace("\n", " ")) from None
    if tok.kind != "dalle":
        raise TokenizerError(f"tokenizer.dalle_path={src}: holds a {tok.kind!r} tokenizer, not a converted DALL-E one")

    with atomic_dir(out) as tmp:  # readers see the old or the new tokenizer, never a mix
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        load_tokenizer(tmp)  # the copy verifies too (fingerprint over the copied bytes)
    return load_tokenizer(out)


def _train_threads(workers: int) -> int:
    # A core per loader worker, the rest for training: on the 2-core default, 2 training
    # threads beside 1 worker ran at 39 img/s against 143 img/s for 1 (OpenMP threads spin-wait).
    return max(1, len(os.sched_getaffinity(0)) - workers)


def train_own(params: Params, device: torch.device, progress: bool) -> tuple[DVAE, list[dict]]:
    """Train the dVAE; returns the model and the logged rows (every tokenizer.log_every steps)."""
    cfg = params.tokenizer
    torch.manual_seed(params.seed)
    model = DVAE(cfg.model).to(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(_train_threads(cfg.loader.num_workers))
    rows: list[dict] = []
    bar = tqdm(total=cfg.steps, unit="step", disable=not progress, smoothing=0.05, desc="dVAE")
    t0 = time.perf_counter()

    def on_step(step: int, stats: dict) -> None:
        if not math.isfinite(stats["loss"]):  # stop now, not after the remaining steps
            raise FloatingPointError(f"non-finite dVAE loss at step {step}; lower tokenizer.schedule.lr")
        bar.update(1)
        done = step + 1
        if done % cfg.log_every and done != cfg.steps:
            return
        ips = done * cfg.batch_size / (time.perf_counter() - t0)
        rows.append({**stats, "step": done, "img_per_s": ips})
        bar.set_postfix(loss=f"{stats['loss']:.4f}", mse=f"{stats['mse']:.4f}",
                        codes=stats["codes_in_batch"], img_s=f"{ips:.0f}")

    try:
        train_dvae(model, train_batches(params, cfg.model.image_size), cfg.steps, cfg.schedule, on_step=on_step)
    finally:
        bar.close()
        torch.set_num_threads(threads)
    return model, rows


def write_curve(params: Params, rows: list[dict], title: str) -> None:
    """TSV (DVC plots) + PNG, each written atomically."""
    paths = params.outputs.tokenizer
    atomic_write(paths.curve, tsv_text(COLUMNS, rows))
    plot_curves(paths.curve, paths.figure, ["mse", "codes_in_batch", "temperature"], title)


def check_splits(params: Params, verify: bool) -> None:
    """Both splits' tars (sizes; sha256 with `verify`) before any work: the eval split is
    otherwise first opened after training."""
    for split in (params.data.train_split, params.data.eval_split):
        open_labelled(Path(params.outputs.shards) / split, verify=verify)


def train_tokenizer(params: Params, progress: bool = True, verify: bool = False) -> dict:
    """The stage: writes outputs.tokenizer (dir, metrics, curve, figure, recon); returns the metrics.
    `verify`: check every shard image's sha256 first (the tar sizes are always checked)."""
    cfg, paths = params.tokenizer, params.outputs.tokenizer
    out = Path(paths.dir)
    t0 = time.perf_counter()
    device = _device(cfg.device)
    if cfg.kind == "dalle":
        tok = adopt_dalle(cfg.dalle_path, out).to(device)
        check_splits(params, verify)
        rows, extra = [], {"kind": "dalle", "steps": 0}
        title = f"DALL-E tokenizer from {cfg.dalle_path} (not trained here)"
    else:
        check_splits(params, verify)
        model, rows = train_own(params, device, progress)
        with atomic_dir(out) as tmp:
            save_tokenizer(model, cfg.model, tmp)
        tok = load_tokenizer(out, device)  # score what was written, exactly as downstream stages will read it
        last = rows[-1]
        extra = {"kind": "dvae", "steps": cfg.steps, "train_seconds": round(time.perf_counter() - t0, 1),
                 "train_img_per_s": last["img_per_s"], "train_mse": last["mse"]}
        title = f"dVAE: {cfg.model.image_size} px -> {tok.grid[0]}x{tok.grid[1]} codes of {tok.vocab_size}"
    metrics, originals, recons = score(tok, params)
    metrics = {**extra, **metrics}
    write_curve(params, rows, title)
    save_recon_grid(originals, recons, paths.recon)
    write_json(paths.metrics, metrics)
    return metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--steps", type=int, default=None, help="Override tokenizer.steps (quick trials).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@click.option("--verify", is_flag=True, help="Check every shard image's sha256 against index.parquet first.")
@one_line_errors
def cli(params_path: str, steps: Optional[int], progress: bool, verify: bool) -> None:
    """Train the dVAE tokenizer (or adopt a converted DALL-E one) into outputs.tokenizer.dir."""
    params = load_params(params_path)
    if steps is not None:
        params = dataclasses.replace(params, tokenizer=dataclasses.replace(params.tokenizer, steps=steps))
    metrics = train_tokenizer(params, progress, verify)
    click.echo(json.dumps(metrics, sort_keys=True))
