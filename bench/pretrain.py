"""Pretraining step and data-loader throughput, side by side in one run (medians of
interleaved repeats).

  step   (a) offline  one Stepper step with precomputed tokens as targets (our design)
         (b) online   the reference design: the tokenizer encodes the batch's tokenizer
                      view inside every step, then the same Stepper step
         ratio online / offline = what offline tokens save per step. Two pairings:
           micro  model `micro` (32 px, patch 4, 8x8) + the default dVAE (DVAEConfig(), 8x8)
           dalle  model `tiny` (224 px, patch 16, 14x14, 12 x 192 wide) + the DALL-E encoder
                  architecture at 112 px (14x14, 8192 codes); `--vit base` for ViT-B.
                  Random weights everywhere (speed only).
  loader (c) MIMDataset through pipeline.stream.batches(), 1 DataLoader worker process
             (and num_workers=0, in-process), images/s of the steady state (first batch
             to last; the per-epoch start-up and wind-down printed apart)
         (d) decode_rgb + apply_view alone on the same samples and views, one core
         ratio loader / (d) = share of the per-core data limit the loader delivers
         (target >= 90%), plus where the loader's extra time goes.
         (b) the loader with batched masks; (b') the same 1-worker loader without the batch
             ring (pipeline/ring.py): each batch in fresh shared memory, as before the ring.

Usage: .venv/bin/python bench/pretrain.py [--batch 128] [--dalle-batch 8] [--vit tiny]
           [--repeats 3] [--threads 1] [--loader-images 3000] [--no-dalle]
Default args finish in about 2.5 minutes on a 2-core shared box.
"""
from __future__ import annotations

import os
import sys


import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.beit import create_model  # noqa: E402
from model.engine import Dist, Stepper  # noqa: E402
from model.schema import OptimConfig
from pipeline.fingerprint import index_fingerprint, stable_hash, stable_hashes  # noqa: E402
from pipeline.masking import MaskGenerator  # noqa: E402
from pipeline.schema import MaskingConfig
from pipeline.mim import MASK_CHUNK, MIMDataset, attach_tokens, open_split  # noqa: E402
from pipeline.schema import LoaderConfig  # noqa: E402
from pipeline.shardread import decode_rgb, image_bytes, tar_samples  # noqa: E402
from pipeline.stream import batches  # noqa: E402
from pipeline.tokens import StoreSpec, create_or_open, open_tokens  # noqa: E402
from pipeline.views import View, apply_view, apply_views  # noqa: E402
from pipeline.schema import ViewConfig

REAL = ROOT / "data" / "shards" / "train"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed3(fn) -> float:
    """Median of 3 passes (the breakdown runs each part alone, so noise hits each once)."""
    return statistics.median(timed(fn) for _ in range(3))


# ---------------------------------------------------------------- (a)/(b) step time


def _loss(net, batch: dict):
    return net(batch["image"], batch["mask"], batch["tokens"])


def bench_step(name: str, vit: str, tokenizer, batch: int, repeats: int, steps: int, threads: int) -> float:
    """Median seconds per step: offline vs online; returns the ratio."""
    torch.manual_seed(0)
    model = create_model(vit, vocab_size=tokenizer.vocab_size)
    c = model.config
    if tuple(tokenizer.grid) != c.grid:
        raise ValueError(f"{name}: tokenizer grid {tokenizer.grid} != {vit} grid {c.grid}")
    stepper = Stepper(model, OptimConfig(), Dist())
    masks = MaskGenerator(c.grid, MaskingConfig(kind="block", mask_ratio=0.4))
    rng = np.random.default_rng(0)
    images = torch.rand(batch, 3, c.img_size, c.img_size) * 2 - 1  # normalised patch view
    tok_view = torch.rand(batch, 3, tokenizer.input_size, tokenizer.input_size)  # [0,1] tokenizer view
    mask = torch.from_numpy(np.stack([masks(rng).reshape(-1) for _ in range(batch)]))  # [B, N]
    tokens = torch.randint(0, tokenizer.vocab_size, (batch, *c.grid))

    def offline():
        stepper.step([{"image": images, "mask": mask, "tokens": tokens}], _loss)

    def online():
        with torch.inference_mode():
            ids = tokenizer.encode(tok_view)  # [B, h, w], the reference's per-step tokenization
        stepper.step([{"image": images, "mask": mask, "tokens": ids.clone()}], _loss)

    def encode_only():
        with torch.inference_mode():
            tokenizer.encode(tok_view)

    torch.set_num_threads(threads)
    offline(), online()  # warm-up
    modes = {"a offline step": offline, "b online step": online, "  tokenizer encode alone": encode_only}
    runs = {k: [] for k in modes}
    names = list(modes)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            runs[k].append(timed(lambda: [modes[k]() for _ in range(steps)]) / steps)
    med = {k: statistics.median(v) for k, v in runs.items()}
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\n{name}: {vit} ({c.img_size} px, patch {c.patch_size}, {c.depth}x{c.embed_dim}, {n_params:.1f}M) "
          f"+ {tokenizer.kind} tokenizer at {tokenizer.input_size} px, batch {batch}, threads {threads}, "
          f"{steps} step(s) x {repeats} repeats")
    for k, m in med.items():
        print(f"  {k:<26}{m * 1e3:10.1f} ms/step  {batch / m:8.1f} img/s  "
              + " ".join(f"{x * 1e3:.0f}" for x in runs[k]))
    ratio = med["b online step"] / med["a offline step"]
    print(f"  online / offline step time: {ratio:.2f}x  (tokenizer = "
          f"{med['  tokenizer encode alone'] / med['b online step'] * 100:.0f}% of an online step)")
    return ratio


# ---------------------------------------------------------------- (c)/(d) loader


def _bench_tokenize_module():
    """bench/tokenize_stage.py, loaded once (the fixture builders share it)."""
    from against import load_module  # bench/against.py (a script's folder is on sys.path)

    return sys.modules.get("bench_tokenize") or load_module(ROOT / "bench" / "tokenize_stage.py", "bench_tokenize")


def _legacy():
    """tests/reference_loader.py: the loader as it was before the speed work."""
    sys.path.insert(0, str(ROOT / "tests"))
    import reference_loader

    return reference_loader


def loader_fixture(tmp: Path, n_images: int, n_shards: int, views: int, scale: str = "fashion"):
    """Shards + a token store with zero tokens and the real views drawn by sample_view:
    what MIMDataset reads in pretraining.

    fashion:  subsets of the real train shards (or synthetic), 28 px PNGs, 8x8 tokens
    imagenet: photo-like 500x375 JPEGs (bench/tokenize_stage.py's), 14x14 tokens,
              tokenizer views rendered at 112 px (DALL-E's input)"""
    bt = _bench_tokenize_module()
    shard_dir = tmp / "shards" / "train"
    if scale == "fashion":
        source = bt.fashion_shards(shard_dir, n_shards, n_images // n_shards)
        grid, tok_size = (8, 8), 32
    else:
        bt.jpeg_shard(shard_dir, n_images)  # one shard: split it, so workers/shards behave
        _split_shard(shard_dir, n_shards)
        source = f"photo-like 500x375 JPEGs (~{_mean_kb(shard_dir):.0f} KB)"
        grid, tok_size = (14, 14), 112
    from pipeline.tokenize import tokenize_shard

    tars = sorted(shard_dir.glob("*.tar"))
    zero = lambda x: torch.zeros(x.shape[0], *grid, dtype=torch.long)  # noqa: E731
    results = [tokenize_shard(t, zero, tok_size, ViewConfig(), 0, views, 64) for t in tars]
    spec = StoreSpec(shards=tuple(t.name for t in tars), counts=tuple(len(r[0]) for r in results),
                     views=views, grid=grid, view_dim=View.K, vocab_size=8192,
                     fingerprints={"shards": index_fingerprint(shard_dir / "index.parquet")})
    store = create_or_open(tmp / "tokens", "train", "zarr", spec)
    for s, r in enumerate(results):
        store.write_shard(s, *r)
    return source, open_split(shard_dir, store.path)


def _split_shard(shard_dir: Path, n_shards: int) -> None:
    """Re-cut bench/tokenize_stage.py's single JPEG shard into n_shards shards."""
    import webdataset as wds

    bt = _bench_tokenize_module()
    one = shard_dir / "train-000000.tar"
    samples = [(s["__key__"], "jpg", s["jpg"], int(s["cls"]))
               for s in wds.tarfile_to_samples()(iter([{"url": str(one)}]))]
    one.unlink()
    per = -(-len(samples) // n_shards)
    shards = {f"train-{i:06d}.tar": samples[i * per:(i + 1) * per] for i in range(n_shards)}
    for name, part in shards.items():
        bt._write_tar(shard_dir / name, part)
    bt._write_index(shard_dir, shards)


def _mean_kb(shard_dir: Path) -> float:
    tars = list(shard_dir.glob("*.tar"))
    import webdataset as wds

    sizes = [len(s["jpg"]) for s in wds.tarfile_to_samples()(iter([{"url": str(t)} for t in tars]))]
    return statistics.mean(sizes) / 1024


def bench_loader(tmp: Path, n_images: int, batch: int, repeats: int, views: int, scale: str = "fashion",
                 shuffle: int = 500, n_shards: int = 2, legacy: bool = True) -> dict:
    source, split = loader_fixture(tmp, n_images, n_shards, views, scale)
    size = 32 if scale == "fashion" else 224
    grid = (8, 8) if scale == "fashion" else (14, 14)
    masks = MaskGenerator(grid, MaskingConfig(kind="block", mask_ratio=0.4))
    batched = MaskGenerator(grid, MaskingConfig(kind="block", mask_ratio=0.4, draw="batched"))
    n = (split.num_samples // batch) * batch  # both paths drop partial batches... per worker
    print(f"\nloader [{scale}]: {source}; {split.num_samples} images in {len(split.shards)} shards, "
          f"{size} px, batch {batch}, shuffle buffer {shuffle}, {views} stored views, block masks "
          f"{grid[0]}x{grid[1]}")

    # The same samples and views the loader renders in epoch 0, in memory, for (d).
    store = open_tokens(split.token_path)
    import webdataset as wds

    samples = []
    for s, name in enumerate(split.shards):
        part = store.read_shard(s)
        for row, smp in enumerate(wds.tarfile_to_samples()(iter([{"url": str(split.shard_dir / name)}]))):
            key = smp["__key__"]
            v = (0 + stable_hash("view", key)) % views
            samples.append((image_bytes(smp), View.from_array(part.views[row][v])))

    def decode_augment():
        for data, view in samples[:n]:
            apply_view(decode_rgb(data), view, size)

    chunk = MIMDataset(split, LoaderConfig(), size, None, 0).render_chunk

    def decode_augment_chunked():
        for i in range(0, n, chunk):
            part = samples[i:min(i + chunk, n)]
            apply_views([decode_rgb(d) for d, _ in part], [v for _, v in part], size)

    fixed: dict[str, list[tuple[float, float]]] = {}  # loader -> (start-up, wind-down) s per epoch

    def loader(workers: int, cls=MIMDataset, gen=masks, ring: bool = True):
        """(images, seconds) of the epoch's steady state: from the first batch's arrival to the
        last's. The epoch's fixed costs are returned apart: start-up (fork, shuffle-buffer fill,
        first batch) and wind-down (last batch to the end of the iteration: with workers, the
        DataLoader joining its worker, whose exit takes ~15-25 ms in a forked torch process). Per
        epoch, not per image: ~3% of a 6,000-image bench epoch, 0.3% of the default's 60,000."""
        cfg = LoaderConfig(num_workers=workers, shuffle_buffer=shuffle)
        ds = cls(split, cfg, size, gen, seed=0)
        t0 = time.perf_counter()
        it = batches(ds, batch, cfg.num_workers, epoch=0, ring=ring)
        next(it)
        t = last = time.perf_counter()
        k = 0
        for _ in it:
            k, last = k + 1, time.perf_counter()
        return k * batch, last - t, (t - t0, time.perf_counter() - last)

    D, D2 = "d decode + augment", f"d' decode + augment, chunk {chunk}"
    C1, C0, L1 = "c loader 1 worker", "c loader in-process", "l legacy loader 1 worker"
    B1, B0 = "b loader 1 worker, batched masks", "b loader in-process, batched"
    BN = "b' 1 worker, batched, no ring"
    rates: dict[str, list[float]] = {D: [], D2: [], C1: [], C0: [], B1: [], B0: [], BN: []}
    if legacy:
        rates[L1] = []
    Legacy = _legacy().LegacyMIMDataset if legacy else None

    def run(k: str) -> None:
        torch.set_num_threads(1)
        if k == D:
            rates[k].append(n / timed(decode_augment))
        elif k == D2:
            rates[k].append(n / timed(decode_augment_chunked))
        else:
            imgs, sec, ends = loader(0 if k in (C0, B0) else 1, Legacy if k == L1 else MIMDataset,
                                     batched if k in (B1, B0, BN) else masks, ring=k != BN)
            rates[k].append(imgs / sec)
            fixed.setdefault(k, []).append(ends)
            if k == B1:  # paired with the (d') pass run just before it in the same repeat
                paired.append(rates[B1][-1] / rates[D2][-1])

    names = list(rates)
    paired: list[float] = []  # (b) / (d'), repeat by repeat
    decode_augment()  # warm-up
    for r in range(repeats):
        # (d') right before (b) in every repeat, so each (b) has a (d') measured beside it; the
        # other passes rotate around the pair
        rest = [k for k in names if k not in (D2, B1)]
        for k in [D2, B1] + rest[r % len(rest):] + rest[:r % len(rest)]:
            run(k)
    med = {k: statistics.median(v) for k, v in rates.items()}
    limit = med[D]
    print("  loaders: images/s of the steady state, first batch to last; the epoch's fixed costs below")
    for k, m in med.items():
        print(f"  {k:<30}{m:9.0f} img/s  {1e6 / m:8.1f} us/img  {m / limit * 100:6.1f}% of (d)  "
              f"{m / med[D2] * 100:6.1f}% of (d')   " + " ".join(f"{x:.0f}" for x in rates[k]))
    best = {k: max(v) for k, v in rates.items()}  # contention on a shared box only ever slows a pass down
    print(f"  best passes: (b) / (d') {best[B1] / best[D2] * 100:.1f}%, (b) in-process / (d') "
          f"{best[B0] / best[D2] * 100:.1f}% ({1e6 / best[D2]:.1f}, {1e6 / best[B1]:.1f}, {1e6 / best[B0]:.1f} us/img)")
    pair = sorted(paired)
    print(f"  (b) / (d') repeat by repeat, each against the (d') pass just before it: median "
          f"{statistics.median(pair) * 100:.1f}%, range {pair[0] * 100:.1f}-{pair[-1] * 100:.1f}% over {len(pair)}")
    for k in (B1, B0):
        start, end = (statistics.median(x) * 1e3 for x in zip(*fixed[k]))
        whole = n / (n / med[k] + (start + end) / 1e3)
        print(f"  {k:<30}per epoch: start-up {start:.0f} ms, wind-down {end:.0f} ms; "
              f"with both, {whole:.0f} img/s on {n} images ({whole / med[D2] * 100:.1f}% of (d'))")

    # Where the loader's extra time goes (in-process, one thread), per image.
    torch.set_num_threads(1)
    ds = MIMDataset(split, LoaderConfig(num_workers=0), size, masks, seed=0)
    urls = [str(split.shard_dir / s) for s in split.shards]
    tar_t = timed3(lambda: sum(1 for _ in tar_samples(urls)))
    wds_t = timed3(lambda: sum(1 for _ in wds.tarfile_to_samples()(iter([{"url": u} for u in urls]))))
    stream_t = timed3(lambda: sum(1 for _ in attach_tokens(tar_samples(urls), open_tokens(split.token_path),
                                                           split.shards, rows=lambda keys, part: {})))
    ds_b = MIMDataset(split, LoaderConfig(num_workers=0), size, batched, seed=0)
    rows_t = timed3(lambda: sum(1 for _ in ds.attach(tar_samples(urls))))
    rows_b_t = timed3(lambda: sum(1 for _ in ds_b.attach(tar_samples(urls))))
    raw = list(ds.attach(tar_samples(urls)))
    m = len(raw)
    made = ds.make_samples([dict(x) for x in raw])
    make_t = timed3(lambda: [ds.make_samples([dict(x) for x in raw[i:i + chunk]]) for i in range(0, m, chunk)])
    keys = [x["__key__"] for x in raw]
    mask_t = timed3(lambda: [masks(np.random.Generator(np.random.PCG64(stable_hash("mask", 0, 0, k))))
                             for k in keys])
    ids = np.array([stable_hash("mask", 0, 0, k) for k in keys], dtype=np.uint64)
    batched_t = timed3(lambda: [batched.keyed(ids[i:i + batch]) for i in range(0, m, batch)])
    shard_t = timed3(lambda: [batched.keyed(ids[i:i + MASK_CHUNK]) for i in range(0, m, MASK_CHUNK)])
    ref = _legacy().ref_mask if legacy else None
    ref_mask_t = timed3(lambda: [ref(masks, np.random.default_rng(stable_hash("mask", 0, 0, k)))
                                 for k in keys]) if legacy else float("nan")
    hash_t = timed3(lambda: [stable_hash("view", k) for k in keys])
    hashes_t = timed3(lambda: stable_hashes(keys, "view"))
    from torch.utils.data import default_collate

    coll_t = timed3(lambda: [default_collate(made[i:i + batch]) for i in range(0, m - batch + 1, batch)])
    da_t = timed3(lambda: [apply_view(decode_rgb(d), v, size) for d, v in samples[:m]])
    dac_t = timed3(lambda: [apply_views([decode_rgb(d) for d, _ in samples[i:i + chunk]],
                                        [v for _, v in samples[i:i + chunk]], size)
                            for i in range(0, m, chunk)])
    print("  per image, in-process, 1 thread (median of 3 passes each):")
    for k, t in (("tar read (pipeline.shardread)", tar_t), ("tar read (webdataset, before)", wds_t),
                 ("tar read + attach_tokens", stream_t), ("  + epoch rows, per-sample masks", rows_t),
                 ("  + epoch rows, batched masks", rows_b_t),
                 ("make_samples (all)", make_t),
                 ("  of which decode+apply_views", dac_t), ("  (decode+apply_view 1 by 1)", da_t),
                 ("  of which block mask + rng", mask_t), ("  (the same, before)", ref_mask_t),
                 (f"  (batched masks, {batch} a call)", batched_t),
                 (f"  (batched, {MASK_CHUNK} a call: per shard)", shard_t),
                 ("stable_hash (view), 1 by 1", hash_t), ("  (stable_hashes, a shard at once)", hashes_t),
                 ("default_collate", coll_t)):
        print(f"    {k:<32}{t / m * 1e6:8.1f} us")
    return {f"{scale}: loader 1 worker / (d)": med[C1] / limit,
            f"{scale}: loader 1 worker / (d')": med[C1] / med[D2],
            f"{scale}: loader 1 worker, batched masks / (d')": med[B1] / med[D2],
            f"{scale}: the same, repeat by repeat (median)": statistics.median(pair),
            f"{scale}: the batch ring, (b) / (b')": med[B1] / med[BN],
            **({f"{scale}: legacy 1 worker / (d)": med[L1] / limit} if legacy else {})}


@click.command()
@click.option("--batch", default=128, show_default=True, help="micro batch (pretrain.batch_size).")
@click.option("--steps", default=2, show_default=True, help="micro steps per timed repeat.")
@click.option("--dalle-batch", default=8, show_default=True)
@click.option("--vit", default="tiny", show_default=True, help="ViT paired with DALL-E (tiny | small | base).")
@click.option("--repeats", default=3, show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch threads for the step benches.")
@click.option("--loader-images", default=3000, show_default=True)
@click.option("--loader-batch", default=128, show_default=True)
@click.option("--loader-shards", default=2, show_default=True,
              help="shards the fashion loader images are split into (the default pipeline's: 5,000 images a shard).")
@click.option("--views", default=8, show_default=True)
@click.option("--dalle/--no-dalle", default=True, show_default=True)
@click.option("--step/--no-step", default=True, show_default=True, help="the step benches (a)/(b).")
@click.option("--scale", type=click.Choice(["fashion", "imagenet", "both", "none"]), default="both",
              show_default=True, help="loader bench: 28 px Fashion-MNIST PNGs and/or 500x375 JPEGs.")
@click.option("--shuffle-buffer", default=500, show_default=True,
              help="loader shuffle buffer (fashion); smaller than the images, so tar reads are timed.")
@click.option("--imagenet-images", default=384, show_default=True)
@click.option("--imagenet-batch", default=32, show_default=True)
@click.option("--legacy/--no-legacy", default=True, show_default=True,
              help="also time the pre-change loader (tests/reference_loader.py) side by side.")
def main(batch: int, steps: int, dalle_batch: int, vit: str, repeats: int, threads: int,
         loader_images: int, loader_batch: int, loader_shards: int, views: int, dalle: bool, step: bool, scale: str,
         shuffle_buffer: int, imagenet_images: int, imagenet_batch: int, legacy: bool) -> None:
    from model.dalle import DalleConfig, DalleVAE
    from model.dvae import DVAE
    from model.schema import DVAEConfig
    from model.tokenizer import Tokenizer

    t0 = time.perf_counter()
    torch.manual_seed(0)
    summary = {}
    if step:
        summary["micro+dvae online/offline"] = bench_step(
            "micro", "micro", Tokenizer(DVAE(DVAEConfig()), "dvae", "random"), batch, repeats, steps, threads)
    if step and dalle:
        summary[f"{vit}+dalle online/offline"] = bench_step(
            "dalle", vit, Tokenizer(DalleVAE(DalleConfig()), "dalle", "random"), dalle_batch, repeats, 1, threads)
    for sc in (("fashion", "imagenet") if scale == "both" else () if scale == "none" else (scale,)):
        tmp = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
        try:
            if sc == "fashion":
                summary.update(bench_loader(tmp, loader_images, loader_batch, repeats, views, sc,
                                            shuffle_buffer, n_shards=loader_shards, legacy=legacy))
            else:
                summary.update(bench_loader(tmp, imagenet_images, imagenet_batch, repeats, views, sc,
                                            imagenet_batch * 4, legacy=legacy))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print("\nsummary: " + ", ".join(f"{k} {v:.2f}" for k, v in summary.items())
          + f"  (total bench {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
