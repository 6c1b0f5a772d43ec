"""Explicit self-attention weights of a timm BEiT block, for pictures and the foreground metric.

timm's `Attention` calls F.scaled_dot_product_attention when fused attention is on, which
returns softmax(q k^T * scale + bias) v but never the weights. So the weights are recomputed
here from the attention module's own input and parameters: a forward hook records what the
block fed its `attn` (norm1 of the block input, and the relative position bias it was
given), then `attention_weights` redoes qkv -> softmax(q k^T * scale + rel_pos_bias).
tests/test_attention_maps.py checks that these weights times v, through `proj`, give the
module's actual output, so the picture is the attention the model ran with.

Works for both model kinds, which use timm's Block: BeitMIM (one shared relative bias
passed to every block) and BeitClassifier (a table per block, shared bias None).
Shapes: B batch, H heads, T = 1 + N tokens (CLS first), Dh head dim.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def attention_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [B, H, T, Dh] of timm's BEiT `Attention` on its input x [B, T, D] (k has no bias)."""
    B, T, _ = x.shape
    bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))  # [3*H*Dh]
    qkv = F.linear(x, attn.qkv.weight, bias)  # [B, T, 3*H*Dh]
    qkv = qkv.reshape(B, T, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, T, Dh]
    q, k, v = qkv.unbind(0)
    return q, k, v


def attention_weights(attn: nn.Module, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None,
                      queries: slice = slice(None)) -> torch.Tensor:
    """softmax(q k^T * scale + relative position bias) [B, H, Q, T] of timm's BEiT `Attention`
    on x [B, T, D]: the block's own table (if it has one) plus the shared bias (if given),
    exactly the terms timm adds before its softmax. `queries` picks the Q query rows (all by
    default; slice(0, 1): the CLS row only, T times less memory, which ViT-B at 224 px needs)."""
    q, k, _ = attention_qkv(attn, x)
    logits = (q[:, :, queries] * attn.scale) @ k.transpose(-2, -1)  # [B, H, Q, T]
    if getattr(attn, "relative_position_bias_table", None) is not None:
        logits = logits + attn._get_rel_pos_bias()[:, :, queries]  # [1, H, Q, T]
    if shared_rel_pos_bias is not None:
        logits = logits + shared_rel_pos_bias[..., queries, :]  # [H, Q, T]
    return logits.softmax(dim=-1)  # [B, H, Q, T]


def attention_output(attn: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """What the module returns given its weights [B, H, T, T]: proj(weights @ v) -> [B, T, D]."""
    _, _, v = attention_qkv(attn, x)
    B, T, _ = x.shape
    out = (weights @ v).transpose(1, 2).reshape(B, T, -1)  # [B, H, T, Dh] -> [B, T, H*Dh]
    return attn.proj(out)  # [B, T, D]


class AttentionRecorder:
    """Context manager: while active, every forward of `block` (a timm BEiT Block) stores its
    attention weights [B, H, Q, T] (`queries` rows, all by default) in `.weights` (the last
    call's), computed explicitly from the input its `attn` received. The model's own forward
    is unchanged."""

    def __init__(self, block: nn.Module, queries: slice = slice(None)):
        self.block = block
        self.queries = queries
        self.weights: Optional[torch.Tensor] = None
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        x = args[0]  # [B, T, D]: norm1 of the block input
        shared = kwargs.get("shared_rel_pos_bias", args[1] if len(args) > 1 else None)
        self.weights = attention_weights(module, x, shared, self.queries).detach()

    def __enter__(self) -> "AttentionRecorder":
        self._handle = self.block.attn.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


@torch.no_grad()
def cls_attention(model: nn.Module, run: Callable[[torch.Tensor], object], images: torch.Tensor,
                  block: int = -1) -> torch.Tensor:
    """The CLS query's attention over the patch tokens in `model.blocks[block]` (default: the
    last), per head: images [B, C, H, W] -> [B, heads, N], each row renormalised over the N
    patches (the CLS key's own weight left out, so a uniform map is 1/N everywhere).
    `run(images)` is the model's forward up to (at least) that block."""
    with AttentionRecorder(model.blocks[block], queries=slice(0, 1)) as rec:
        run(images)
    if rec.weights is None:
        raise RuntimeError(f"block {block} did not run in the given forward")
    to_patches = rec.weights[:, :, 0, 1:].float()  # [B, heads, N]: the CLS query row, patch keys
    return to_patches / to_patches.sum(-1, keepdim=True)  # [B, heads, N]
