"""Self-attention with BEiT's shared relative position bias, on a selectable kernel.

timm's BEiT `Attention` hands the bias to `F.scaled_dot_product_attention` as a float
`attn_mask` and lets PyTorch choose the kernel: flash attention never takes a float mask,
so on CUDA it is the memory-efficient kernel at best, and nothing says which one ran.
Here the choice is explicit (`pretrain.attention`):

* ``timm``  - timm's own forward, untouched: today's behaviour and the default;
* ``math``  - the reference, softmax(q k^T * scale + bias) v, written out (an [B, H, N, N]
  score tensor in memory: what a fused kernel must reproduce);
* ``sdpa``  - SDPA with the additive bias, restricted on CUDA to the memory-efficient kernel
  (the fused one that takes a float bias and returns its gradient); on CPU whatever SDPA picks;
* ``flex``  - `torch.nn.attention.flex_attention` with a score modifier that adds the bias
  (compiled on CUDA into one fused kernel; eager on CPU, where it is a slow reference).

`use_attention(model, impl)` switches every timm BEiT Attention in a model. Parameters and
buffers stay where they are (state dicts, timm export and checkpoints are unchanged): only
the forward differs.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.beit import Attention

IMPLS = ("timm", "math", "sdpa", "flex")


def attend_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                scale: float) -> torch.Tensor:
    """q, k, v [B, H, N, d]; bias [1 or B, H, N, N] or None -> [B, H, N, d]."""
    attn = (q * scale) @ k.transpose(-2, -1)  # [B, H, N, N]
    if bias is not None:
        attn = attn + bias  # [B, H, N, N]
    return attn.softmax(dim=-1) @ v  # [B, H, N, d]


def _sdpa_backends(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Flash takes no float mask; cuDNN's bias gradient is not on every build; the
    # memory-efficient kernel takes the bias (padded to its alignment by SDPA) and
    # returns its gradient. MATH stays as a fallback for shapes it rejects.
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def attend_sdpa(q, k, v, bias, scale: float) -> torch.Tensor:
    """As attend_math, on SDPA."""
    if bias is not None:
        bias = bias.to(q.dtype)  # under autocast q is bf16 and the bias fp32: SDPA wants one dtype
    with _sdpa_backends(q.device):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)  # [B, H, N, d]


_FLEX: dict = {}


def _flex(device: torch.device):
    """flex_attention, compiled where inductor fuses it into one kernel (CUDA); eager elsewhere
    (on CPU a reference that materialises the scores, forward only in torch 2.14)."""
    if device.type not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX[device.type] = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    return _FLEX[device.type]


def attend_flex(q, k, v, bias, scale: float) -> torch.Tensor:
    """As attend_math, on FlexAttention: the bias is read inside the kernel per (b, h, q, kv)."""
    if bias is None:
        return _flex(q.device)(q, k, v, scale=scale)  # [B, H, N, d]
    per_batch = bias.shape[0] != 1
    bias = bias if per_batch else bias[0]  # [B, H, N, N] or [H, N, N]

    def add_bias(score, b, h, q_idx, kv_idx):
        return score + (bias[b, h, q_idx, kv_idx] if per_batch else bias[h, q_idx, kv_idx])

    # flex computes in the inputs' dtype; the bias joins the fp32 score, as in the math path
    return _flex(q.device)(q, k, v, score_mod=add_bias, scale=scale)  # [B, H, N, d]


ATTEND = {"math": attend_math, "sdpa": attend_sdpa, "flex": attend_flex}


class BiasAttention(Attention):
    """timm's BEiT Attention with the kernel chosen by `attn_impl` (same parameters)."""

    attn_impl: str = "timm"

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.attn_impl == "timm":
            return super().forward(x, shared_rel_pos_bias)
        B, N, C = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)  # [B, N, 3*H*d]
        else:
            qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, self.k_bias, self.v_bias)))
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, N, d]
        bias = shared_rel_pos_bias  # [1, H, N, N] (from RelativePositionBias) or None
        if self.relative_position_bias_table is not None:
            own = self._get_rel_pos_bias()  # [1, H, N, N]
            bias = own if bias is None else bias + own
        if self.training and self.attn_drop.p > 0:
            raise ValueError(f"attention={self.attn_impl} has no attention dropout; use attention=timm")
        x = ATTEND[self.attn_impl](q, k, v, bias, self.scale)  # [B, H, N, d]
        x = x.transpose(1, 2).reshape(B, N, C)  # [B, N, H*d]
        return self.proj_drop(self.proj(x))


def use_attention(model: nn.Module, impl: str) -> nn.Module:
    """Run every timm BEiT Attention in `model` on `impl` (one of IMPLS); returns `model`.
    The modules keep their parameters: re-classing them (rather than rebuilding them)
    keeps state-dict keys and the optimizer's parameter objects as they are."""
    if impl not in IMPLS:
        raise ValueError(f"attention={impl!r}: must be one of {', '.join(IMPLS)}")
    for m in model.modules():
        if isinstance(m, Attention):
            m.__class__ = BiasAttention
            m.attn_impl = impl
    return model
