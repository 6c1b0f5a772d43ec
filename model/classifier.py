"""BEiT image classifier: the encoder of model/beit.py with a mean-pooling head.

Built on timm's `Beit` (the same timm blocks our MIM encoder uses), so
parameter names are timm's and the layer-decay rules in model/optim.py apply
unchanged: patch_embed / cls_token / pos_embed -> layer 0, blocks.i -> i+1,
fc_norm / head -> top. The state dict *is* a timm `beit_*` state dict, which
makes `export-timm` of a fine-tuned model a plain copy.

Fine-tuning recipe pieces (paper Sec. 2.6 / App. C, unilm's run_class_finetuning):
* mean of the patch tokens (no CLS) -> LayerNorm (fc_norm) -> linear head;
  no final `norm` on the token sequence (timm: norm = Identity with avg pooling);
* the shared relative position bias copied into every block, so layers can diverge;
* head weights scaled down at init (init_scale 0.001);
* drop path (stochastic depth), linear over depth.

Every way to build one goes through `from_encoder(BeitMIM)`, so a fine-tuned
model and its from-scratch baseline differ only in the encoder weights.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence, get_args

import torch
from timm.models.beit import Beit

from model.beit import BeitConfig, BeitMIM, beit_config_from_dict, load_encoder, timm_export, timm_kwargs
from model.checkpoints import load_checkpoint

# What `pooled_blocks` keeps of a block's patch tokens: their mean (paper App. D) or all of them in place.
Pool = Literal["mean", "grid"]

HEAD_KEYS = ("fc_norm.", "head.")  # what a pretrained encoder does not provide


class BeitClassifier(Beit):
    """forward(images [B, C, H, W]) -> logits [B, K]; pooled_blocks(images, blocks, pool) -> [L, B, F]."""

    def __init__(self, config: BeitConfig, num_classes: int, drop_path: Optional[float] = None,
                 head_init_scale: float = 0.001):
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes}: must be >= 0 (0: no head)")
        rate = config.drop_path if drop_path is None else drop_path
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path={rate}: must be in [0, 1)")
        super().__init__(**timm_kwargs(config), num_classes=num_classes, drop_path_rate=rate,
                         head_init_scale=head_init_scale)
        self.config = config
        self.drop_path = rate

    # ---- construction ----------------------------------------------------------
    @classmethod
    def from_encoder(cls, encoder: BeitMIM, num_classes: int, drop_path: Optional[float] = None,
                     head_init_scale: float = 0.001) -> "BeitClassifier":
        """Encoder weights from a BeitMIM (pretrained or freshly initialised); fresh
        fc_norm and head. mask_token, lm_head and the MIM `norm` are dropped."""
        model = cls(encoder.config, num_classes, drop_path, head_init_scale)
        sd, _ = timm_export(encoder, per_layer_rel_pos=True)
        model.load_encoder(sd)
        return model

    @classmethod
    def from_pretrained(cls, ckpt_dir: str | Path, num_classes: int, drop_path: Optional[float] = None,
                        head_init_scale: float = 0.001) -> "BeitClassifier":
        """From a `beit pretrain` checkpoint directory (models/pretrain)."""
        return cls.from_encoder(load_encoder(ckpt_dir), num_classes, drop_path, head_init_scale)

    def load_encoder(self, sd: dict[str, torch.Tensor]) -> None:
        """Load timm-layout encoder weights; fc_norm/head may be absent (kept fresh) or
        present with a matching shape. Anything else missing or extra is an error."""
        own = self.state_dict()
        sd = {k: v for k, v in sd.items()
              if not (k.startswith(HEAD_KEYS) and (k not in own or own[k].shape != v.shape))}
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith(HEAD_KEYS)]
        if missing or unexpected:
            raise ValueError(f"encoder weights do not fit {self.config}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")

    def checkpoint_config(self, **extra) -> dict:
        """JSON for model.checkpoints.save_checkpoint; `load_classifier` reads it back."""
        return {"kind": "classifier", "beit": dataclasses.asdict(self.config),
                "num_classes": self.num_classes, "drop_path": self.drop_path,
                "timm_kwargs": timm_kwargs(self.config), **extra}

    # ---- features ----------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings with the CLS token prepended (+ absolute positions): [B, 1+N, D]."""
        x = self.patch_embed(images)  # [B, N, D]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [B, 1+N, D]
        return x if self.pos_embed is None else x + self.pos_embed  # [B, 1+N, D]

    def block_outputs(self, images: torch.Tensor, num_blocks: int) -> Iterator[torch.Tensor]:
        """The token sequence after each of the first `num_blocks` blocks, before any norm:
        yields [B, 1+N, D] per block."""
        x = self.embed(images)  # [B, 1+N, D]
        for blk in self.blocks[:num_blocks]:
            x = blk(x, shared_rel_pos_bias=None)  # [B, 1+N, D]; per-block tables
            yield x

    def forward_blocks(self, images: torch.Tensor, num_blocks: Optional[int] = None) -> torch.Tensor:
        """Token sequence after the first `num_blocks` blocks (all when None), before
        any norm: [B, C, H, W] -> [B, 1+N, D]."""
        n = len(self.blocks) if num_blocks is None else num_blocks
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"block={num_blocks}: must be in 1..{len(self.blocks)}")
        *_, x = self.block_outputs(images, n)
        return x

    def pooled_blocks(self, images: torch.Tensor, blocks: Sequence[int], pool: Pool = "mean") -> torch.Tensor:
        """The patch tokens (no CLS, no fc_norm) after each of `blocks` (counted from 1), from one
        pass. pool "mean": their average, paper App. D's linear-probe feature: [len(blocks), B, D];
        "grid": every token kept in place, flattened in grid order: [len(blocks), B, N*D]."""
        return self.pooled_blocks_by(images, blocks, (pool,))[pool]

    def pooled_blocks_by(self, images: torch.Tensor, blocks: Sequence[int], pools: Sequence[Pool]
                         ) -> dict[str, torch.Tensor]:
        """`pooled_blocks` for each of `pools` from the same single pass: pool -> [len(blocks), B, F]."""
        if not blocks or not all(1 <= b <= len(self.blocks) for b in blocks):
            raise ValueError(f"blocks={list(blocks)}: each must be in 1..{len(self.blocks)}")
        for pool in pools:
            if pool not in get_args(Pool):
                raise ValueError(f"pool={pool!r}: must be one of {', '.join(map(repr, get_args(Pool)))}")
        # pooled as each block yields, so no block's full token sequence outlives its pooling (ViT-B,
        # batch 256: 12 blocks' sequences would be ~1.9 GB), and only the blocks asked for are kept
        pooled: dict[str, dict[int, torch.Tensor]] = {pool: {} for pool in pools}
        for b, x in enumerate(self.block_outputs(images, max(blocks)), 1):  # x: [B, 1+N, D]
            if b in blocks:  # patch tokens [B, N, D] -> [B, D] (mean) or [B, N*D] (grid)
                for pool in pools:
                    pooled[pool][b] = x[:, 1:].mean(dim=1) if pool == "mean" else x[:, 1:].flatten(1)
        return {pool: torch.stack([by[b] for b in blocks]) for pool, by in pooled.items()}  # [len(blocks), B, F]


def load_classifier(ckpt_dir: str | Path) -> BeitClassifier:
    """A checkpoint written by `beit finetune` / `beit scratch`."""
    sd, config = load_checkpoint(ckpt_dir, fix="rerun `beit finetune` (or `beit scratch`, whichever wrote it)")
    if config.get("kind") != "classifier":
        raise ValueError(f"{ckpt_dir}: not a classifier checkpoint (no kind=classifier in config.json)")
    model = BeitClassifier(beit_config_from_dict(config["beit"]), config["num_classes"], config["drop_path"])
    model.load_state_dict(sd, strict=True)
    return model
