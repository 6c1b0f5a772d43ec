"""Fine-tuning's RandAugment and random erasing: timm's transforms, made reproducible per sample.

timm's `rand_augment_transform` and `RandomErasing` draw from Python's `random`, NumPy's
global RNG and torch's global RNG. To keep every random choice a function of
(seed, epoch, key), as the rest of the data plane is (exact resume, identical runs for any
worker count), each call runs under all three seeded from that triple and restores them
afterwards, so nothing else that draws from the global generators sees a difference.

Order as in timm's `create_transform` for training: the view (crop + resize + flip,
pipeline/views.py) -> RandAugment on the uint8 PIL image -> normalise -> random erasing
on the normalised tensor (its pixel mode fills with N(0, 1) noise, which assumes that).
"""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch
import torchvision.transforms.functional as TF

from pipeline.fingerprint import stable_hash
from pipeline.schema import AugmentConfig


@contextlib.contextmanager
def seeded_globals(seed: int):
    """Run the body with random, numpy.random and torch seeded from `seed`; restore them after."""
    py, npy, th = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.manual_seed(seed % 2**63)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.random.set_rng_state(th)


class Augment:
    """augment(x, mean, std, seed, epoch, key): float [3, S, S] in [0, 1] -> normalised
    [3, S, S] with RandAugment before and random erasing after the normalisation."""

    def __init__(self, cfg: AugmentConfig, image_size: int, mean: tuple[float, ...]):
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.random_erasing import RandomErasing

        self.cfg = cfg
        # timm create_transform's hyper-parameters for RandAugment at this size and mean
        # magnitude_max just under timm's 10: a sampled magnitude of 10 (m9 + std 0.5 reaches it)
        # makes PosterizeIncreasing keep 0 bits, which Pillow >= 11 rejects ("bits must be between
        # or equal to 1 and 8"); 9.99 keeps 1 bit and changes every other op by 0.1% at most.
        hparams = {"translate_const": int(image_size * 0.45),
                   "img_mean": tuple(min(255, round(255 * m)) for m in mean), "magnitude_max": 9.99}
        self.rand = rand_augment_transform(cfg.rand_augment, hparams) if cfg.rand_augment else None
        self.erase = (RandomErasing(cfg.erase_prob, mode="pixel", max_count=1, device="cpu")
                      if cfg.erase_prob > 0 else None)

    @property
    def active(self) -> bool:
        return self.rand is not None or self.erase is not None

    def __call__(self, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, seed: int, epoch: int,
                 key: str) -> torch.Tensor:
        with seeded_globals(stable_hash("augment", seed, epoch, key)):
            if self.rand is not None:
                image = TF.to_pil_image((x * 255).round().to(torch.uint8))  # [3, S, S] -> PIL
                x = TF.pil_to_tensor(self.rand(image)).float() / 255  # [3, S, S] in [0, 1]
            x = (x - mean) / std  # [3, S, S]
            if self.erase is not None:
                x = self.erase(x)  # [3, S, S]: one box of N(0, 1) pixels with erase_prob
        return x
