"""`beit visualize`: what pretraining learned (paper RQ5), as pictures and one number.

On the first `visualize.images` eval images (stored order, so the same images every run):
* the last block's CLS attention (model/attention_maps.py) of three encoders of one
  architecture: the pretrained one (outputs.pretrain), the random init it started from
  (the same seed through the same constructor), and the fine-tuned one (outputs.finetune);
* against the foreground patches (model/foreground.py): the share of attention mass on them
  and the IoU of the top-attended patches with them, mean and standard error over the
  images, beside what a uniform map scores (chance) -> outputs.visualize.metrics;
* pictures of the first `visualize.show` images: the mean-over-heads maps side by side, every
  head per model, and MIM reconstructions (masks from the pretraining mask generator, the
  tokenizer's decoder; model/reconstruct.py).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import click
import numpy as np
import torch
import torch.nn.functional as F

from model.attention_scores import ForegroundRule, score_encoders
from model.beit import BeitMIM, load_encoder
from model.classifier import load_classifier
from model.checkpoints import WEIGHTS
from model.engine import setup_distributed
from model.foreground import foreground_scores
from model.reconstruct import masked_input, predicted_pixels, predicted_tokens
from model.tokenizer import load_tokenizer
from pipeline.classify import ClassifyDataset, open_labelled
from pipeline.fingerprint import stable_hash
from pipeline.masking import MaskGenerator
from pipeline.schema import LoaderConfig
from pipeline.stream import eval_batches
from stages.config import ConfigError, Params, load_params
from stages.errors import one_line_errors
from stages.metrics import write_json
from stages.vis_figures import save_attention_grid, save_head_grid, save_image_rows

MODELS = ("pretrain", "random", "finetune")
TITLES = {"pretrain": "pretrained", "random": "random init", "finetune": "fine-tuned"}


def encoders(params: Params, device: torch.device) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """name -> (model in eval mode, forward that runs all its blocks on normalised images)."""
    out = params.outputs
    for name, d, fix in (("pretrain", out.pretrain.dir, "beit pretrain"), ("finetune", out.finetune.dir, "beit finetune")):
        if not (Path(d) / WEIGHTS).exists():
            raise FileNotFoundError(f"{d}: no {name} checkpoint; run `{fix}` (or `dvc repro {name}`) first")
    pre = load_encoder(out.pretrain.dir, params.model, params.data.image_size)
    torch.manual_seed(params.seed)  # stages/pretrain.py: build_model seeds the same constructor
    rand = BeitMIM(pre.config)
    fine = load_classifier(out.finetune.dir)
    if fine.config.grid != pre.config.grid or len(fine.blocks) != len(pre.blocks):
        raise ConfigError(f"{out.finetune.dir}: a {fine.config.grid} grid, {len(fine.blocks)}-block classifier "
                          f"beside a {pre.config.grid}, {len(pre.blocks)}-block pretrained encoder; "
                          "rerun `beit finetune` from this pretraining")
    models = {"pretrain": pre, "random": rand, "finetune": fine}
    for m in models.values():
        m.eval().to(device)
    return {"pretrain": (pre, pre.features), "random": (rand, rand.features), "finetune": (fine, fine.forward_blocks)}


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, S, S] -> [B, C, size, size] (antialiased bilinear); unchanged when S == size."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)


@torch.no_grad()
def reconstructions(params: Params, model: BeitMIM, images01: torch.Tensor, mean: torch.Tensor,
                    std: torch.Tensor) -> list:
    """(title, images [B, 3, S, S] in [0, 1]) columns of the reconstruction figure."""
    c = model.config
    images = (images01 - mean) / std  # [B, 3, S, S] as the encoder sees them
    gen = MaskGenerator(c.grid, params.mask)  # the run's mask_ratio / masking / blocks
    rng = np.random.default_rng(stable_hash("visualize-masks", params.seed))
    mask = torch.from_numpy(gen.batch(rng, len(images))).reshape(len(images), -1).to(images.device)  # [B, N]
    cols = [("original", images01), ("masked input", masked_input(images01, mask, c.patch_size))]
    if c.target == "pixels":
        pred = predicted_pixels(model, images, mask) * std + mean  # [B, 3, S, S] in [0, 1]
        return cols + [("predicted pixels", pred.clamp(0, 1))]
    tok = load_tokenizer(params.outputs.tokenizer.dir, images.device)
    if getattr(tok.model, "decoder", None) is None:
        raise ConfigError(f"{params.outputs.tokenizer.dir}: the tokenizer has no decoder, so tokens cannot be "
                          "drawn; convert or train one with its decoder")
    if tuple(tok.grid) != c.grid or tok.vocab_size != c.vocab_size:
        raise ConfigError(f"{params.outputs.tokenizer.dir}: a {tok.grid} grid of {tok.vocab_size} codes, but the "
                          f"pretrained model predicts {c.grid} of {c.vocab_size}; rerun `beit pretrain` on its tokens")
    # The tokenizer sees the image at its own input size (as the tokenize stage renders views);
    # its decoded pictures come back at that size and are shown at the model's.
    true_ids = tok.encode(resized(images01, tok.input_size))  # [B, h, w]
    pred_ids = predicted_tokens(model, images, mask, true_ids)  # [B, h, w]
    size = images01.shape[-1]
    return cols + [("tokenizer (true tokens)", resized(tok.decode(true_ids), size).clamp(0, 1)),
                   ("prediction (masked)", resized(tok.decode(pred_ids), size).clamp(0, 1))]


def visualize(params: Params) -> dict:
    cfg, out = params.visualize, params.outputs.visualize
    device = setup_distributed(cfg.device).device
    models = encoders(params, device)
    pre = models["pretrain"][0]
    loader = LoaderConfig(num_workers=0)
    split = open_labelled(Path(params.outputs.shards) / params.data.eval_split)
    data = ClassifyDataset(split, loader, params.data.image_size, seed=0, train=False)
    mean = torch.tensor(loader.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(loader.std, device=device).view(1, 3, 1, 1)
    rule = ForegroundRule(pre.config.patch_size, cfg.pixel_threshold, cfg.patch_share)
    batches = (b["image"].to(device) for b in eval_batches(data, cfg.batch_size, 0, limit=cfg.images))
    t0 = time.perf_counter()
    try:
        scores, shown = score_encoders(models, batches, mean, std, rule, cfg.show)
    except ValueError as err:
        raise ConfigError(f"{split.shard_dir}: {err} (data.eval_split is empty?)") from None
    seconds = time.perf_counter() - t0
    click.echo(f"visualize: {scores['images']} images x {len(models)} encoders in {seconds:.1f} s "
               f"({scores['images'] / seconds:.0f} img/s)")
    metrics = {**scores, "pixel_threshold": cfg.pixel_threshold, "patch_share": cfg.patch_share}

    fg = rule(shown.images01)  # [show, N]
    notes = []
    for m in MODELS:  # each tile's own mass on the foreground, blank where the image has none
        s = foreground_scores(shown.maps[m].mean(1), fg)
        mass = iter(s["mass"].tolist())
        notes.append([f"fg mass {next(mass):.2f}" if k else "" for k in s["kept"].tolist()])
    grid = pre.config.grid
    save_attention_grid(shown.images01, fg, [(TITLES[m], shown.maps[m].mean(1)) for m in MODELS], grid,
                        out.attention, notes)
    save_head_grid(shown.images01, [(TITLES[m], shown.maps[m]) for m in MODELS], grid, out.heads)
    save_image_rows(reconstructions(params, pre, shown.images01.to(device), mean, std), out.recon)
    write_json(out.metrics, metrics)
    return metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@one_line_errors
def cli(params_path: str) -> None:
    """Attention maps, the attention-on-foreground numbers and MIM reconstructions (paper RQ5)."""
    metrics = visualize(load_params(params_path))
    click.echo(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
    cli()
