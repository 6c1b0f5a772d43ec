"""Shard-stage throughput, side by side in one run (medians of interleaved repeats).

  (a) ours        pipeline.shards.shard_split, workers=1
  (b) ShardWriter webdataset's own writer, the same samples (jpg + cls + json)
  (c) copy        read every file and append its bytes to one file: the I/O limit
  with --resize-short N:
  (d) PIL         open + convert RGB + BICUBIC resize + JPEG encode per image (no tar at all)
      ours        the full sharder with resize_short=N (tar, hashes, index included)
  and workers=1 vs workers=2 for ours.

Usage: .venv/bin/python bench/shard.py [--images 600] [--repeats 3] [--resize-short 256]
The images are synthetic photo-like 500x375 JPEGs (~100 KB) in a temp folder.
"""
from __future__ import annotations

import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import simplejpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.shards import Settings, shard_split  # noqa: E402
from pipeline.sources import ImageFolderSource  # noqa: E402


def make_images(root: Path, n: int, classes: int = 10) -> int:
    """n photo-like JPEGs in ROOT/train/cNN/; returns total bytes."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    total = 0
    for i in range(n):
        ph = rng.uniform(0, 6.28, 3)
        img = np.stack([127 + 90 * np.sin(x / (23 + 7 * c) + y / (31 + 5 * c) + ph[c]) for c in range(3)], -1)
        img += rng.normal(0, 9, img.shape)  # sensor-like noise: makes the JPEG photo-sized
        data = simplejpeg.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=90)
        folder = root / "train" / f"c{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i:05d}.jpg").write_bytes(data)
        total += len(data)
    return total


def files(root: Path) -> list[tuple[Path, int]]:
    classes = sorted(p.name for p in (root / "train").iterdir())
    return [(p, classes.index(p.parent.name)) for p in sorted((root / "train").rglob("*.jpg"))]


def run_ours(src: Path, out: Path, workers: int = 1, resize_short: int | None = None) -> None:
    settings = Settings(resize_short=resize_short, max_pixels=89_478_485, jpeg_quality=95)
    shard_split(ImageFolderSource(src), "train", out, seed=0, shard_size=100, settings=settings,
                workers=workers, progress=False)


def run_shardwriter(src: Path, out: Path) -> None:
    import webdataset as wds

    out.mkdir(parents=True)
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=100, verbose=0) as sink:
        for i, (path, label) in enumerate(files(src)):
            sink.write({"__key__": f"k{i:06d}", "jpg": path.read_bytes(), "cls": label,
                        "json": {"source": str(path.relative_to(src)), "label": label}})


def run_copy(src: Path, out: Path) -> None:
    out.mkdir(parents=True)
    with open(out / "all.bin", "wb") as f:
        for path, _ in files(src):
            f.write(path.read_bytes())
        f.flush()
        os.fsync(f.fileno())  # ours fsyncs every shard; keep the I/O limit honest


def run_pil(src: Path, out: Path, resize_short: int) -> None:
    from PIL import Image

    for path, _ in files(src):
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resize_short / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=95)


@click.command()
@click.option("--images", default=600, show_default=True)
@click.option("--repeats", default=3, show_default=True)
@click.option("--resize-short", type=int, default=None, help="also benchmark the resize path (e.g. 256)")
def main(images: int, repeats: int, resize_short: int | None) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        tmp = Path(tmp)
        src = tmp / "src"
        total = make_images(src, images)
        print(f"{images} JPEGs, {total / images / 1e3:.0f} KB each, {os.cpu_count()} CPUs; median of {repeats}")
        modes = {
            "ours (workers=1)": lambda o: run_ours(src, o),
            "webdataset ShardWriter": lambda o: run_shardwriter(src, o),
            "plain copy (I/O limit)": lambda o: run_copy(src, o),
            "ours (workers=2)": lambda o: run_ours(src, o, workers=2),
        }
        if resize_short:
            modes[f"PIL decode+resize+encode ({resize_short})"] = lambda o: run_pil(src, o, resize_short)
            modes[f"ours resize {resize_short} (workers=1)"] = lambda o: run_ours(src, o, 1, resize_short)
            modes[f"ours resize {resize_short} (workers=2)"] = lambda o: run_ours(src, o, 2, resize_short)
        run_copy(src, tmp / "warm")  # page cache warm for everyone
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(repeats):  # interleaved: background load hits every mode alike
            for name, fn in modes.items():
                out = tmp / "out"
                shutil.rmtree(out, ignore_errors=True)
                start = time.perf_counter()
                fn(out)
                times[name].append(time.perf_counter() - start)
        rate = {m: images / statistics.median(t) for m, t in times.items()}
        for m, r in rate.items():
            print(f"  {m:38s} {r:8.0f} img/s  {r * total / images / 1e6:7.1f} MB/s")
        ours = rate["ours (workers=1)"]
        print(f"ratio ours / ShardWriter:           {ours / rate['webdataset ShardWriter']:.2f}x  (target >= 1.5)")
        print(f"ratio ours / plain copy:            {ours / rate['plain copy (I/O limit)']:.2f}x")
        print(f"scaling workers 2 / 1 (no resize):  {rate['ours (workers=2)'] / ours:.2f}x")
        if resize_short:
            r1 = rate[f"ours resize {resize_short} (workers=1)"]
            print(f"ratio ours resize / PIL baseline:   {r1 / rate[f'PIL decode+resize+encode ({resize_short})']:.2f}x"
                  "  (target >= 1.7)")
            print(f"scaling workers 2 / 1 (resize):     {rate[f'ours resize {resize_short} (workers=2)'] / r1:.2f}x")


if __name__ == "__main__":
    main()
