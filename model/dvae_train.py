"""Training and scoring of the dVAE in model/dvae.py, apart from the network itself.

Why a file of its own: a tokenizer that is only loaded and run (model/tokenizer.py,
the tokenize stage) needs the network, not the Gumbel schedule, the dead-code
restarts or the held-out metrics. `train_dvae` is the loop; `schedule_at` is pure,
so the stage can plot it; `evaluate_dvae` scores any tokenizer model (DVAE, DalleVAE).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.dvae import DVAE
from model.schema import DVAESchedule


def _cosine(start: float, end: float, t: float) -> float:
    """Cosine from start (t=0) to end (t>=1)."""
    t = min(max(t, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))


def schedule_at(s: DVAESchedule, step: int, steps: int) -> dict:
    """lr, temperature and kl weight at `step` of `steps`; pure, so the stage can plot it."""
    warm = max(1, int(s.warmup_frac * steps))
    lr = s.lr * (step + 1) / warm if step < warm else _cosine(s.lr, s.lr * s.lr_min_ratio, (step - warm) / max(1, steps - warm))
    temp = _cosine(s.temp_start, s.temp_end, step / max(1, s.temp_anneal_frac * steps))
    kl_w = _cosine(0.0, s.kl_weight, step / max(1, s.kl_warmup_frac * steps))
    return {"lr": lr, "temperature": temp, "kl_weight": kl_w}


def _cycle(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Re-iterate a re-iterable (a DataLoader, a list); a spent one-shot iterator is an error."""
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise ValueError("train_dvae: batches ran out before `steps`; pass a re-iterable or an endless iterator")


def _reset_adam_rows(opt: torch.optim.Optimizer, param: torch.Tensor, rows: torch.Tensor) -> None:
    """Forget Adam moments of re-initialised rows, so stale momentum does not drag them back."""
    state = opt.state.get(param, {})
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key][rows] = 0


def train_dvae(
    model: DVAE,
    batches: Iterable[torch.Tensor],
    steps: int,
    schedule: DVAESchedule = DVAESchedule(),
    *,
    on_step: Optional[Callable[[int, dict], None]] = None,
) -> list[dict]:
    """Train `model` in place for `steps` updates on float [B,3,S,S] batches in [0,1].

    Batches are moved to the model's device. Returns one stats dict per step
    (loss, mse, kl, codes_in_batch, lr, temperature, kl_weight); `on_step(step, stats)`
    is called after each update (logging, checkpoints, early stop by raising).
    """
    if steps < 1:
        raise ValueError(f"train_dvae: steps={steps} must be >= 1")
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    V = model.cfg.vocab_size
    hits = torch.zeros(V, dtype=torch.long, device=device)  # argmax counts since the last restart
    restart_until = int(schedule.restart_until_frac * steps)
    model.train()
    history = []
    for step, x in zip(range(steps), _cycle(batches)):
        x = x.to(device, non_blocking=True)
        if step == 0 and schedule.init_codes:
            model.restart_codes(torch.arange(V, device=device), x, copy_decoder=False)
        knobs = schedule_at(schedule, step, steps)
        for group in opt.param_groups:
            group["lr"] = knobs["lr"]
        loss, stats, ids = model.loss_and_codes(x, knobs["temperature"], knobs["kl_weight"],
                                                schedule.straight_through, schedule.entropy_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        opt.step()
        hits += torch.bincount(ids.reshape(-1), minlength=V)
        restarted = 0
        if schedule.restart_every and (step + 1) % schedule.restart_every == 0 and step < restart_until:
            dead = (hits == 0).nonzero().squeeze(1)  # [K]
            restarted = model.restart_codes(dead, x)
            _reset_adam_rows(opt, model.encoder.codebook, dead)
            _reset_adam_rows(opt, model.decoder.embed, dead)
            hits.zero_()
        stats = {"step": step, **stats, **knobs, "restarted": restarted}
        history.append(stats)
        if on_step is not None:
            on_step(step, stats)
    model.eval()
    return history


# --------------------------------------------------------------------------- metrics


def codebook_usage(ids: torch.Tensor, vocab_size: int) -> float:
    """Fraction of the vocabulary that appears in `ids` (any shape)."""
    return int(torch.unique(ids).numel()) / vocab_size


def perplexity(ids: torch.Tensor, vocab_size: int) -> float:
    """exp(entropy) of the code histogram: the effective number of codes in use."""
    return _counts_perplexity(torch.bincount(ids.reshape(-1), minlength=vocab_size))


def _counts_perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a histogram of code counts (long [V])."""
    p = counts[counts > 0].double() / counts.sum()
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def evaluate_dvae(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 256,
                  recon: bool = True) -> dict:
    """Hard-code reconstruction MSE, codebook usage and perplexity on held-out images.

    `model`: anything with encode/decode/cfg.vocab_size (DVAE, DalleVAE); `images`: float
    [N,3,S,S] in [0,1] or an iterable of such batches (streamed: only code counts are kept).
    recon=False skips the decoder (a tokenizer without one) and omits recon_mse."""
    model.eval()
    device = next(model.parameters()).device
    V = model.cfg.vocab_size
    counts = torch.zeros(V, dtype=torch.long)
    sq, n = 0.0, 0
    for x in images.split(batch_size) if isinstance(images, torch.Tensor) else images:
        x = x.to(device)
        code = model.encode(x)  # [B,h,w]
        if recon:
            sq += F.mse_loss(model.decode(code), x, reduction="sum").item()
        counts += torch.bincount(code.reshape(-1).cpu(), minlength=V)
        n += x.numel()
    if n == 0:
        raise ValueError("evaluate_dvae: no images")
    out = {"codebook_usage": int((counts > 0).sum()) / V, "perplexity": _counts_perplexity(counts)}
    return {"recon_mse": sq / n, **out} if recon else out


@torch.no_grad()
def recon_floors(images: Iterable[torch.Tensor], patch: int) -> dict:
    """What a tokenizer's reconstruction must beat, on the same held-out images (float
    [B,3,S,S] in [0,1]), with `patch` = pixels per token cell:

    patch_mean_mse   each cell replaced by its mean colour (a "tokenizer" with one code per colour)
    avgpool_mse      patch x patch average pooling, bicubic upsampling back (clamped to [0, 1])
    background_share cells that are all black (every pixel below half a grey level)
    """
    sq_mean, sq_pool, n, cells, black = 0.0, 0.0, 0, 0, 0
    for x in images:
        x = x.float()
        pooled = F.avg_pool2d(x, patch)  # [B,3,h,w]
        flat = F.interpolate(pooled, scale_factor=patch, mode="nearest")  # [B,3,S,S]
        smooth = F.interpolate(pooled, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
        sq_mean += F.mse_loss(flat, x, reduction="sum").item()
        sq_pool += F.mse_loss(smooth, x, reduction="sum").item()
        n += x.numel()
        dark = F.max_pool2d(x.amax(1, keepdim=True), patch) < 0.5 / 255  # [B,1,h,w]
        cells += dark.numel()
        black += int(dark.sum())
    if n == 0:
        raise ValueError("recon_floors: no images")
    return {"patch_mean_mse": sq_mean / n, "avgpool_mse": sq_pool / n, "background_share": black / cells}
