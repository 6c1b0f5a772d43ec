"""Builders for small end-to-end fixtures (synthetic Fashion-MNIST -> shards -> tokens)."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from pipeline.synthetic import write_fake_fashion_mnist
from stages.config import Params, from_dict


def merge(base: dict, over: dict) -> dict:
    """`base` with `over` merged in, nested mappings key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_raw(tmp: Path, **sections) -> dict:
    """params.yaml's values as a dict for a run entirely inside `tmp` (every output under
    it); `sections` are merged in key by key (nested mappings too)."""
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    outputs = {"shards": "shards", "tokens": "tokens", "runs": "runs"}
    for stage, record in raw["outputs"].items():
        if isinstance(record, dict):
            outputs[stage] = {k: str(tmp / v) for k, v in record.items()}
    raw = merge(raw, {
        # 32 px (8x8 grid), which the stand-in tokenizers below are built for; the default is 28
        "data": {"root": str(tmp / "fm"), "image_size": 32},
        "tokenizer": {"model": {"image_size": 32}},
        "shard": {"shard_size": 40, "workers": 1},
        "tokenize": {"views": 3, "batch_size": 50, "cluster": {"workers": 1}},
        "pretrain": {"loop": {"batch_size": 16, "epochs": 2, "warmup_epochs": 0.5, "log_every": 1},
                     "loader": {"num_workers": 0, "shuffle_buffer": 50}, "eval_batches": 2},
        "outputs": {k: (str(tmp / v) if isinstance(v, str) else v) for k, v in outputs.items()},
    })
    return merge(raw, sections)


def tiny_params(tmp: Path, **sections) -> Params:
    """`tiny_raw`, read into Params."""
    return from_dict(Params, tiny_raw(tmp, **sections))


def make_shards(tmp: Path, params: Params, n_train: int = 120, n_test: int = 40) -> None:
    from stages.shard import shard

    write_fake_fashion_mnist(tmp / "fm", n_train, n_test)
    shard(params, tuple(params.data.splits), progress=False)


def fake_encode(x: torch.Tensor, patch: int = 4, levels: int = 64) -> torch.Tensor:
    """A deterministic stand-in tokenizer: quantised grey level of each patch.
    float [B, 3, S, S] in [0, 1] -> long [B, S/patch, S/patch]."""
    grey = x.mean(1, keepdim=True)  # [B, 1, S, S]
    pooled = torch.nn.functional.avg_pool2d(grey, patch)  # [B, 1, h, w]
    return (pooled[:, 0] * (levels - 1)).round().long()  # [B, h, w]


def fake_tokens(params: Params, split: str, input_size: int = 32, fmt: str = "zarr"):
    """Token store for `split` made by `fake_encode` through the real tokenize code."""
    import pyarrow.parquet as pq

    from pipeline.fingerprint import index_fingerprint, json_fingerprint
    from pipeline.tokenize import tokenize_shard
    from pipeline.tokens import StoreSpec, create_or_open
    from pipeline.views import View

    shard_dir = Path(params.outputs.shards) / split
    shards = list(dict.fromkeys(pq.read_table(shard_dir / "index.parquet").column("shard").to_pylist()))
    results = [tokenize_shard(shard_dir / s, fake_encode, input_size, params.views, params.seed,
                              params.tokenize.views) for s in shards]
    g = input_size // 4
    spec = StoreSpec(shards=tuple(shards), counts=tuple(len(r[0]) for r in results),
                     views=params.tokenize.views, grid=(g, g), view_dim=View.K, vocab_size=64,
                     fingerprints={"shards": index_fingerprint(shard_dir / "index.parquet"),
                                   "tokenizer": "fake", "views": json_fingerprint(params.views)})
    store = create_or_open(params.outputs.tokens, split, fmt, spec)
    for s, r in enumerate(results):
        store.write_shard(s, *r)
    return store


def mim_world(tmp: Path):
    """(tmp, params, SplitData): tiny shards + fake tokens for the train split, opened for the MIM loader."""
    from pipeline.mim import open_split
    from pipeline.tokens import store_path

    params = tiny_params(tmp)
    make_shards(tmp, params)
    fake_tokens(params, "train")
    return tmp, params, open_split(tmp / "shards/train", store_path(tmp / "tokens", "train", "zarr"))


def save_stand_in_encoder(params: Params, seed: int = 1, **overrides) -> Path:
    """A random BEiT encoder saved where `beit pretrain` saves its model (what finetune and the
    probes read); another seed than scratch's, so the two inits differ."""
    import dataclasses

    from model.beit import create_model
    from model.checkpoints import save_checkpoint

    torch.manual_seed(seed)
    mim = create_model(params.model, **overrides)
    return save_checkpoint(params.outputs.pretrain.dir, mim.state_dict(),
                           {"model": params.model, **dataclasses.asdict(mim.config)})


def save_tiny_tokenizer(path, seed: int = 0):
    """A random 32 px -> 8x8, 64-code dVAE saved as a tokenizer folder."""
    from model.dvae import DVAE
    from model.schema import DVAEConfig
    from model.tokenizer import save_tokenizer

    torch.manual_seed(seed)
    cfg = DVAEConfig(image_size=32, vocab_size=64, downsample=4, hidden=8)
    return save_tokenizer(DVAE(cfg).eval(), cfg, path)


def shards_with_tokenizer(tmp, n_train: int, n_test: int):
    """(tmp, params): tiny params under tmp, their shards and a tiny tokenizer at tmp/tok."""
    params = tiny_params(tmp)
    make_shards(tmp, params, n_train=n_train, n_test=n_test)
    save_tiny_tokenizer(tmp / "tok")
    return tmp, params
