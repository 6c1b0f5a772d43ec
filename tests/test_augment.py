"""Fine-tuning augmentation: timm's RandAugment and random erasing, reproducible per sample."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipeline.augment import Augment
from pipeline.schema import AugmentConfig

MEAN, STD = torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.5)


def garment(seed: int = 0) -> torch.Tensor:
    """A grey 32 px 'garment': a bright box with texture on black, float [3, 32, 32] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(1, 32, 32)
    x[:, 6:26, 9:23] = 0.4 + 0.5 * torch.rand(1, 20, 14, generator=g)
    return x.expand(3, -1, -1).clone()


def test_off_by_default_is_plain_normalisation():
    aug = Augment(AugmentConfig(), 32, (0.5, 0.5, 0.5))
    assert not aug.active
    x = garment()
    assert torch.equal(aug(x, MEAN, STD, 0, 0, "k"), (x - MEAN) / STD)


def test_rand_augment_is_a_function_of_seed_epoch_key_and_leaves_globals_alone():
    aug = Augment(AugmentConfig(rand_augment="rand-m9-mstd0.5-inc1"), 32, (0.5, 0.5, 0.5))
    x = garment()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    a = aug(x, MEAN, STD, 0, 3, "key-7")
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == before  # nothing else sees a draw
    assert torch.equal(a, aug(x, MEAN, STD, 0, 3, "key-7"))  # same (seed, epoch, key): same image
    others = [aug(x, MEAN, STD, 0, e, "key-7") for e in range(4, 44)]
    assert any(not torch.equal(a, o) for o in others)  # another epoch: another draw
    plain = (x - MEAN) / STD
    assert sum(not torch.allclose(o, plain, atol=1 / 255 * 2 + 1e-6) for o in others) >= 20  # it does change most
    # (2 ops per image, each applied with p 0.5, and a few ops leave a grey image as it is)


def test_top_magnitude_posterize_keeps_a_bit():
    """m9 + std 0.5 samples magnitude 10 now and then; timm then posterizes to 0 bits, which
    Pillow rejects: every op at the highest magnitude must run."""
    aug = Augment(AugmentConfig(rand_augment="rand-m10-mstd0-inc1"), 32, (0.5, 0.5, 0.5))
    for op in aug.rand.ops:
        op.prob = 1.0
    x = garment()
    for e in range(40):  # every op is drawn within 40 images of 2 ops each (15 ops)
        aug(x, MEAN, STD, 0, e, "k")


def test_random_erasing_fills_one_box_with_noise():
    aug = Augment(AugmentConfig(erase_prob=1.0), 32, (0.5, 0.5, 0.5))
    x = garment()
    out = aug(x, MEAN, STD, 0, 0, "k")
    changed = (out != (x - MEAN) / STD).any(0)  # [32, 32]
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0.02 * 1024 * 0.5 <= changed.sum() <= area <= 1024 / 3 + 32  # one box of 2%..33% of the image
    assert torch.equal(out, aug(x, MEAN, STD, 0, 0, "k"))


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="rand_augment='m9'"):
        AugmentConfig(rand_augment="m9")
    with pytest.raises(ValueError, match="erase_prob=1.5"):
        AugmentConfig(erase_prob=1.5)
