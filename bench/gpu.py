"""The GPU numbers issue 14 asks for, in one script (about 5 minutes on one GPU).

  step      ViT-B/16 MIM step at 224 px, bf16, precomputed tokens (offline: this pipeline)
  online    the same step + the DALL-E encoder (random weights) on a 112 px view inside it
            (online tokens: unilm's design); offline / online = the offline-token speedup
  encoder   the bare DALL-E encoder forward at tokenize.batch_size (fp32: tokenize.precision)
  stage     the tokenize stage on one GPU (in-process, warm) and on a 1-worker Dask GPU
            cluster (cluster start-up included); overhead = encoder views/s / stage views/s - 1
  loader    MIMDataset img/s with one DataLoader worker at 224 px on ImageNet-like JPEGs;
            workers one GPU needs = ceil(offline step img/s / loader img/s per worker)

Peak GPU memory per phase (torch.cuda.max_memory_allocated), the loader's peak host RSS.
MFU = model FLOPs per second / the device's dense bf16 peak (--peak-tflops, else PEAK).

Usage (the GPU machine, from the repository root):
  OMP_NUM_THREADS=8 python bench/gpu.py                # -> bench/results/gpu-<device>.json
  python bench/gpu.py --smoke --out /tmp/smoke.json   # toy sizes on CPU, seconds (tests/test_bench_gpu.py)
Options: --batch N (per step; default 256) --steps N --compile --attention sdpa|flex|math|timm
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from model.attention import use_attention  # noqa: E402
from model.beit import create_model  # noqa: E402
from model.dalle import DalleConfig, DalleVAE  # noqa: E402
from model.engine import Dist, Stepper  # noqa: E402
from model.schema import OptimConfig  # noqa: E402
from model.tokenizer import Tokenizer, save_tokenizer  # noqa: E402
from pipeline.masking import MaskGenerator  # noqa: E402
from pipeline.mim import MIMDataset, open_split  # noqa: E402
from pipeline.schema import LoaderConfig, MaskingConfig  # noqa: E402
from pipeline.stream import batches  # noqa: E402
from pipeline.tokens import store_path  # noqa: E402
from stages.config import Params, from_dict  # noqa: E402
from stages.tokenize import tokenize  # noqa: E402

# Dense bf16 tensor-core peak, FLOP/s (vendor data sheets; SXM parts). Matched against
# torch.cuda.get_device_name() in this order; --peak-tflops overrides.
PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "V100": 125e12}


@dataclasses.dataclass(frozen=True)
class Sizes:
    vit: str = "base"
    img: int = 224
    patch: int | None = None  # None: the registry's
    depth: int | None = None
    dalle_px: int = 112
    dalle_hid: int = 256  # DALL-E's own width
    vocab: int = 8192
    batch: int = 256
    steps: int = 20
    warmup: int = 5
    tok_batch: int = 512  # tokenize.batch_size of configs/imagenet-base.yaml
    images: int = 1024  # ImageNet-like JPEGs (one shard) for the stage and the loader
    views: int = 2
    loader_batch: int = 64


FULL = Sizes()
SMOKE = Sizes(vit="micro", img=32, patch=8, depth=2, dalle_px=32, dalle_hid=16, vocab=64, batch=4, steps=2,
              warmup=1, tok_batch=8, images=24, views=2, loader_batch=4)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def peak_mb(dev: torch.device):
    return round(torch.cuda.max_memory_allocated(dev) / 2**20) if dev.type == "cuda" else None


def vit_flops_per_image(model) -> float:
    """Training FLOPs of one image, analytically (the PaLM / Megatron MFU convention: matmuls
    only, backward = 2 x forward, so 3 x the forward):
      forward = 2 * T * W_blocks           (qkv, proj, mlp: every Linear weight in the blocks, T = 1 + N tokens)
              + 2 * N * (P*P*C) * D        (patch embedding)
              + depth * 4 * T^2 * D        (q k^T and attn v)
              + 2 * M * D * V              (LM head on the M masked patches of the image)
    Layer norms, softmax, GELU and the optimizer are left out, as in the convention."""
    c = model.config
    T, N = 1 + c.num_patches, c.num_patches
    w_blocks = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    M = model.masked_per_image or round(0.4 * N)
    fwd = (2 * T * w_blocks + 2 * N * c.patch_size ** 2 * c.in_chans * c.embed_dim
           + c.depth * 4 * T * T * c.embed_dim + 2 * M * c.embed_dim * c.vocab_size)
    return 3.0 * fwd


def peak_flops(dev: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, f"--peak-tflops {override}"
    if dev.type != "cuda":
        return None, "no peak for a CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(dev)
    for key, flops in PEAK.items():
        if key in name:
            return flops, f"{name}: {key} {flops / 1e12:.0f} TFLOP/s dense bf16"
    return None, f"{name}: not in PEAK (pass --peak-tflops)"


def bench_steps(sz: Sizes, dev: torch.device, attention: str, compile_: bool) -> dict:
    """Offline (tokens given) vs online (DALL-E encoder in the step) MIM steps, bf16."""
    over = {"img_size": sz.img, "vocab_size": sz.vocab}
    over.update({k: v for k, v in (("patch_size", sz.patch), ("depth", sz.depth)) if v is not None})
    torch.manual_seed(0)
    model = use_attention(create_model(sz.vit, **over), attention)
    masks = MaskGenerator(model.config.grid, MaskingConfig(kind="block", mask_ratio=0.4))
    model.masked_per_image = masks.num_masked  # the static-shape gather (no host sync)
    stepper = Stepper(model, OptimConfig(lr=1.5e-3, amp="bf16", compile=compile_), Dist(device=dev))
    dalle = DalleVAE(DalleConfig(image_size=sz.dalle_px, n_hid=sz.dalle_hid, vocab_size=sz.vocab)).eval().to(dev)
    if tuple(dalle.cfg.grid) != model.config.grid:
        raise SystemExit(f"DALL-E grid {dalle.cfg.grid} != ViT grid {model.config.grid}")
    g = torch.Generator().manual_seed(0)
    B = sz.batch
    batch = {"image": torch.randn(B, 3, sz.img, sz.img, generator=g).to(dev),
             "small": torch.rand(B, 3, sz.dalle_px, sz.dalle_px, generator=g).to(dev),
             "mask": torch.from_numpy(masks.batch(np.random.default_rng(0), B)).to(dev),
             "tokens": torch.randint(0, sz.vocab, (B, *model.config.grid), generator=g).to(dev)}

    def offline(net, b):
        return net(b["image"], b["mask"], b["tokens"])

    def online(net, b):  # unilm: the tokenizer runs inside the step, under the step's autocast
        with torch.no_grad():
            ids = dalle.encode(b["small"])  # [B, h, w]
        return net(b["image"], b["mask"], ids)

    flops = vit_flops_per_image(model)
    out = {}
    for name, loss_fn in (("offline", offline), ("online", online)):
        for _ in range(sz.warmup):
            stepper.step([batch], loss_fn)
        sync(dev)
        reset_peak(dev)
        t = time.perf_counter()
        for _ in range(sz.steps):
            stepper.step([batch], loss_fn)
        sync(dev)
        sec = time.perf_counter() - t
        out[name] = {"img_per_s": B * sz.steps / sec, "step_ms": 1e3 * sec / sz.steps, "peak_mb": peak_mb(dev)}
    out["vit_train_gflops_per_img"] = flops / 1e9
    out["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    return out


def imagenet_like(tmp: Path, sz: Sizes) -> Path:
    """One shard of ImageNet-like photo JPEGs (500x375, ~100 KB): bench/tokenize_stage.py's fixture."""
    import importlib

    shard_dir = tmp / "shards" / "train"
    importlib.import_module("tokenize_stage").jpeg_shard(shard_dir, sz.images)  # bench/tokenize_stage.py
    return shard_dir


def stage_params(tmp: Path, shard_root: Path, out: str, sz: Sizes, device: str, workers: int) -> Params:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["outputs"].update(shards=str(shard_root), tokens=str(tmp / out))
    raw["outputs"]["tokenizer"]["dir"] = str(tmp / "dalle")
    raw["tokenize"].update(views=sz.views, batch_size=sz.tok_batch, format="zarr")
    raw["tokenize"]["cluster"].update(workers=workers, device=device, threads_per_worker=1, scheduler=None)
    raw["data"]["train_split"] = "train"
    return from_dict(Params, raw)


def bench_tokenize(tmp: Path, shard_dir: Path, sz: Sizes, dev: torch.device) -> dict:
    """Bare encoder forward vs the tokenize stage at the same batch (fp32, as tokenize.precision)."""
    torch.manual_seed(0)
    cfg = DalleConfig(image_size=sz.dalle_px, n_hid=sz.dalle_hid, vocab_size=sz.vocab)
    save_tokenizer(DalleVAE(cfg), cfg, tmp / "dalle")
    tok = Tokenizer(DalleVAE(cfg), "dalle", "bench").to(dev)
    x = torch.rand(sz.tok_batch, 3, sz.dalle_px, sz.dalle_px, device=dev)
    n_views = sz.images * sz.views
    reps = max(1, n_views // sz.tok_batch)
    tok.encode(x)
    sync(dev)
    reset_peak(dev)
    t = time.perf_counter()
    for _ in range(reps):
        tok.encode(x)
    sync(dev)
    bare = reps * sz.tok_batch / (time.perf_counter() - t)
    out = {"encoder": {"views_per_s": bare, "batch": sz.tok_batch, "peak_mb": peak_mb(dev)}}
    device = "cuda" if dev.type == "cuda" else "cpu"
    root = shard_dir.parent
    tokenize(stage_params(tmp, root, "warm", sz, device, 0), "train")  # loads the tokenizer once (cached)
    reset_peak(dev)
    s = tokenize(stage_params(tmp, root, "inproc", sz, device, 0), "train")
    out["stage_inprocess"] = {"views_per_s": n_views / s["seconds"], "overhead": bare * s["seconds"] / n_views - 1,
                              "peak_mb": peak_mb(dev)}
    return out


def bench_dask(tmp: Path, shard_dir: Path, sz: Sizes, dev: torch.device, bare: float) -> dict:
    """The stage on a fresh 1-worker Dask cluster (GPU: pinned, GPU=1). Its seconds include
    the cluster's start-up and the worker's tokenizer load (CUDA context too): the warm
    in-process row is the stage's steady-state overhead, this one what a short run pays."""
    device = "cuda" if dev.type == "cuda" else "cpu"
    sec = tokenize(stage_params(tmp, shard_dir.parent, "dask", sz, device, 1), "train")["seconds"]
    n_views = sz.images * sz.views
    return {"views_per_s": n_views / sec, "overhead": bare * sec / n_views - 1, "seconds": sec,
            "note": "includes cluster start-up and the worker's tokenizer load"}


def bench_loader(tmp: Path, shard_dir: Path, sz: Sizes, grid: tuple[int, int]) -> dict:
    """MIMDataset img/s with one DataLoader worker at the ViT's size, on the stage's tokens."""
    split = open_split(shard_dir, store_path(tmp / "inproc", "train", "zarr"))
    masks = MaskGenerator(grid, MaskingConfig(kind="block", mask_ratio=0.4))
    cfg = LoaderConfig(num_workers=1, shuffle_buffer=min(500, sz.images))
    ds = MIMDataset(split, cfg, sz.img, masks, seed=0)
    it = batches(ds, sz.loader_batch, 1, epoch=0)
    next(it)  # worker start-up and the shuffle buffer's fill: not counted
    t = time.perf_counter()
    n = sum(len(b["image"]) for b in it)
    rate = n / (time.perf_counter() - t) if n else float("nan")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux -> MiB
    return {"img_per_s_per_worker": rate, "images": n, "peak_rss_mb_worker": round(rss)}


def device_slug(dev: torch.device, smoke: bool) -> str:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug + ("-smoke" if smoke else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU, seconds: the suite's check")
    ap.add_argument("--out", default=None, help="JSON path [bench/results/gpu-<device>.json]")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--attention", default="sdpa", choices=["timm", "math", "sdpa", "flex"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the ViT (adds ~1 min)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device")
    args = ap.parse_args()
    sz = SMOKE if args.smoke else FULL
    sz = dataclasses.replace(sz, **{k: v for k, v in (("batch", args.batch), ("steps", args.steps)) if v})
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda:0")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t0 = time.perf_counter()
    steps = bench_steps(sz, dev, args.attention, args.compile)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as d:
        tmp = Path(d)
        shard_dir = imagenet_like(tmp, sz)
        tok = bench_tokenize(tmp, shard_dir, sz, dev)
        grid = (sz.img // (sz.patch or 16),) * 2
        loader = bench_loader(tmp, shard_dir, sz, grid)  # before Dask: its worker is the only child process
        tok["stage_dask_1worker"] = bench_dask(tmp, shard_dir, sz, dev, tok["encoder"]["views_per_s"])
    peak, peak_note = peak_flops(dev, args.peak_tflops)
    flops = steps["vit_train_gflops_per_img"] * 1e9
    for k in ("offline", "online"):
        steps[k]["mfu"] = flops * steps[k]["img_per_s"] / peak if peak else None
    speedup = steps["offline"]["img_per_s"] / steps["online"]["img_per_s"]
    per_worker = loader["img_per_s_per_worker"]
    workers = math.ceil(steps["offline"]["img_per_s"] / per_worker) if per_worker > 0 else None
    result = {"device": device_slug(dev, args.smoke), "torch": torch.__version__, "smoke": args.smoke,
              "sizes": dataclasses.asdict(sz), "attention": args.attention, "compile": args.compile,
              "peak": peak_note, "steps": steps, "offline_speedup": speedup, "tokenize": tok,
              "loader": loader, "loader_workers_per_gpu": workers, "seconds": time.perf_counter() - t0}
    fmt = lambda v, f: format(v, f) if v is not None else "-".rjust(int(re.match(r"\d+", f).group()))  # noqa: E731
    print(f"\n{result['device']}  torch {torch.__version__}  {sz.vit} {sz.img}px batch {sz.batch}, "
          f"attention {args.attention}, compile {args.compile}; {peak_note}")
    print(f"{'measure':42s} {'rate':>12s} {'MFU':>7s} {'peak MB':>8s}")
    print(f"{'MIM step, offline tokens (img/s)':42s} {steps['offline']['img_per_s']:12.1f} "
          f"{fmt(steps['offline']['mfu'], '7.1%')} {fmt(steps['offline']['peak_mb'], '8d')}")
    print(f"{'MIM step + DALL-E online (img/s)':42s} {steps['online']['img_per_s']:12.1f} "
          f"{fmt(steps['online']['mfu'], '7.1%')} {fmt(steps['online']['peak_mb'], '8d')}")
    print(f"{'  offline-token speedup':42s} {speedup:11.2f}x")
    print(f"{'DALL-E encoder forward (views/s)':42s} {tok['encoder']['views_per_s']:12.1f} {'':7s} "
          f"{fmt(tok['encoder']['peak_mb'], '8d')}")
    inproc, dk = tok["stage_inprocess"], tok["stage_dask_1worker"]
    print(f"{'tokenize stage, in-process (views/s)':42s} {inproc['views_per_s']:12.1f}   overhead {inproc['overhead']:+.0%}")
    print(f"{'tokenize stage, Dask 1 worker (views/s)':42s} {dk['views_per_s']:12.1f}   overhead {dk['overhead']:+.0%}"
          f" (cold: cluster start-up in its {dk['seconds']:.1f} s)")
    print(f"{'loader, 1 worker (img/s)':42s} {per_worker:12.1f} {'':7s} {loader['peak_rss_mb_worker']:8d} (worker RSS)")
    print(f"{'  loader workers per GPU':42s} {fmt(workers, '12d')}")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"gpu-{result['device']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
