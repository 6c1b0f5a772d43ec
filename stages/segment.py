"""`beit segment`: semantic segmentation on `beit shard-seg` shards (paper Table 3, RQ4).

`segment.init` picks the encoder: `pretrain` (outputs.pretrain, BEiT pre-training),
`intermediate` (outputs.finetune: pre-training, then supervised fine-tuning on the labelled
classification set, the paper's ImageNet-1k intermediate step), or `scratch` (a random BEiT
init; the baseline, `dvc exp run -S segment.init=scratch`). `segment.init_path` points at
another checkpoint folder of that kind. The encoder is built at the segmentation size
(model/segmentation.py resizes its position terms), the decoder is fresh; everything else is
the same for the three inits, seeded from params.seed only.

The loop is stages/loop.py's `fit` (resumable under <outputs.runs>/segment-<fingerprint>/),
the optimizer step model/engine.py's `Stepper` with layer-wise lr decay and, by default,
mmseg's poly schedule. mIoU / per-class IoU / pixel accuracy on the eval split after every
epoch (the last epoch scores the whole split: the reported metrics).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import click
import torch

from model.beit import create_model, load_encoder, model_config, timm_export
from model.checkpoints import WEIGHTS, save_checkpoint
from model.engine import Dist, Stepper, setup_distributed, teardown_distributed
from model.optim import poly_lr_at
from model.seg_metrics import confusion, scores
from model.segmentation import BeitSegmenter, classifier_encoder
from pipeline.fingerprint import file_fingerprint, json_fingerprint, stable_hash
from pipeline.segdata import SegDataset, SegView, open_seg_split
from pipeline.stream import batches, epoch_steps, eval_batches
from stages.config import ConfigError, Params, load_params
from stages.errors import one_line_errors
from stages.figures import plot_curves
from stages.loop import Task, fit, micro_batch, plan_steps
from stages.metrics import TsvLog, publish_curve, write_json
from stages.seg_figure import save_seg_grid

COLUMNS = ("step", "epoch", "lr", "loss", "aux_loss", "grad_norm", "img_per_s", "eval_miou", "eval_pixel_acc")


class SegStepper(Stepper):
    """The shared Stepper with mmseg's poly schedule when segment.head.schedule is poly."""

    def __init__(self, *args, schedule: str = "poly", **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = schedule

    def set_lr(self, step: int, total_steps: int, warmup_steps: int) -> float:
        if self.schedule != "poly":
            return super().set_lr(step, total_steps, warmup_steps)
        lr = poly_lr_at(step, total_steps, warmup_steps, self.cfg.lr, self.cfg.min_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        return lr


def encoder_init(params: Params) -> tuple[dict, object, str]:
    """(timm-layout encoder state dict at its own grid, its BeitConfig, fingerprint of the init)."""
    cfg = params.segment
    if cfg.init == "scratch":
        torch.manual_seed(params.seed)
        encoder = create_model(params.model, img_size=cfg.size)  # the paper's init, at the segmentation size
        return timm_export(encoder)[0], encoder.config, "scratch"
    if cfg.init == "pretrain":
        ckpt = Path(cfg.init_path or params.outputs.pretrain.dir)
        if not (ckpt / WEIGHTS).exists():
            raise FileNotFoundError(f"{ckpt}: no pretrained checkpoint; run `beit pretrain` (or `dvc repro "
                                    "pretrain`), or set segment.init: scratch")
        encoder = load_encoder(ckpt, params.model)  # another model size: one line
        return timm_export(encoder)[0], encoder.config, f"pretrain-{file_fingerprint(ckpt / WEIGHTS)}"
    ckpt = Path(cfg.init_path or params.outputs.finetune.dir)
    if not (ckpt / WEIGHTS).exists():
        raise FileNotFoundError(f"{ckpt}: no fine-tuned classifier; run `beit finetune` (or `dvc repro "
                                "finetune`) for segment.init: intermediate")
    sd, config = classifier_encoder(ckpt)
    return sd, config, f"intermediate-{file_fingerprint(ckpt / WEIGHTS)}"


def build_segmenter(params: Params, num_classes: int) -> tuple[BeitSegmenter, str]:
    """The model every init trains: the encoder at `segment.size` px, a fresh decoder."""
    sd, config, init_fp = encoder_init(params)
    size = params.segment.size
    if size % config.patch_size:
        raise ConfigError(f"segment.image_size={size}: must be a multiple of the encoder's patch size "
                          f"{config.patch_size}")
    torch.manual_seed(stable_hash("seg-head", params.seed) % 2**63)  # the same decoder init for every encoder
    model = BeitSegmenter(dataclasses.replace(config, img_size=size), num_classes, params.segment.head,
                          drop_path=params.segment.drop_path)
    model.load_encoder(sd)  # resized to the segmentation grid where it differs
    return model, init_fp


@torch.no_grad()
def evaluate(model: BeitSegmenter, dataset: SegDataset, batch_size: int, env: Dist,
             classes: tuple[str, ...], limit: Optional[int] = None) -> dict:
    """mIoU, per-class IoU, pixel accuracy over (the first `limit` scenes of) the split."""
    was_training = model.training
    model.eval()
    k = len(classes)
    conf = torch.zeros(k, k, dtype=torch.int64)
    per_rank = None if limit is None else math.ceil(limit / env.world)
    n = 0
    for batch in eval_batches(dataset, batch_size, dataset.cfg.num_workers, per_rank):
        pred = model(batch["image"].to(env.device)).argmax(1).cpu()  # [B, S, S]
        conf += confusion(pred, batch["mask"], k)
        n += len(pred)
    if env.world > 1:
        conf = conf.to(env.device)
        torch.distributed.all_reduce(conf)
        conf = conf.cpu()
    model.train(was_training)
    s = scores(conf, classes)
    return {"eval_miou": s["miou"], "eval_pixel_acc": s["pixel_acc"], "per_class_iou": s["per_class_iou"],
            "eval_scenes": n * env.world}


@torch.no_grad()
def draw_samples(model: BeitSegmenter, dataset: SegDataset, count: int, path: str, num_classes: int) -> None:
    """The first `count` eval scenes (stored order): image / ground truth / prediction."""
    model.eval()
    batch = next(iter(eval_batches(dataset, count, 0, count)))
    device = next(model.parameters()).device
    pred = model(batch["image"].to(device)).argmax(1).cpu()  # [N, S, S]
    mean = torch.tensor(dataset.cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(dataset.cfg.std).view(1, 3, 1, 1)
    images = ((batch["image"] * std + mean).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    save_seg_grid(images, batch["mask"].byte().numpy(), pred.byte().numpy(), path, num_classes)


def run_fingerprint(params: Params, init_fp: str, train_fp: str) -> str:
    cfg = params.segment
    recipe = {k: v for k, v in dataclasses.asdict(cfg).items()
              if k not in ("init", "init_path", "loop", "eval_samples", "figure_scenes", "data")}
    return json_fingerprint({"seed": params.seed, "model": params.model, "init": init_fp, "size": cfg.size,
                             "segment": recipe, "loop": cfg.loop.trajectory(), "train": train_fp})


def segment(params: Params, stop_after: Optional[int] = None, verify: bool = False) -> dict:
    """Train and score the segmenter (on the ranks torchrun started; one process without it)."""
    env = setup_distributed(params.segment.loop.device)
    try:
        return run(params, env, stop_after, verify)
    finally:
        teardown_distributed()


def run(params: Params, env: Dist, stop_after: Optional[int], verify: bool) -> dict:
    cfg, out, data = params.segment, params.outputs, params.segment.data
    root = Path(out.seg_shards)
    train = open_seg_split(root / data.train_split, verify)
    held = open_seg_split(root / data.eval_split, verify)
    if train.num_classes != data.classes:
        raise ConfigError(f"{root / data.train_split}/classes.json lists {train.num_classes} classes but "
                          f"segment.data says {data.classes}; rerun `beit shard-seg`")
    model, init_fp = build_segmenter(params, train.num_classes)
    micro, workers = micro_batch(cfg.loop, env, "segment"), cfg.loader.num_workers
    view = SegView(cfg.augment.scale, cfg.augment.flip_p)
    train_data = SegDataset(train, cfg.loader, cfg.size, params.seed, train=True, view=view)
    eval_data = SegDataset(held, cfg.loader, cfg.size, params.seed, train=False)
    plan = plan_steps(lambda e: epoch_steps(train, micro, workers, params.seed, e, env.world),
                      cfg.loop, train.num_samples, "segment")
    stepper = SegStepper(model, cfg.optim, env, num_layers=len(model.blocks), schedule=cfg.head.schedule)
    run_dir = Path(out.runs) / f"segment-{run_fingerprint(params, init_fp, train.fingerprint)}"

    def micro_batches(epoch: int, skip: int):
        return batches(train_data, micro, workers, epoch, skip=skip)

    def prepare(batch: dict, step: int, j: int) -> dict:
        return {"image": batch["image"].to(env.device), "mask": batch["mask"].to(env.device)}

    def loss(net, batch: dict):
        return (net.module if hasattr(net, "module") else net).loss(batch["image"], batch["mask"])

    def score(final: bool) -> dict:
        s = evaluate(stepper.model, eval_data, micro, env, train.classes, None if final else cfg.eval_samples)
        return {k: v for k, v in s.items() if k != "per_class_iou"} | ({"per_class_iou": s["per_class_iou"]}
                                                                          if final else {})

    task = Task("segment", COLUMNS, micro_batches, prepare, loss, score)
    header = (f"init {cfg.init}, {params.model} at {cfg.size} px ({cfg.size // model.config.patch_size}^2 patches), "
              f"{train.num_samples} train scenes, {train.num_classes} classes, ")
    result = fit(task, stepper, plan, cfg.loop, run_dir, env, params.seed, stop_after, header)
    if result.stopped_at is not None:
        return {"stopped_at": result.stopped_at}
    final = result.scores if "per_class_iou" in result.scores else score(True)  # a finished run, rerun
    history = [r for r in TsvLog(run_dir / "log.tsv", COLUMNS).rows() if r.get("eval_miou")] if env.main else []
    metrics = {"miou": final["eval_miou"], "pixel_acc": final["eval_pixel_acc"],
               "per_class_iou": final["per_class_iou"], "eval_scenes": final["eval_scenes"],
               "eval_on": data.eval_split, "train_scenes": train.num_samples, "init": cfg.init,
               "init_fingerprint": init_fp, "image_size": cfg.size, "epochs": cfg.loop.epochs, "steps": plan.total,
               "train_loss": result.last.get("loss"), "img_per_s": result.last.get("img_per_s"),
               "amp": result.amp, "epoch_miou": [float(r["eval_miou"]) for r in history]}
    if env.main:
        paths = out.segment
        save_checkpoint(paths.dir, stepper.model.state_dict(),
                        model.checkpoint_config(model=params.model, init=init_fp, run=run_dir.name))
        write_json(paths.metrics, metrics)
        publish_curve(run_dir / "log.tsv", paths.curve)
        plot_curves(paths.curve, paths.figure, ["loss", "eval_miou", "lr"],
                    f"segment ({params.model}, init {cfg.init})")
        draw_samples(stepper.model, eval_data, cfg.figure_scenes, paths.samples, train.num_classes)
    return metrics


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--init", type=click.Choice(["pretrain", "intermediate", "scratch"]), default=None,
              help="Encoder init (overrides segment.init).")
@click.option("--stop-after", type=int, default=None,
              help="Stop after this many steps with a checkpoint (simulates preemption).")
@click.option("--verify", is_flag=True, help="Check every shard image's sha256 against index.parquet first.")
@one_line_errors
def cli(params_path: str, init: Optional[str], stop_after: Optional[int], verify: bool) -> None:
    """Semantic segmentation with the BEiT encoder (UperNet decoder) on `beit shard-seg` shards."""
    params = load_params(params_path)
    if init is not None:
        params = dataclasses.replace(params, segment=dataclasses.replace(params.segment, init=init))
    metrics = segment(params, stop_after, verify)
    click.echo(json.dumps({k: v for k, v in metrics.items() if k != "per_class_iou"}, sort_keys=True))
