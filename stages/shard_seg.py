"""`beit shard-seg`: a segmentation source -> WebDataset shards of image + label map.

The shard machinery of `beit shard` (pipeline/shards.py: plan, resume, index, rejected.jsonl)
with a segmentation source (pipeline/segsource.py): the Fashion-MNIST scenes by default, or an
ADE20K-layout folder. Writes <outputs.seg_shards>/<split>/. Bad samples (no label map, a map
of another size, a class id out of range) are skipped and listed in rejected.jsonl.
"""
from __future__ import annotations

import dataclasses
import click

from pipeline.segsource import make_seg_source
from pipeline.shards import SplitSummary, shard_split
from pipeline.sources import SourceError
from stages.config import Params, load_params
from stages.errors import one_line_errors


def shard_seg(params: Params, splits: tuple[str, ...], progress: bool = True) -> list[SplitSummary]:
    """Shard every split in `splits` of `segment.data`; one summary per split."""
    data, out = params.segment.data, params.outputs.seg_shards
    unknown = [s for s in splits if s not in data.splits]
    if unknown:
        raise SourceError(f"--split {unknown[0]}: not in segment.data.splits ({', '.join(data.splits)})")
    source = make_seg_source(data)
    cfg = dataclasses.replace(params.shard, encode=data.encode)
    summaries = []
    for split in splits:
        # scene_seed, not seed: the shards are data, the same for every experiment seed
        s = shard_split(source, split, out, cfg, seed=data.scene_seed, progress=progress)
        rate = s.written / s.seconds if s.seconds > 0 else 0.0
        click.echo(f"{split}: {s.written}/{s.planned} scenes+maps in {s.shards} shards ({s.shards_written} written "
                   f"now) -> {out}/{split}; {s.image_bytes / 1e6:.1f} MB, {s.seconds:.1f} s, {rate:.0f} img/s")
        if s.rejected:
            reasons = ", ".join(f"{reason}={n}" for reason, n in s.rejected.items())
            click.echo(f"  skipped {sum(s.rejected.values())}: {reasons} (see {out}/{split}/rejected.jsonl)")
        summaries.append(s)
    return summaries


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True, help="params file to read")
@click.option("--split", "splits", multiple=True, help="split to shard; repeatable (default: segment.data.splits)")
@click.option("--progress/--no-progress", default=True, help="show a progress bar")
@one_line_errors
def cli(params_path: str, splits: tuple[str, ...], progress: bool) -> None:
    """Write WebDataset shards of image + label map (params.yaml `segment.data`)."""
    params = load_params(params_path)
    shard_seg(params, splits or tuple(params.segment.data.splits), progress)
