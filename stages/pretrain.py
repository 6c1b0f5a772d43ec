"""`beit pretrain`: BEiT masked image modeling on shards + precomputed tokens.

Run alone (`beit pretrain`), under DVC (`dvc repro pretrain`) or on several
processes (`torchrun --nproc_per_node N -m stages.pretrain`). Resumable
checkpoints live under `runs/pretrain-<fingerprint>/`, keyed by every param
this stage reads plus the data fingerprints, so a changed param starts a new
run instead of silently resuming an old one.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import click
import torch
from tqdm import tqdm

from model.beit import create_model
from model.checkpoints import save_checkpoint
from model.engine import Dist, OptimConfig, Stepper, all_mean, setup_distributed, teardown_distributed
from pipeline.fingerprint import json_fingerprint
from pipeline.loader import LoaderConfig, MIMDataset, StaleTokens, batches, open_split
from pipeline.masking import MaskGenerator, MaskingConfig
from pipeline.tokens import store_path
from stages.config import ConfigError, Params, load_params
from stages.metrics import TsvLog, plot_curves, write_json
from stages.training import (checkpoint, micro_batch, plan_steps, require_finite, resume,
                             seed_step)

COLUMNS = ["step", "epoch", "lr", "loss", "acc", "grad_norm", "img_per_s"]


def _model_overrides(params: Params, vocab_size: int) -> dict:
    over = {"vocab_size": vocab_size, "target": params.target}
    if params.pretrain.drop_path is not None:
        over["drop_path"] = params.pretrain.drop_path
    return over


def run_fingerprint(params: Params, token_fps: dict) -> str:
    """Everything that changes the trajectory; not output paths or logging cadence."""
    cfg = dataclasses.asdict(params.pretrain)
    for k in ("out", "runs", "metrics", "curve", "figure", "log_every", "checkpoint_every",
              "eval_batches", "device", "num_workers"):
        cfg.pop(k)
    return json_fingerprint({"seed": params.seed, "mask_ratio": params.mask_ratio,
                             "masking": params.masking, "target": params.target,
                             "model": params.model, "pretrain": cfg, "tokens": token_fps})


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _loss(net, batch: dict):
    return net(batch["image"], batch["mask"], batch["tokens"])


@torch.no_grad()
def evaluate(model, dataset: MIMDataset, lcfg: LoaderConfig, env: Dist, max_batches: int) -> dict:
    """Masked-token loss/accuracy on held-out images (epoch-0 views and masks)."""
    model.eval()
    totals, n = {}, 0
    for i, batch in enumerate(batches(dataset, dataclasses.replace(lcfg, num_workers=0), epoch=0)):
        if i >= max_batches:
            break
        batch = _to(batch, env.device)
        loss, metrics = model(batch["image"], batch["mask"], batch["tokens"])
        for k, v in {"loss": loss, **metrics}.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        n += 1
    model.train()
    out = {f"eval_{k}": v / max(n, 1) for k, v in totals.items() if k != "num_masked"}
    return all_mean(out, env) if n else {}


def pretrain(params: Params, stop_after: Optional[int] = None) -> dict:
    """Train; returns the final metrics (or {"stopped_at": step} when `stop_after`
    interrupts it, leaving a checkpoint to resume from)."""
    cfg = params.pretrain
    env = setup_distributed(cfg.device)
    try:
        return _pretrain(params, env, stop_after)
    finally:
        teardown_distributed()


def _pretrain(params: Params, env: Dist, stop_after: Optional[int]) -> dict:
    cfg = params.pretrain
    shards = Path(params.shard.out)
    fmt = params.tokenize.format
    train = open_split(shards / params.data.train_split,
                       store_path(params.tokenize.out, params.data.train_split, fmt))
    held = open_split(shards / params.data.eval_split,
                      store_path(params.tokenize.out, params.data.eval_split, fmt))
    from pipeline.tokens import open_tokens

    spec = open_tokens(train.token_path).spec
    torch.manual_seed(params.seed)  # identical init on every rank
    model = create_model(params.model, **_model_overrides(params, spec.vocab_size))
    if model.config.img_size != params.data.image_size:
        raise ConfigError(f"model {params.model} takes {model.config.img_size} px but "
                          f"data.image_size={params.data.image_size}; make them agree")
    if params.target == "tokens" and tuple(spec.grid) != model.config.grid:
        raise ConfigError(f"token grid {tuple(spec.grid)} != {params.model} patch grid "
                          f"{model.config.grid}: pick a tokenizer whose grid matches the model")
    masks = MaskGenerator(model.config.grid, MaskingConfig(
        kind=params.masking, mask_ratio=params.mask_ratio, min_block=cfg.min_block))
    micro = micro_batch(cfg.batch_size, cfg.accum_steps, env, "pretrain")
    lcfg = LoaderConfig(batch_size=micro, num_workers=cfg.num_workers,
                        shuffle_buffer=cfg.shuffle_buffer, image_size=model.config.img_size)
    data = MIMDataset(train, lcfg, masks, params.seed)
    plan = plan_steps(train, lcfg, params.seed, cfg.epochs, cfg.accum_steps, cfg.warmup_epochs,
                      env, "pretrain")
    steps, total = plan.steps, plan.total

    stepper = Stepper(model, OptimConfig(lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                                         betas=cfg.betas, clip_grad=cfg.clip_grad, amp=cfg.amp,
                                         compile=cfg.compile), env)
    run_dir = Path(cfg.runs) / f"pretrain-{run_fingerprint(params, spec.fingerprints)}"
    step, epoch, in_epoch = resume(run_dir, stepper)
    log = TsvLog(run_dir / "log.tsv", COLUMNS) if env.main else None
    if log is not None:
        log.truncate_after(step)
        click.echo(f"pretrain: {params.model} ({sum(p.numel() for p in model.parameters())/1e6:.2f}M "
                   f"params), {total} steps, run dir {run_dir}" + (f", resumed at step {step}" if step else ""))

    bar = tqdm(total=total, initial=step, unit="step", disable=not env.main, smoothing=0.05)
    last: dict = {}
    t0, seen = time.perf_counter(), 0
    while epoch < cfg.epochs:
        it = batches(data, lcfg, epoch, skip=in_epoch * cfg.accum_steps)
        while in_epoch < steps[epoch]:
            micro_batches = [_to(next(it), env.device) for _ in range(cfg.accum_steps)]
            seed_step(params.seed, step, env.rank)
            lr = stepper.set_lr(step, total, plan.warmup)
            stats = stepper.step(micro_batches, _loss)
            step, in_epoch, seen = step + 1, in_epoch + 1, seen + cfg.batch_size
            require_finite(stats, step, "pretrain")
            if step % cfg.log_every == 0 or step == total:
                stats = all_mean(stats, env)
                ips = seen / (time.perf_counter() - t0)
                last = {"step": step, "epoch": epoch, "lr": lr, "img_per_s": ips, **stats}
                if log is not None:
                    log.append(last)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats.get('acc', 0):.3f}",
                                img_s=f"{ips:.0f}")
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == stop_after:
                checkpoint(run_dir, step, stepper, env, epoch, in_epoch, steps[epoch])
            if stop_after is not None and step >= stop_after:
                bar.close()
                return {"stopped_at": step}
        epoch, in_epoch = epoch + 1, 0
    bar.close()

    eval_data = MIMDataset(held, lcfg, masks, params.seed)
    metrics = {"steps": total, "train_loss": last.get("loss"), "train_acc": last.get("acc"),
               "img_per_s": last.get("img_per_s"),
               **evaluate(stepper.model, eval_data, lcfg, env, cfg.eval_batches)}
    if env.main:
        config = {"model": params.model, **dataclasses.asdict(model.config),
                  "tokens": spec.fingerprints, "run": run_dir.name}
        save_checkpoint(cfg.out, stepper.model.state_dict(), config)
        write_json(cfg.metrics, metrics)
        Path(cfg.curve).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.curve).write_text((run_dir / "log.tsv").read_text())
        plot_curves(cfg.curve, cfg.figure,
                    ["loss", "acc", "lr"] if params.target == "tokens" else ["loss", "lr"],
                    f"BEiT pretraining ({params.model}, {params.masking} masking {params.mask_ratio})")
    return metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--stop-after", type=int, default=None,
              help="Stop after this many steps with a checkpoint (simulates preemption).")
def cli(params_path: str, stop_after: Optional[int]) -> None:
    """Pretrain the BEiT encoder with masked image modeling."""
    try:
        metrics = pretrain(load_params(params_path), stop_after)
    except (ConfigError, StaleTokens, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":  # torchrun --nproc_per_node N -m stages.pretrain
    cli()
