"""Scale rehearsal: a synthetic ImageNet-like folder through shard -> tokenize -> loader,
with per-core throughput of each stage, the projection to ImageNet-1k, loader RSS over an
epoch, and the loader goals side by side.

  1 folder    ROOT/train/n0000xxxx/*.JPEG: --images photo-like JPEGs (default 20,000, 1,000
              classes), sizes drawn like ImageNet's (long side mostly 500, 300-1024; aspect
              1:1 to 3:2, either orientation), generated deterministically from --seed
  2 shard     pipeline/shards.py: shard_split, one worker, resize_short as configs/imagenet-base
              (256; --resize-short 0 keeps the originals)
  3 tokenize  pipeline/tokenize.py: tokenize_shard on every shard with a null encoder (the data
              plane: decode + sample_view + render at 112 px, --views per image), and the DALL-E
              encoder architecture (model/dalle.py, random weights) on --tokenize-images images
  4 loader    MIMDataset (224 px, 14x14 block masks, loader.transport uint8, 1 DataLoader worker)
              over one epoch; RSS of the main process + its worker sampled every 50 ms
  goals       side by side, interleaved, one core each, same images and views:
              (T) torchvision's standard pipeline: PIL open + RandomResizedCrop(224) + flip +
                  ToTensor + Normalize
              (R) the loader's own bare decode + render (pipeline/render.py: render_views, uint8)
              (L) the loader, 1 worker, uint8 transport, normalize() in the main process
              target: L / T >= 1.5, L / R >= 0.9

Projection: ImageNet-1k = 1,281,167 train images, 10 views; wall time = images / (per-core
rate x --cores) for CPU stages (default 16 cores: the device machine of this project, one
H200; the DALL-E encode there runs on the GPU, not measured here, so its CPU time is shown
for scale only). Disk = measured bytes per image x 1.28M.

Usage: .venv/bin/python bench/rehearsal.py [--images 20000] [--classes 1000] [--views 10]
           [--tokenize-images 200] [--repeats 3] [--cores 16] [--keep DIR] [--smoke]
--smoke: toy size (48 images, 8 classes, 2 views, 4 DALL-E views), seconds; tests/test_rehearsal.py runs it.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("TQDM_DISABLE", "1")

import click
import numpy as np
import simplejpeg
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.fingerprint import index_fingerprint, stable_hash  # noqa: E402
from pipeline.masking import MaskGenerator  # noqa: E402
from pipeline.mim import MIMDataset, open_split, view_of  # noqa: E402
from pipeline.render import normalize, render_views  # noqa: E402
from pipeline.schema import EncodeConfig, LoaderConfig, MaskingConfig, ShardConfig, ViewConfig  # noqa: E402
from pipeline.shardread import image_bytes, read_index, tar_samples  # noqa: E402
from pipeline.stream import batches  # noqa: E402
from pipeline.tokenize import tokenize_shard  # noqa: E402
from pipeline.tokens import StoreSpec, create_or_open, open_tokens  # noqa: E402
from pipeline.views import View  # noqa: E402

IMAGENET_TRAIN = 1_281_167
IMAGENET_VIEWS = 10
IMAGENET_VIEW_CFG = ViewConfig(scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.4)  # imagenet-base
CROP_FLIP_CFG = ViewConfig(scale=(0.08, 1.0), brightness=0.0, contrast=0.0, saturation=0.0)  # (T)'s work: no jitter
LONG_SIDES = (500,) * 8 + (300, 400, 640, 800, 1024)
ASPECTS = (4 / 3, 4 / 3, 4 / 3, 3 / 2, 1.0, 5 / 4)


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- 1 folder


def texture_pool(n: int, side: int, seed: int) -> list[np.ndarray]:
    """n smooth-gradient + noise textures (float32 [side, side, 3]) that images are cut from:
    photo-like JPEG sizes (~100 KB at 500x375, quality 90) at a fraction of the cost of
    generating every image's noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    pool = []
    for _ in range(n):
        f, ph = rng.uniform(15, 40, (3, 2)), rng.uniform(0, 6.28, 3)
        img = np.stack([127 + 90 * np.sin(x / f[c, 0] + y / f[c, 1] + ph[c]) for c in range(3)], -1)
        pool.append(img + rng.normal(0, 9, img.shape).astype(np.float32))
    return pool


def make_folder(root: Path, images: int, classes: int, seed: int) -> dict:
    """ROOT/train/<wnid-like>/<key>.JPEG; deterministic in (images, classes, seed)."""
    side = max(LONG_SIDES)
    pool = texture_pool(8, side, seed)
    rng = np.random.default_rng(seed + 1)
    t, nbytes = time.perf_counter(), 0
    for i in range(images):
        long = int(rng.choice(LONG_SIDES))
        short = int(round(long / float(rng.choice(ASPECTS))))
        w, h = (long, short) if rng.random() < 0.75 else (short, long)
        tex = pool[int(rng.integers(len(pool)))]
        top, left = int(rng.integers(side - h + 1)), int(rng.integers(side - w + 1))
        shift = rng.uniform(-30, 30, 3).astype(np.float32)
        img = np.clip(tex[top:top + h, left:left + w] + shift, 0, 255).astype(np.uint8)  # [h, w, 3]
        data = simplejpeg.encode_jpeg(img, quality=90)
        path = root / "train" / f"n{i % classes:08d}" / f"img_{i:07d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        nbytes += len(data)
    sec = time.perf_counter() - t
    return {"images": images, "seconds": sec, "bytes": nbytes}


# ---------------------------------------------------------------------------- 2 shard


def shard(root: Path, out: Path, resize_short: int | None, shard_size: int, restart_markers: bool) -> dict:
    from pipeline.shards import shard_split
    from pipeline.sources import make_source

    cfg = ShardConfig(shard_size=shard_size, workers=1,
                      encode=EncodeConfig(resize_short=resize_short, jpeg_quality=90, restart_markers=restart_markers))
    t = time.perf_counter()
    s = shard_split(make_source("imagefolder", str(root), ("train",)), "train", out, cfg, seed=0, progress=False)
    return {"images": s.written, "seconds": time.perf_counter() - t, "bytes": du(out / "train")}


# ---------------------------------------------------------------------------- 3 tokenize


def tokenize_null(shard_dir: Path, token_root: Path, views: int, view_cfg: ViewConfig) -> tuple[dict, Path]:
    """Every shard through tokenize_shard with a null 14x14 encoder (the data plane alone),
    written to a zarr token store: what the loader reads."""
    tars = sorted(shard_dir.glob("*.tar"))
    zero = lambda x: torch.zeros(x.shape[0], 14, 14, dtype=torch.long)  # noqa: E731
    t = time.perf_counter()
    results = [tokenize_shard(tar, zero, 112, view_cfg, 0, views, 64) for tar in tars]
    sec = time.perf_counter() - t
    spec = StoreSpec(shards=tuple(p.name for p in tars), counts=tuple(len(r[0]) for r in results),
                     views=views, grid=(14, 14), view_dim=View.K, vocab_size=8192,
                     fingerprints={"shards": index_fingerprint(shard_dir / "index.parquet")})
    store = create_or_open(token_root, "train", "zarr", spec)
    for s, r in enumerate(results):
        store.write_shard(s, *r)
    n = sum(len(r[0]) for r in results)
    return {"images": n, "views": n * views, "seconds": sec, "bytes": du(Path(store.path))}, Path(store.path)


def tokenize_dalle(shard_dir: Path, n_images: int, batch: int) -> dict:
    """The DALL-E encoder architecture (random weights) at 112 px on n_images x 1 view,
    through the real tokenize_shard (render included)."""
    from model.dalle import DalleConfig, DalleVAE
    from model.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer(DalleVAE(DalleConfig()), "dalle", "random")

    def encode(x):
        with torch.inference_mode():
            return tok.encode(x)

    tar = sorted(shard_dir.glob("*.tar"))[0]
    # a tar holding only the first n_images samples, so the encode is timed on exactly those
    sub = shard_dir.parent / "dalle-subset.tar"
    _subset_tar(tar, sub, n_images)
    t = time.perf_counter()
    keys, _, _ = tokenize_shard(sub, encode, 112, IMAGENET_VIEW_CFG, 0, 1, batch)
    sec = time.perf_counter() - t
    return {"views": len(keys), "seconds": sec}


def _subset_tar(src: Path, dst: Path, n: int) -> None:
    import tarfile

    with tarfile.open(src) as fin, tarfile.open(dst, "w") as fout:
        keys: list[str] = []
        for m in fin:
            key = m.name.split(".", 1)[0]
            if key not in keys:
                if len(keys) == n:
                    break
                keys.append(key)
            fout.addfile(m, fin.extractfile(m))


# ---------------------------------------------------------------------------- 4 loader


class RSS:
    """Memory of this process + its children, sampled every `every` s in a thread, each
    sample tagged with the epoch fraction the caller last reported. PSS (proportional set
    size: shared pages split between the processes that map them), where Linux gives it:
    a forked worker maps the parent's pages, and plain RSS would count them twice."""

    def __init__(self, every: float = 0.5):  # reading smaps costs ms: sampled sparsely, and not in the goal runs
        import psutil

        self.proc, self.every, self.frac, self.samples = psutil.Process(), every, 0.0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _one(p) -> int:
        try:
            return p.memory_full_info().pss
        except AttributeError:  # no PSS on this OS
            return p.memory_info().rss

    def _rss(self) -> Optional[tuple[int, int]]:
        """(the sum, the processes summed), or None when a child could not be read (a worker
        starting or exiting): a partial sum would read as growth. The likely cause of a +122%
        max/min in a run whose marks rose only 1216 -> 1302 MiB (2026-12-02, photo-sized run 1).
        The count is kept so the spread leaves out samples that missed a process without an
        error; a single low sample with every process read also happens (2026-12-03), hence
        `flat` is the growth of the running peak."""
        total, children = self._one(self.proc), self.proc.children(recursive=True)
        for c in children:
            try:
                total += self._one(c)
            except Exception:  # noqa: BLE001  (psutil: NoSuchProcess, AccessDenied, ...)
                return None
        return total, 1 + len(children)

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self._rss()
            if r is not None:
                self.samples.append((self.frac, *r))
            time.sleep(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def at(self, frac: float) -> int:
        """The largest RSS sampled at or before `frac` of the epoch (after it started)."""
        seen = [r for f, r, _ in self.samples if 0 < f <= frac + 1e-9]
        return max(seen) if seen else 0


def loader_epoch(split, batch: int, workers: int, transport: str, memory: bool = True,
                 limit: Optional[int] = None, draw: str = "per-sample", ring: bool = True) -> dict:
    """`_loader_epoch` in a fresh (spawned) process, as a trainer runs it: a DataLoader
    worker forked from this process would copy-on-write pages of the earlier stages'
    heap as its garbage collector touches them, and the memory would grow for that
    reason alone (measured: +60% over an epoch here, +6% from a fresh process).

    The child runs with MALLOC_MMAP_THRESHOLD_ fixed at 1 MiB: with glibc's dynamic
    threshold, the main process's heap grew ~25 MB per 32-image batch normalised on the
    CPU (a float [32, 3, 224, 224] each), linearly over the epoch (measured: 302 -> 1031 MiB
    in 30 batches; with the fixed threshold 381 -> 405 MiB). A GPU step normalises on the
    device and allocates no such host buffer; a CPU trainer needs the variable set."""
    import multiprocessing as mp

    for tar in split.shard_dir.glob("*.tar"):  # page cache warm, as (T) and (R) read from memory
        tar.read_bytes()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_loader_child, args=(out, split, batch, workers, transport, memory, limit, draw, ring))
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # read by the child's glibc at start
    try:
        p.start()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    result = out.get()
    p.join()
    if isinstance(result, BaseException):
        raise result
    return result


def _loader_child(out, split, batch, workers, transport, memory, limit, draw, ring) -> None:
    torch.set_num_threads(1)
    try:
        out.put(_loader_epoch(split, batch, workers, transport, memory, limit, draw, ring))
    except BaseException as err:  # noqa: BLE001  (handed to the parent, which raises it)
        out.put(err)


def _loader_epoch(split, batch: int, workers: int, transport: str, memory: bool, limit: Optional[int],
                  draw: str, ring: bool = True) -> dict:
    cfg = LoaderConfig(num_workers=workers, shuffle_buffer=max(batch * 4, 64), transport=transport)
    masks = MaskGenerator((14, 14), MaskingConfig(kind="block", mask_ratio=0.4, draw=draw))
    ds = MIMDataset(split, cfg, 224, masks, seed=0)
    total = split.num_samples // batch
    with (RSS() if memory else contextlib.nullcontext(RSS.__new__(RSS))) as rss:
        it = batches(ds, batch, workers, epoch=0, ring=ring)
        first = next(it)
        normalize(first["image"], cfg.mean, cfg.std, "cpu")
        t, k = time.perf_counter(), 1
        for b in it:
            normalize(b["image"], cfg.mean, cfg.std, "cpu")  # what the step does on its device
            k += 1
            rss.frac = k / total
            if limit is not None and k * batch >= limit:
                break
        sec = time.perf_counter() - t
        rss.frac = -1.0  # the worker shuts down now: not part of the epoch's samples
    if not memory:
        return {"images": (k - 1) * batch, "seconds": sec}
    marks = {f: rss.at(f) for f in (0.1, 0.25, 0.5, 0.75, 1.0)}
    late = [(r, n) for f, r, n in rss.samples if 0.1 <= f <= 1.0]
    procs = max((n for _, n in late), default=0)  # main + worker (+ multiprocessing's tracker)
    full = [r for r, n in late if n == procs]  # samples that summed every process
    # Flat = no growth: the running peak at 100% over the one at 10%. A single low sample (seen
    # twice on 2026-12-03: 590 MiB between samples of 1220, with every process read) is a dip of
    # the reading, not a leak; max/min is printed beside it as the spread.
    flat = marks[1.0] / marks[0.1] - 1 if marks[0.1] else float("nan")
    spread = (max(full) / min(full) - 1) if full else float("nan")
    return {"images": (k - 1) * batch, "seconds": sec, "rss": marks, "flat": flat, "spread": spread,
            "partial": len(late) - len(full)}


# ---------------------------------------------------------------------------- goals


def goals(split, n: int, repeats: int, batch: int) -> dict:
    """(T), (R), (L) side by side on the first n samples and their epoch-0 views."""
    import torchvision.transforms as T
    from PIL import Image

    store = open_tokens(split.token_path)
    samples = []
    for s, name in enumerate(split.shards):
        part = store.read_shard(s)
        for row, smp in enumerate(tar_samples([str(split.shard_dir / name)])):
            v = (0 + stable_hash("view", smp["__key__"])) % part.views.shape[1]
            samples.append((image_bytes(smp), view_of(part.views[row][v])))
    samples = samples[:n]
    mean, std = LoaderConfig().mean, LoaderConfig().std
    standard = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                          T.ToTensor(), T.Normalize(mean, std)])

    def tv():
        torch.manual_seed(0)
        for data, _ in samples:
            with Image.open(io.BytesIO(data)) as im:
                standard(im.convert("RGB"))

    def bare(whole: Optional[bool]):
        for data, view in samples:
            render_views([data], [view], 224, torch.uint8, whole=whole)

    def loader(workers: int, draw: str = "per-sample", ring: bool = True):
        r = loader_epoch(split, batch, workers, "uint8", memory=False, limit=max(4 * batch, n), draw=draw, ring=ring)
        return r["images"] / r["seconds"]

    rates: dict[str, list[float]] = {"T torchvision standard": [], "R bare decode+render": [],
                                     "R' the same, whole decode": [], "L loader 1 worker": [],
                                     "L0 loader in-process": [], "LB loader 1 worker, batched masks": [],
                                     "LB' the same, no ring": []}
    modes = {"T torchvision standard": tv, "R bare decode+render": lambda: bare(None),
             "R' the same, whole decode": lambda: bare(True)}
    fns = list(rates)
    for r in range(repeats):
        for k in fns[r % len(fns):] + fns[:r % len(fns)]:
            torch.set_num_threads(1)
            if k.startswith("L"):
                rates[k].append(loader(0 if k.startswith("L0") else 1, "batched" if k.startswith("LB") else "per-sample",
                                       ring=not k.startswith("LB'")))
            else:
                t = time.perf_counter()
                modes[k]()
                rates[k].append(len(samples) / (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in rates.items()} | {"runs": rates}


# ---------------------------------------------------------------------------- main


def _hms(sec: float) -> str:
    h, m = divmod(int(sec) // 60, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {int(sec) % 60:02d} s"


@click.command()
@click.option("--images", default=20000, show_default=True)
@click.option("--classes", default=1000, show_default=True)
@click.option("--views", default=IMAGENET_VIEWS, show_default=True, help="views per image tokenized.")
@click.option("--tokenize-images", default=200, show_default=True, help="images the DALL-E encoder runs on.")
@click.option("--resize-short", default=256, show_default=True, help="shard stage resize; 0 keeps the originals.")
@click.option("--shard-size", default=1000, show_default=True)
@click.option("--batch", default=64, show_default=True, help="loader batch.")
@click.option("--goal-images", default=600, show_default=True, help="images in each goal mode.")
@click.option("--repeats", default=3, show_default=True)
@click.option("--cores", default=16, show_default=True, help="CPU cores of the machine projected to.")
@click.option("--seed", default=0, show_default=True)
@click.option("--keep", type=click.Path(file_okay=False), default=None, help="work folder to keep (default: a temp dir).")
@click.option("--restart-markers/--no-restart-markers", default=True, show_default=True,
              help="shard.encode.restart_markers (configs/imagenet-base.yaml: on): the loader decodes only a view's MCUs.")
@click.option("--jitter/--no-jitter", default=True, show_default=True,
              help="views with imagenet-base's colour jitter (0.4/0.4/0.4), or crop + flip only, (T)'s work.")
@click.option("--goals/--no-goals", "run_goals", default=True, show_default=True, help="the side-by-side goal modes.")
@click.option("--smoke", is_flag=True, help="toy size: seconds.")
def main(images, classes, views, tokenize_images, resize_short, shard_size, batch, goal_images, repeats,
         cores, seed, keep, restart_markers, jitter, run_goals, smoke):
    torch.set_num_threads(1)
    if smoke:
        images, classes, views, tokenize_images, shard_size, batch, goal_images, repeats = 48, 8, 2, 4, 16, 8, 16, 1
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="beit-rehearsal-"))
    t0 = time.perf_counter()
    try:
        print(f"rehearsal: {images} images, {classes} classes, {views} views, resize_short {resize_short or None}, "
              f"views {'with' if jitter else 'without'} colour jitter, restart markers {'on' if restart_markers else 'off'}, "
              f"work {work}; one core per stage (torch threads 1)")
        fold = make_folder(work / "src", images, classes, seed)
        print(f"1 folder    {fold['images'] / fold['seconds']:8.1f} img/s  {fold['bytes'] / images / 1024:.0f} KB/img")
        sh = shard(work / "src", work / "shards", resize_short or None, shard_size, restart_markers)
        index = read_index(work / "shards" / "train", ["width", "height"])
        mpx = statistics.mean(w * h for w, h in zip(index["width"], index["height"])) / 1e6
        print(f"2 shard     {sh['images'] / sh['seconds']:8.1f} img/s/core  {sh['bytes'] / sh['images'] / 1024:.0f} KB/img "
              f"stored ({mpx:.3f} Mpx mean)")
        tk, token_path = tokenize_null(work / "shards" / "train", work / "tokens", views,
                                       IMAGENET_VIEW_CFG if jitter else CROP_FLIP_CFG)
        print(f"3 tokenize  {tk['views'] / tk['seconds']:8.1f} views/s/core data plane (null encoder, 112 px), "
              f"tokens {tk['bytes'] / tk['images']:.0f} B/img on disk")
        dl = tokenize_dalle(work / "shards" / "train", min(tokenize_images, sh["images"]), 8)
        print(f"  DALL-E    {dl['views'] / dl['seconds']:8.2f} views/s/core (random weights, 112 px, batch 8, CPU)")
        split = open_split(work / "shards" / "train", token_path)
        ld = loader_epoch(split, batch, 1, "uint8", draw="batched")  # configs/imagenet-base.yaml's mask draw
        print(f"4 loader    {ld['images'] / ld['seconds']:8.1f} img/s/worker (224 px, uint8, batched masks, 1 worker)")
        marks = "  ".join(f"{int(f * 100)}%: {r / 2**20:.0f} MiB" for f, r in ld["rss"].items())
        print(f"  PSS (main + worker) {marks}; growth of the peak from 10% to 100%: +{ld['flat'] * 100:.1f}% "
              f"({'flat' if ld['flat'] <= 0.10 else 'NOT flat'}, target <= 10%); spread of the samples "
              f"max/min +{ld['spread'] * 100:.1f}% ({ld['partial']} that missed a process left out)")

        n = IMAGENET_TRAIN
        per_core = {"shard": sh["images"] / sh["seconds"],
                    "tokenize data plane": tk["views"] / tk["seconds"] / IMAGENET_VIEWS,
                    "tokenize DALL-E (CPU)": dl["views"] / dl["seconds"] / IMAGENET_VIEWS,
                    "loader, one epoch": ld["images"] / ld["seconds"]}
        print(f"\nImageNet-1k projection ({n:,} images, {IMAGENET_VIEWS} views, {cores} cores; per-core rates above):")
        for k, r in per_core.items():
            print(f"  {k:<24}{_hms(n / (r * cores)):>16}   ({r:.1f} img/s/core)")
        print(f"  loader cores per 1500 img/s GPU step (ViT-B MIM): {1500 / per_core['loader, one epoch']:.1f}")
        print(f"  disk: shards {sh['bytes'] / sh['images'] * n / 1e9:.0f} GB, tokens "
              f"{tk['bytes'] / tk['images'] * n * IMAGENET_VIEWS / views / 1e9:.1f} GB "
              f"(source folder {fold['bytes'] / images * n / 1e9:.0f} GB)")

        if not run_goals:
            return
        g = goals(split, min(goal_images, split.num_samples), repeats, batch)
        print(f"\ngoals, 224 px, one core each, {min(goal_images, split.num_samples)} images, medians of {repeats}:")
        for k in g["runs"]:
            print(f"  {k:<26}{g[k]:8.1f} img/s   " + " ".join(f"{x:.0f}" for x in g["runs"][k]))
        region = g["R bare decode+render"] / g["R' the same, whole decode"]
        print(f"  region / whole decode (R / R'): {region:.2f}x")
        lt, lr = g["L loader 1 worker"] / g["T torchvision standard"], g["L loader 1 worker"] / g["R bare decode+render"]
        print(f"  loader / torchvision standard: {lt:.2f}x (target >= 1.5x)")
        print(f"  loader / bare decode+render:   {lr * 100:.1f}% (target >= 90%); in-process "
              f"{g['L0 loader in-process'] / g['R bare decode+render'] * 100:.1f}%")
        lb = g["LB loader 1 worker, batched masks"]
        print(f"  with batched masks (pretrain.mask_draw: batched): loader / torchvision {lb / g['T torchvision standard']:.2f}x, "
              f"loader / bare {lb / g['R bare decode+render'] * 100:.1f}%")
        no_ring = g["LB' the same, no ring"]
        print(f"  the batch ring (pipeline/ring.py): LB / LB' {lb / no_ring:.2f}x")
        print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
