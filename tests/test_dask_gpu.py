"""GPU tokenize on Dask, checked on CPU: one pinned worker per GPU advertising GPU=1, and a
GPU task on a cluster without GPU workers failing in seconds with one line."""
import os
import time

import pytest

from pipeline.dask_runner import NoGpuWorkers, dask_client, gpu_ids, run_per_shard
from pipeline.schema import ClusterConfig

distributed = pytest.importorskip("dask.distributed")


def where_am_i(s: int) -> dict:
    return {"shard": s, "images": 1, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}


@pytest.mark.parametrize("resources", [{"CPU_SLOT": 1}, None])
def test_gpu_task_on_a_cluster_without_gpu_workers_fails_fast(resources):
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None,
                                  resources=resources) as cluster:
        cfg = ClusterConfig(scheduler=cluster.scheduler_address, device="cuda")
        start = time.monotonic()
        with dask_client(cfg) as client:
            with pytest.raises(NoGpuWorkers) as err:
                run_per_shard(client, where_am_i, [0, 1], cfg=cfg, images_per_shard={0: 1, 1: 1})
        assert time.monotonic() - start < 30
    line = str(err.value)
    assert "\n" not in line and "tokenize.cluster.device" in line and "--resources GPU=1" in line


def test_local_gpu_cluster_pins_one_worker_per_gpu(monkeypatch):
    # no dask-cuda here: the fallback SpecCluster; the pinning is what a GPU box would see
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = ClusterConfig(workers=2, device="cuda", retries=0)
    with dask_client(cfg) as client:
        info = client.scheduler_info(n_workers=-1)["workers"].values()
        assert sorted(w["resources"].get("GPU") for w in info) == [1, 1]
        pinned = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))  # {worker address: value}
        assert sorted(pinned.values()) == ["0", "1"]
        out = run_per_shard(client, where_am_i, [0, 1, 2, 3], cfg=cfg, images_per_shard=dict.fromkeys(range(4), 1))
    assert sorted(r["shard"] for r in out) == [0, 1, 2, 3]
    assert {r["gpu"] for r in out} <= {"0", "1"}


def test_gpu_ids_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpu_ids(2) == ["3", "5"]
    with pytest.raises(NoGpuWorkers, match="tokenize.cluster.workers=3"):
        gpu_ids(3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert gpu_ids(2) == ["0", "1"]
