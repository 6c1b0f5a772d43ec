"""AdamW parameter groups (no-decay set, layer-wise lr decay) and the lr schedule.

Pure functions: they read a model and return plain data; the trainer owns the
optimiser. Each group carries `lr_scale`; the trainer sets
`group["lr"] = lr_at(step, ...) * group["lr_scale"]` every step.
"""
from __future__ import annotations

import math
import re
from typing import Optional

import torch.nn as nn

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# Embedding-side parameters: layer 0 under layer-wise decay.
_EMBED_PREFIXES = ("cls_token", "mask_token", "pos_embed", "patch_embed.", "rel_pos_bias.")


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings/tokens/shared rel bias, i+1 for blocks.i, num_layers+1 for the rest (norm, heads)."""
    if name.startswith(_EMBED_PREFIXES):
        return 0
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1


def _no_decay(name: str, param, skip: set[str]) -> bool:
    # 1-D tensors are norms, biases and LayerScale gammas; decaying them only
    # fights the normalisation. Tokens and position terms come by name.
    return param.ndim <= 1 or name in skip or name.endswith("relative_position_bias_table")


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: Optional[float] = None,
    num_layers: Optional[int] = None,
) -> list[dict]:
    """AdamW groups: every trainable parameter in exactly one group.

    Without layer_decay: two groups (decay, no decay), lr_scale 1.0.
    With layer_decay in (0, 1]: one pair per layer id, lr_scale =
    layer_decay ** (num_layers + 1 - layer_id); num_layers defaults to
    len(model.blocks). Each group: params, param_names (torch's own key, kept
    in optimizer.state_dict()), weight_decay, lr_scale, layer_id.
    Empty groups are left out; frozen parameters (requires_grad=False) too.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay}: must be >= 0, e.g. 0.05")
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay={layer_decay}: must be in (0, 1], e.g. 0.65, or None")
    if num_layers is None:
        num_layers = len(getattr(model, "blocks", ()))
    if num_layers < 0:
        raise ValueError(f"num_layers={num_layers}: must be >= 0")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()

    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_id(name, num_layers) if layer_decay is not None else 0
        decay = not _no_decay(name, param, skip)
        if (lid, decay) not in groups:
            scale = 1.0 if layer_decay is None else layer_decay ** (num_layers + 1 - lid)
            groups[(lid, decay)] = {
                "params": [], "param_names": [], "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale, "layer_id": lid,
            }
        groups[(lid, decay)]["params"].append(param)
        groups[(lid, decay)]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup to base_lr over warmup_steps, then cosine to min_lr at total_steps.

    lr_at(s) = base_lr * (s + 1) / warmup_steps during warmup: unilm's schedule starts at 0,
    which spends the first step on nothing (AdamW still updates its moments);
    lr_at(warmup - 1) = lr_at(warmup) = base_lr;
    lr_at(total) = min_lr, and steps past the end stay at min_lr (resumed or extended runs).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: must be >= 1")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps={warmup_steps}: must be in [0, total_steps={total_steps}]")
    if step < 0:
        raise ValueError(f"step={step}: must be >= 0")
    if base_lr < 0 or not 0 <= min_lr <= base_lr:
        raise ValueError(f"min_lr={min_lr}: must be in [0, base_lr={base_lr}]")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def poly_lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float = 0.0,
               power: float = 1.0) -> float:
    """mmseg's poly schedule after the same linear warmup as `lr_at`:
    min_lr + (base_lr - min_lr) * (1 - progress) ** power; steps past the end stay at min_lr."""
    if step < warmup_steps or total_steps < 1:
        return lr_at(step, max(total_steps, 1), warmup_steps, base_lr, min_lr)
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + (base_lr - min_lr) * (1.0 - progress) ** power
