"""BEiT masked-image-modeling encoder on timm's BEiT blocks, plus a size registry.

One readable file (nanoGPT style): a typed config, the model, the registry,
and reading a saved encoder back (`load_encoder`), so the loader sits beside
the class it builds rather than in the classifier that happens to use it.
Shapes: B batch, N = h*w patches, D embed_dim, V vocab_size, M = number of
masked positions in the whole batch, P = patch_size, C = in_chans.

What BEiT pretraining adds to a ViT, and where it is here:
* a learnable mask token that *replaces* masked patch embeddings, so masked
  pixels cannot influence anything (`forward_encoder`);
* one relative position bias shared by all layers (`rel_pos_bias`; the unilm
  pretraining default, no absolute position embedding);
* LayerScale (gamma_1/gamma_2 in timm's Block), drop path;
* an LM head over masked positions only (`forward_loss`), or, for the paper's
  pixel-regression ablation, a per-patch pixel head with MAE's norm_pix loss.

Parameter names mirror timm's `Beit` (patch_embed, cls_token, rel_pos_bias,
blocks.i.attn..., norm) so the encoder weights map onto timm models directly;
`mask_token` and `lm_head` are pretraining-only extras.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.beit import Block, RelativePositionBias

from model.checkpoints import CONFIG, UnreadableCheckpoint, WEIGHTS, load_checkpoint, read_json

SHARED_REL_POS = "rel_pos_bias.relative_position_bias_table"  # [(2h-1)(2w-1)+3, heads]


@dataclasses.dataclass(frozen=True)
class BeitConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    vocab_size: int = 8192  # DALL-E's codebook; must equal the tokenizer's
    layer_scale_init: Optional[float] = 0.1  # None disables LayerScale; 1e-5 for large
    drop_path: float = 0.1
    abs_pos_emb: bool = False  # BEiT pretraining relies on the shared relative bias alone
    target: Literal["tokens", "pixels"] = "tokens"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.patch_size >= 1, f"patch_size={self.patch_size}: must be >= 1")
        need(self.img_size >= self.patch_size and self.img_size % self.patch_size == 0,
             f"img_size={self.img_size}: must be a positive multiple of patch_size={self.patch_size}")
        need(self.in_chans >= 1, f"in_chans={self.in_chans}: must be >= 1")
        need(self.depth >= 1, f"depth={self.depth}: must be >= 1")
        need(self.num_heads >= 1 and self.embed_dim % self.num_heads == 0,
             f"num_heads={self.num_heads}: must be >= 1 and divide embed_dim={self.embed_dim}")
        need(self.mlp_ratio > 0, f"mlp_ratio={self.mlp_ratio}: must be > 0")
        need(self.vocab_size >= 2, f"vocab_size={self.vocab_size}: must be >= 2")
        need(self.layer_scale_init is None or self.layer_scale_init > 0,
             f"layer_scale_init={self.layer_scale_init}: must be > 0 or null")
        need(0.0 <= self.drop_path < 1.0, f"drop_path={self.drop_path}: must be in [0, 1)")
        need(self.target in ("tokens", "pixels"), f"target={self.target!r}: must be tokens or pixels")
        need(self.init_std > 0, f"init_std={self.init_std}: must be > 0")

    @property
    def grid(self) -> tuple[int, int]:
        s = self.img_size // self.patch_size
        return (s, s)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


class BeitMIM(nn.Module):
    """forward_encoder(images, mask) -> [B, 1+N, D]; forward_loss(images, mask, targets) -> (loss, metrics);
    features(images) -> [B, 1+N, D]. Build through create_model(name, **overrides)."""

    def __init__(self, config: BeitConfig):
        super().__init__()
        c = self.config = config
        self.patch_embed = PatchEmbed(
            img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + c.num_patches, c.embed_dim)) if c.abs_pos_emb else None
        self.rel_pos_bias = RelativePositionBias(window_size=c.grid, num_heads=c.num_heads)
        # Stochastic depth grows linearly with depth (plain floats: works on the meta device).
        dpr = [c.drop_path * i / max(1, c.depth - 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList([
            Block(
                dim=c.embed_dim, num_heads=c.num_heads, qkv_bias=c.qkv_bias, mlp_ratio=c.mlp_ratio,
                drop_path=dpr[i], init_values=c.layer_scale_init,
                window_size=None,  # no per-block table: the shared one is passed in forward
            )
            for i in range(c.depth)
        ])
        self.norm = nn.LayerNorm(c.embed_dim, eps=1e-6)
        # Tokens: logits over the visual vocabulary. Pixels: P*P*C values per patch.
        out = c.vocab_size if c.target == "tokens" else c.patch_size ** 2 * c.in_chans
        self.lm_head = nn.Linear(c.embed_dim, out)
        self._init_weights()

    # ---- init (paper / unilm) ------------------------------------------------
    def _init_weights(self) -> None:
        # unilm truncates at +-1 std (its own trunc_normal_ wrapper), not timm's +-2 absolute,
        # which for std 0.02 is no truncation at all. The patch-embedding conv keeps PyTorch's
        # default init, as in unilm, whose _init_weights touches only Linear and LayerNorm.
        std = self.config.init_std
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=std, a=-std, b=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.mask_token, self.pos_embed):
            if p is not None:
                trunc_normal_(p, std=std, a=-std, b=std)
        # Residual branches add up over depth: shrink each block's output
        # projections by 1/sqrt(2 * layer_id) (layer_id from 1) to keep early
        # training stable, as unilm's fix_init_weight.
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                scale = math.sqrt(2.0 * (i + 1))
                blk.attn.proj.weight.div_(scale)
                blk.mlp.fc2.weight.div_(scale)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay (cls token, position terms). mask_token is
        decayed, as in unilm (its no_weight_decay lists only pos_embed and cls_token)."""
        names = {"cls_token", "rel_pos_bias.relative_position_bias_table"}
        if self.pos_embed is not None:
            names.add("pos_embed")
        return names

    # ---- forward ----------------------------------------------------------------
    def forward_encoder(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """images [B, C, H, W], mask bool [B, N] (True = masked) or None -> [B, 1+N, D]."""
        x = self.patch_embed(images)  # [B, N, D]
        B, N, D = x.shape
        if mask is not None:
            if mask.shape != (B, N):
                raise ValueError(f"mask shape {tuple(mask.shape)}: expected (B, N) = ({B}, {N})")
            # Replace, not blend: torch.where keeps masked pixels (even NaN/inf)
            # from leaking through `x * 0`; equivalent to x*(1-w) + mask_token*w.
            w = mask.to(torch.bool).unsqueeze(-1)  # [B, N, 1]
            x = torch.where(w, self.mask_token.to(x.dtype).expand(B, N, D), x)  # [B, N, D]
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # [B, 1+N, D]
        if self.pos_embed is not None:
            x = x + self.pos_embed  # [B, 1+N, D]
        rel_bias = self.rel_pos_bias()  # [heads, 1+N, 1+N], computed once, shared by all blocks
        for blk in self.blocks:
            x = blk(x, shared_rel_pos_bias=rel_bias)  # [B, 1+N, D]
        return self.norm(x)  # [B, 1+N, D]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder output for downstream use: [B, C, H, W] -> [B, 1+N, D]."""
        return self.forward_encoder(images, None)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, P*P*C], patch pixels in (row, col, channel) order (as MAE)."""
        B, C, H, W = images.shape
        p = self.config.patch_size
        h, w = H // p, W // p
        x = images.reshape(B, C, h, p, w, p)  # [B, C, h, P, w, P]
        x = torch.einsum("bcipjq->bijpqc", x)  # [B, h, w, P, P, C]
        return x.reshape(B, h * w, p * p * C)  # [B, N, P*P*C]

    # Set (by the stage) to the number of masked patches in *every* image when the mask
    # generator guarantees it (pipeline/masking.py: the exact count, always): the masked rows
    # are then gathered at a static shape. Boolean indexing (None, the default) must read the
    # mask's count back to the host first, a sync per step on CUDA.
    masked_per_image: Optional[int] = None

    def masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, N, ...] at the masked positions of mask bool [B, N] -> [M, ...], rows in
        row-major (b, n) order: x[mask], without a host sync when masked_per_image is set."""
        k = self.masked_per_image
        if k is None:
            return x[mask]  # [M, ...]
        B, N = mask.shape
        # A stable descending sort puts the k masked positions first, in ascending n: the
        # rows x[mask] has, in its order.
        idx = mask.to(torch.int32).argsort(dim=1, descending=True, stable=True)[:, :k]  # [B, k]
        idx = idx.reshape(B, k, *([1] * (x.dim() - 2))).expand(B, k, *x.shape[2:])  # [B, k, ...]
        return x.gather(1, idx).reshape(B * k, *x.shape[2:])  # [M = B*k, ...]

    def predict(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The LM head's output at the masked positions: images [B, C, H, W], mask bool [B, N]
        -> [M, V] token logits (or [M, P*P*C] pixels), rows in row-major (b, n) order."""
        x = self.forward_encoder(images, mask)  # [B, 1+N, D]
        x = self.masked(x[:, 1:], mask)  # [M, D]: masked positions only
        if x.shape[0] == 0:
            raise ValueError("mask has no masked positions: the loss would be NaN (mean over nothing)")
        return self.lm_head(x)  # [M, V] or [M, P*P*C]

    def forward_loss(
        self, images: torch.Tensor, mask: torch.Tensor, targets: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Masked-position loss.

        images [B, C, H, W]; mask bool [B, N] or [B, h, w] (True = masked, >= 1 in
        the batch); targets long [B, h, w] token ids (target='tokens'; ignored
        for 'pixels'). Returns (scalar loss, metrics) where metrics hold detached
        0-d tensors (no host sync here; call .item() when logging):
        tokens: acc (masked-token accuracy), num_masked; pixels: num_masked.
        """
        c = self.config
        B = images.shape[0]
        mask = mask.reshape(B, -1).to(torch.bool)  # [B, N]
        out = self.predict(images, mask)  # [M, V] or [M, P*P*C]
        num_masked = torch.tensor(out.shape[0], device=out.device)
        if c.target == "tokens":
            if targets is None or tuple(targets.shape) != (B, *c.grid):
                shape = None if targets is None else tuple(targets.shape)
                raise ValueError(f"targets shape {shape}: expected token ids (B, h, w) = ({B}, {c.grid[0]}, {c.grid[1]})")
            labels = self.masked(targets.reshape(B, -1), mask).long()  # [M]
            loss = F.cross_entropy(out.float(), labels)
            acc = (out.detach().argmax(-1) == labels).float().mean()
            return loss, {"acc": acc, "num_masked": num_masked}
        # Pixels (MAE norm_pix_loss): each patch normalised by its own mean/var.
        patches = self.masked(self.patchify(images), mask).float()  # [M, P*P*C]
        mean = patches.mean(dim=-1, keepdim=True)  # [M, 1]
        var = patches.var(dim=-1, keepdim=True)  # [M, 1]
        patches = (patches - mean) / (var + 1e-6).sqrt()  # [M, P*P*C]
        loss = F.mse_loss(out.float(), patches)
        return loss, {"num_masked": num_masked}

    def forward(self, images, mask, targets=None):
        return self.forward_loss(images, mask, targets)


def timm_export(model: BeitMIM, per_layer_rel_pos: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Encoder weights for timm's `Beit` -> (state_dict, Beit kwargs).

    `timm.models.beit.Beit(**kwargs, num_classes=K).load_state_dict(sd, strict=False)`
    then misses only the fresh classifier (head.*, fc_norm.*: mean pooling, as
    BEiT fine-tuning). per_layer_rel_pos copies the shared relative bias into
    every block (unilm's fine-tuning recipe: layers may then diverge); timm's
    own checkpoint filter does not do this expansion.
    """
    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()
          if not k.startswith(("mask_token", "lm_head", "norm."))}  # pretraining-only parts
    if per_layer_rel_pos:
        copy_rel_pos_bias_per_layer(sd, c.depth)
    return sd, timm_kwargs(c, per_layer_rel_pos)


def state_depth(sd: dict[str, torch.Tensor]) -> int:
    """Number of blocks in a timm-layout state dict (`blocks.<i>.*` keys)."""
    return 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))


def copy_rel_pos_bias_per_layer(sd: dict[str, torch.Tensor], depth: Optional[int] = None) -> None:
    """In place: replace the shared relative position bias table, if `sd` has one, by a copy
    of it in each block (`blocks.<i>.attn.relative_position_bias_table`; depth from the
    keys when None). unilm's fine-tuning recipe, so layers may then diverge."""
    table = sd.pop(SHARED_REL_POS, None)
    if table is None:
        return
    for i in range(state_depth(sd) if depth is None else depth):
        sd[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()


def timm_kwargs(c: BeitConfig, per_layer_rel_pos: bool = True) -> dict:
    """timm `Beit(**kwargs)` arguments for the encoder described by `c` (mean-pooling head)."""
    return dict(
        img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim,
        depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias,
        init_values=c.layer_scale_init, use_abs_pos_emb=c.abs_pos_emb, global_pool="avg",
        use_rel_pos_bias=per_layer_rel_pos, use_shared_rel_pos_bias=not per_layer_rel_pos,
    )


# ---- registry ---------------------------------------------------------------------
MODELS: dict[str, BeitConfig] = {}


def register(name: str, **fields) -> None:
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = BeitConfig(**fields)


# The stages build a registered architecture at data.image_size (create_model(name, img_size=...)).
# micro: the CPU default (28 px Fashion-MNIST: a 7x7 grid; 32 px: 8x8; 1.3M params, ~30 ms per
# fwd+bwd of 4 images on one core). vocab 1024 suits a small own dVAE. It adds an
# absolute position embedding to the shared relative bias: with only a
# zero-initialised relative bias every masked position starts identical and
# positions are learnt slowly (a 4-image overfit stalls at ln(#masked) for
# hundreds of steps), too slow for CPU-sized budgets. Larger sizes follow the
# paper (relative bias only); override with create_model(name, abs_pos_emb=...).
register("micro", img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4,
         vocab_size=1024, layer_scale_init=0.1, drop_path=0.0, abs_pos_emb=True)
register("tiny", img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, drop_path=0.1)
register("small", img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path=0.1)
register("base", img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, drop_path=0.1)
register("large", img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16,
         layer_scale_init=1e-5, drop_path=0.1)


def model_config(name: str, **overrides) -> BeitConfig:
    """The registered config `name` with fields replaced by `overrides`."""
    if name not in MODELS:
        raise ValueError(f"model={name!r}: must be one of {', '.join(MODELS)}")
    fields = {f.name for f in dataclasses.fields(BeitConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model override {unknown[0]!r}: valid fields are {', '.join(sorted(fields))}")
    return dataclasses.replace(MODELS[name], **overrides)


def create_model(name: str, **overrides) -> BeitMIM:
    """timm-style: create_model('micro', vocab_size=512, target='pixels')."""
    return BeitMIM(model_config(name, **overrides))


# ---- saved encoders -------------------------------------------------------------
def beit_config_from_dict(raw: dict) -> BeitConfig:
    """BeitConfig from a checkpoint's config JSON: its fields are read, other keys ignored."""
    fields = {f.name for f in dataclasses.fields(BeitConfig)}
    return BeitConfig(**{k: v for k, v in raw.items() if k in fields})


PRETRAIN_FIX = "rerun `beit pretrain`"


class EncoderMismatch(ValueError):
    """A pretrained encoder of another model size or input size than the params ask for."""


def check_pretrained(ckpt_dir: str | Path, config: Optional[dict] = None, model: Optional[str] = None,
                     image_size: Optional[int] = None) -> dict:
    """The config.json of a `beit pretrain` checkpoint (read unless given), checked against
    `model` (params.model) and `image_size` (data.image_size) where given: a checkpoint
    trained as another size, or at another resolution, is an EncoderMismatch naming both."""
    if config is None:
        config = read_json(Path(ckpt_dir) / CONFIG, PRETRAIN_FIX)
    if config.get("kind") == "classifier":
        raise ValueError(f"{ckpt_dir}: a fine-tuned classifier, not a pretrained encoder; "
                         "use load_classifier")
    have = config.get("model")
    if model is not None and have is not None and have != model:
        raise EncoderMismatch(f"{ckpt_dir}: pretrained as model={have} but params.model={model}; "
                              f"rerun `beit pretrain` with model={model} (or set model: {have})")
    size = config.get("img_size")
    if image_size is not None and size is not None and size != image_size:
        raise EncoderMismatch(f"{ckpt_dir}: pretrained at {size} px but data.image_size={image_size}; "
                              f"rerun `beit pretrain` at {image_size} px (or set data.image_size: {size})")
    return config


def load_encoder(ckpt_dir: str | Path, model: Optional[str] = None, image_size: Optional[int] = None) -> BeitMIM:
    """The BeitMIM saved by `beit pretrain` (its config.json holds BeitConfig's fields); with
    `model` / `image_size`, `check_pretrained` first. A damaged checkpoint is an
    UnreadableCheckpoint that says to rerun `beit pretrain`."""
    sd, config = load_checkpoint(ckpt_dir, fix=PRETRAIN_FIX)
    check_pretrained(ckpt_dir, config, model, image_size)
    try:
        encoder = BeitMIM(beit_config_from_dict(config))
        encoder.load_state_dict(sd, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:  # config fields / tensor shapes not ours
        why = " ".join(str(err).split())[:300] or type(err).__name__  # torch's is many lines long
        raise UnreadableCheckpoint.at(Path(ckpt_dir) / WEIGHTS, f"does not fit its {CONFIG}: {why}",
                                      PRETRAIN_FIX) from None
    return encoder
