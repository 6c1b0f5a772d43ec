"""Our own discrete VAE tokenizer, trained the way DALL-E's dVAE was.

Encoder: a small ResNet that maps [B,3,S,S] images to logits [B,V,h,w] over a
vocabulary of V codes (h = S / downsample). Training relaxes the categorical
code with Gumbel-softmax (temperature annealed 1 -> 1/16), adds KL(q || uniform)
with a warmed-up weight, and decodes the soft one-hot with a conv decoder.
Reconstruction is MSE on sigmoid outputs in [0,1], a bounded pixel space.
At tokenization time codes are the argmax of the logits.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class DVAEConfig:
    """Sizes. Defaults: 32 px -> 8x8 codes, the patch grid of the default ViT (patch 4)."""

    image_size: int = 32
    in_channels: int = 3
    vocab_size: int = 1024
    downsample: int = 4  # power of two; grid = image_size // downsample
    hidden: int = 32  # width at full resolution; doubles after each 2x downsample
    blocks_per_group: int = 1

    def __post_init__(self) -> None:
        d = self.downsample
        if d < 1 or d & (d - 1):
            raise ValueError(f"dvae downsample={d}: must be a power of two (4 for 32 px -> 8x8)")
        if self.image_size % d:
            raise ValueError(f"dvae image_size={self.image_size} is not divisible by downsample={d}")
        if self.vocab_size < 2 or self.hidden < 1 or self.blocks_per_group < 1:
            raise ValueError("dvae vocab_size >= 2, hidden >= 1 and blocks_per_group >= 1 are required")

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.downsample
        return g, g

    @property
    def widths(self) -> list[int]:
        """Channel width of each resolution level, finest first."""
        return [self.hidden * 2**i for i in range(int(math.log2(self.downsample)) + 1)]


# The 112 px -> 14x14 configuration (8x down) for ImageNet-scale use.
DVAE_112 = DVAEConfig(image_size=112, vocab_size=8192, downsample=8, hidden=64, blocks_per_group=2)


class ResBlock(nn.Module):
    """Pre-activation residual block; the residual branch starts near zero (as DALL-E's post_gain)."""

    def __init__(self, n_in: int, n_out: int, gain: float) -> None:
        super().__init__()
        self.skip = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.conv1 = nn.Conv2d(n_in, n_out, 3, padding=1)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.gain * self.conv2(F.relu(self.conv1(F.relu(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        w = cfg.widths
        gain = 1.0 / (len(w) * cfg.blocks_per_group)
        self.stem = nn.Conv2d(cfg.in_channels, w[0], 3, padding=1)
        layers: list[nn.Module] = []
        for level, width in enumerate(w):
            prev = w[max(level - 1, 0)]
            layers += [ResBlock(prev if b == 0 else width, width, gain) for b in range(cfg.blocks_per_group)]
            if level < len(w) - 1:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(w[-1], cfg.vocab_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,S,S] in [0,1] -> logits [B,V,h,w]."""
        h = F.relu(self.body(self.stem(2.0 * x - 1.0)))  # [B,C,h,w]
        # Centring features per position stops one shared direction (ReLU outputs are all
        # positive) from picking the same few codes everywhere; it halved recon error in trials.
        h = F.layer_norm(h.permute(0, 2, 3, 1), h.shape[1:2]).permute(0, 3, 1, 2)  # [B,h,w,C] -> [B,C,h,w]
        return self.head(h)


class Decoder(nn.Module):
    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        w = cfg.widths[::-1]  # coarsest first
        gain = 1.0 / (len(w) * cfg.blocks_per_group)
        # A code's embedding is a 1x1 conv on its one-hot: [V, C] weight.
        self.embed = nn.Parameter(torch.randn(cfg.vocab_size, w[0]) / math.sqrt(w[0]))
        layers: list[nn.Module] = []
        for level, width in enumerate(w):
            prev = w[max(level - 1, 0)]
            layers += [ResBlock(prev if b == 0 else width, width, gain) for b in range(cfg.blocks_per_group)]
            if level < len(w) - 1:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(w[-1], cfg.in_channels, 3, padding=1)

    def forward(self, soft: torch.Tensor) -> torch.Tensor:
        """(relaxed) one-hot [B,V,h,w] -> image [B,C,S,S] in [0,1]."""
        z = torch.einsum("bvhw,vc->bchw", soft, self.embed)  # [B,C,h,w]
        return torch.sigmoid(self.head(F.relu(self.body(z))))

    def from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """long [B,h,w] -> image [B,C,S,S]; a gather instead of a V-wide one-hot."""
        z = self.embed[ids].permute(0, 3, 1, 2)  # [B,h,w,C] -> [B,C,h,w]
        return torch.sigmoid(self.head(F.relu(self.body(z))))


class DVAE(nn.Module):
    def __init__(self, cfg: DVAEConfig = DVAEConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _check(self, x: torch.Tensor) -> None:
        c, s = self.cfg.in_channels, self.cfg.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s) or not x.is_floating_point():
            raise ValueError(f"dVAE expects float [B,{c},{s},{s}] in [0,1], got {x.dtype} {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """float [B,3,S,S] in [0,1] -> long [B,h,w] (argmax codes)."""
        self._check(x)
        return self.encoder(x).argmax(dim=1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """long [B,h,w] -> float [B,3,S,S] in [0,1]."""
        return self.decoder.from_ids(ids)

    def forward(
        self, x: torch.Tensor, temperature: float, kl_weight: float, straight_through: bool = False
    ) -> tuple[torch.Tensor, dict]:
        """Relaxed ELBO-style loss; returns (loss, float stats)."""
        self._check(x)
        logits = self.encoder(x)  # [B,V,h,w]
        soft = F.gumbel_softmax(logits, tau=temperature, hard=straight_through, dim=1)  # [B,V,h,w]
        recon = self.decoder(soft)
        mse = F.mse_loss(recon, x)
        log_q = F.log_softmax(logits, dim=1)
        # KL(q || uniform) per code position, in nats: sum q log q + log V.
        kl = (log_q.exp() * log_q).sum(dim=1).mean() + math.log(self.cfg.vocab_size)
        loss = mse + kl_weight * kl
        stats = {"loss": loss.item(), "mse": mse.item(), "kl": kl.item(),
                 "codes_in_batch": int(logits.argmax(dim=1).unique().numel())}
        return loss, stats

    loss = forward


# --------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class DVAESchedule:
    """Optimisation knobs; *_frac are fractions of the total step count (DALL-E's shapes, cosine)."""

    lr: float = 2e-3
    lr_min_ratio: float = 0.01  # final lr = lr * ratio
    warmup_frac: float = 0.02
    weight_decay: float = 1e-4
    temp_start: float = 1.0
    temp_end: float = 1 / 16
    temp_anneal_frac: float = 0.7
    kl_weight: float = 1e-4  # relative to per-pixel MSE; larger spreads codes, smaller sharpens recon
    kl_warmup_frac: float = 0.1
    grad_clip: float = 1.0
    straight_through: bool = False  # decoder sees hard one-hots (soft gradients)


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
    model.train()
    history = []
    for step, x in zip(range(steps), _cycle(batches)):
        knobs = schedule_at(schedule, step, steps)
        for group in opt.param_groups:
            group["lr"] = knobs["lr"]
        loss, stats = model(x.to(device, non_blocking=True), knobs["temperature"], knobs["kl_weight"],
                            schedule.straight_through)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        opt.step()
        stats = {"step": step, **stats, **knobs}
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
    p = torch.bincount(ids.reshape(-1), minlength=vocab_size).double()
    p = p[p > 0] / p.sum()
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def evaluate_dvae(model: DVAE, images: torch.Tensor, batch_size: int = 256) -> dict:
    """Hard-code reconstruction MSE, codebook usage and perplexity on held-out images [N,3,S,S]."""
    model.eval()
    device = next(model.parameters()).device
    ids, sq = [], 0.0
    for x in images.split(batch_size):
        x = x.to(device)
        code = model.encode(x)
        sq += F.mse_loss(model.decode(code), x, reduction="sum").item()
        ids.append(code.cpu())
    all_ids = torch.cat(ids)
    return {"recon_mse": sq / images.numel(), "codebook_usage": codebook_usage(all_ids, model.cfg.vocab_size),
            "perplexity": perplexity(all_ids, model.cfg.vocab_size)}


def save_recon_grid(originals: torch.Tensor, recons: torch.Tensor, path: str | Path, cols: int = 8) -> Path:
    """PNG grid: each row pair is `cols` originals over their reconstructions ([N,3,S,S] in [0,1])."""
    from PIL import Image  # only needed for pictures

    if originals.shape != recons.shape:
        raise ValueError(f"originals {tuple(originals.shape)} and recons {tuple(recons.shape)} differ in shape")
    n, c, s, _ = originals.shape
    rows = math.ceil(n / cols)
    pad = 2
    canvas = np.ones((rows * 2 * (s + pad) + pad, cols * (s + pad) + pad, 3), dtype=np.uint8) * 255
    to_hwc = lambda t: (t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)  # noqa: E731
    for i in range(n):
        r, k = divmod(i, cols)
        x0 = pad + k * (s + pad)
        for j, img in enumerate((originals[i], recons[i])):
            y0 = pad + (2 * r + j) * (s + pad)
            tile = to_hwc(img)  # [3,S,S] -> [S,S,3]
            canvas[y0 : y0 + s, x0 : x0 + s] = tile if c == 3 else tile[..., :1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
