"""`beit finetune` and `beit scratch`: image classification on labelled shards.

One recipe (the `finetune` section), two inits. `finetune` starts the encoder from
outputs.pretrain (or an official unilm checkpoint, `--init unilm:PATH`); `scratch`
from a random BEiT init (the paper's from-scratch baseline). Everything else is
shared by construction: the classifier (mean pooling, fc_norm, head init), param
groups (layer-wise lr decay), data order, augmentation, mixup/cutmix draws and
schedule, all seeded from params.seed only. Each command writes its own
`outputs.<kind>` record.

The loop is stages/loop.py's `fit`: resumable under `<outputs.runs>/<kind>-<fingerprint>/`,
top-1/top-5 on the whole eval split after the last epoch (the reported metric); with
`eval_samples: N` also on its first N images after every other epoch (a curve; 0, the default,
scores the test split once).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Literal, Optional

import click
import numpy as np
import torch
import torch.nn.functional as F

from model.beit import create_model, load_encoder, timm_export
from model.checkpoints import WEIGHTS, save_checkpoint
from model.classifier import BeitClassifier
from model.engine import Dist, Stepper, setup_distributed, teardown_distributed
from model.mixup import mix_batch, soft_cross_entropy
from pipeline.classify import ClassifyDataset, LabelledSplit, open_labelled
from pipeline.fingerprint import file_fingerprint, json_fingerprint, stable_hash
from pipeline.stream import batches, epoch_steps, eval_batches
from stages.config import ConfigError, Params, load_params
from stages.errors import one_line_errors
from stages.figures import plot_curves
from stages.loop import Task, fit, micro_batch, plan_steps
from stages.metrics import TsvLog, publish_curve, topk_hits, write_json

Kind = Literal["finetune", "scratch"]
COLUMNS = ("step", "epoch", "lr", "loss", "grad_norm", "img_per_s", "eval_loss", "eval_top1", "eval_top5")


def encoder_init(params: Params, kind: Kind, init: Optional[str]) -> tuple[dict, object, str]:
    """(timm-layout encoder state dict, BeitConfig, fingerprint of the init)."""
    if kind == "scratch":
        torch.manual_seed(params.seed)
        encoder = create_model(params.model, img_size=params.data.image_size)  # the paper's init
        return timm_export(encoder)[0], encoder.config, "scratch"
    if init is not None:
        from model.interop import load_unilm

        if not init.startswith("unilm:"):
            raise ConfigError(f"--init {init!r}: expected unilm:PATH (an official microsoft/unilm BEiT .pth)")
        path = init.removeprefix("unilm:")
        config, sd = load_unilm(path)
        return sd, config, f"unilm-{file_fingerprint(path)}"
    ckpt = Path(params.outputs.pretrain.dir)
    if not (ckpt / WEIGHTS).exists():
        raise FileNotFoundError(f"{ckpt}: no pretrained checkpoint; run `beit pretrain` "
                                "(or `dvc repro pretrain`), or use `beit scratch`")
    encoder = load_encoder(ckpt, params.model, params.data.image_size)  # another size/resolution: one line
    return timm_export(encoder)[0], encoder.config, f"pretrain-{file_fingerprint(ckpt / WEIGHTS)}"


def build_classifier(params: Params, kind: Kind, init: Optional[str], classes: int
                     ) -> tuple[BeitClassifier, str]:
    """The model both commands train: only the encoder weights depend on `kind`/`init`."""
    sd, config, init_fp = encoder_init(params, kind, init)
    if config.img_size != params.data.image_size:
        source = "model " + params.model if kind == "scratch" else f"--init {init}" if init else "the encoder"
        raise ConfigError(f"{source} takes {config.img_size} px but data.image_size={params.data.image_size}; "
                          "make them agree")
    torch.manual_seed(stable_hash("classifier-head", params.seed) % 2**63)  # same head init for both
    model = BeitClassifier(config, classes, drop_path=params.finetune.drop_path)
    model.load_encoder(sd)
    return model, init_fp


def run_fingerprint(params: Params, kind: Kind, init_fp: str, train: LabelledSplit) -> str:
    """Everything that changes the trajectory; not output paths, logging or eval cadence.
    `validation` stays in although it only changes what is scored: the run's log holds the
    per-epoch scores, and a tuning run must never report test-split scores (or vice versa)."""
    cfg = params.finetune
    recipe = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("init", "loop", "eval_samples")}
    recipe["optim"] = dataclasses.asdict(optim_for(params, kind))
    recipe["loader"] = cfg.loader.trajectory()  # as asdict, minus a default transport
    return json_fingerprint({"kind": kind, "seed": params.seed, "model": params.model, "init": init_fp,
                             "image_size": params.data.image_size, "finetune": recipe,
                             "loop": cfg.loop.trajectory(), "train": train.fingerprint})


def optim_for(params: Params, kind: Kind):
    """The optimiser of `kind`: scratch has its own section (no layer decay, its own lr)."""
    return params.scratch.optim if kind == "scratch" else params.finetune.optim


def classify_loss(net, batch: dict):
    return soft_cross_entropy(net(batch["image"]), batch["target"]), {}


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: ClassifyDataset, batch_size: int, num_workers: int, env: Dist,
             limit: Optional[int] = None) -> dict:
    """Top-1 / top-5 accuracy and cross-entropy over (the first `limit` images of) the split."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, loss sum, count
    per_rank = None if limit is None else math.ceil(limit / env.world)
    for batch in eval_batches(dataset, batch_size, num_workers, per_rank):
        logits = model(batch["image"].to(env.device)).float()  # [B, K]
        labels = batch["label"].to(env.device)  # [B]
        top1, top5 = topk_hits(logits, labels)  # bool [B] each
        sums += torch.tensor([top1.sum().item(), top5.sum().item(),
                              F.cross_entropy(logits, labels, reduction="sum").item(), len(labels)],
                             dtype=torch.float64)
    if env.world > 1:
        sums = sums.to(env.device)
        torch.distributed.all_reduce(sums)
        sums = sums.cpu()
    model.train(was_training)
    n = max(sums[3].item(), 1.0)
    return {"eval_top1": sums[0].item() / n, "eval_top5": sums[1].item() / n,
            "eval_loss": sums[2].item() / n, "eval_samples": int(sums[3].item())}


def finetune(params: Params, init: Optional[str] = None, stop_after: Optional[int] = None,
             verify: bool = False) -> dict:
    """Fine-tune from outputs.pretrain (or `init`, unilm:PATH); the final metrics, or
    {"stopped_at": step} after `stop_after` steps. `verify`: check every shard image's
    sha256 first (the tar sizes are always checked)."""
    return train_classifier(params, "finetune", init, stop_after, verify)


def scratch(params: Params, stop_after: Optional[int] = None, verify: bool = False) -> dict:
    """The same recipe from random init (the paper's baseline)."""
    return train_classifier(params, "scratch", None, stop_after, verify)


def train_classifier(params: Params, kind: Kind, init: Optional[str] = None,
                     stop_after: Optional[int] = None, verify: bool = False) -> dict:
    """`finetune` or `scratch`, on the ranks torchrun started (one process without it)."""
    env = setup_distributed(params.finetune.loop.device)
    try:
        return run(params, env, kind, init, stop_after, verify)
    finally:
        teardown_distributed()


def run(params: Params, env: Dist, kind: Kind, init: Optional[str], stop_after: Optional[int],
        verify: bool = False) -> dict:
    cfg, out = params.finetune, params.outputs
    init = None if kind == "scratch" else (init or cfg.init)
    shards, size = Path(out.shards), params.data.image_size
    train = open_labelled(shards / params.data.train_split, cfg.label_fraction, params.seed, verify=verify)
    if cfg.validation is None:
        held, scored = open_labelled(shards / params.data.eval_split, verify=verify), params.data.eval_split
    else:  # tuning: never touch the test split (its shards were verified with `train`)
        held = open_labelled(shards / params.data.train_split, cfg.label_fraction, params.seed,
                             holdout=cfg.validation)
        scored = f"{params.data.train_split} holdout of {held.num_samples}"
    classes = train.num_classes
    model, init_fp = build_classifier(params, kind, init, classes)

    micro, workers = micro_batch(cfg.loop, env, "finetune"), cfg.loader.num_workers
    data = ClassifyDataset(train, cfg.loader, size, params.seed, train=True, views=cfg.views,
                           augment=cfg.augment)
    eval_data = ClassifyDataset(held, cfg.loader, size, params.seed, train=False)
    plan = plan_steps(lambda e: epoch_steps(train, micro, workers, params.seed, e, env.world),
                      cfg.loop, train.num_samples, "finetune")
    stepper = Stepper(model, optim_for(params, kind), env, num_layers=len(model.blocks))
    run_dir = Path(out.runs) / f"{kind}-{run_fingerprint(params, kind, init_fp, train)}"

    def micro_batches(epoch: int, skip: int):
        return batches(data, micro, workers, epoch, skip=skip)

    def mixed(batch: dict, step: int, j: int) -> dict:
        rng = np.random.default_rng(stable_hash("mix", params.seed, step, env.rank, j))
        x, y = mix_batch(batch["image"], batch["label"], classes, cfg.mix, rng)  # [B,3,S,S], [B,K]
        return {"image": x.to(env.device), "target": y.to(env.device)}

    def score(final: bool) -> dict:
        if not final and cfg.eval_samples == 0:  # scored once, after the last epoch
            return {}
        return evaluate(stepper.model, eval_data, micro, workers, env, None if final else cfg.eval_samples)

    task = Task(kind, COLUMNS, micro_batches, mixed, classify_loss, score)
    header = (f"{params.model}, {train.num_samples} labelled images ({cfg.label_fraction:g} of the labels), "
              f"{classes} classes, ")
    result = fit(task, stepper, plan, cfg.loop, run_dir, env, params.seed, stop_after, header)
    if result.stopped_at is not None:
        return {"stopped_at": result.stopped_at}
    scores = result.scores or score(True)  # resumed after the last evaluation (a finished run rerun)

    history = [r for r in TsvLog(run_dir / "log.tsv", COLUMNS).rows() if r.get("eval_top1")] if env.main else []
    last = result.last
    metrics = {"top1": scores["eval_top1"], "top5": scores["eval_top5"], "eval_loss": scores["eval_loss"],
               "eval_samples": scores["eval_samples"], "eval_on": scored, "train_samples": train.num_samples,
               "label_fraction": cfg.label_fraction, "epochs": cfg.loop.epochs, "steps": plan.total,
               "init": init_fp.split("-")[0], "train_loss": last.get("loss"),
               "img_per_s": last.get("img_per_s"), "amp": result.amp,
               "epoch_top1": [float(r["eval_top1"]) for r in history]}
    if env.main:
        paths = getattr(out, kind)
        save_checkpoint(paths.dir, stepper.model.state_dict(),
                        model.checkpoint_config(model=params.model, init=init_fp, run=run_dir.name))
        write_json(paths.metrics, metrics)
        publish_curve(run_dir / "log.tsv", paths.curve)
        plot_curves(paths.curve, paths.figure, ["loss", "eval_top1", "lr"],
                    f"{kind} ({params.model}, {cfg.label_fraction:g} of the labels)")
    return metrics


def command(kind: Kind) -> click.Command:
    @click.command(name=kind)
    @click.option("--params", "params_path", default="params.yaml", show_default=True)
    @click.option("--stop-after", type=int, default=None,
                  help="Stop after this many steps with a checkpoint (simulates preemption).")
    @click.option("--verify", is_flag=True, help="Check every shard image's sha256 against index.parquet first.")
    @one_line_errors
    def cli(params_path: str, stop_after: Optional[int], verify: bool, **kw) -> None:
        metrics = train_classifier(load_params(params_path), kind, kw.get("init"), stop_after, verify)
        click.echo(json.dumps(metrics, sort_keys=True))

    if kind == "finetune":
        cli = click.option("--init", default=None, metavar="unilm:PATH",
                           help="Start from an official microsoft/unilm BEiT .pth instead of "
                                "outputs.pretrain (overrides finetune.init).")(cli)
    cli.help = ("Fine-tune the pretrained BEiT encoder on labelled images." if kind == "finetune"
                else "Train the same classifier with the same recipe from random init (baseline).")
    return cli


finetune_cli = command("finetune")
scratch_cli = command("scratch")

if __name__ == "__main__":  # torchrun --nproc_per_node N -m stages.finetune
    finetune_cli()
