"""Cut a source split into WebDataset shards: plan, resume, index (the writing of a
shard and the worker pool are pipeline/shardwrite.py's; reading is pipeline/shardread.py's).

Layout of OUT/<split>/ (all names relative to it):

  <split>-NNNNNN.tar         WebDataset shard; per sample, in this order:
                               KEY.cls   class index, ASCII decimal
                               KEY.jpg | KEY.png   image bytes (real format; decode_rgb -> RGB)
                               KEY.json  {"key", "source", "label", "class", "orig_width",
                                          "orig_height", "width", "height", "orientation", "reencoded"}
  <split>-NNNNNN.stats.json  written last: marks the shard complete; holds the plan
                             fingerprint, counts, the rejected files and one row per sample
  index.parquet              one row per stored sample, shard order then tar order
                             (shardread.INDEX_SCHEMA): key, shard (tar file name), position,
                             label, width, height, bytes, sha256 (of the stored image bytes),
                             ext, source
  rejected.jsonl             one line per skipped input: shard, key, source, reason, detail;
                             first those the listing found (shard null: a dangling link, an
                             unreadable folder), then those of each shard in shard order
  classes.json               ["name of class 0", ...]

The plan (which entries go to which shard, in which order) is a pure function
of the listing, the seed and shard_size: entries are ordered by
sha256(seed, key) -- a shuffle across classes that no library version can
change -- and cut into runs of `shard_size`. Each shard's fingerprint covers
its entries (key, path, label, file size) and every setting that changes the
stored bytes, so on a rerun a shard whose sidecar carries the same fingerprint
(and whose tar has the recorded size) is kept untouched, a stale one is
rewritten, and tars not in the plan are deleted. Tars and sidecars are written
as *.tmp and renamed, so a kill (even -9) leaves nothing that looks complete.
Inputs the listing could not read (`Listing.skipped`) are not in the plan: they
are reported, and the shards of the others are what they would be without them.

A failure (disk full included) keeps every shard completed before it and leaves
no index.parquet, which is written last; the rerun writes only the missing shards
and ends byte-identical to an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_file, atomic_write
from pipeline.schema import EncodeConfig, ShardConfig
from pipeline.shardread import INDEX_NAME, INDEX_SCHEMA
from pipeline.shardwrite import FORMAT, ShardTask, StrictFailure, name_errors, write_shards
from pipeline.sources import Entry, Listing, Skipped, Source


class ShardError(ValueError):
    """A bad setting or state; one line naming what to fix."""


@dataclasses.dataclass
class SplitSummary:
    split: str
    shards: int
    shards_written: int  # this run; the others were already complete
    planned: int  # inputs: those in the plan + those the listing could not read
    written: int
    rejected: dict[str, int]  # reason -> count
    image_bytes: int
    seconds: float
    ignored: int  # files skipped by extension / place when listing


# ---------------------------------------------------------------------------
# plan


def shuffle(entries: list[Entry], seed: int) -> list[Entry]:
    """A seeded shuffle that depends only on (seed, key), not on library versions."""
    prefix = f"{seed}\0".encode()
    return sorted(entries, key=lambda e: hashlib.sha256(prefix + e.key.encode()).digest())


# Entry -> (key, path, label, size), as dataclasses.astuple gives it but ~20x faster (no deep copies):
# on 1.28M ImageNet entries astuple alone took ~35 s of the plan.
_entry_row = operator.attrgetter(*(f.name for f in dataclasses.fields(Entry)))


def plan(split: str, listing: Listing, seed: int, shard_size: int, encode: EncodeConfig, source: str) -> list[ShardTask]:
    order = shuffle(listing.entries, seed)
    common = {"format": FORMAT, "source": source, "settings": encode.fingerprint(), "classes": listing.classes}
    tasks = []
    for i, start in enumerate(range(0, len(order), shard_size)):
        chunk = tuple(order[start : start + shard_size])
        name = f"{split}-{i:06d}"
        blob = json.dumps({**common, "name": name, "entries": [_entry_row(e) for e in chunk]})
        tasks.append(ShardTask(name, chunk, listing.classes, hashlib.sha256(blob.encode()).hexdigest()))
    return tasks


def _read_sidecar(out: Path, task: ShardTask) -> Optional[dict]:
    try:
        stats = json.loads((out / task.sidecar).read_text())
        if stats.get("fingerprint") == task.fingerprint and (out / task.tar).stat().st_size == stats["tar_bytes"]:
            return stats
    except (OSError, ValueError, KeyError):
        pass
    return None


def list_shards(out_dir: str | Path) -> list[Path]:
    """The complete shards of a written split (OUT/<split>), in order."""
    out_dir = Path(out_dir)
    return sorted(p.with_name(p.name[: -len(".stats.json")] + ".tar") for p in out_dir.glob("*.stats.json"))


# ---------------------------------------------------------------------------
# a whole split


def shard_split(source: Source, split: str, out_root: str | Path, cfg: ShardConfig, seed: int,
                progress: bool = True) -> SplitSummary:
    """Write (or finish) OUT/<split>/ for `split` of `source`; see the module docstring."""
    start = time.perf_counter()
    listing = source.list(split)
    if cfg.strict and listing.skipped:
        r = listing.skipped[0]
        raise StrictFailure(f"{r.path}: {r.reason} ({r.detail}); rerun without --strict to skip it")
    tasks = plan(split, listing, seed, cfg.shard_size, cfg.encode, source.name)
    out = Path(out_root) / split
    out.mkdir(parents=True, exist_ok=True)
    _clean(out, split, tasks)
    with name_errors(out / "classes.json"):
        atomic_write(out / "classes.json", json.dumps(list(listing.classes), indent=1), durable=False)

    done = {t.name: s for t in tasks if (s := _read_sidecar(out, t)) is not None}
    todo = [t for t in tasks if t.name not in done]
    if cfg.strict:  # complete shards from an earlier non-strict run may hold rejects
        for s in done.values():
            if s["rejected"]:
                r = s["rejected"][0]
                raise StrictFailure(f"{r['source']}: {r['reason']} ({r['detail']}); rerun without --strict to skip it")
    if todo:
        (out / INDEX_NAME).unlink(missing_ok=True)  # incomplete output must not look complete
        from tqdm import tqdm

        total = sum(len(t.entries) for t in todo)
        with tqdm(total=total, unit="img", desc=f"shard {split}", disable=not progress, smoothing=0.1) as bar:
            done.update(write_shards(todo, source, out, cfg, bar))
        for t in todo:
            if t.name not in done:
                done[t.name] = _read_sidecar(out, t)
    stats = [done[t.name] for t in tasks]
    missing = [t.tar for t, s in zip(tasks, stats) if s is None]
    if missing:  # pragma: no cover - a worker died before it could publish its last shard
        raise ShardError(f"{out}: {len(missing)} shards did not complete ({missing[0]}, ...); rerun `beit shard`")
    rows = [*map(_skipped_row, listing.skipped), *(r for s in stats for r in s["rejected"])]
    with name_errors(out / "rejected.jsonl"):
        atomic_write(out / "rejected.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    with name_errors(out / INDEX_NAME):
        _write_index(out, stats)  # last: its presence says the split is complete
    rejected = Counter(r.reason for r in listing.skipped)
    for s in stats:
        rejected.update(s["rejected_by_reason"])
    return SplitSummary(
        split, len(tasks), len(todo), len(listing.skipped) + sum(s["planned"] for s in stats),
        sum(s["written"] for s in stats), dict(sorted(rejected.items())), sum(s["image_bytes"] for s in stats),
        time.perf_counter() - start, listing.ignored,
    )


def _skipped_row(r: Skipped) -> dict:
    """rejected.jsonl's line for an input the listing could not read (not in any shard)."""
    return {"shard": None, "key": r.key, "source": r.path, "reason": r.reason, "detail": r.detail}


def _clean(out: Path, split: str, tasks: list[ShardTask]) -> None:
    """Remove leftovers of killed runs and shards that are not in the plan."""
    keep = {t.tar for t in tasks} | {t.sidecar for t in tasks}
    for p in out.iterdir():
        name = p.name
        if name.endswith(".tmp") or (
            name.startswith(f"{split}-") and (name.endswith(".tar") or name.endswith(".stats.json")) and name not in keep
        ):
            p.unlink()


def _write_index(out: Path, stats: list[dict]) -> None:
    rows = [s for st in stats for s in st["samples"]]
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA) if rows else INDEX_SCHEMA.empty_table()
    with atomic_file(out / INDEX_NAME) as tmp:
        pq.write_table(table, tmp)
