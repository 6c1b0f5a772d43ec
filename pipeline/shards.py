"""Cut a source split into WebDataset shards: plan, write, resume, index.

Layout of OUT/<split>/ (all names relative to it):

  <split>-NNNNNN.tar         WebDataset shard; per sample, in this order:
                               KEY.cls   class index, ASCII decimal
                               KEY.jpg | KEY.png   image bytes (real format; decode_rgb -> RGB)
                               KEY.json  {"key", "source", "label", "class", "orig_width",
                                          "orig_height", "width", "height", "orientation", "reencoded"}
  <split>-NNNNNN.stats.json  written last: marks the shard complete; holds the plan
                             fingerprint, counts, the rejected files and one row per sample
  index.parquet              one row per stored sample, shard order then tar order:
                             key, shard (tar file name), position, label, width, height,
                             bytes, sha256 (of the stored image bytes), ext, source
  rejected.jsonl             one line per skipped input: shard, key, source, reason, detail
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
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import gc
import hashlib
import json
import multiprocessing as mp
import operator
import os
import queue as queue_mod
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.images import Rejected, prepare
from pipeline.sources import Entry, Listing, Source
from pipeline.tarwriter import TarWriter

FORMAT = 1  # bump when the same inputs + settings would give different stored bytes
PROGRESS_EVERY = 64  # samples between progress messages from a worker
# json.dumps(obj, sort_keys=True) / (separators=...) builds a new encoder per call: same bytes, 2x the time.
_meta_json = json.JSONEncoder(sort_keys=True).encode
_stats_json = json.JSONEncoder(separators=(",", ":")).encode

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),  # tar file name, relative to OUT/<split>/
    ("position", pa.int32()),  # sample position in the tar, 0-based
    ("label", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("bytes", pa.int64()),  # size of the stored image
    ("sha256", pa.string()),  # of the stored image bytes
    ("ext", pa.string()),  # jpg | png
    ("source", pa.string()),  # path relative to the source root
])


class ShardError(ValueError):
    """A bad setting or state; one line naming what to fix."""


class StrictFailure(RuntimeError):
    """--strict: the first rejected input stops the run."""


class Interrupted(RuntimeError):
    """Another worker failed under --strict; this shard was abandoned."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything besides the entries that changes the stored bytes."""

    resize_short: Optional[int]
    max_pixels: int
    jpeg_quality: int
    verify: bool = False


@dataclasses.dataclass(frozen=True)
class ShardTask:
    name: str  # "<split>-NNNNNN"
    entries: tuple[Entry, ...]
    classes: tuple[str, ...]
    fingerprint: str

    @property
    def tar(self) -> str:
        return f"{self.name}.tar"

    @property
    def sidecar(self) -> str:
        return f"{self.name}.stats.json"


@dataclasses.dataclass
class SplitSummary:
    split: str
    shards: int
    shards_written: int  # this run; the others were already complete
    planned: int
    written: int
    rejected: dict[str, int]  # reason -> count
    image_bytes: int
    seconds: float
    ignored: int  # files skipped by extension / place when listing


# ---------------------------------------------------------------------------
# plan


def validate(shard_size: int, settings: Settings, workers: int) -> None:
    if shard_size < 1:
        raise ShardError(f"shard_size={shard_size}: must be >= 1 (samples per tar, e.g. 5000)")
    if settings.resize_short is not None and settings.resize_short < 1:
        raise ShardError(f"resize_short={settings.resize_short}: must be >= 1 (e.g. 256) or null for no resize")
    if settings.max_pixels < 1:
        raise ShardError(f"max_pixels={settings.max_pixels}: must be >= 1")
    if not 1 <= settings.jpeg_quality <= 100:
        raise ShardError(f"jpeg_quality={settings.jpeg_quality}: must be in 1..100 (e.g. 95)")
    if workers < 1:
        raise ShardError(f"workers={workers}: must be >= 1")


def shuffle(entries: list[Entry], seed: int) -> list[Entry]:
    """A seeded shuffle that depends only on (seed, key), not on library versions."""
    prefix = f"{seed}\0".encode()
    return sorted(entries, key=lambda e: hashlib.sha256(prefix + e.key.encode()).digest())


# Entry -> (key, path, label, size), as dataclasses.astuple gives it but ~20x faster (no deep copies):
# on 1.28M ImageNet entries astuple alone took ~35 s of the plan.
_entry_row = operator.attrgetter(*(f.name for f in dataclasses.fields(Entry)))


def plan(split: str, listing: Listing, seed: int, shard_size: int, settings: Settings, source: str) -> list[ShardTask]:
    order = shuffle(listing.entries, seed)
    common = {"format": FORMAT, "source": source, "settings": dataclasses.asdict(settings), "classes": listing.classes}
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
# writing one shard (runs in a worker process, or in-process with workers=1)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _publish(f, tmp: Path, tar: Path, sidecar: Path, stats: bytes) -> None:
    """Make a fully written shard durable and visible: fsync, rename, then the sidecar."""
    try:
        os.fsync(f.fileno())  # the rename below must not publish a tar whose data is still in flight
    finally:
        f.close()
    os.replace(tmp, tar)
    _write_atomic(sidecar, stats)


class Publisher:
    """Runs `_publish` of one shard on a helper thread while the caller writes the next one.

    fsync is waiting for the disk, not CPU (~8 ms per 12 MB here, ~0.6 ms of it CPU): done
    inline it cost ~20% of pass-through sharding. Shards are published one at a time, in order;
    `submit` and `wait` first finish the previous one and re-raise its error, so at most one
    shard is in flight and a failure surfaces at the next shard. A shard counts as complete only
    once its sidecar exists, so a kill while one is in flight just rewrites it on the next run."""

    def __init__(self) -> None:
        self._pool: Optional[cf.ThreadPoolExecutor] = None
        self._last: Optional[cf.Future] = None

    def submit(self, *args) -> None:
        self.wait()  # normally already waited for by write_shard
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="shard-publish")
        self._last = self._pool.submit(_publish, *args)

    def wait(self) -> None:
        last, self._last = self._last, None
        if last is not None:
            last.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None


def write_shard(
    task: ShardTask,
    source: Source,
    out: Path,
    settings: Settings,
    strict: bool = False,
    progress: Optional[Callable[[int], None]] = None,
    stop: Optional[Callable[[], bool]] = None,
    publisher: Optional[Publisher] = None,
) -> dict:
    """Write OUT/<task.tar> and then its sidecar; returns the sidecar dict.
    With a `publisher`, the fsync + rename + sidecar happen on its thread: the shard
    is complete once `publisher.wait()` (or its next `submit`) returns."""
    (out / task.sidecar).unlink(missing_ok=True)  # it is stale: the shard is incomplete until rewritten
    tmp = out / f"{task.tar}.tmp"
    samples, rejected = [], []
    image_bytes = reencoded = pending = 0
    f = open(tmp, "wb", buffering=0)  # TarWriter writes one writev() per sample; closed by _publish
    try:
        tar = TarWriter(f)
        for entry in task.entries:
            if stop is not None and stop():
                raise Interrupted(task.name)
            try:
                try:
                    raw = source.read(entry)
                except OSError as err:
                    raise Rejected("unreadable", f"{type(err).__name__}: {err.strerror or err}") from None
                img = prepare(
                    raw, resize_short=settings.resize_short, max_pixels=settings.max_pixels,
                    jpeg_quality=settings.jpeg_quality, verify=settings.verify,
                )
            except Rejected as rej:
                if strict:
                    raise StrictFailure(f"{entry.path}: {rej.reason} ({rej.detail}); rerun without --strict to skip it") from None
                rejected.append({"shard": task.tar, "key": entry.key, "source": entry.path,
                                 "reason": rej.reason, "detail": rej.detail})
            else:
                meta = {
                    "key": entry.key, "source": entry.path, "label": entry.label,
                    "class": task.classes[entry.label] if entry.label < len(task.classes) else None,
                    "orig_width": img.orig_width, "orig_height": img.orig_height,
                    "width": img.width, "height": img.height,
                    "orientation": img.orientation, "reencoded": img.reencoded,
                }
                tar.add_many((
                    (f"{entry.key}.cls", str(entry.label).encode()),
                    (f"{entry.key}.{img.ext}", img.data),
                    (f"{entry.key}.json", _meta_json(meta).encode()),
                ))
                samples.append({
                    "key": entry.key, "shard": task.tar, "position": len(samples), "label": entry.label,
                    "width": img.width, "height": img.height, "bytes": len(img.data),
                    "sha256": hashlib.sha256(img.data).hexdigest(), "ext": img.ext, "source": entry.path,
                })
                image_bytes += len(img.data)
                reencoded += img.reencoded
            pending += 1
            if progress is not None and pending >= PROGRESS_EVERY:
                progress(pending)
                pending = 0
        tar_bytes = tar.close()
    except BaseException:
        f.close()
        raise
    stats = {
        "shard": task.tar, "fingerprint": task.fingerprint, "format": FORMAT,
        "planned": len(task.entries), "written": len(samples), "tar_bytes": tar_bytes,
        "image_bytes": image_bytes, "reencoded": reencoded,
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "rejected": rejected, "samples": samples,
    }
    args = (f, tmp, out / task.tar, out / task.sidecar, _stats_json(stats).encode())
    if publisher is None:
        _publish(*args)
    else:
        try:
            publisher.wait()  # the previous shard: its fsync ran while this one was written
        except BaseException:
            f.close()
            raise
        publisher.submit(*args)
    if progress is not None and pending:
        progress(pending)
    return stats


# ---------------------------------------------------------------------------
# worker pool

_queue = None
_stop = None
_publisher: Optional[Publisher] = None


def _init_worker(q, stop) -> None:
    global _queue, _stop, _publisher
    _queue, _stop = q, stop
    # One process per core: torch (imported only if resizing) must not fan out too.
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # inherited from the parent through fork
        sys.modules["torch"].set_num_threads(1)  # also keeps a forked child out of OpenMP regions
    # This worker's last shard is published (fsync, rename, sidecar) when the pool shuts
    # the worker down; shard_split then checks that every sidecar exists.
    _publisher = Publisher()
    mp.util.Finalize(None, _publisher.close, exitpriority=10)


def _pool_task(task: ShardTask, source: Source, out: Path, settings: Settings, strict: bool) -> dict:
    return write_shard(task, source, out, settings, strict, progress=_queue.put, stop=_stop.is_set, publisher=_publisher)


def _mp_context(settings: Settings):
    """fork where it is safe (Linux): a worker starts in ~10 ms with every module already
    imported, where spawn re-imports numpy/pyarrow/PIL (~0.5 s) -- and torch (~3 s) when
    resizing -- in every worker, which ate the gain of a second worker on short runs.
    The fork hazard of torch (a child entering an OpenMP region the parent had started) is
    avoided as torch's own DataLoader does: a worker sets torch to one thread before any op
    (_init_worker), so it never enters one. The shard stage's parent itself only imports torch.
    Elsewhere (macOS: fork is unsafe with system frameworks; Windows: none) spawn."""
    if sys.platform != "linux" or "fork" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    if settings.resize_short:
        import torch  # noqa: F401 - once here, shared by every forked worker (~3 s each otherwise)
    return mp.get_context("fork")


def _run_pool(tasks, source, out, settings, strict, workers, bar) -> None:
    ctx = _mp_context(settings)
    q, stop = ctx.Queue(), ctx.Event()
    # A forked worker's garbage collector would touch every object inherited from the parent
    # (torch's modules included) and copy their pages; frozen objects are never scanned.
    gc.freeze()
    try:
        pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(q, stop))
        try:
            pool.submit(int)  # forks every worker now, while the parent's objects are frozen
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    finally:
        gc.unfreeze()
    with pool:
        futures = [pool.submit(_pool_task, t, source, out, settings, strict) for t in tasks]
        pending = set(futures)
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=0.1, return_when=cf.FIRST_COMPLETED)
                _drain(q, bar)
                for fut in done:
                    fut.result()  # re-raises StrictFailure / worker errors
        except BaseException:
            stop.set()  # running shards stop at their next sample, leaving only *.tmp files
            for fut in pending:
                fut.cancel()
            raise
        finally:
            _drain(q, bar)


def _drain(q, bar) -> None:
    while True:
        try:
            bar.update(q.get_nowait())
        except queue_mod.Empty:
            return


# ---------------------------------------------------------------------------
# a whole split


def shard_split(
    source: Source,
    split: str,
    out_root: str | Path,
    *,
    seed: int,
    shard_size: int,
    settings: Settings,
    workers: int = 1,
    strict: bool = False,
    progress: bool = True,
) -> SplitSummary:
    """Write (or finish) OUT/<split>/ for `split` of `source`; see the module docstring."""
    validate(shard_size, settings, workers)
    start = time.perf_counter()
    listing = source.list(split)
    tasks = plan(split, listing, seed, shard_size, settings, source.name)
    out = Path(out_root) / split
    out.mkdir(parents=True, exist_ok=True)
    _clean(out, split, tasks)
    _write_atomic(out / "classes.json", json.dumps(list(listing.classes), indent=1).encode())

    done = {t.name: s for t in tasks if (s := _read_sidecar(out, t)) is not None}
    todo = [t for t in tasks if t.name not in done]
    if strict:  # complete shards from an earlier non-strict run may hold rejects
        for s in done.values():
            if s["rejected"]:
                r = s["rejected"][0]
                raise StrictFailure(f"{r['source']}: {r['reason']} ({r['detail']}); rerun without --strict to skip it")
    if todo:
        (out / "index.parquet").unlink(missing_ok=True)  # incomplete output must not look complete
        from tqdm import tqdm

        total = sum(len(t.entries) for t in todo)
        with tqdm(total=total, unit="img", desc=f"shard {split}", disable=not progress, smoothing=0.1) as bar:
            if workers == 1 or len(todo) == 1:
                publisher = Publisher()
                try:
                    for t in todo:
                        done[t.name] = write_shard(t, source, out, settings, strict, progress=bar.update,
                                                   publisher=publisher)
                finally:
                    publisher.close()  # the last shard; on an error, the finished ones still complete
            else:
                _run_pool(todo, source, out, settings, strict, min(workers, len(todo)), bar)
        for t in todo:
            if t.name not in done:
                done[t.name] = _read_sidecar(out, t)
    stats = [done[t.name] for t in tasks]
    missing = [t.tar for t, s in zip(tasks, stats) if s is None]
    if missing:  # pragma: no cover - a worker could not publish its last shard (its traceback is above)
        raise ShardError(f"{out}: {len(missing)} shards did not complete ({missing[0]}, ...); rerun `beit shard`")
    _write_index(out, stats)
    _write_atomic(out / "rejected.jsonl", b"".join(json.dumps(r).encode() + b"\n" for s in stats for r in s["rejected"]))
    rejected = Counter()
    for s in stats:
        rejected.update(s["rejected_by_reason"])
    return SplitSummary(
        split, len(tasks), len(todo), sum(s["planned"] for s in stats), sum(s["written"] for s in stats),
        dict(sorted(rejected.items())), sum(s["image_bytes"] for s in stats), time.perf_counter() - start,
        listing.ignored,
    )


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
    tmp = out / "index.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "index.parquet")
