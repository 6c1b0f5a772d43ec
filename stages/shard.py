"""`beit shard`: image source -> WebDataset shards (+ index.parquet, stats, rejected list).

With no options it does what the DVC stage does, from params.yaml; options
override single params. See pipeline/shards.py for the output layout.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import click

from pipeline.shards import SplitSummary, shard_split
from pipeline.sources import make_source
from stages.config import Params, load_params
from stages.errors import one_line_errors


def shard(params: Params, splits: tuple[str, ...], progress: bool = True) -> list[SplitSummary]:
    """Shard every split in `splits` as `params` say; returns one summary per split."""
    data, out = params.data, params.outputs.shards
    source = make_source(data.source, data.root, tuple(data.splits) + splits)
    summaries = []
    for split in splits:
        summary = shard_split(source, split, out, params.shard, seed=params.seed, progress=progress)
        click.echo(format_summary(summary, out))
        summaries.append(summary)
    return summaries


def format_summary(s: SplitSummary, out: str) -> str:
    rate = s.written / s.seconds if s.seconds > 0 else 0.0
    lines = [
        f"{s.split}: {s.written}/{s.planned} images in {s.shards} shards ({s.shards_written} written now, "
        f"{s.shards - s.shards_written} already complete) -> {out}/{s.split}; "
        f"{s.image_bytes / 1e6:.1f} MB, {s.seconds:.1f} s" + (f", {rate:.0f} img/s" if s.shards_written == s.shards else "")
    ]
    if s.rejected:
        reasons = ", ".join(f"{reason}={n}" for reason, n in s.rejected.items())
        lines.append(f"  skipped {sum(s.rejected.values())}: {reasons} (see {out}/{s.split}/rejected.jsonl)")
    if s.ignored:
        lines.append(f"  ignored {s.ignored} files that are not images by extension or lie outside class folders")
    return "\n".join(lines)


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file to read")
@click.option("--source", default=None, help="fashion-mnist | imagefolder (data.source)")
@click.option("--root", default=None, help="source root; imagefolder: ROOT/<split>/<class>/<file> (data.root)")
@click.option("--split", "splits", multiple=True, help="split to shard; repeatable (default: data.splits)")
@click.option("--out", default=None, help="output folder; shards go to OUT/<split>/ (outputs.shards)")
@click.option("--shard-size", type=int, default=None, help="samples per tar (shard.shard_size)")
@click.option("--resize-short", type=int, default=None,
              help="shrink so the shorter side is <= N, never enlarge; 0 = no resize (shard.encode.resize_short)")
@click.option("--workers", type=int, default=None, help="worker processes, one shard each (shard.workers)")
@click.option("--strict/--no-strict", default=None, help="stop at the first bad input (shard.strict)")
@click.option("--verify/--no-verify", default=None, help="fully decode pass-through JPEGs (shard.encode.verify)")
@click.option("--seed", type=int, default=None, help="shuffle seed (seed)")
@click.option("--progress/--no-progress", default=True, help="show a progress bar")
@one_line_errors
def cli(
    params_path: str, source: Optional[str], root: Optional[str], splits: tuple[str, ...], out: Optional[str],
    shard_size: Optional[int], resize_short: Optional[int], workers: Optional[int], strict: Optional[bool],
    verify: Optional[bool], seed: Optional[int], progress: bool,
) -> None:
    """Write WebDataset shards of the image source (see params.yaml `data:` and `shard:`)."""
    params = load_params(params_path)
    data = override(params.data, source=source, root=root)
    if source is not None and root is None and source != params.data.source:
        data = dataclasses.replace(data, root=None)  # data.root belongs to the other source
    encode = override(params.shard.encode, verify=verify)
    if resize_short is not None:
        encode = dataclasses.replace(encode, resize_short=resize_short or None)
    settings = override(params.shard, shard_size=shard_size, workers=workers, strict=strict, encode=encode)
    params = dataclasses.replace(params, data=data, shard=settings, seed=params.seed if seed is None else seed,
                                 outputs=override(params.outputs, shards=out))
    shard(params, splits or tuple(params.data.splits), progress)


def override(cfg, **values):
    """`cfg` with the options the user gave (not None) replaced."""
    return dataclasses.replace(cfg, **{k: v for k, v in values.items() if v is not None})
