"""`beit tokenize`: every image x view -> visual tokens, offline, with Dask.

One Dask task per data shard; each task tokenizes its shard and writes that
shard's rows (whole Zarr chunks / one Parquet file) itself. A rerun skips
shards already complete and verified, so a killed run resumes.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Optional

import click
import numpy as np
import torch

from model.cpu import cpu_has_fast_bf16
from pipeline.dask_runner import dask_client, run_per_shard, worker_device
from pipeline.fingerprint import index_fingerprint, json_fingerprint
from pipeline.shardread import check_shards, index_file, read_index, shard_keys
from pipeline.tokenize import tokenize_shard
from pipeline.tokens import StoreSpec, TokenStoreMismatch, create_or_open, store_path, write_index
from pipeline.schema import ClusterConfig, ViewConfig
from pipeline.views import View
from stages.config import ConfigError, Params, TokenizeConfig, load_params
from stages.errors import one_line_errors


class BF16Mismatch(ValueError):
    """bf16 token ids too far from the fp32 ones for this tokenizer."""


_TOKENIZERS: dict = {}  # per worker process: (path, device) -> tokenizer, loaded once


def _tokenizer(path: str, device: str):
    from model.tokenizer import load_tokenizer

    key = (path, device)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(path, device=device)
    return _TOKENIZERS[key]


def _task(s: int, *, shard_dir: str, token_out: str, split: str, fmt: str, spec: StoreSpec,
          tokenizer_path: str, view_cfg: ViewConfig, seed: int,
          batch_size: int, device: str, threads: int, precision: str = "fp32") -> dict:
    """Runs on a Dask worker: tokenize data shard `s` and write its rows."""
    from model.tokenizer import BF16_MIN_AGREEMENT, bf16_agreement, encode_bf16

    torch.set_num_threads(threads)
    start = time.perf_counter()
    dev = worker_device(device)
    tok = _tokenizer(tokenizer_path, dev)
    name = spec.shards[s]
    keys = read_index(shard_dir, ["key"], shard=name)["key"]
    checked = []

    @torch.inference_mode()
    def encode(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dev, non_blocking=True)
        if precision == "fp32":
            return tok.encode(x)
        if checked:
            return encode_bf16(tok, x)
        # the shard's first batch also runs in fp32: a deterministic check per shard
        ids, agree = bf16_agreement(tok, x)
        if agree < BF16_MIN_AGREEMENT:
            raise BF16Mismatch(f"tokenize.precision=bf16: {name}: only {agree:.2%} of the first batch's token ids "
                               f"match fp32 (< {BF16_MIN_AGREEMENT:.1%}); set tokenize.precision: fp32")
        checked.append(agree)
        return ids

    out_keys, tokens, views = tokenize_shard(
        Path(shard_dir) / name, encode, tok.input_size, view_cfg, seed, spec.views,
        batch_size, expected_keys=keys)
    store = create_or_open(token_out, split, fmt, spec)  # opens; the driver created it
    store.write_shard(s, out_keys, tokens, views)
    return {"shard": s, "images": len(out_keys), "seconds": time.perf_counter() - start}


def bf16_emulated_here(precision: str, cluster: ClusterConfig) -> bool:
    """bf16 tokenization on this machine's CPU without bf16 kernels; a remote scheduler's workers
    run on CPUs this process cannot see, so they are not judged here."""
    return (precision == "bf16" and cluster.device == "cpu" and cluster.scheduler is None
            and not cpu_has_fast_bf16())


def tokenize(params: Params, split: str, replace_stale: bool = False, verify: bool = False) -> dict:
    """Tokenize every shard of `split` not yet done with the tokenizer in
    outputs.tokenizer.dir, on tokenize.cluster; returns a summary.

    An existing store built from other shards/tokenizer/views is an error, or,
    with `replace_stale` (what `dvc repro` uses), deleted and rebuilt. The shards are
    checked first (`check_shards`; every image's sha256 with `verify`)."""
    cfg: TokenizeConfig = params.tokenize
    cluster, out = cfg.cluster, params.outputs.tokens
    tokenizer_path = params.outputs.tokenizer.dir
    if not Path(tokenizer_path, "tokenizer.json").exists():
        raise ConfigError(f"{tokenizer_path}: no tokenizer; run `beit train-tokenizer` or `beit convert-dalle` "
                          "(or point outputs.tokenizer.dir / --tokenizer at one)")
    shard_dir = Path(params.outputs.shards) / split
    index = index_file(shard_dir)
    keys_by_shard = shard_keys(read_index(index, ["key", "shard"]))
    shards = list(keys_by_shard)
    check_shards(shard_dir, shards, verify)

    tok = _tokenizer(str(tokenizer_path), "cpu")  # metadata only; workers load their own copy
    if tok.vocab_size > np.iinfo(np.uint16).max + 1:
        raise ConfigError(f"tokenizer vocab {tok.vocab_size} does not fit uint16 token ids")
    spec = StoreSpec(
        shards=tuple(shards), counts=tuple(len(keys_by_shard[s]) for s in shards),
        views=cfg.views, grid=tuple(tok.grid), view_dim=View.K, vocab_size=tok.vocab_size,
        fingerprints={"shards": index_fingerprint(index), "tokenizer": tok.fingerprint,
                      "views": json_fingerprint({"seed": params.seed, "views": params.views,
                                                 "input_size": tok.input_size}),
                      # only when set, so today's fp32 stores keep their fingerprints
                      **({"precision": cfg.precision} if cfg.precision != "fp32" else {})})
    try:
        store = create_or_open(out, split, cfg.format, spec)
    except TokenStoreMismatch as err:
        if not replace_stale:
            raise
        stale = store_path(out, split, cfg.format)
        click.echo(f"{err}\n-> replacing it (--replace-stale)")
        shutil.rmtree(stale)
        store = create_or_open(out, split, cfg.format, spec)
    done = store.done()
    todo = [s for s in range(len(shards)) if s not in done]
    if todo and bf16_emulated_here(cfg.precision, cluster):
        # Unlike the trainer's autocast, not a silent fallback to fp32: bf16 ids are what the
        # store's fingerprint says it holds, so the user's choice stands and is only flagged.
        click.echo(f"warning: tokenize.precision: bf16 has no native kernels on this CPU "
                   f"({torch.backends.cpu.get_cpu_capability()}), so it runs emulated, slower than fp32; "
                   "set tokenize.precision: fp32", err=True)
    start = time.perf_counter()
    if todo:
        with dask_client(cluster) as client:
            run_per_shard(
                client, _task, todo, cfg=cluster,
                images_per_shard={s: spec.counts[s] for s in todo}, desc=f"tokenize {split}",
                shard_dir=str(shard_dir), token_out=out, split=split, fmt=cfg.format, spec=spec,
                tokenizer_path=str(tokenizer_path), view_cfg=params.views, seed=params.seed,
                batch_size=cfg.batch_size, device=cluster.device, threads=cluster.threads_per_worker,
                precision=cfg.precision)
    seconds = time.perf_counter() - start
    write_index(Path(out) / f"{split}.index.parquet", spec, [keys_by_shard[s] for s in shards])
    images = sum(spec.counts[s] for s in todo)
    return {"split": split, "shards": len(shards), "skipped_done": len(done),
            "images": images, "views": cfg.views, "seconds": round(seconds, 2),
            "image_views_per_s": round(images * cfg.views / seconds, 1) if seconds > 0 else None,
            "store": str(store_path(out, split, cfg.format))}


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--split", "splits", multiple=True, help="Split(s) to tokenize [default: data.splits].")
@click.option("--tokenizer", "tokenizer_path", default=None,
              help="Folder with the tokenizer's safetensors + JSON config [default: outputs.tokenizer.dir].")
@click.option("--workers", type=int, help="Override tokenize.cluster.workers.")
@click.option("--scheduler", help="Override tokenize.cluster.scheduler (tcp://host:8786).")
@click.option("--replace-stale", is_flag=True,
              help="Rebuild a store made from other shards/tokenizer/views instead of failing.")
@click.option("--verify", is_flag=True, help="Check every image's sha256 against index.parquet first.")
@one_line_errors
def cli(params_path: str, splits: tuple[str, ...], tokenizer_path: Optional[str], workers: Optional[int],
        scheduler: Optional[str], replace_stale: bool, verify: bool) -> None:
    """Precompute visual tokens for every image view into <outputs.tokens>/<split>.zarr."""
    params = load_params(params_path)
    cluster = dataclasses.replace(params.tokenize.cluster, **{k: v for k, v in
                                  {"workers": workers, "scheduler": scheduler}.items() if v is not None})
    outputs = params.outputs
    if tokenizer_path is not None:
        outputs = dataclasses.replace(outputs, tokenizer=dataclasses.replace(outputs.tokenizer, dir=tokenizer_path))
    params = dataclasses.replace(params, outputs=outputs,
                                 tokenize=dataclasses.replace(params.tokenize, cluster=cluster))
    for split in splits or params.data.splits:
        summary = tokenize(params, split, replace_stale, verify)
        click.echo(" ".join(f"{k}={v}" for k, v in summary.items()))
