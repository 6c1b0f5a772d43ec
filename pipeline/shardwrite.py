"""Writing shards: one shard's tar + sidecar (`write_shard`), published in the background,
and the process pool that writes a split's missing shards (`write_shards`).

The output layout and the plan are pipeline/shards.py's; this module turns one planned
`ShardTask` into OUT/<split>/<name>.tar, written as <name>.tar.tmp, fsync'ed and renamed,
then <name>.stats.json (the completion mark), so a kill (even -9) leaves nothing that
looks complete.

A failure (disk full, an I/O error, --strict) removes the failing shard's temp files and
never leaves its .tar or .stats.json: every shard published before it is kept, and the
OSError names the file (`name_errors`), so the one-line message says where it happened.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import gc
import hashlib
import json
import multiprocessing as mp
import os
import queue as queue_mod
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator, Optional

from pipeline.prepare import Rejected, prepare
from pipeline.schema import EncodeConfig, ShardConfig
from pipeline.sources import Entry, Source
from pipeline.tarwriter import TarWriter

FORMAT = 1  # bump when the same inputs + settings would give different stored bytes
PROGRESS_EVERY = 64  # samples between progress messages from a worker
# json.dumps(obj, sort_keys=True) / (separators=...) builds a new encoder per call: same bytes, 2x the time.
_meta_json = json.JSONEncoder(sort_keys=True).encode
_stats_json = json.JSONEncoder(separators=(",", ":")).encode


class StrictFailure(RuntimeError):
    """--strict: the first rejected input stops the run."""


class Interrupted(RuntimeError):
    """Another worker failed under --strict; this shard was abandoned."""


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


# ---------------------------------------------------------------------------
# writing one shard (runs in a worker process, or in-process with workers=1)


@contextlib.contextmanager
def name_errors(path: Path) -> Iterator[None]:
    """An OSError raised inside without a file name (a write to an open descriptor, pyarrow's)
    gets `path`: the one-line error (stages/errors.py) then says which output failed."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise


def _publish(f, tmp: Path, tar: Path, sidecar_tmp: Path, sidecar: Path) -> None:
    """Make a fully written shard durable and visible: fsync, rename, then the sidecar (already
    written to `sidecar_tmp`, so completing a shard needs no disk space: a disk filled by the
    next shard cannot take this one with it). On a failure neither name is left behind."""
    published = False
    try:
        with name_errors(tar):
            try:
                os.fsync(f.fileno())  # the rename below must not publish a tar whose data is still in flight
            finally:
                f.close()
            os.replace(tmp, tar)
            published = True
            # Not fsync'ed: a sidecar lost or torn by a power cut fails its check and the shard is redone.
            os.replace(sidecar_tmp, sidecar)
    except BaseException:
        _remove(tmp, sidecar_tmp, *((tar,) if published else ()))
        raise


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink(missing_ok=True)


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

    def close_quietly(self) -> None:
        """`close` while another error is on its way: the shard in flight still completes
        if it can, and that first error is the one reported."""
        with contextlib.suppress(Exception):
            self.close()

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
    encode: EncodeConfig,
    strict: bool = False,
    progress: Optional[Callable[[int], None]] = None,
    stop: Optional[Callable[[], bool]] = None,
    publisher: Optional[Publisher] = None,
) -> dict:
    """Write OUT/<task.tar> and then its sidecar; returns the sidecar dict.
    With a `publisher`, the fsync + rename + sidecar happen on its thread: the shard
    is complete once `publisher.wait()` (or its next `submit`) returns. On any error
    the shard's temp files are removed and neither of its names exists."""
    if stop is not None and stop():
        raise Interrupted(task.name)
    # Both are stale (the shard is incomplete until rewritten); removing the old tar also frees its space.
    _remove(out / task.sidecar, out / task.tar)
    tmp, sidecar_tmp = out / f"{task.tar}.tmp", out / f"{task.sidecar}.tmp"
    samples, rejected = [], []
    image_bytes = reencoded = pending = 0
    f = open(tmp, "wb", buffering=0)  # TarWriter writes one writev() per sample; closed by _publish
    try:
        tar = TarWriter(f, str(out / task.tar))
        for entry in task.entries:
            if stop is not None and stop():
                raise Interrupted(task.name)
            try:
                try:
                    raw = source.read(entry)
                except OSError as err:
                    raise Rejected("unreadable", f"{type(err).__name__}: {err.strerror or err}") from None
                # A source with its own `prepare` (segmentation: image + label map) returns the
                # stored image and the extra tar members that go with it.
                if hasattr(source, "prepare"):
                    img, extra = source.prepare(raw, encode)
                else:
                    img, extra = prepare(
                        raw, resize_short=encode.resize_short, max_pixels=encode.max_pixels,
                        jpeg_quality=encode.jpeg_quality, verify=encode.verify,
                        restart_markers=encode.restart_markers,
                    ), ()
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
                    *((f"{entry.key}.{ext}", data) for ext, data in extra),
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
        stats = {
            "shard": task.tar, "fingerprint": task.fingerprint, "format": FORMAT,
            "planned": len(task.entries), "written": len(samples), "tar_bytes": tar_bytes,
            "image_bytes": image_bytes, "reencoded": reencoded,
            "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
            "rejected": rejected, "samples": samples,
        }
        with name_errors(out / task.sidecar), open(sidecar_tmp, "wb") as side:
            side.write(_stats_json(stats).encode())
        if publisher is not None:
            publisher.wait()  # the previous shard: its fsync ran while this one was written
    except BaseException:
        f.close()
        _remove(tmp, sidecar_tmp)
        raise
    args = (f, tmp, out / task.tar, sidecar_tmp, out / task.sidecar)
    if publisher is None:
        _publish(*args)
    else:
        publisher.submit(*args)
    if progress is not None and pending:
        progress(pending)
    return stats


# ---------------------------------------------------------------------------
# the shards of a split: in-process or on a worker pool

_queue = None
_stop = None
_publisher: Optional[Publisher] = None


def write_shards(tasks: list[ShardTask], source: Source, out: Path, cfg: ShardConfig, bar) -> dict[str, dict]:
    """Write every task's shard, `cfg.workers` at a time; `bar.update(n)` counts samples.
    Returns the sidecar dicts of the shards written in-process (with one worker or one
    task); those of pool workers are on disk once this returns."""
    if cfg.workers == 1 or len(tasks) == 1:
        done = {}
        publisher = Publisher()
        try:
            for t in tasks:
                done[t.name] = write_shard(t, source, out, cfg.encode, cfg.strict, progress=bar.update,
                                           publisher=publisher)
        except BaseException:
            publisher.close_quietly()  # on an error, the shard in flight still completes
            raise
        publisher.close()  # the last shard
        return done
    _run_pool(tasks, source, out, cfg.encode, cfg.strict, min(cfg.workers, len(tasks)), bar)
    return {}


def _init_worker(q, stop) -> None:
    global _queue, _stop, _publisher
    _queue, _stop = q, stop
    # One process per core: torch (imported only if resizing) must not fan out too.
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # inherited from the parent through fork
        sys.modules["torch"].set_num_threads(1)  # also keeps a forked child out of OpenMP regions
    # This worker's last shard is published (fsync, rename, sidecar) when the pool shuts
    # the worker down; a failure there goes to the parent through the progress queue.
    _publisher = Publisher()
    mp.util.Finalize(None, _close_worker_publisher, exitpriority=10)


def _close_worker_publisher() -> None:
    try:
        _publisher.close()
    except Exception as err:  # noqa: BLE001 - handed to the parent, which raises it
        _queue.put(err)


def _pool_task(task: ShardTask, source: Source, out: Path, encode: EncodeConfig, strict: bool) -> dict:
    return write_shard(task, source, out, encode, strict, progress=_queue.put, stop=_stop.is_set, publisher=_publisher)


def _mp_context(encode: EncodeConfig):
    """fork where it is safe (Linux): a worker starts in ~10 ms with every module already
    imported, where spawn re-imports numpy/pyarrow/PIL (~0.5 s) -- and torch (~3 s) when
    resizing -- in every worker, which ate the gain of a second worker on short runs.
    The fork hazard of torch (a child entering an OpenMP region the parent had started) is
    avoided as torch's own DataLoader does: a worker sets torch to one thread before any op
    (_init_worker), so it never enters one. The shard stage's parent itself only imports torch.
    Elsewhere (macOS: fork is unsafe with system frameworks; Windows: none) spawn."""
    if sys.platform != "linux" or "fork" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    if encode.resize_short:
        import torch  # noqa: F401 - once here, shared by every forked worker (~3 s each otherwise)
    return mp.get_context("fork")


def _run_pool(tasks, source, out, encode, strict, workers, bar) -> None:
    ctx = _mp_context(encode)
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
    errors: list[BaseException] = []
    with pool:
        futures = [pool.submit(_pool_task, t, source, out, encode, strict) for t in tasks]
        pending = set(futures)
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=0.1, return_when=cf.FIRST_COMPLETED)
                _drain(q, bar, errors)
                for fut in done:
                    fut.result()  # re-raises StrictFailure / worker errors
        except BaseException:
            stop.set()  # running shards stop at their next sample and remove their temp files
            for fut in pending:
                fut.cancel()
            raise
        finally:
            _drain(q, bar, errors)
    _drain(q, bar, errors)  # the workers have exited: their last shards are published, or failed
    if errors:
        raise errors[0]


def _drain(q, bar, errors: list) -> None:
    while True:
        try:
            item = q.get_nowait()
        except queue_mod.Empty:
            return
        if isinstance(item, BaseException):
            errors.append(item)
        else:
            bar.update(item)
