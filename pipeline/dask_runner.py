"""Run one task per data shard on Dask: a LocalCluster by default, an existing
scheduler by address, GPU workers by resource.

Tasks write their own outputs (whole chunks nobody else touches) and return a
small stats dict; the driver only tracks progress. `retries` re-runs a task
whose worker died, which is safe because a task's writes are idempotent.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

from pipeline.schema import ClusterConfig


class ShardTasksFailed(RuntimeError):
    """Some shard tasks failed after their retries; the message carries the first error's."""


@contextlib.contextmanager
def dask_client(cfg: ClusterConfig) -> Iterator[Any]:
    """A Dask client, or None for in-process execution (workers=0: debugging, tests)."""
    if cfg.workers == 0 and not cfg.scheduler:
        yield None
        return
    from dask.distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:  # closes the client, then the cluster we started (if any)
        if cfg.scheduler:
            yield stack.enter_context(Client(cfg.scheduler, timeout="30s"))
            return
        if cfg.device == "cuda":
            cluster = stack.enter_context(gpu_cluster(cfg))
        else:
            import dask

            # Dask's default MALLOC_TRIM_THRESHOLD_=65536 makes glibc hand the tokenizer's large
            # activations back to the OS after every forward and fault them in again (measured:
            # ~2x slower encode on CPU). Keeping them mapped is the right trade for a compute worker.
            environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}),
                       "MALLOC_TRIM_THRESHOLD_": 1 << 30, "MALLOC_MMAP_THRESHOLD_": 1 << 30}
            with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
                cluster = stack.enter_context(LocalCluster(
                    n_workers=cfg.workers, threads_per_worker=cfg.threads_per_worker, processes=True,
                    dashboard_address=None, silence_logs=40,
                ))
        yield stack.enter_context(Client(cluster))


class NoGpuWorkers(ValueError):
    """tokenize.cluster.device is cuda but no worker of the cluster advertises a GPU."""


def gpu_ids(workers: int) -> list[str]:
    """The GPUs of this host to put one worker each on: the first `workers` of
    CUDA_VISIBLE_DEVICES when it is set, else 0..workers-1."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if visible and workers > len(visible):
        raise NoGpuWorkers(f"tokenize.cluster.workers={workers} but CUDA_VISIBLE_DEVICES lists {len(visible)} "
                           "GPU(s); set workers to at most that (one worker per GPU)")
    return visible[:workers] if visible else [str(i) for i in range(workers)]


def gpu_cluster(cfg: ClusterConfig) -> Any:
    """One Dask worker per GPU, each advertising resources={"GPU": 1}: dask-cuda's
    LocalCUDACluster where it is installed (`pip install .[gpu]`; it also sets up each
    worker's CUDA context and memory), else worker processes pinned by CUDA_VISIBLE_DEVICES."""
    ids = gpu_ids(cfg.workers)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        LocalCUDACluster = None
    if LocalCUDACluster is not None:
        return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(ids), threads_per_worker=cfg.threads_per_worker,
                                resources={"GPU": 1}, dashboard_address=None, silence_logs=40)
    from dask.distributed import Nanny, Scheduler, SpecCluster

    # LocalCluster gives every worker the same environment; a SpecCluster is LocalCluster
    # with one spec per worker, so each gets its own CUDA_VISIBLE_DEVICES (seen as cuda:0).
    workers = {
        i: {"cls": Nanny, "options": {
            "nthreads": cfg.threads_per_worker, "resources": {"GPU": 1}, "name": i, "silence_logs": 40,
            "env": {"CUDA_VISIBLE_DEVICES": gpu, "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}}}
        for i, gpu in enumerate(ids)
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    return SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)


def require_gpu_workers(client: Any, wait_s: float = 5.0) -> int:
    """The number of workers advertising a GPU resource; NoGpuWorkers after `wait_s` seconds
    without one (workers still joining get that long), rather than tasks queued forever."""
    deadline = time.monotonic() + wait_s
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        gpus = sum(1 for w in workers if w.get("resources", {}).get("GPU", 0) >= 1)
        if gpus or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    if not gpus:
        where = getattr(client, "scheduler", None)
        where = getattr(where, "address", None) or "the cluster"
        raise NoGpuWorkers(f"tokenize.cluster.device=cuda but none of the {len(workers)} worker(s) at {where} "
                           "advertises a GPU resource: start them with `dask worker ADDRESS --resources GPU=1` "
                           "(one per GPU, CUDA_VISIBLE_DEVICES pinned) or set tokenize.cluster.device: cpu")
    return gpus


def worker_device(requested: str) -> str:
    """The device this task should use: with several GPUs on one host, spread
    LocalCluster workers (named 0..n-1) over them."""
    if requested != "cuda":
        return "cpu"
    import torch

    try:
        from dask.distributed import get_worker

        name = get_worker().name
        index = int(name) if isinstance(name, int) or str(name).isdigit() else 0
    except (ValueError, ImportError):
        index = 0
    return f"cuda:{index % max(1, torch.cuda.device_count())}"


def run_per_shard(
    client: Any,
    task: Callable[..., dict],
    shard_ids: Iterable[int],
    *,
    cfg: ClusterConfig,
    images_per_shard: dict[int, int],
    desc: str = "shards",
    **task_kwargs: Any,
) -> list[dict]:
    """Submit `task(shard_id, **task_kwargs)` for every shard; show images/s and ETA.

    Returns the tasks' stats dicts in completion order. A task that fails after
    its retries raises here, after the others have finished (so their work is kept).
    """
    ids = list(shard_ids)
    if not ids:
        return []
    total = sum(images_per_shard[s] for s in ids)
    if client is None:  # in-process, in order
        results = []
        with tqdm(total=total, unit="img", desc=desc, smoothing=0.1) as bar:
            for s in ids:
                results.append(task(s, **task_kwargs))
                bar.update(results[-1].get("images", 0))
        return results
    from dask.distributed import as_completed

    resources = {"GPU": 1} if cfg.device == "cuda" else None
    if resources:
        require_gpu_workers(client)
    futures = [
        client.submit(task, s, pure=False, retries=cfg.retries, resources=resources,
                      key=f"{desc}-{s}-{time.time_ns()}", **task_kwargs)
        for s in ids
    ]
    results, failures = [], []
    with tqdm(total=total, unit="img", desc=desc, smoothing=0.1) as bar:
        for fut in as_completed(futures):
            try:
                stats = fut.result()
            except Exception as err:  # keep going: finished shards stay finished
                failures.append(err)
                continue
            results.append(stats)
            bar.update(stats.get("images", 0))
    if failures:
        raise ShardTasksFailed(f"{len(failures)} shard task(s) failed; first: {failures[0]}") from failures[0]
    return results
