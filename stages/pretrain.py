"""`beit pretrain`: BEiT masked image modeling on shards + precomputed tokens.

Run alone (`beit pretrain`), under DVC (`dvc repro pretrain`) or on several
processes (`torchrun --nproc_per_node N -m stages.pretrain`). The loop is
stages/loop.py's `fit`; this module says what a MIM step is: the model, the
masked batches, the loss (cross-entropy on masked positions, in model/beit.py)
and the held-out masked-token accuracy. Resumable checkpoints live under
`<outputs.runs>/pretrain-<fingerprint>/`, keyed by every param that changes the
trajectory plus the data fingerprints, so a changed param starts a new run.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import click
import torch

from model.attention import use_attention
from model.beit import create_model
from model.checkpoints import save_checkpoint
from model.engine import Dist, Stepper, all_mean, setup_distributed, teardown_distributed
from pipeline.fingerprint import json_fingerprint
from pipeline.masking import MaskGenerator
from pipeline.mim import MIMDataset, open_split
from pipeline.render import normalize
from pipeline.schema import LoaderConfig
from pipeline.stream import batches, epoch_steps
from pipeline.tokens import open_tokens, store_path
from stages.config import ConfigError, Params, load_params
from stages.errors import one_line_errors
from stages.figures import plot_curves
from stages.loop import Task, fit, micro_batch, plan_steps
from stages.metrics import publish_curve, write_json

COLUMNS = ("step", "epoch", "lr", "loss", "acc", "grad_norm", "img_per_s")


def run_fingerprint(params: Params, token_fps: dict) -> str:
    """Everything that changes the trajectory; not output paths or logging cadence."""
    cfg = params.pretrain
    return json_fingerprint({"seed": params.seed, "mask": params.mask.trajectory(),
                             "target": params.target, "model": params.model,
                             "loop": cfg.loop.trajectory(), "optim": dataclasses.asdict(cfg.optim),
                             "loader": cfg.loader.trajectory(),
                             "drop_path": cfg.drop_path, "tokens": token_fps,
                             # only when set: the default's run folder (named in its config.json) stays as it was
                             **({"attention": cfg.attention} if cfg.attention != "timm" else {})})


def build_model(params: Params, vocab_size: int, grid: tuple[int, int]):
    # The registry names an architecture; the resolution is the data's (micro: 32 px or the
    # native 28 px of Fashion-MNIST, a 7x7 grid of 4 px patches).
    over = {"vocab_size": vocab_size, "target": params.target, "img_size": params.data.image_size}
    if params.pretrain.drop_path is not None:
        over["drop_path"] = params.pretrain.drop_path
    torch.manual_seed(params.seed)  # identical init on every rank
    try:
        model = create_model(params.model, **over)
    except ValueError as err:
        raise ConfigError(f"data.image_size={params.data.image_size} does not fit model {params.model}: {err}") from None
    use_attention(model, params.pretrain.attention)  # parameters unchanged, only the kernel
    if params.target == "tokens" and tuple(grid) != model.config.grid:
        raise ConfigError(f"token grid {tuple(grid)} != {params.model} patch grid "
                          f"{model.config.grid}: pick a tokenizer whose grid matches the model")
    return model


def to_device(batch: dict, device: torch.device, loader: LoaderConfig = LoaderConfig()) -> dict:
    """The batch on `device`; uint8 images (`loader.transport: uint8`) normalised there
    (pipeline/render.py: normalize); float ones arrive normalised and are only moved."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "image"}
    out["image"] = normalize(batch["image"], loader.mean, loader.std, device)
    return out


def mim_loss(net, batch: dict):
    return net(batch["image"], batch["mask"], batch["tokens"])


def background_patches(model, images: torch.Tensor) -> torch.Tensor:
    """bool [B, N]: patches whose pixels are all black in the rendered view (the ViT's input is
    normalised (x - 0.5) / 0.5, so black is -1; half a grey level of slack)."""
    return model.patchify(images).amax(-1) <= -1.0 + 1.0 / 255  # [B, N]


@torch.no_grad()
def evaluate(model, dataset: MIMDataset, batch_size: int, env: Dist, max_batches: int) -> dict:
    """Masked-token loss/accuracy on held-out images (epoch-0 views and masks), and, for
    token targets, the accuracy on masked patches that are not all background: on centred
    objects over black, the background tokens are easy and inflate the plain accuracy."""
    model.eval()
    totals, n = {}, 0
    fg = torch.zeros(3, dtype=torch.float64)  # foreground hits, foreground masked, all masked
    for i, batch in enumerate(batches(dataset, batch_size, num_workers=0, epoch=0)):
        if i >= max_batches:
            break
        batch = to_device(batch, env.device, dataset.cfg)
        loss, metrics = model(batch["image"], batch["mask"], batch["tokens"])
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        n += 1
        if model.config.target == "tokens":
            mask = batch["mask"].reshape(len(batch["mask"]), -1)  # [B, N]
            hit = model.predict(batch["image"], mask).argmax(-1) == batch["tokens"].reshape(mask.shape)[mask]  # [M]
            keep = ~background_patches(model, batch["image"])[mask]  # [M]
            fg += torch.tensor([float(hit[keep].sum()), float(keep.sum()), float(keep.numel())], dtype=torch.float64)
    model.train()
    out = {f"eval_{k}": v / max(n, 1) for k, v in totals.items() if k != "num_masked"}
    if fg[2] > 0:
        out["eval_acc_foreground"] = float(fg[0] / fg[1].clamp_min(1))
        out["eval_foreground_share"] = float(fg[1] / fg[2])
    return all_mean(out, env) if n else {}


def pretrain(params: Params, stop_after: Optional[int] = None, verify: bool = False) -> dict:
    """Train; returns the final metrics (or {"stopped_at": step} when `stop_after`
    interrupts it, leaving a checkpoint to resume from). `verify`: check every shard
    image's sha256 first (the tar sizes are always checked)."""
    env = setup_distributed(params.pretrain.loop.device)
    try:
        return run(params, env, stop_after, verify)
    finally:
        teardown_distributed()


def run(params: Params, env: Dist, stop_after: Optional[int], verify: bool = False) -> dict:
    cfg, out = params.pretrain, params.outputs
    shards, fmt = Path(out.shards), params.tokenize.format
    train = open_split(shards / params.data.train_split, store_path(out.tokens, params.data.train_split, fmt), verify)
    held = open_split(shards / params.data.eval_split, store_path(out.tokens, params.data.eval_split, fmt), verify)
    spec = open_tokens(train.token_path).spec
    model = build_model(params, spec.vocab_size, spec.grid)
    masks = MaskGenerator(model.config.grid, params.mask)
    if env.device.type == "cuda":  # the static-shape gather of masked rows: no host sync per step
        model.masked_per_image = masks.num_masked  # (CPU keeps boolean indexing: today's exact path)
    size, micro = model.config.img_size, micro_batch(cfg.loop, env, "pretrain")
    data = MIMDataset(train, cfg.loader, size, masks, params.seed)
    plan = plan_steps(lambda e: epoch_steps(train, micro, cfg.loader.num_workers, params.seed, e, env.world),
                      cfg.loop, train.num_samples, "pretrain")
    stepper = Stepper(model, cfg.optim, env)
    run_dir = Path(out.runs) / f"pretrain-{run_fingerprint(params, spec.fingerprints)}"

    def micro_batches(epoch: int, skip: int):
        return batches(data, micro, cfg.loader.num_workers, epoch, skip=skip)

    task = Task("pretrain", COLUMNS, micro_batches, lambda batch, step, j: to_device(batch, env.device, cfg.loader), mim_loss)
    header = f"{params.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
    result = fit(task, stepper, plan, cfg.loop, run_dir, env, params.seed, stop_after, header)
    if result.stopped_at is not None:
        return {"stopped_at": result.stopped_at}

    eval_data = MIMDataset(held, cfg.loader, size, masks, params.seed)
    last = result.last
    metrics = {"steps": plan.total, "train_loss": last.get("loss"), "train_acc": last.get("acc"),
               "img_per_s": last.get("img_per_s"), "amp": result.amp,
               **evaluate(stepper.model, eval_data, micro, env, cfg.eval_batches)}
    if env.main:
        config = {"model": params.model, **dataclasses.asdict(model.config),
                  "tokens": spec.fingerprints, "run": run_dir.name}
        save_checkpoint(out.pretrain.dir, stepper.model.state_dict(), config)
        write_json(out.pretrain.metrics, metrics)
        publish_curve(run_dir / "log.tsv", out.pretrain.curve)
        plot_curves(out.pretrain.curve, out.pretrain.figure,
                    ["loss", "acc", "lr"] if params.target == "tokens" else ["loss", "lr"],
                    f"BEiT pretraining ({params.model}, {params.masking} masking {params.mask_ratio})")
    return metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--stop-after", type=int, default=None,
              help="Stop after this many steps with a checkpoint (simulates preemption).")
@click.option("--verify", is_flag=True, help="Check every shard image's sha256 against index.parquet first.")
@one_line_errors
def cli(params_path: str, stop_after: Optional[int], verify: bool) -> None:
    """Pretrain the BEiT encoder with masked image modeling."""
    metrics = pretrain(load_params(params_path), stop_after, verify)
    click.echo(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":  # torchrun --nproc_per_node N -m stages.pretrain
    cli()
