"""configs/*.yaml: complete params files that load with the same schema as params.yaml."""
from pathlib import Path

import pytest
import yaml

from model.beit import create_model
from stages.config import load_params

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def key_paths(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= key_paths(v, f"{prefix}{k}.")
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_is_complete(path):
    load_params(path)
    assert key_paths(yaml.safe_load(path.read_text())) == key_paths(yaml.safe_load((REPO / "params.yaml").read_text()))


def test_imagenet_base_is_the_paper_recipe(monkeypatch):
    monkeypatch.chdir(REPO)
    p = load_params("configs/imagenet-base.yaml")
    assert (p.model, p.mask_ratio, p.masking, p.target) == ("base", 0.4, "block", "tokens")
    assert (p.data.source, p.data.image_size, p.shard.encode.resize_short) == ("imagefolder", 224, 256)
    assert p.data.root and (p.data.train_split, p.data.eval_split) == ("train", "val")
    assert (p.tokenize.views, p.tokenize.cluster.device) == (10, "cuda")
    assert (p.views.scale, p.views.flip_p, p.views.brightness) == ((0.08, 1.0), 0.5, 0.4)
    t, o = p.pretrain.loop, p.pretrain.optim
    assert (t.epochs, t.batch_size, o.lr, t.warmup_epochs, o.weight_decay, p.pretrain.drop_path, o.clip_grad,
            o.amp) == (800, 2048, 1.5e-3, 10, 0.05, 0.1, 3.0, "bf16")
    f = p.finetune
    assert (f.loop.epochs, f.loop.batch_size, f.optim.lr, f.optim.layer_decay, f.mix.smoothing, f.mix.mixup_alpha,
            f.mix.cutmix_alpha, f.drop_path, f.label_fraction) == (100, 1024, 4e-3, 0.65, 0.1, 0.8, 1.0, 0.1, 1.0)
    assert (f.augment.rand_augment, f.augment.erase_prob) == ("rand-m9-mstd0.5-inc1", 0.25)  # RandAugment(9, 0.5)
    assert (p.scratch.optim.layer_decay, p.scratch.optim.weight_decay) == (None, 0.05)  # DeiT: no layer decay
    cfg = create_model(p.model).config  # the 112 px DALL-E grid (112 / 8 = 14) must match the patch grid
    assert cfg.img_size == p.data.image_size and cfg.grid == (112 // 8, 112 // 8)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


# The long profile is the default with more budget: any other difference is drift, and its numbers
# would then not say what more steps do.
LONG_BUDGET = {"tokenizer.steps", "tokenize.views", "pretrain.loop.epochs", "finetune.loop.epochs",
               "finetune.loop.warmup_epochs"}


def test_fashion_long_is_the_default_with_more_budget():
    default = flat(yaml.safe_load((REPO / "params.yaml").read_text()))
    long = flat(yaml.safe_load((REPO / "configs/fashion-long.yaml").read_text()))
    differ = {k for k in default if default[k] != long[k]}
    assert differ == LONG_BUDGET, sorted(differ ^ LONG_BUDGET)
    assert all(long[k] > default[k] for k in LONG_BUDGET)
