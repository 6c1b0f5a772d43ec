import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from pipeline.views import View, apply_view, apply_views, identity_view, sample_view

from pipeline.schema import ViewConfig

REPO = Path(__file__).resolve().parents[1]
CFG = ViewConfig()
NO_JITTER = ViewConfig(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


def smooth_image(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """uint8 [H,W,3] low-frequency image, so resampling at two sizes is comparable."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 6, 8, generator=g)
    big = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)  # [1,3,H,W]
    return (big[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()


def test_same_args_same_view_and_different_keys_differ():
    a = sample_view(3, "img-001", 2, 500, 375, CFG)
    assert a == sample_view(3, "img-001", 2, 500, 375, CFG)
    others = {sample_view(3, "img-002", 2, 500, 375, CFG), sample_view(3, "img-001", 3, 500, 375, CFG),
              sample_view(4, "img-001", 2, 500, 375, CFG)}
    assert a not in others and len(others) == 3


def test_values_inside_ranges():
    for i in range(300):
        v = sample_view(0, f"k{i}", i % 4, 300, 200, CFG)
        assert 0 <= v.top and v.top + v.height <= 200 and 0 <= v.left and v.left + v.width <= 300
        # Rounding to whole pixels can push area/ratio slightly past the ranges.
        assert 0.08 * 0.9 <= v.height * v.width / 60000 <= 1.0
        assert 0.75 * 0.95 <= v.width / v.height <= 4 / 3 * 1.05
        for f in (v.brightness, v.contrast, v.saturation):
            assert 0.6 <= f <= 1.4
        assert v.hue == 0.0


def test_statistics_match_torchvision_random_resized_crop():
    n, (H, W) = 3000, (96, 128)
    ours = [sample_view(0, f"img{i}", 0, W, H, CFG) for i in range(n)]
    torch.manual_seed(0)
    theirs = [T.RandomResizedCrop.get_params(torch.empty(3, H, W), [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    a_ours = np.array([v.height * v.width / (H * W) for v in ours])
    a_tv = np.array([h * w / (H * W) for _, _, h, w in theirs])
    r_ours = np.log([v.width / v.height for v in ours])
    r_tv = np.log([w / h for _, _, h, w in theirs])
    # Same algorithm -> same distributions; bounds are ~4 standard errors.
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(a_ours, q) - np.quantile(a_tv, q)) < 0.04, q
        assert abs(np.quantile(r_ours, q) - np.quantile(r_tv, q)) < 0.04, q
    flips = np.mean([v.flip for v in ours])
    assert abs(flips - 0.5) < 4 * math.sqrt(0.25 / n)
    centre_top = np.array([v.top + v.height / 2 for v in ours]) / H
    assert abs(centre_top.mean() - 0.5) < 0.02


def test_fallback_is_torchvision_centre_crop():
    cfg = dataclasses.replace(CFG, scale=(0.9, 1.0), ratio=(1.0, 1.0))
    v = sample_view(0, "wide", 0, 100, 10, cfg)  # a 30x30 box never fits 10 rows
    assert (v.top, v.left, v.height, v.width) == (0, 45, 10, 10)


def test_array_round_trip_and_k():
    v = sample_view(1, "x", 0, 640, 480, dataclasses.replace(CFG, hue=0.1))
    arr = v.to_array()
    assert arr.dtype == np.float32 and arr.shape == (View.K,) == (11,)
    assert View.from_array(arr) == v
    with pytest.raises(ValueError, match="shape"):
        View.from_array(arr[:5])


def test_two_sizes_agree_and_differ_from_another_view():
    img = smooth_image()
    v = sample_view(0, "parity", 0, 128, 96, CFG)
    big, small = apply_view(img, v, 64), apply_view(img, v, 32)
    assert big.shape == (3, 64, 64) and small.shape == (3, 32, 32) and big.dtype == torch.float32
    assert 0.0 <= float(big.min()) and float(big.max()) <= 1.0
    down = F.interpolate(big[None], size=(32, 32), mode="bicubic", antialias=True, align_corners=False)[0]
    err = (down - small).abs().mean().item()
    other = apply_view(img, sample_view(0, "parity", 1, 128, 96, CFG), 32)
    assert err < 0.01
    assert (other - small).abs().mean().item() > 5 * err  # the tolerance does discriminate views


def test_flip_really_flips_and_accepts_both_layouts():
    img = smooth_image()
    v = sample_view(0, "f", 0, 128, 96, NO_JITTER)._replace(flip=False)
    plain = apply_view(img, v, 24)
    flipped = apply_view(torch.from_numpy(img).permute(2, 0, 1), v._replace(flip=True), 24)
    assert torch.equal(flipped, plain.flip(-1))
    assert not torch.equal(flipped, plain)


def test_jitter_zero_is_identity_on_colours():
    img = smooth_image(32, 40)
    cfg = dataclasses.replace(NO_JITTER, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    v = sample_view(0, "id", 0, 32, 32, cfg)
    assert (v.brightness, v.contrast, v.saturation, v.hue) == (1.0, 1.0, 1.0, 0.0)
    square = img[:, 4:36]
    out = apply_view(square, identity_view(32, 32), 32)
    expected = torch.from_numpy(square).permute(2, 0, 1).float() / 255
    assert torch.allclose(out, expected, atol=1e-5)


def test_jitter_matches_torchvision_ops_in_fixed_order():
    img = smooth_image(32, 32)
    v = View(0, 0, 32, 32, 32, 32, False, 1.3, 0.7, 1.25, 0.05)
    ours = apply_view(img, v, 32)
    x = apply_view(img, identity_view(32, 32), 32)
    x = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(x, 1.3), 0.7), 1.25), 0.05)
    assert torch.allclose(ours, x, atol=1e-5)
    assert not torch.allclose(ours, apply_view(img, identity_view(32, 32), 32), atol=1e-2)


def test_batched_equals_single_and_size_mismatch_is_an_error():
    imgs = [smooth_image(seed=s) for s in range(3)]
    views = [sample_view(0, f"b{s}", 0, 128, 96, CFG) for s in range(3)]
    batch = apply_views(imgs, views, 16)
    assert batch.shape == (3, 3, 16, 16)
    for i in range(3):
        assert torch.allclose(batch[i], apply_view(imgs[i], views[i], 16), atol=1e-6)
    with pytest.raises(ValueError, match="drawn for a 128x96 image"):
        apply_view(smooth_image(64, 64), views[0], 16)


def test_views_identical_in_another_process():
    keys = ["a", "n01440764/n01440764_10026.JPEG", "ü-key", "42"]
    here = np.stack([sample_view(7, k, v, 333, 250, CFG).to_array() for k in keys for v in range(3)])
    code = (
        "import sys, numpy as np\n"
        "from pipeline.schema import ViewConfig\nfrom pipeline.views import sample_view\n"
        f"keys = {keys!r}\n"
        "a = np.stack([sample_view(7, k, v, 333, 250, ViewConfig()).to_array() for k in keys for v in range(3)])\n"
        "sys.stdout.write(a.tobytes().hex())\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    there = np.frombuffer(bytes.fromhex(out.stdout), dtype=np.float32).reshape(here.shape)
    assert np.array_equal(here, there)


def test_bad_config_is_a_one_line_error():
    with pytest.raises(ValueError, match="scale"):
        ViewConfig(scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="hue"):
        ViewConfig(hue=0.7)
