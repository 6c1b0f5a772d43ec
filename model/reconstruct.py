"""What the MIM head predicts at masked positions, turned back into pixels (paper RQ5 pictures).

Token target: the argmax token at each masked patch, the true tokens elsewhere, decoded by
the tokenizer's decoder. Decoding the true tokens everywhere is the upper bound: the best
picture any token prediction could give through this tokenizer.
Pixel target (MAE's norm_pix): the head regresses each masked patch normalised by its own
mean and std, which the picture has to undo; as MAE's visualisation, the true patch's mean
and std are used for that, so the picture shows the predicted structure, not its brightness.
Shapes: B batch, N = h*w patches, P patch size, C channels, S image size, V vocabulary.
"""
from __future__ import annotations

import torch

from model.beit import BeitMIM


@torch.no_grad()
def predicted_tokens(model: BeitMIM, images: torch.Tensor, mask: torch.Tensor, true_ids: torch.Tensor
                     ) -> torch.Tensor:
    """images [B, C, S, S] normalised, mask bool [B, N], true_ids long [B, h, w] -> long [B, h, w]:
    the head's argmax at masked positions, `true_ids` elsewhere."""
    B = images.shape[0]
    ids = true_ids.reshape(B, -1).clone()  # [B, N]
    ids[mask] = model.predict(images, mask).argmax(-1).to(ids.dtype)  # [M] in row-major (b, n) order
    return ids.reshape(true_ids.shape)  # [B, h, w]


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of BeitMIM.patchify: [B, N, P*P*C] -> [B, C, h*P, w*P]."""
    B = patches.shape[0]
    h, w = grid
    x = patches.reshape(B, h, w, patch, patch, channels)  # [B, h, w, P, P, C]
    x = torch.einsum("bijpqc->bcipjq", x)  # [B, C, h, P, w, P]
    return x.reshape(B, channels, h * patch, w * patch)  # [B, C, S, S]


@torch.no_grad()
def predicted_pixels(model: BeitMIM, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """images [B, C, S, S] normalised, mask bool [B, N] -> [B, C, S, S] (same normalisation):
    the regressed pixels at masked patches, un-normalised with each true patch's mean/std as
    in the norm_pix loss (model/beit.py), the input elsewhere."""
    c = model.config
    patches = model.patchify(images).float()  # [B, N, P*P*C]
    target = patches[mask]  # [M, P*P*C]
    mean = target.mean(dim=-1, keepdim=True)  # [M, 1]
    std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()  # [M, 1]
    patches[mask] = model.predict(images, mask).float() * std + mean  # [M, P*P*C]
    return unpatchify(patches, c.patch_size, c.in_chans, c.grid)  # [B, C, S, S]


MASK_COLOUR = (0.25, 0.4, 0.75)  # blue: on grey images a grey fill would pass for the object


def masked_input(images01: torch.Tensor, mask: torch.Tensor, patch: int,
                 fill: float | tuple[float, ...] = MASK_COLOUR) -> torch.Tensor:
    """images [B, C, S, S] in [0, 1] with the masked patches (mask bool [B, N]) painted `fill`
    (a value, or one per channel): what the encoder is shown (it sees the mask token there)."""
    B, _, S, _ = images01.shape
    g = S // patch
    cover = mask.reshape(B, 1, g, g).float()  # [B, 1, h, w]
    cover = cover.repeat_interleave(patch, 2).repeat_interleave(patch, 3).bool()  # [B, 1, S, S]
    colour = torch.as_tensor(fill, dtype=images01.dtype, device=images01.device).reshape(-1, 1, 1)  # [C or 1, 1, 1]
    return torch.where(cover, colour.expand_as(images01[0]), images01)  # [B, C, S, S]
