"""OpenAI's DALL-E dVAE (the tokenizer BEiT used), state-dict compatible.

Facts from the reference package `dall-e==0.1` (read, not copied):
- every conv is a custom module with parameters `w` [out,in,k,k] and `b` [out],
  'same' padding; the encoder is `blocks.{input, group_1..4, output}` with
  `block_i.{id_path, res_path.conv_1..4}` inside groups, max-pool 2x after
  groups 1-3 (8x down: 112 px -> 14x14), 8192 codes, n_hid 256, 2 blocks/group;
- residual blocks are `id_path(x) + (1 / n_layers**2) * res_path(x)` with
  n_layers = 4 groups * blocks per group; encoder res_path convs are 3,3,3,1
  wide, decoder ones 1,3,3,3;
- pixels go in as `map_pixels(x) = 0.8 x + 0.1` (logit-Laplace eps 0.1); codes are
  the argmax of the encoder logits; the decoder's first 3 of 6 output channels,
  through sigmoid and `unmap_pixels`, are the image.
Our modules run in float32 everywhere; the reference casts most convs to float16
on CUDA, so a GPU run of the reference can differ from ours on near-ties.

OpenAI ships `encoder.pkl`/`decoder.pkl` as *pickled modules*: loading one runs
arbitrary code, so `beit convert-dalle` (stages/convert_dalle.py) does it only when
asked, once, and writes safetensors + JSON that `model.tokenizer.load_tokenizer`
reads. This file is the architecture only (plus reading sizes off a state dict):
it never unpickles, and model/tokenizer.py imports it without a cycle.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

LOGIT_LAPLACE_EPS = 0.1
GROUPS = 4  # fixed in the reference: 3 max-pools, so 8x downsampling


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0,1] -> [eps, 1-eps], the range DALL-E was trained on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


@dataclasses.dataclass(frozen=True)
class DalleConfig:
    image_size: int = 112
    n_hid: int = 256
    n_blk_per_group: int = 2
    input_channels: int = 3
    vocab_size: int = 8192
    n_init: int = 128  # decoder's code-embedding width
    has_decoder: bool = False

    def __post_init__(self) -> None:
        if self.image_size % 8:
            raise ValueError(f"dalle image_size={self.image_size}: must be a multiple of 8 (112 -> 14x14)")

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size // 8, self.image_size // 8


class _Conv(nn.Module):
    """Conv with 'same' padding and the reference's parameter names `w`, `b`."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]) -> None:
        super().__init__()
        hid = n_out // 4
        self.id_path = _Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [(n_in, hid), (hid, hid), (hid, hid), (hid, n_out)]
        layers = []
        for i, ((a, b), k) in enumerate(zip(widths, kernels), start=1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", _Conv(a, b, k))]
        self.res_path = nn.Sequential(OrderedDict(layers))
        self.post_gain = 1 / n_layers**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _group(widths: list[tuple[int, int]], n_layers: int, kernels, tail: Optional[tuple[str, nn.Module]]) -> nn.Sequential:
    blocks = [(f"block_{i + 1}", _Block(a, b, n_layers, kernels)) for i, (a, b) in enumerate(widths)]
    return nn.Sequential(OrderedDict(blocks + ([tail] if tail else [])))


class DalleEncoder(nn.Module):
    """image [B,3,S,S] (already map_pixels'd) -> logits [B,vocab,S/8,S/8]."""

    def __init__(self, cfg: DalleConfig = DalleConfig()) -> None:
        super().__init__()
        h, n, L = cfg.n_hid, cfg.n_blk_per_group, GROUPS * cfg.n_blk_per_group
        mult = [1, 1, 2, 4, 8]  # width multiplier entering group g is mult[g-1], inside it mult[g]
        groups = []
        for g in range(1, GROUPS + 1):
            widths = [((mult[g - 1] if i == 0 else mult[g]) * h, mult[g] * h) for i in range(n)]
            tail = ("pool", nn.MaxPool2d(kernel_size=2)) if g < GROUPS else None
            groups.append((f"group_{g}", _group(widths, L, (3, 3, 3, 1), tail)))
        self.blocks = nn.Sequential(OrderedDict([
            ("input", _Conv(cfg.input_channels, h, 7)),
            *groups,
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _Conv(8 * h, cfg.vocab_size, 1))]))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x.float())


class DalleDecoder(nn.Module):
    """one-hot codes [B,vocab,h,w] -> 6 channels [B,6,8h,8w] (logit-Laplace parameters)."""

    def __init__(self, cfg: DalleConfig = DalleConfig()) -> None:
        super().__init__()
        h, n, L = cfg.n_hid, cfg.n_blk_per_group, GROUPS * cfg.n_blk_per_group
        mult = [8, 4, 2, 1]  # width inside group g is mult[g-1] * n_hid
        groups = []
        for g in range(1, GROUPS + 1):
            first = cfg.n_init if g == 1 else mult[g - 2] * h
            widths = [((first if i == 0 else mult[g - 1] * h), mult[g - 1] * h) for i in range(n)]
            tail = ("upsample", nn.Upsample(scale_factor=2, mode="nearest")) if g < GROUPS else None
            groups.append((f"group_{g}", _group(widths, L, (1, 3, 3, 3), tail)))
        self.blocks = nn.Sequential(OrderedDict([
            ("input", _Conv(cfg.vocab_size, cfg.n_init, 1)),
            *groups,
            ("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _Conv(h, 2 * cfg.input_channels, 1))]))),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x.float())

    def from_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """long [B,h,w] -> 6 channels; gathers the input conv's columns instead of a one-hot."""
        inp = self.blocks.input
        z = inp.w[:, :, 0, 0].t()[ids].permute(0, 3, 1, 2) + inp.b.view(1, -1, 1, 1)  # [B,h,w,C] -> [B,C,h,w]
        return self.blocks[1:](z)


class DalleVAE(nn.Module):
    """Encoder (+ optional decoder) with the pixel mapping built in: the Tokenizer-facing model."""

    def __init__(self, cfg: DalleConfig = DalleConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = DalleEncoder(cfg)
        self.decoder = DalleDecoder(cfg) if cfg.has_decoder else None

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """float [B,3,S,S] in [0,1] -> long [B,S/8,S/8]."""
        return self.encoder(map_pixels(x.float())).argmax(dim=1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """long [B,h,w] -> float [B,3,8h,8w] in [0,1]."""
        if self.decoder is None:
            raise ValueError("this DALL-E tokenizer has no decoder; convert it with DECODER.pkl to draw pictures")
        out = self.decoder.from_ids(ids)  # [B,6,S,S]
        return unmap_pixels(torch.sigmoid(out[:, : self.cfg.input_channels]))


# --------------------------------------------------------------------------- sizes from weights


def _blocks_per_group(sd: dict) -> int:
    return len({m.group(1) for k in sd if (m := re.match(r"blocks\.group_1\.(block_\d+)\.", k))})


def encoder_config_from_state(sd: dict) -> dict:
    """Infer encoder sizes from tensor shapes (robust to how the module was pickled)."""
    return {"n_hid": sd["blocks.input.w"].shape[0], "input_channels": sd["blocks.input.w"].shape[1],
            "vocab_size": sd["blocks.output.conv.w"].shape[0], "n_blk_per_group": _blocks_per_group(sd)}


def decoder_config_from_state(sd: dict) -> dict:
    return {"n_init": sd["blocks.input.w"].shape[0], "vocab_size": sd["blocks.input.w"].shape[1],
            "n_hid": sd["blocks.output.conv.w"].shape[1], "input_channels": sd["blocks.output.conv.w"].shape[0] // 2,
            "n_blk_per_group": _blocks_per_group(sd)}
