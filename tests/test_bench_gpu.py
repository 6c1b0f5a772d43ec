"""bench/gpu.py --smoke: the GPU bench's code at toy sizes on CPU, so it cannot rot before a GPU run."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_runs_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu-smoke.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["smoke"] and r["device"] == "cpu-smoke"
    for k in ("offline", "online"):
        assert r["steps"][k]["img_per_s"] > 0 and r["steps"][k]["mfu"] is None  # no CPU peak without --peak-tflops
    assert r["offline_speedup"] == r["steps"]["offline"]["img_per_s"] / r["steps"]["online"]["img_per_s"]
    assert r["steps"]["vit_train_gflops_per_img"] > 0
    assert {"encoder", "stage_inprocess", "stage_dask_1worker"} <= set(r["tokenize"])
    assert r["loader"]["images"] > 0 and r["loader_workers_per_gpu"] >= 1
    assert "offline-token speedup" in run.stdout and "loader workers per GPU" in run.stdout
