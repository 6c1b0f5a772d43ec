"""Stored image bytes + views -> rendered views: the one function the tokenize stage and
the trainers render through (`render_views`), so view parity holds by construction.

JPEGs (what ImageNet-like shards hold) render in uint8 end to end, decoding no more than
the view needs; a view is known before its image is decoded (its box, flip and jitter are
stored with the tokens):

- DCT scaling: libjpeg's 1/2, 1/4, 1/8 (simplejpeg `min_width`/`min_height`, the shard
  stage's decoder) at the smallest scale whose copy of the crop box still has >= `size`
  pixels on both sides. The scale is a function of (view, size) alone, never of which
  other views share a batch.
- Region decode: a JPEG with a restart marker after every MCU (`shard.encode.restart_markers`,
  on in configs/imagenet-base.yaml) is cut to the MCUs around the box before decoding
  (pipeline/jpegregion.py), so Huffman decoding, IDCT and colour conversion run over that
  rectangle only. A cut renders the same bits as the whole image (tests/test_render.py); a
  source with several views in one call (the tokenize stage) is decoded whole once instead.
- Resize: at full scale the box is whole pixels, cropped and resized by torch's antialiased
  bicubic on uint8 (views.resize_views' algorithm); at a DCT scale the box is fractional,
  resized by PIL (`resize_box`, passes in a fixed order).
- Colour jitter and flip: views._jitter's ops on the view's uint8 pixels in one float
  buffer, rounded once (`_jitter_u8`); no jitter, no float pass.

How far this moves from the float reference (full decode + `views.apply_views`):
tests/test_render.py (PSNR >= 30 dB per view) and bench/README.md.

Other formats (PNG: the bundled default), and JPEGs libjpeg-turbo cannot turn into RGB
(CMYK/YCCK; the shard stage normalises those, foreign shards may hold them), render as
they always did: full decode (`decode_rgb`) + `views.apply_views` (float, torch).

Transport. `dtype=torch.uint8` returns uint8 views (4x fewer bytes than float32 across the
DataLoader worker boundary); the consumer calls `normalize` once, on its device. For JPEGs
the float render is exactly that uint8 / 255; for the float path, uint8 is round(255 x).
"""
from __future__ import annotations

import collections
import math
from typing import Optional, Sequence

import numpy as np
import simplejpeg
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from pipeline import jpegregion
from pipeline.shardread import JPEG_MAGIC, decode_rgb
from pipeline.views import LUMA, View, finish_views, resize_views

# A cut costs ~0.1-0.15 ms (finding the markers, re-wrapping the bytes, a second header parse)
# and saves decoding the MCUs outside it (~1.3 us each): worth it below ~60% of a 256 px
# image's MCUs (bench/rehearsal.py, R vs R'); above, the whole image is decoded (same bits).
CUT_SHARE = 0.6
DCT_DENOMS = (8, 4, 2)  # libjpeg-turbo's SIMD IDCT scales (3/4, 7/8, ... are plain C and slower)
_RGB_JPEG = ("YCbCr", "RGB", "Gray")  # what simplejpeg decodes to RGB (decode_rgb's fast path)


class Encoded:
    """One stored image: its bytes, its size, and its decodes (cached per DCT scale, so
    the V views of an image in a tokenize batch decode it once per scale they need)."""

    __slots__ = ("data", "jpeg", "width", "height", "_decoded", "_layout")

    def __init__(self, data: bytes):
        self.data = data
        self._decoded: dict[object, object] = {}
        self._layout: object = False  # False: not parsed yet; None: no restart marker after every MCU
        self.jpeg = False
        if data[:3] == JPEG_MAGIC:
            try:
                h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
                self.jpeg, self.height, self.width = colorspace in _RGB_JPEG, int(h), int(w)
            except ValueError:
                pass  # decode_rgb names the problem below
        if not self.jpeg:
            full = decode_rgb(data)  # uint8 [H, W, 3]
            self._decoded[1] = full
            self.height, self.width = full.shape[:2]

    def full(self) -> np.ndarray:
        """uint8 [H, W, 3], as `decode_rgb` returns it."""
        if 1 not in self._decoded:
            self._decoded[1] = decode_rgb(self.data)
        return self._decoded[1]

    def scaled(self, denom: int) -> np.ndarray:
        """uint8 [h, w, 3]: the JPEG decoded at 1/denom (denom 1: full size)."""
        a = self._decoded.get(-denom)
        if a is None:
            w, h = -(-self.width // denom), -(-self.height // denom)  # libjpeg rounds scaled sizes up
            a = simplejpeg.decode_jpeg(self.data, colorspace="RGB", strict=False, min_width=w, min_height=h)
            if a.shape[:2] != (h, w):  # simplejpeg picked another scale: never expected; fail loudly
                raise ValueError(f"JPEG {self.width}x{self.height} at 1/{denom}: decoded {a.shape[1]}x{a.shape[0]}")
            self._decoded[-denom] = a  # [h, w, 3]
        return a

    def scaled_image(self, denom: int) -> Image.Image:
        """`scaled(denom)` as a PIL image (cached: PIL copies RGB into its own 4-byte layout)."""
        key = ("image", denom)
        im = self._decoded.get(key)
        if im is None:
            im = self._decoded[key] = Image.fromarray(self.scaled(denom))
        return im

    def layout(self) -> Optional[jpegregion.Layout]:
        """Where each MCU's bytes are (pipeline/jpegregion.py); None for JPEGs that decode whole."""
        if self._layout is False:
            self._layout = jpegregion.layout(self.data) if self.jpeg else None
        return self._layout  # type: ignore[return-value]

    def region(self, window: tuple[int, int, int, int], denom: int) -> np.ndarray:
        """MCU rows [r0, r1) x columns [c0, c1) decoded at 1/denom (not cached: one view each)."""
        lay, (r0, r1, c0, c1) = self.layout(), window
        data = jpegregion.cut(self.data, lay, r0, r1, c0, c1)
        w, h = (-(-side // denom) for side in lay.extent(r0, r1, c0, c1))  # libjpeg rounds scaled sizes up
        a = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False, min_width=w, min_height=h)
        if a.shape[:2] != (h, w):
            raise ValueError(f"JPEG cut {window} at 1/{denom}: decoded {a.shape[1]}x{a.shape[0]}, not {w}x{h}")
        return a  # [h, w, 3]


def dct_denom(view: View, size: int) -> int:
    """The largest of 8, 4, 2 (else 1) at which the view's box still spans >= size pixels."""
    for d in DCT_DENOMS:
        if view.width >= size * d and view.height >= size * d:
            return d
    return 1


def _jpeg_view(src: Encoded, view: View, size: int, whole: bool) -> torch.Tensor:
    """uint8 [3, size, size]: the whole view of a JPEG (resize, colour jitter, flip), with
    one float pass only where the view has colour jitter."""
    x = _jpeg_resize(src, view, size, whole)  # [3, S, S]
    if (view.brightness, view.contrast, view.saturation, view.hue) != (1.0, 1.0, 1.0, 0.0):
        x = _jitter_u8(x, view)
    return x.flip(-1) if view.flip else x


def _jitter_u8(x: torch.Tensor, view: View) -> torch.Tensor:
    """uint8 [3, S, S] -> uint8 [3, S, S]: views._jitter's colour ops (brightness, contrast,
    saturation, hue, in that order, each clamped) in one float32 buffer with scalar factors,
    rounded once at the end. ~3x cheaper than the batched float path per 224 px view (no
    per-view factor tensors, the contrast mean from three channel means)."""
    y = x.float()  # [3, S, S] in [0, 255]
    if view.brightness != 1.0:
        y.mul_(view.brightness).clamp_(0.0, 255.0)
    if view.contrast != 1.0:
        mean = float((y.mean(dim=(1, 2)) * torch.tensor(LUMA)).sum())  # mean of the grey image
        y.mul_(view.contrast).add_((1.0 - view.contrast) * mean).clamp_(0.0, 255.0)
    if view.saturation != 1.0:
        grey = y[0] * LUMA[0] + y[1] * LUMA[1] + y[2] * LUMA[2]  # [S, S]
        y.mul_(view.saturation).add_(grey, alpha=1.0 - view.saturation).clamp_(0.0, 255.0)
    if view.hue != 0.0:  # rare (BEiT uses hue 0): torchvision's HSV round trip
        y = TF.adjust_hue(y.div_(255.0), view.hue).mul_(255.0)
    return y.round_().to(torch.uint8)


def _reach(extent: float, denom: int, size: int) -> float:
    """Source px around a box side that may differ in a cut or that the resize reads: the
    chroma-upsampling edge; at a DCT scale (PIL resizes the fractional box) also PIL's bicubic
    support (2 x the downscale, at least 2) + 1.5 for its window rounding; at the decode scale."""
    if denom == 1:
        return float(jpegregion.CHROMA_EDGE)  # the box is cropped exactly, then resized alone
    return denom * (2.0 * max(1.0, extent / (denom * size)) + 1.5 + jpegregion.CHROMA_EDGE)


def _jpeg_resize(src: Encoded, view: View, size: int, whole: bool = True) -> torch.Tensor:
    """uint8 [3, size, size]: the view's box from the JPEG decoded at its DCT scale (and, with a
    restart marker after every MCU and `whole` False, only the MCUs around the box), resized.

    At full scale the box is whole pixels: cropped and resized by torch's antialiased bicubic on
    uint8 (its AVX2 kernel: ~5x PIL's bicubic here; the algorithm of views.resize_views, the PNG
    path). At 1/2..1/8 the box is fractional in reduced pixels: PIL resizes it (`resize_box`)."""
    if (src.height, src.width) != (view.src_height, view.src_width):
        raise ValueError(f"view was drawn for a {view.src_width}x{view.src_height} image, "
                         f"got {src.width}x{src.height}")
    d = dct_denom(view, size)
    lay = None if whole else src.layout()
    img, ox, oy = None, 0, 0
    if lay is not None:
        win = jpegregion.window(lay, view.left, view.top, view.left + view.width, view.top + view.height,
                                _reach(view.width, d, size), _reach(view.height, d, size))
        if (win[1] - win[0]) * (win[3] - win[2]) <= CUT_SHARE * lay.rows * lay.cols:
            # the cut starts at MCU (r0, c0), i.e. at reduced pixel (r0 mcu_h / d, c0 mcu_w / d): exact, as
            # mcu sides are multiples of 8; the box moves by that whole number of pixels
            img, ox, oy = src.region(win, d), win[2] * lay.mcu_w // d, win[0] * lay.mcu_h // d
    if d == 1:
        img = src.scaled(1) if img is None else img  # [H', W', 3]
        crop = img[view.top - oy:view.top - oy + view.height, view.left - ox:view.left - ox + view.width]
        return resize_u8(crop, size)
    # Reduced pixel i covers source pixels [i*d, (i+1)*d) (DCT scaling averages 8x8 blocks
    # into 8/d x 8/d), so source coordinate x sits at x/d: the box, exactly, in reduced pixels.
    box = (view.left / d - ox, view.top / d - oy, (view.left + view.width) / d - ox, (view.top + view.height) / d - oy)
    im = src.scaled_image(d) if img is None else Image.fromarray(img)
    return torch.from_numpy(np.array(resize_box(im, box, size))).permute(2, 0, 1).contiguous()  # [3, S, S]


def resize_u8(crop: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [h, w, 3] -> [3, size, size]: torch's antialiased bicubic on uint8."""
    x = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)  # [1, 3, h, w], HWC strides (channels-last)
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return y[0]  # [3, S, S], contiguous


def resize_box(im: Image.Image, box: tuple[float, float, float, float], size: int) -> Image.Image:
    """`im.resize((size, size), BICUBIC, box=box)` with the passes in a fixed order: the rows
    the vertical filter reads, resized horizontally, then vertically. PIL's one call picks
    the order from the image's size (the two orders round differently, by up to ~20 levels),
    so a cut and the whole image would not render alike; with a fixed order the result
    depends only on the pixels around the box (pipeline/jpegregion.py, tests/test_render.py)."""
    x0, y0, x1, y1 = box
    reach = 2.0 * max(1.0, (y1 - y0) / size) + 1.0  # PIL's bicubic support + its window rounding
    top, bottom = max(0, math.floor(y0 - reach)), min(im.height, math.ceil(y1 + reach))
    rows = im.crop((0, top, im.width, bottom))  # [bottom - top, W]
    wide = rows.resize((size, bottom - top), Image.Resampling.BICUBIC, box=(x0, 0, x1, bottom - top))
    return wide.resize((size, size), Image.Resampling.BICUBIC, box=(0, y0 - top, size, y1 - top))


def render_views(sources: Sequence[Encoded | bytes], views: Sequence[View], size: int,
                 dtype: torch.dtype = torch.float32, whole: Optional[bool] = None,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each view of each source rendered at size x size: [B, 3, size, size], float32 in
    [0, 1], or (dtype uint8) round(255 x) of it. Sources are `Encoded` or raw bytes.
    `whole`: None decodes a source with one view here by its MCUs, else whole; True always
    whole (the same bits either way; bench/rehearsal.py compares the speed). `out`: a
    [B, 3, size, size] tensor of `dtype` to render into (a batch buffer), returned."""
    if len(sources) != len(views):
        raise ValueError(f"{len(sources)} images but {len(views)} views")
    if size < 1:
        raise ValueError(f"output size must be >= 1, got {size}")
    if dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
    srcs = [s if isinstance(s, Encoded) else Encoded(s) for s in sources]
    jpeg = [i for i, s in enumerate(srcs) if s.jpeg]
    other = [i for i, s in enumerate(srcs) if not s.jpeg]
    # a source with several views here (tokenize) decodes whole once; one view: just its MCUs
    uses = collections.Counter(id(s) for s in srcs)
    whole = [True] * len(srcs) if whole else [uses[id(s)] > 1 for s in srcs]
    if out is not None and (out.shape != (len(srcs), 3, size, size) or out.dtype != dtype):
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, not {dtype} {(len(srcs), 3, size, size)}")
    if not other:  # JPEGs only: uint8 end to end; float is that / 255 (so uint8 = quantize(float) exactly)
        u8 = [_jpeg_view(s, v, size, w) for s, v, w in zip(srcs, views, whole)]  # [3, S, S] each
        if dtype == torch.uint8:
            return torch.stack(u8, out=out)  # [B, 3, S, S]
        x = torch.stack(u8).float().div_(255.0)
        return x if out is None else out.copy_(x)
    if not jpeg:  # PNG and the like (the bundled default): rendered straight into `out` when it is float
        into = out if dtype == torch.float32 else None
        x = finish_views(resize_views([s.full() for s in srcs], views, size, out=into), views)  # [B, 3, S, S]
        if into is not None and x is not into:  # finish_views works in place; should that change
            x = into.copy_(x)
        if dtype == torch.uint8:
            return quantize(x) if out is None else out.copy_(quantize(x))
        return x
    x = torch.empty(len(srcs), 3, size, size)  # [B, 3, S, S]; both kinds in one batch
    u8 = torch.stack([_jpeg_view(srcs[i], views[i], size, whole[i]) for i in jpeg])  # [J, 3, S, S]
    x[jpeg] = u8.float().div_(255.0)  # [J, 3, S, S] in [0, 1], finished
    x[other] = finish_views(resize_views([srcs[i].full() for i in other], [views[i] for i in other], size),
                            [views[i] for i in other])
    x = quantize(x) if dtype == torch.uint8 else x
    return x if out is None else out.copy_(x)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """float [..] in [0, 1] -> uint8 round(255 x) (what a worker ships)."""
    return x.mul(255.0).round_().to(torch.uint8)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              device: Optional[torch.device | str] = None) -> torch.Tensor:
    """The training step's input: uint8 [B, 3, S, S] -> float32 (x / 255 - mean) / std on
    `device`, in one fused pass after the (4x smaller) uint8 copy. Float images come from a
    float-transport loader, already normalised: they are only moved."""
    x = images if device is None else images.to(device, non_blocking=True)
    if x.dtype != torch.uint8:
        return x
    std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    # addcmul promotes the uint8 operand inside the kernel: one read of x, one write.
    return torch.addcmul(-mean_t / std_t, x, 1.0 / (255.0 * std_t))  # [B, 3, S, S]
