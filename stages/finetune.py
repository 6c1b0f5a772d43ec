"""`beit finetune` and `beit scratch`: image classification on labelled shards.

One recipe, two inits. `finetune` starts the encoder from models/pretrain (or
an official unilm checkpoint, `--init unilm:PATH`); `scratch` from a random
BEiT init (the paper's from-scratch baseline). Everything else is shared by
construction: the classifier (mean pooling, fc_norm, head init), param groups
(layer-wise lr decay), data order, augmentation, mixup/cutmix draws and
schedule, all seeded from params.seed only.

Resumable like pretrain: checkpoints under runs/<kind>-<fingerprint>/; every
random choice is a function of (seed, step) or (seed, epoch, key), so a run
resumed after `--stop-after` continues exactly where it stopped.
Top-1/top-5 on the eval split after every epoch (the first `eval_samples`
images; the last epoch scores the whole split, and that is the reported metric).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Optional

import click
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.beit import create_model, timm_export
from model.checkpoints import WEIGHTS, save_checkpoint
from model.classifier import BeitClassifier, load_encoder
from model.engine import Dist, OptimConfig, Stepper, all_mean, setup_distributed, teardown_distributed
from model.mixup import MixConfig, mix_batch, soft_cross_entropy
from pipeline.classify import ClassifyDataset, LabelledSplit, eval_batches, open_labelled
from pipeline.fingerprint import json_fingerprint, stable_hash
from pipeline.loader import LoaderConfig, batches
from pipeline.views import ViewConfig
from stages.config import ConfigError, Params, load_params
from stages.metrics import TsvLog, plot_curves, write_json
from stages.training import (checkpoint, micro_batch, plan_steps, require_finite, resume,
                             seed_step)

COLUMNS = ["step", "epoch", "lr", "loss", "grad_norm", "img_per_s", "eval_loss", "eval_top1", "eval_top5"]


def file_digest(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def num_classes(split: LabelledSplit) -> int:
    classes = split.shard_dir / "classes.json"
    return len(json.loads(classes.read_text())) if classes.exists() else split.num_classes


def encoder_init(params: Params, scratch: bool, init: Optional[str]) -> tuple[dict, object, str]:
    """(timm-layout encoder state dict, BeitConfig, fingerprint of the init)."""
    if scratch:
        torch.manual_seed(params.seed)
        encoder = create_model(params.model)  # the paper's init, from model/beit.py
        return timm_export(encoder)[0], encoder.config, "scratch"
    if init is not None:
        from model.interop import load_unilm

        if not init.startswith("unilm:"):
            raise ConfigError(f"--init {init!r}: expected unilm:PATH (an official microsoft/unilm BEiT .pth)")
        path = init.removeprefix("unilm:")
        config, sd = load_unilm(path)
        return sd, config, f"unilm-{file_digest(path)}"
    ckpt = Path(params.pretrain.out)
    if not (ckpt / WEIGHTS).exists():
        raise FileNotFoundError(f"{ckpt}: no pretrained checkpoint; run `beit pretrain` "
                                "(or `dvc repro pretrain`), or use `beit scratch`")
    encoder = load_encoder(ckpt)
    return timm_export(encoder)[0], encoder.config, f"pretrain-{file_digest(ckpt / WEIGHTS)}"


def build_classifier(params: Params, scratch: bool, init: Optional[str], classes: int
                     ) -> tuple[BeitClassifier, str]:
    """The model both commands train: only the encoder weights depend on `scratch`/`init`."""
    sd, config, init_fp = encoder_init(params, scratch, init)
    if config.img_size != params.data.image_size:
        raise ConfigError(f"model input {config.img_size} px != data.image_size={params.data.image_size}")
    torch.manual_seed(stable_hash("classifier-head", params.seed) % 2**63)  # same head init for both
    model = BeitClassifier(config, classes, drop_path=params.finetune.drop_path)
    model.load_encoder(sd)
    return model, init_fp


def run_fingerprint(params: Params, kind: str, init_fp: str, train: LabelledSplit) -> str:
    """Everything that changes the trajectory; not output paths, logging or eval cadence.
    `validation` stays in although it only changes what is scored: the run's log holds the
    per-epoch scores, and a tuning run must never report test-split scores (or vice versa)."""
    cfg = dataclasses.asdict(params.finetune)
    for k in ("out", "scratch_out", "runs", "log_every", "checkpoint_every", "eval_samples", "device", "init"):
        cfg.pop(k)
    return json_fingerprint({"kind": kind, "seed": params.seed, "model": params.model, "init": init_fp,
                             "image_size": params.data.image_size, "finetune": cfg,
                             "train": train.fingerprint})


def _loss(net, batch: dict):
    return soft_cross_entropy(net(batch["image"]), batch["target"]), {}


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: ClassifyDataset, lcfg: LoaderConfig, env: Dist,
             limit: Optional[int] = None) -> dict:
    """Top-1 / top-5 accuracy and cross-entropy over (the first `limit` images of) the split."""
    was_training = model.training
    model.eval()
    k = min(5, model.num_classes)
    sums = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@k, loss sum, count
    per_rank = None if limit is None else math.ceil(limit / env.world)
    for batch in eval_batches(dataset, lcfg, per_rank):
        logits = model(batch["image"].to(env.device)).float()  # [B, K]
        labels = batch["label"].to(env.device)  # [B]
        topk = logits.topk(k, dim=-1).indices  # [B, k]
        hit = topk == labels[:, None]  # [B, k]
        sums += torch.tensor([hit[:, 0].sum().item(), hit.any(-1).sum().item(),
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


def train_classifier(params: Params, scratch: bool, init: Optional[str] = None,
                     stop_after: Optional[int] = None) -> dict:
    """Train; returns the final metrics (or {"stopped_at": step} after `stop_after` steps)."""
    env = setup_distributed(params.finetune.device)
    try:
        return _train(params, env, scratch, init, stop_after)
    finally:
        teardown_distributed()


def _train(params: Params, env: Dist, scratch: bool, init: Optional[str], stop_after: Optional[int]) -> dict:
    cfg = params.finetune
    kind = "scratch" if scratch else "finetune"
    init = None if scratch else (init or cfg.init)
    shards = Path(params.shard.out)
    train = open_labelled(shards / params.data.train_split, cfg.label_fraction, params.seed)
    if cfg.validation is None:
        held, scored = open_labelled(shards / params.data.eval_split), params.data.eval_split
    else:  # tuning: never touch the test split
        held = open_labelled(shards / params.data.train_split, cfg.label_fraction, params.seed,
                             holdout=cfg.validation)
        scored = f"{params.data.train_split} holdout of {held.num_samples}"
    classes = num_classes(train)
    model, init_fp = build_classifier(params, scratch, init, classes)

    micro = micro_batch(cfg.batch_size, cfg.accum_steps, env, "finetune")
    lcfg = LoaderConfig(batch_size=micro, num_workers=cfg.num_workers,
                        shuffle_buffer=cfg.shuffle_buffer, image_size=params.data.image_size)
    views = ViewConfig(scale=cfg.crop_scale, ratio=cfg.crop_ratio, flip_p=cfg.flip_p,
                       brightness=cfg.color_jitter, contrast=cfg.color_jitter,
                       saturation=cfg.color_jitter, hue=0.0)
    data = ClassifyDataset(train, lcfg, params.seed, train=True, views=views)
    eval_data = ClassifyDataset(held, lcfg, params.seed, train=False)
    mix = MixConfig(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                    smoothing=cfg.label_smoothing)
    plan = plan_steps(train, lcfg, params.seed, cfg.epochs, cfg.accum_steps, cfg.warmup_epochs,
                      env, "finetune")
    steps, total = plan.steps, plan.total

    stepper = Stepper(model, OptimConfig(lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                                         betas=cfg.betas, clip_grad=cfg.clip_grad,
                                         layer_decay=cfg.layer_decay, amp=cfg.amp, compile=cfg.compile),
                      env, num_layers=len(model.blocks))
    run_dir = Path(cfg.runs) / f"{kind}-{run_fingerprint(params, kind, init_fp, train)}"
    step, epoch, in_epoch = resume(run_dir, stepper)
    log = TsvLog(run_dir / "log.tsv", COLUMNS) if env.main else None
    if log is not None:
        log.truncate_after(step)
        click.echo(f"{kind}: {params.model}, {train.num_samples} labelled images "
                   f"({cfg.label_fraction:g} of the labels), {classes} classes, {total} steps, "
                   f"run dir {run_dir}" + (f", resumed at step {step}" if step else ""))

    bar = tqdm(total=total, initial=step, unit="step", disable=not env.main, smoothing=0.05)
    last: dict = {}
    scores: dict = {}
    t0, seen = time.perf_counter(), 0
    while epoch < cfg.epochs:
        it = batches(data, lcfg, epoch, skip=in_epoch * cfg.accum_steps)
        while in_epoch < steps[epoch]:
            micro_batches = []
            for j in range(cfg.accum_steps):
                b = next(it)
                rng = np.random.default_rng(stable_hash("mix", params.seed, step, env.rank, j))
                x, y = mix_batch(b["image"], b["label"], classes, mix, rng)  # [B,3,S,S], [B,K]
                micro_batches.append({"image": x.to(env.device), "target": y.to(env.device)})
            seed_step(params.seed, step, env.rank)
            lr = stepper.set_lr(step, total, plan.warmup)
            stats = stepper.step(micro_batches, _loss)
            step, in_epoch, seen = step + 1, in_epoch + 1, seen + cfg.batch_size
            require_finite(stats, step, "finetune")
            if step % cfg.log_every == 0 or step == total:
                stats = all_mean(stats, env)
                last = {"step": step, "epoch": epoch, "lr": lr,
                        "img_per_s": seen / (time.perf_counter() - t0), **stats}
                if log is not None:
                    log.append(last)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", img_s=f"{last['img_per_s']:.0f}")
            bar.update(1)
            done_epoch = in_epoch == steps[epoch]
            if done_epoch:  # before the checkpoint, so a resumed run never skips an evaluation
                final = epoch == cfg.epochs - 1
                scores = evaluate(stepper.model, eval_data, lcfg, env, None if final else cfg.eval_samples)
                if log is not None:
                    log.append({"step": step, "epoch": epoch, **scores})
                    bar.write(f"{kind} epoch {epoch + 1}/{cfg.epochs}: top-1 {scores['eval_top1']:.4f} "
                              f"top-5 {scores['eval_top5']:.4f} on {scores['eval_samples']} images")
            if step % cfg.checkpoint_every == 0 or step == stop_after or (done_epoch and step < total):
                checkpoint(run_dir, step, stepper, env, epoch, in_epoch, steps[epoch])
            if stop_after is not None and step >= stop_after and step < total:
                bar.close()
                return {"stopped_at": step}
        epoch, in_epoch = epoch + 1, 0
    bar.close()
    if not scores:  # resumed after the last evaluation (a finished run rerun): score again
        scores = evaluate(stepper.model, eval_data, lcfg, env, None)

    history = [r for r in TsvLog(run_dir / "log.tsv", COLUMNS).rows() if r.get("eval_top1")] if env.main else []
    metrics = {"top1": scores["eval_top1"], "top5": scores["eval_top5"], "eval_loss": scores["eval_loss"],
               "eval_samples": scores["eval_samples"], "eval_on": scored, "train_samples": train.num_samples,
               "label_fraction": cfg.label_fraction, "epochs": cfg.epochs, "steps": total,
               "init": init_fp.split("-")[0], "train_loss": last.get("loss"),
               "img_per_s": last.get("img_per_s"),
               "epoch_top1": [float(r["eval_top1"]) for r in history]}
    if env.main:
        out = cfg.scratch_out if scratch else cfg.out
        save_checkpoint(out, stepper.model.state_dict(),
                        model.checkpoint_config(model=params.model, init=init_fp, run=run_dir.name))
        write_json(cfg.scratch_metrics if scratch else cfg.metrics, metrics)
        curve = Path(cfg.scratch_curve if scratch else cfg.curve)
        curve.parent.mkdir(parents=True, exist_ok=True)
        curve.write_text((run_dir / "log.tsv").read_text())
        plot_curves(curve, cfg.scratch_figure if scratch else cfg.figure, ["loss", "eval_top1", "lr"],
                    f"{kind} ({params.model}, {cfg.label_fraction:g} of the labels)")
    return metrics


def _cli(kind: str):
    @click.command(name=kind)
    @click.option("--params", "params_path", default="params.yaml", show_default=True)
    @click.option("--stop-after", type=int, default=None,
                  help="Stop after this many steps with a checkpoint (simulates preemption).")
    def command(params_path: str, stop_after: Optional[int], **kw) -> None:
        try:
            metrics = train_classifier(load_params(params_path), kind == "scratch", kw.get("init"), stop_after)
        except (ConfigError, FileNotFoundError, ValueError) as err:
            raise click.ClickException(str(err)) from None
        click.echo(json.dumps(metrics, sort_keys=True))

    if kind == "finetune":
        command = click.option("--init", default=None, metavar="unilm:PATH",
                               help="Start from an official microsoft/unilm BEiT .pth instead of "
                                    "pretrain.out (overrides finetune.init).")(command)
    command.help = ("Fine-tune the pretrained BEiT encoder on labelled images." if kind == "finetune"
                    else "Train the same classifier with the same recipe from random init (baseline).")
    return command


finetune_cli = _cli("finetune")
scratch_cli = _cli("scratch")

if __name__ == "__main__":  # torchrun --nproc_per_node N -m stages.finetune
    finetune_cli()
