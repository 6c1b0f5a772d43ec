"""May the tokenizer run in bf16? Argmax token ids under bf16 autocast vs fp32, on CPU.

  dvae   our trained dVAE (default: /work/base/models/tokenizer, else --dvae PATH) on the
         tokenizer's views of real shard images (data/shards test split)
  dalle  the DALL-E encoder architecture with random weights (its trained weights are not
         redistributable) at --dalle-hid width, or a converted encoder (--dalle PATH), on
         112 px views of the same images

Prints the share of grid positions whose bf16 id equals the fp32 id; the stage allows
tokenize.precision: bf16 only at >= 99.5% (model/tokenizer.py BF16_MIN_AGREEMENT) and checks
it again on every shard's first batch.

Usage: OMP_NUM_THREADS=1 python bench/tokenizer_bf16.py [--images 256] [--dalle-hid 64] [--dalle models/dalle]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.dalle import DalleConfig, DalleVAE  # noqa: E402
from model.tokenizer import BF16_MIN_AGREEMENT, Tokenizer, bf16_agreement, load_tokenizer  # noqa: E402
from pipeline.schema import ViewConfig  # noqa: E402
from pipeline.shardread import decode_rgb  # noqa: E402
from pipeline.tokenize import tar_images  # noqa: E402
from pipeline.views import apply_views, sample_view  # noqa: E402


def views(shards: Path, n: int, size: int) -> torch.Tensor:
    """float [n, 3, size, size]: one default-params view per image of the first tars."""
    images, vs = [], []
    for key, data in itertools.islice(itertools.chain.from_iterable(
            tar_images(t) for t in sorted(shards.glob("*.tar"))), n):
        img = decode_rgb(data)
        images.append(img)
        vs.append(sample_view(0, key, 0, img.shape[1], img.shape[0], ViewConfig()))
    return apply_views(images, vs, size)


def agreement(tok: Tokenizer, x: torch.Tensor, batch: int = 64) -> float:
    hits = [bf16_agreement(tok, x[i:i + batch])[1] * len(x[i:i + batch]) for i in range(0, len(x), batch)]
    return sum(hits) / len(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dvae", default="/work/base/models/tokenizer")
    ap.add_argument("--shards", default="/work/base/data/shards/test")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--dalle-hid", type=int, default=64)
    ap.add_argument("--dalle-images", type=int, default=32)
    ap.add_argument("--dalle", default=None, help="a `beit convert-dalle` folder: its trained weights instead")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    if Path(args.dvae, "tokenizer.json").exists():
        tok = load_tokenizer(args.dvae)
        rows.append(("dvae " + args.dvae, tok.input_size, agreement(tok, views(Path(args.shards), args.images, tok.input_size))))
    torch.manual_seed(0)
    if args.dalle:
        tok, name = load_tokenizer(args.dalle), f"dalle {args.dalle}"
    else:
        tok, name = Tokenizer(DalleVAE(DalleConfig(n_hid=args.dalle_hid)), "dalle", "random"), \
            f"dalle random n_hid={args.dalle_hid}"
    rows.append((name, tok.input_size,
                 agreement(tok, views(Path(args.shards), args.dalle_images, tok.input_size), batch=16)))
    print(f"{'tokenizer':40s} {'px':>4s} {'bf16 == fp32 ids':>17s}  verdict (>= {BF16_MIN_AGREEMENT:.1%})")
    for name, px, share in rows:
        print(f"{name:40s} {px:4d} {share:17.4%}  {'bf16 ok' if share >= BF16_MIN_AGREEMENT else 'keep fp32'}")


if __name__ == "__main__":
    main()
