"""Augmented views shared by the tokenize stage and the trainer.

BEiT feeds the *same* random crop, flip and colour jitter to the patch image
(e.g. 224 px) and to the tokenizer image (e.g. 112 px). We tokenize offline,
so a view must be reproducible later from a few numbers:

- `sample_view(seed, key, v, width, height, cfg)` draws the parameters from
  an RNG derived from a stable hash of (seed, key, v); it does not depend on
  the worker, the process, the order of calls or Python's `hash()`.
- `apply_view(image, view, size)` renders the view at any output size. The
  tokenize stage and the trainer call this one function with different sizes,
  so view parity holds by construction. Readers of stored bytes go through
  `pipeline/render.py: render_views`, which decodes JPEGs only as finely as the view
  needs (DCT scaling) and renders everything else with `apply_views`' own steps.

Rendering order: crop the box (integer pixels of the source image) -> resize
to `size`x`size` with **bicubic, antialiased** interpolation (BEiT's train
interpolation; clamped to [0, 1] because bicubic overshoots) -> horizontal
flip -> colour jitter in the fixed order brightness, contrast, saturation, hue
(torchvision's ColorJitter shuffles the order; a fixed one keeps a stored view
reproducible). BEiT's reference jitters the full image before cropping; we
jitter the rendered crop, which differs only in the mean used by contrast
(crop mean instead of image mean) and costs far less on large images.

A `View` serialises to a float32 vector of K = 11 values (see `View`), which
the token store keeps as `[N, V, K]`. Integers up to 2**24 are exact in
float32, so pixel boxes round-trip exactly.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from pipeline.schema import ViewConfig

# ITU-R 601 luma weights, the ones torchvision's rgb_to_grayscale uses.
LUMA = (0.2989, 0.587, 0.114)


class View(NamedTuple):
    """One view of one image; `to_array()` lays the fields out in this order (K = 11).

    A NamedTuple rather than a frozen dataclass: the loader builds one per sample per epoch
    (pipeline/mim.py: views_of), and a tuple is built in ~0.3 us against the dataclass's
    ~1.35 us (eleven `object.__setattr__` calls), one object instead of two for the collector."""

    top: int  # crop box in source pixels
    left: int
    height: int
    width: int
    src_height: int  # source size the box was drawn for; apply_view checks it
    src_width: int
    flip: bool
    brightness: float  # multiplicative factors; 1.0 = unchanged
    contrast: float
    saturation: float
    hue: float  # additive hue shift; 0.0 = unchanged

    K = 11  # class attribute, not a field

    def to_array(self) -> np.ndarray:
        """float32 [K] in field order."""
        return np.array(self, dtype=np.float32)

    @classmethod
    def from_array(cls, arr: np.ndarray | Sequence[float]) -> View:
        a = np.asarray(arr, dtype=np.float64)
        if a.shape != (cls.K,):
            raise ValueError(f"a View array has shape ({cls.K},), got {a.shape}")
        ints = [int(round(x)) for x in a[:6]]
        # float32 -> float64 keeps the stored factor exactly, so renders from a
        # round-tripped view match renders from the original float32 array.
        return cls(*ints, bool(a[6] >= 0.5), *(float(x) for x in a[7:]))


def identity_view(width: int, height: int) -> View:
    """The whole image, unflipped, unjittered (evaluation-time view)."""
    return View(0, 0, height, width, height, width, False, 1.0, 1.0, 1.0, 0.0)


def _rng(seed: int, key: str, v: int, part: str) -> np.random.Generator:
    # One stream per part, so that e.g. disabling jitter leaves the crops unchanged.
    payload = json.dumps(["beit-view", int(seed), str(key), int(v), part]).encode()
    digest = hashlib.blake2b(payload, digest_size=16).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    # Only Generator.random() is used: its double stream is the most stable
    # part of NumPy's RNG API across versions and platforms.
    return lo + (hi - lo) * float(rng.random())


def _randint(rng: np.random.Generator, n: int) -> int:
    """Uniform integer in [0, n)."""
    return min(int(math.floor(float(rng.random()) * n)), n - 1)


def _crop_box(rng: np.random.Generator, width: int, height: int, cfg: ViewConfig) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, driven by our RNG: (top, left, h, w)."""
    area = height * width
    log_r0, log_r1 = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
    for _ in range(10):
        target_area = area * _uniform(rng, *cfg.scale)
        aspect = math.exp(_uniform(rng, log_r0, log_r1))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(rng, height - h + 1)
            left = _randint(rng, width - w + 1)
            return top, left, h, w
    # Ten misses (extreme aspect ratios): centre crop at the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < min(cfg.ratio):
        w, h = width, int(round(width / min(cfg.ratio)))
    elif in_ratio > max(cfg.ratio):
        h, w = height, int(round(height * max(cfg.ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_view(seed: int, key: str, v: int, width: int, height: int, cfg: ViewConfig) -> View:
    """The v-th view of image `key` (source size width x height); deterministic."""
    if width < 1 or height < 1:
        raise ValueError(f"image {key!r}: size {width}x{height} is empty")
    top, left, h, w = _crop_box(_rng(seed, key, v, "crop"), width, height, cfg)
    flip = float(_rng(seed, key, v, "flip").random()) < cfg.flip_p
    jit = _rng(seed, key, v, "jitter")
    # Always draw four numbers so each factor's stream is independent of the others' settings.
    u = [float(x) for x in jit.random(4)]

    def factor(x: float, ui: float) -> float:
        return 1.0 if x == 0 else max(0.0, 1.0 - x) + ui * ((1.0 + x) - max(0.0, 1.0 - x))

    hue = 0.0 if cfg.hue == 0 else -cfg.hue + u[3] * 2 * cfg.hue
    # Round factors through float32 so a view read back from the store renders identically.
    f32 = lambda x: float(np.float32(x))  # noqa: E731
    return View(
        top, left, h, w, height, width, flip,
        f32(factor(cfg.brightness, u[0])), f32(factor(cfg.contrast, u[1])),
        f32(factor(cfg.saturation, u[2])), f32(hue),
    )


def _to_chw_float(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 [3,H,W] tensor or uint8 [H,W,3] array -> float32 [3,H,W] in [0,1]."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 [H,W,3] array, got {image.dtype} {image.shape}")
        # Decoders may hand back read-only arrays; we only read, then convert to float.
        t = torch.from_numpy(np.require(image, requirements=("C", "W"))).permute(2, 0, 1)  # [H,W,3] -> [3,H,W]
    elif isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 [3,H,W] tensor, got {image.dtype} {tuple(image.shape)}")
        t = image
    else:
        raise TypeError(f"expected a torch.Tensor or np.ndarray image, got {type(image).__name__}")
    return t.float().div_(255.0)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B,3,S,S] -> [B,1,S,S]."""
    r, g, b = x.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor*x + (1-factor)*other, clamped like torchvision; factor is [B,1,1,1]. In place
    on x (every caller owns it): the same ops in the same order, so the same bits, without
    two [B,3,S,S] temporaries (at 224 px the jitter was ~40% of a view's render)."""
    return x.mul_(factor).add_((1.0 - factor) * other).clamp_(0.0, 1.0)


def _jitter(x: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
    """Per-sample colour jitter on [B,3,S,S]; matches torchvision's adjust_* ops."""

    def col(name: str) -> torch.Tensor:
        return torch.tensor([getattr(v, name) for v in views], dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)  # [B,1,1,1]

    # Skipping a factor of exactly 1 keeps "jitter disabled" bit-exact (no clamp, no blend rounding).
    if any(v.brightness != 1.0 for v in views):
        # blend with black: factor*x + (1-factor)*0 is factor*x bit for bit (+-0 added is exact)
        x = x.mul_(col("brightness")).clamp_(0.0, 1.0)
    if any(v.contrast != 1.0 for v in views):
        mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # [B,1,1,1]
        x = _blend(x, mean, col("contrast"))
    if any(v.saturation != 1.0 for v in views):
        x = _blend(x, _grayscale(x), col("saturation"))
    for i, v in enumerate(views):
        if v.hue != 0.0:  # rare (BEiT uses hue 0); torchvision's HSV round trip per sample
            x[i] = TF.adjust_hue(x[i], v.hue)
    return x


def apply_views(images: Sequence[torch.Tensor | np.ndarray], views: Sequence[View], size: int) -> torch.Tensor:
    """Render each view of each image: float32 [B,3,size,size] in [0,1], on the images' device.

    Images may differ in size; each must match its view's src_width x src_height.
    """
    return finish_views(resize_views(images, views, size), views)


def resize_views(images: Sequence[torch.Tensor | np.ndarray], views: Sequence[View], size: int,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`apply_views` up to the resize: each view's box cropped from its fully decoded image and
    resized, clamped to [0, 1]: float32 [B,3,size,size]; no flip, no jitter yet. `out`: the
    float32 [B,3,size,size] tensor to write them into (a batch buffer), returned."""
    if len(images) != len(views):
        raise ValueError(f"{len(images)} images but {len(views)} views")
    if size < 1:
        raise ValueError(f"output size must be >= 1, got {size}")
    resized = []
    for image, view in zip(images, views):
        x = _to_chw_float(image)  # [3,H,W]
        if (x.shape[1], x.shape[2]) != (view.src_height, view.src_width):
            raise ValueError(
                f"view was drawn for a {view.src_width}x{view.src_height} image, got {x.shape[2]}x{x.shape[1]}"
            )
        crop = x[:, view.top : view.top + view.height, view.left : view.left + view.width]  # [3,h,w]
        resized.append(
            F.interpolate(crop.unsqueeze(0), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        )  # [1,3,size,size]
    return torch.cat(resized, out=out).clamp_(0.0, 1.0)  # [B,3,size,size]; bicubic overshoots


def finish_views(x: torch.Tensor, views: Sequence[View]) -> torch.Tensor:
    """The steps after the resize: flip, then colour jitter, on float [B,3,S,S] in [0,1]
    (in place where it can). pipeline/render.py calls it on crops resized another way."""
    flips = torch.tensor([v.flip for v in views], device=x.device)
    if flips.any():
        x[flips] = x[flips].flip(-1)
    return _jitter(x, views)


def apply_view(image: torch.Tensor | np.ndarray, view: View, size: int) -> torch.Tensor:
    """Render one view: float32 [3,size,size] in [0,1]."""
    return apply_views([image], [view], size)[0]
