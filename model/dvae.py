"""Our own discrete VAE tokenizer, trained the way DALL-E's dVAE was.

Encoder: a small ResNet that maps [B,3,S,S] images to logits [B,V,h,w] over a
vocabulary of V codes (h = S / downsample). Training relaxes the categorical
code with Gumbel-softmax (temperature annealed 1 -> 1/16), adds KL(q || uniform)
with a warmed-up weight, and decodes the soft one-hot with a conv decoder.
Reconstruction is MSE on sigmoid outputs in [0,1], a bounded pixel space.
At tokenization time codes are the argmax of the logits.

Codebook usage. A plain 1x1-conv head collapses onto a few dozen codes (a few
codes with large weight norms win everywhere; the rest never get gradient), which
would make BEiT's MIM targets nearly trivial. Four standard fixes, each measured
(see DVAESchedule):
- cosine logits over a low-dimensional, l2-normalised codebook (ViT-VQGAN's
  "factorized + l2-normalised codes"): no code can win by norm alone;
- data-dependent init: the codebook starts as k-means++ centres of the encoder's
  features on the first batch, not random directions no input is near;
- dead-code restart: codes unused for a while move to k-means++-sampled features
  poorly served by their current code (their decoder embedding copies that
  code's, so reconstruction does not jump);
- entropy bonus on the batch-averaged code distribution, log V - H(mean q):
  spreads codes across the batch without blurring each position's q (which is
  what a large KL-to-uniform weight does).

This file is the network only (the parts a saved tokenizer needs to run);
model/dvae_train.py trains and scores it, stages/figures.py draws it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.schema import DVAEConfig


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


def _body(widths: list[int], blocks_per_group: int, resample: Callable[[], nn.Module]) -> nn.Sequential:
    """`blocks_per_group` ResBlocks per level, widths[level] wide, `resample()` between levels."""
    gain = 1.0 / (len(widths) * blocks_per_group)
    layers: list[nn.Module] = []
    for level, width in enumerate(widths):
        prev = widths[max(level - 1, 0)]
        layers += [ResBlock(prev if b == 0 else width, width, gain) for b in range(blocks_per_group)]
        if level < len(widths) - 1:
            layers.append(resample())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        w = cfg.widths
        self.stem = nn.Conv2d(cfg.in_channels, w[0], 3, padding=1)
        self.body = _body(w, cfg.blocks_per_group, lambda: nn.MaxPool2d(2))
        self.proj = nn.Conv2d(w[-1], cfg.codebook_dim, 1)
        self.codebook = nn.Parameter(torch.randn(cfg.vocab_size, cfg.codebook_dim))  # [V,d]
        # Learnable inverse temperature of the cosine logits (CLIP-style, stored as a log);
        # cosines live in [-1,1], so a scale of ~10 lets q be confident from the start.
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,S,S] in [0,1] -> unit-norm code-space features [B,d,h,w]."""
        h = F.relu(self.body(self.stem(2.0 * x - 1.0)))  # [B,C,h,w]
        # Centring features per position stops one shared direction (ReLU outputs are all
        # positive) from picking the same few codes everywhere; it halved recon error in trials.
        h = F.layer_norm(h.permute(0, 2, 3, 1), h.shape[1:2]).permute(0, 3, 1, 2)  # [B,h,w,C] -> [B,C,h,w]
        return F.normalize(self.proj(h), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B,C,S,S] in [0,1] -> logits [B,V,h,w] = scale * cos(feature, code)."""
        scale = self.log_scale.clamp(0.0, math.log(100.0)).exp()
        return scale * torch.einsum("bdhw,vd->bvhw", self.features(x), F.normalize(self.codebook, dim=1))


class Decoder(nn.Module):
    def __init__(self, cfg: DVAEConfig) -> None:
        super().__init__()
        w = cfg.widths[::-1]  # coarsest first
        # A code's embedding is a 1x1 conv on its one-hot: [V, C] weight.
        self.embed = nn.Parameter(torch.randn(cfg.vocab_size, w[0]) / math.sqrt(w[0]))
        self.body = _body(w, cfg.blocks_per_group, lambda: nn.Upsample(scale_factor=2, mode="nearest"))
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
        self, x: torch.Tensor, temperature: float, kl_weight: float, straight_through: bool = False,
        entropy_weight: float = 0.0,
    ) -> tuple[torch.Tensor, dict]:
        """Relaxed ELBO-style loss; returns (loss, float stats)."""
        loss, stats, _ = self.loss_and_codes(x, temperature, kl_weight, straight_through, entropy_weight)
        return loss, stats

    loss = forward

    def loss_and_codes(
        self, x: torch.Tensor, temperature: float, kl_weight: float, straight_through: bool = False,
        entropy_weight: float = 0.0,
    ) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """forward(), plus the argmax codes long [B,h,w] (for usage counts and restarts)."""
        self._check(x)
        logits = self.encoder(x)  # [B,V,h,w]
        soft = gumbel_softmax(logits, temperature, straight_through)  # [B,V,h,w]
        recon = self.decoder(soft)
        mse = F.mse_loss(recon, x)
        log_q = F.log_softmax(logits, dim=1)
        q = log_q.exp()
        log_v = math.log(self.cfg.vocab_size)
        # KL(q || uniform) per code position, in nats: sum q log q + log V.
        kl = (q * log_q).sum(dim=1).mean() + log_v
        # Codebook entropy deficit, log V - H(mean q) over every position of the batch: zero
        # when the batch spreads evenly over the vocabulary, whatever each q looks like.
        q_bar = q.mean(dim=(0, 2, 3))  # [V]
        deficit = log_v + (q_bar * q_bar.clamp_min(1e-12).log()).sum()
        loss = mse + kl_weight * kl + entropy_weight * deficit
        ids = logits.argmax(dim=1).detach()  # [B,h,w]
        stats = {"loss": loss.item(), "mse": mse.item(), "kl": kl.item(), "entropy_deficit": deficit.item(),
                 "codes_in_batch": int(ids.unique().numel())}
        return loss, stats, ids

    @torch.no_grad()
    def restart_codes(self, dead: torch.Tensor, x: torch.Tensor, copy_decoder: bool = True) -> int:
        """Move codes `dead` (long [K]) onto features of batch x [B,3,S,S], chosen by k-means++
        seeding against the live codes; returns how many moved. copy_decoder: a moved code's
        decoder embedding copies that of the code it takes positions from."""
        if dead.numel() == 0:
            return 0
        enc = self.encoder
        feats = enc.features(x).permute(0, 2, 3, 1).reshape(-1, self.cfg.codebook_dim)  # [N,d], unit norm
        book = F.normalize(enc.codebook, dim=1)  # [V,d]
        live = torch.ones(self.cfg.vocab_size, dtype=torch.bool, device=x.device)
        live[dead] = False
        owner = (feats @ book.T).argmax(dim=1)  # [N] code each feature maps to now
        picks = kmeanspp(feats, book[live], dead.numel())  # [K] rows of feats
        norm = enc.codebook[live].norm(dim=1).mean() if live.any() else math.sqrt(self.cfg.codebook_dim)
        # A little noise so two codes seeded on one feature can still split apart.
        enc.codebook[dead] = norm * F.normalize(feats[picks] + 0.01 * torch.randn_like(feats[picks]), dim=1)
        if copy_decoder:
            self.decoder.embed[dead] = self.decoder.embed[owner[picks]]
        return int(dead.numel())


def gumbel_noise(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise, float32 of `shape`: -log(-log U) with U uniform.

    Why not F.gumbel_softmax's noise (-log of `exponential_()`): on CPU `exponential_` draws one
    element at a time through a double-precision log on a single thread while the other cores
    wait: 180 ms of a 755 ms default dVAE step on 2 AVX2 cores. Here only the uniform draw is
    serial and both logs are vectorised and multi-threaded: 46 ms, the step 1.26x faster and the
    process at 195% instead of 178% of the 2 cores (bench/dvae_noise.py). U is kept at or above
    the smallest normal float, so the noise is finite: that cuts the left tail at
    -log(-log(tiny)) = -4.47, where the Gumbel CDF is exp(-e^4.47) = e^-87.
    """
    u = torch.rand(shape, device=device).clamp_min_(torch.finfo(torch.float32).tiny)
    return u.log_().neg_().log_().neg_()  # log U <= 0 -> -log U > 0 -> log(-log U) -> Gumbel


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool = False, dim: int = 1) -> torch.Tensor:
    """The relaxed one-hot softmax((logits + g) / tau) along `dim`, g ~ Gumbel(0, 1) (`gumbel_noise`);
    `hard`: the forward pass is the one-hot of its argmax, the gradient the relaxed sample's
    (straight-through). Same distribution as F.gumbel_softmax, faster noise."""
    soft = ((logits + gumbel_noise(logits.shape, logits.device)) / tau).softmax(dim)
    if not hard:
        return soft
    one_hot = torch.zeros_like(soft).scatter_(dim, soft.argmax(dim, keepdim=True), 1.0)
    return one_hot - soft.detach() + soft


def kmeanspp(feats: torch.Tensor, centres: torch.Tensor, k: int) -> torch.Tensor:
    """k-means++ seeding on the unit sphere: indices long [k] into feats [N,d] (unit norm),
    each drawn with probability ~ 1 - cos to the nearest centre so far (= squared
    distance / 2), starting from `centres` [M,d] (may be empty)."""
    n = feats.shape[0]
    dist = (1 - (feats @ centres.T).max(dim=1).values) if centres.numel() else torch.ones(n, device=feats.device)
    picks = torch.empty(k, dtype=torch.long, device=feats.device)
    for j in range(k):
        # With fewer distinct features than k, the floor keeps sampling possible (duplicates).
        i = torch.multinomial(dist.clamp_min(0) + 1e-6, 1)
        picks[j] = i[0]
        dist = torch.minimum(dist, 1 - feats @ feats[i[0]])
    return picks
