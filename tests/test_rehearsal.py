"""bench/rehearsal.py --smoke: the scale rehearsal end to end at toy size (folder -> shard ->
tokenize -> loader -> projection -> goals), in seconds."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_rehearsal_smoke_runs_every_stage():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "rehearsal.py"), "--smoke"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    for line in ("1 folder", "2 shard", "3 tokenize", "DALL-E", "4 loader", "PSS (main + worker)",
                 "ImageNet-1k projection", "disk: shards", "loader / torchvision standard",
                 "loader / bare decode+render", "region / whole decode"):
        assert line in text, text
    assert "48 images" in text and "1,281,167 images" in text
