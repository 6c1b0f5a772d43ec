"""Tokenize-stage throughput beside the bare tokenizer forward (the compute limit).

Side by side in one run, modes interleaved (order rotated every repeat), medians:

  (a) bare      Tokenizer.encode on the batches the stage would render (pre-rendered)
  (b) shard     pipeline.tokenize.tokenize_shard in-process: tar read + decode
                + sample_view + apply_views + encode (no store)
  (n) null      (b) with an encoder that returns zeros: the data plane alone
  (c0) stage    stages.tokenize.tokenize_split, workers=0 (in-process), fresh store
  (c1) dask     tokenize_split on a warm Dask LocalCluster, 1 worker x 1 thread;
                cluster start-up and the cold first run are reported apart
  overhead = mode / bare - 1  (target from the issue: stage <= 15% over bare, on CPU)

plus a per-view breakdown of the non-encode time (tar read, decode, sample_view,
apply_views, store write) and the per-task index read on the real index.

Two tokenizers (random init: speed only):
  dvae   model/dvae.py DVAEConfig defaults (32 px -> 8x8, 1024 codes) on Fashion-MNIST
         shards (subsets of data/shards/train, or synthetic if absent), modes a b n c0 c1
  dalle  the DALL-E encoder architecture (112 px -> 14x14, 8192 codes) on ImageNet-like
         500x375 JPEGs, modes a b n: the ImageNet compute/overhead ratio

Usage: .venv/bin/python bench/tokenize_stage.py [--images 120] [--shards 2] [--views 8]
           [--repeats 5] [--threads 1] [--dalle-images 2] [--dalle-views 2] [--no-dask] [--fix-batch 64]
Default args finish in about 2.5 minutes on a 2-core shared box.
"""
from __future__ import annotations

import os
import sys


import hashlib
import io
import itertools
import json
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the stage's progress bars would flood the table

import warnings

import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.shardread import decode_rgb, sidecar_of  # noqa: E402
from pipeline.tokenize import tar_images, tokenize_shard  # noqa: E402
from pipeline.tokens import StoreSpec, create_or_open  # noqa: E402
from pipeline.views import View, apply_views, sample_view  # noqa: E402
from pipeline.schema import ViewConfig

REAL = ROOT / "data" / "shards" / "train"


# ---------------------------------------------------------------- fixtures


def _write_tar(path: Path, samples: list[tuple[str, str, bytes, int]]) -> None:
    """samples: (key, ext, image bytes, label) -> a WebDataset tar in that order."""
    with tarfile.open(path, "w") as tar:
        for key, ext, data, label in samples:
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), 0
                tar.addfile(info, io.BytesIO(payload))


def _write_index(shard_dir: Path, shards: dict[str, list[tuple[str, str, bytes, int]]]) -> None:
    """index.parquet, and for each (already written) tar the sidecar its readers check its size against."""
    rows = [{"key": k, "shard": name, "position": i, "label": lab, "sha256": hashlib.sha256(d).hexdigest()}
            for name, samples in shards.items() for i, (k, _, d, lab) in enumerate(samples)]
    pq.write_table(pa.Table.from_pylist(rows), shard_dir / "index.parquet")
    for name in shards:
        tar = shard_dir / name
        sidecar_of(tar).write_text(json.dumps({"shard": name, "tar_bytes": tar.stat().st_size}))


def fashion_shards(out: Path, n_shards: int, per_shard: int) -> str:
    """Copy the first `per_shard` samples of real train shards into small shards in `out`
    (same file names); synthetic Fashion-MNIST look-alikes when data/ has none."""
    out.mkdir(parents=True)
    shards: dict[str, list] = {}
    real = sorted(REAL.glob("train-*.tar"))
    if len(real) >= n_shards:
        for tar in real[:n_shards]:
            samples = []
            for sample in itertools.islice(_raw_samples(tar), per_shard):
                samples.append(sample)
            shards[tar.name] = samples
        source = f"real Fashion-MNIST ({REAL})"
    else:
        from PIL import Image

        from pipeline.synthetic import shape_image

        rng = np.random.default_rng(0)
        for s in range(n_shards):
            samples = []
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(np.repeat(shape_image(rng, i % 10)[:, :, None], 3, 2)).save(buf, format="PNG")
                samples.append((f"s{s}-{i:06d}", "png", buf.getvalue(), i % 10))
            shards[f"train-{s:06d}.tar"] = samples
        source = "synthetic Fashion-MNIST look-alikes (no data/shards/train)"
    for name, samples in shards.items():
        _write_tar(out / name, samples)
    _write_index(out, shards)
    return source


def _raw_samples(tar_path: Path):
    import webdataset as wds

    for s in wds.tarfile_to_samples()(iter([{"url": str(tar_path)}])):
        ext = "png" if "png" in s else "jpg"
        yield s["__key__"], ext, s[ext], int(s.get("cls", b"0"))


def jpeg_shard(out: Path, n: int) -> None:
    """ImageNet-like: n photo-like 500x375 JPEGs (~100 KB each), one shard."""
    import simplejpeg

    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    samples = []
    for i in range(n):
        ph = rng.uniform(0, 6.28, 3)
        img = np.stack([127 + 90 * np.sin(x / (23 + 7 * c) + y / (31 + 5 * c) + ph[c]) for c in range(3)], -1)
        img += rng.normal(0, 9, img.shape)
        data = simplejpeg.encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=90)
        samples.append((f"img{i:05d}", "jpg", data, i % 10))
    _write_tar(out / "train-000000.tar", samples)
    _write_index(out, {"train-000000.tar": samples})


def make_params(shard_out: Path, token_out: Path, views: int, batch_size: int, threads: int):
    from stages.config import Params, from_dict

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["shard"]["out"] = str(shard_out)
    raw["tokenize"].update(out=str(token_out), views=views, batch_size=batch_size, workers=0,
                           threads_per_worker=threads, format="zarr")
    return from_dict(Params, raw)


# ---------------------------------------------------------------- measurement


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def render_batches(tars: list[Path], size: int, cfg: ViewConfig, seed: int, views: int,
                   batch_size: int) -> list[torch.Tensor]:
    """Exactly the float batches tokenize_shard feeds the encoder (cut per shard)."""
    out = []
    for tar in tars:
        imgs, vs = [], []
        for key, data in tar_images(tar):
            image = decode_rgb(data)
            for v in range(views):
                imgs.append(image)
                vs.append(sample_view(seed, key, v, image.shape[1], image.shape[0], cfg))
        for i in range(0, len(vs), batch_size):
            out.append(apply_views(imgs[i:i + batch_size], vs[i:i + batch_size], size))
    return out


def breakdown(tars: list[Path], size: int, cfg: ViewConfig, seed: int, views: int,
              batch_size: int, spec: StoreSpec | None, store_dir: Path | None) -> dict[str, float]:
    """Seconds spent in each non-encode part of tokenize_shard (+ the store write)."""
    t = dict.fromkeys(["tar read", "decode", "sample_view", "apply_views", "store write"], 0.0)
    for s, tar in enumerate(tars):
        t0 = time.perf_counter()
        items = list(tar_images(tar))
        t["tar read"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        images = [decode_rgb(d) for _, d in items]
        t["decode"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        vs = [sample_view(seed, k, v, im.shape[1], im.shape[0], cfg)
              for (k, _), im in zip(items, images) for v in range(views)]
        t["sample_view"] += time.perf_counter() - t0
        flat = [im for im in images for _ in range(views)]
        t0 = time.perf_counter()
        for i in range(0, len(vs), batch_size):
            apply_views(flat[i:i + batch_size], vs[i:i + batch_size], size)
        t["apply_views"] += time.perf_counter() - t0
        if spec is not None:
            n = len(items)
            tokens = np.zeros((n, views, *spec.grid), np.uint16)
            params = np.stack([v.to_array() for v in vs]).reshape(n, views, View.K)
            t0 = time.perf_counter()
            create_or_open(store_dir, "train", "zarr", spec).write_shard(s, [k for k, _ in items], tokens, params)
            t["store write"] += time.perf_counter() - t0
    return t


def report(title: str, runs: dict[str, list[float]], n_views: int, notes: dict[str, str]) -> dict[str, float]:
    med = {k: statistics.median(v) for k, v in runs.items()}
    bare = med["a bare encode"]
    print(f"\n{title}")
    print(f"  {'mode':<28}{'median s':>10}{'views/s':>10}{'x bare':>8}{'overhead':>10}   runs (s)")
    for k, m in med.items():
        over = f"{(m / bare - 1) * 100:+.1f}%" if not k.startswith("n ") else f"{m / bare * 100:.1f}%"
        if k.startswith("a'"):
            over = f"{bare / m:.2f}x"
        print(f"  {k:<28}{m:>10.3f}{n_views / m:>10.0f}{m / bare:>8.3f}{over:>10}   "
              + " ".join(f"{x:.2f}" for x in runs[k]) + (f"  {notes[k]}" if k in notes else ""))
    return med


def print_breakdown(parts: dict[str, list[float]], n_views: int, bare: float) -> None:
    print(f"  non-encode time per view (median over repeats), as % of the bare encode:")
    total = 0.0
    for k, v in parts.items():
        m = statistics.median(v)
        total += m
        print(f"    {k:<14}{m / n_views * 1e6:8.1f} us/view  {m / bare * 100:6.2f}%")
    print(f"    {'sum':<14}{total / n_views * 1e6:8.1f} us/view  {total / bare * 100:6.2f}%")


# ---------------------------------------------------------------- the two benches


def bench_dvae(tmp: Path, images: int, n_shards: int, views: int, repeats: int, threads: int,
               batch_size: int, dask: bool, fix_batch: int) -> None:
    from model.dvae import DVAE
    from model.schema import DVAEConfig
    from model.tokenizer import load_tokenizer, save_tokenizer
    from stages.tokenize import tokenize_split

    per_shard = images // n_shards
    shard_root = tmp / "fm"
    source = fashion_shards(shard_root / "train", n_shards, per_shard)
    tars = sorted((shard_root / "train").glob("*.tar"))
    torch.manual_seed(0)
    cfg = DVAEConfig()
    tok_dir = save_tokenizer(DVAE(cfg), cfg, tmp / "tok-dvae")
    tok = load_tokenizer(tok_dir)
    params = make_params(shard_root, tmp / "tokens", views, batch_size, threads)
    vcfg, seed = params.views, params.seed
    n_views = n_shards * per_shard * views
    print(f"dvae: {cfg} ({sum(p.numel() for p in tok.model.encoder.parameters()) / 1e6:.2f}M encoder params)")
    print(f"data: {source}; {n_shards} shards x {per_shard} images x {views} views = {n_views} image-views, "
          f"batch {batch_size}, torch threads {threads}")

    def encode(x: torch.Tensor) -> torch.Tensor:  # what stages.tokenize._task passes
        with torch.inference_mode():
            return tok.encode(x)

    def null(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], *tok.grid, dtype=torch.long)

    rendered = render_batches(tars, tok.input_size, vcfg, seed, views, batch_size)
    counter = itertools.count()

    def run_stage(cluster) -> float:
        p = make_params(shard_root, tmp / f"tokens-{next(counter)}", views, batch_size, threads)
        t = timed(lambda: tokenize_split(p, "train", tok_dir, cluster))
        shutil.rmtree(p.tokenize.out)
        return t

    from pipeline.schema import ClusterConfig

    small = [x for b in rendered for x in b.split(fix_batch)]
    modes = {
        "a bare encode": lambda: [encode(x) for x in rendered],
        f"a' bare encode, batch {fix_batch}": lambda: [encode(x) for x in small],
        "b tokenize_shard": lambda: [tokenize_shard(t, encode, tok.input_size, vcfg, seed, views, batch_size)
                                     for t in tars],
        "n null encoder (data only)": lambda: [tokenize_shard(t, null, tok.input_size, vcfg, seed, views,
                                                              batch_size) for t in tars],
        "c0 stage workers=0": lambda: run_stage(ClusterConfig(workers=0, threads_per_worker=threads)),
    }
    notes = {}
    clusters = []
    if dask:
        import dask as dask_
        from pipeline.dask_runner import dask_client

        # c1: the stage's own LocalCluster (Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in
        # workers); c1': the same with that variable unset (the fix proposed in bench/README.md).
        for label, env in (("c1 stage dask 1 worker", {}),
                           ("c1' dask, MALLOC_TRIM_THRESHOLD_ unset",
                            {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})):
            t0 = time.perf_counter()
            with dask_.config.set(env):
                ctx = dask_client(ClusterConfig(workers=1, threads_per_worker=threads))
                client = ctx.__enter__()
            start_s = time.perf_counter() - t0
            clusters.append(ctx)
            warm_cfg = ClusterConfig(workers=1, threads_per_worker=threads, scheduler=client.scheduler.address)
            cold = run_stage(warm_cfg)  # first task: imports torch + model, loads the tokenizer
            modes[label] = (lambda c: lambda: run_stage(c))(warm_cfg)
            notes[label] = (start_s, cold)

    torch.set_num_threads(threads)
    encode(rendered[0])  # warm-up: oneDNN primitives; the tars are in the page cache already
    runs: dict[str, list[float]] = {k: [] for k in modes}
    parts: dict[str, list[float]] = {}
    names = list(modes)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            torch.set_num_threads(threads)
            runs[k].append(timed(modes[k]))
        spec = StoreSpec(shards=tuple(t.name for t in tars), counts=(per_shard,) * n_shards, views=views,
                         grid=tuple(tok.grid), view_dim=View.K, vocab_size=tok.vocab_size,
                         fingerprints={"bench": str(r)})
        for k, v in breakdown(tars, tok.input_size, vcfg, seed, views, batch_size, spec,
                              tmp / f"parts-{r}").items():
            parts.setdefault(k, []).append(v)
    for label, (start_s, cold) in list(notes.items()):
        median_warm = statistics.median(runs[label])
        notes[label] = (f"(warm worker; cluster start {start_s:.1f} s, cold first run "
                        f"{cold:.1f} s = +{cold - median_warm:.1f} s one-off)")
    for ctx in clusters:
        ctx.__exit__(None, None, None)
    med = report(f"dvae 32 px -> 8x8, {n_views} image-views", runs, n_views, notes)
    print_breakdown(parts, n_views, med["a bare encode"])

    real_index = REAL / "index.parquet"
    if real_index.exists():
        name = pq.read_table(real_index, columns=["shard"]).column("shard")[0].as_py()
        reads = [timed(lambda: pq.read_table(real_index, columns=["key"], filters=[("shard", "=", name)]))
                 for _ in range(3)]
        per_shard_encode = med["a bare encode"] / n_views * 5000 * views
        print(f"  per-task index read on the real {pq.read_metadata(real_index).num_rows}-row index: "
              f"{statistics.median(reads) * 1e3:.0f} ms = {statistics.median(reads) / per_shard_encode * 100:.2f}% "
              f"of a 5000-image shard's encode")


def bench_dalle(tmp: Path, images: int, views: int, repeats: int, threads: int, batch_size: int) -> None:
    from model.dalle import DalleConfig, DalleVAE
    from model.tokenizer import Tokenizer

    cfg = DalleConfig()
    torch.manual_seed(0)
    tok = Tokenizer(DalleVAE(cfg), "dalle", "random")
    jpeg_shard(tmp / "jpeg" / "train", images)
    tars = [tmp / "jpeg" / "train" / "train-000000.tar"]
    vcfg, seed = ViewConfig(scale=(0.08, 1.0), ratio=(0.75, 4 / 3)), 0
    n_views = images * views
    print(f"\ndalle: DALL-E encoder architecture, random weights, {cfg.image_size} px -> {cfg.grid}, "
          f"{cfg.vocab_size} codes; {images} photo-like 500x375 JPEGs x {views} views = {n_views} image-views, "
          f"batch {batch_size}, torch threads {threads}")

    def encode(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return tok.encode(x)

    def null(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], *tok.grid, dtype=torch.long)

    torch.set_num_threads(threads)
    rendered = render_batches(tars, tok.input_size, vcfg, seed, views, batch_size)
    modes = {
        "a bare encode": lambda: [encode(x) for x in rendered],
        "b tokenize_shard": lambda: [tokenize_shard(t, encode, tok.input_size, vcfg, seed, views, batch_size)
                                     for t in tars],
        "n null encoder (data only)": lambda: [tokenize_shard(t, null, tok.input_size, vcfg, seed, views,
                                                              batch_size) for t in tars],
    }
    encode(rendered[0][:1])  # warm-up
    runs: dict[str, list[float]] = {k: [] for k in modes}
    parts: dict[str, list[float]] = {}
    names = list(modes)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            runs[k].append(timed(modes[k]))
        for k, v in breakdown(tars, tok.input_size, vcfg, seed, views, batch_size, None, None).items():
            if k != "store write":
                parts.setdefault(k, []).append(v)
    med = report(f"dalle 112 px -> 14x14, {n_views} image-views", runs, n_views, {})
    print_breakdown(parts, n_views, med["a bare encode"])


@click.command()
@click.option("--images", default=120, show_default=True, help="Fashion-MNIST images in all (dvae).")
@click.option("--shards", "n_shards", default=2, show_default=True)
@click.option("--views", default=8, show_default=True, help="Views per image (tokenize.views).")
@click.option("--batch-size", default=256, show_default=True, help="tokenize.batch_size (dvae).")
@click.option("--repeats", default=5, show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch threads (tokenize.threads_per_worker).")
@click.option("--dalle-images", default=2, show_default=True, help="0 skips the DALL-E bench.")
@click.option("--dalle-views", default=2, show_default=True)
@click.option("--dalle-batch", default=8, show_default=True)
@click.option("--dask/--no-dask", default=True, show_default=True, help="Include the Dask 1-worker modes.")
@click.option("--fix-batch", default=64, show_default=True, help="Batch of the a' mode (same views, re-cut).")
def main(images: int, n_shards: int, views: int, batch_size: int, repeats: int, threads: int,
         dalle_images: int, dalle_views: int, dalle_batch: int, dask: bool, fix_batch: int) -> None:
    warnings.filterwarnings("ignore", message="Port .* is already in use")
    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    t0 = time.perf_counter()
    try:
        bench_dvae(tmp, images, n_shards, views, repeats, threads, batch_size, dask, fix_batch)
        if dalle_images:
            bench_dalle(tmp, dalle_images, dalle_views, min(repeats, 3), threads, dalle_batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n(overhead = mode / bare - 1; the null row is data-plane time as % of the bare encode; "
          f"total bench {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
