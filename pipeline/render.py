"""Stored image bytes + views -> rendered views: the one function the tokenize stage and
the trainers render through (`render_views`), so view parity holds by construction.

Crop-aware decode. A view is known before its image is decoded (its box, flip and
jitter are stored with the tokens), so a JPEG is decoded only as finely as the view
needs: libjpeg's DCT scaling (1/2, 1/4, 1/8; simplejpeg `min_width`/`min_height`, the
same decoder and scales as the shard stage's resize in pipeline/prepare.py) at the
smallest scale whose copy of the crop box still has at least `size` pixels on both
sides; then the box, mapped to that scale with fractional coordinates, is resized to
`size` x `size` by PIL's antialiased bicubic on uint8 (`Image.resize(box=)` takes the
fractional box exactly; a torch crop would have to round it to whole reduced pixels).
Huffman decoding still reads the whole file; the IDCT and colour conversion shrink
with the scale. The scale is a function of (view, size) alone, never of which other
views share a batch, so the tokenize stage (V views of an image per batch) and the
trainer (one view) render the same pixels. How far this moves from a full decode:
tests/test_render.py (PSNR >= 30 dB per view, measured ~36-38 dB on photo-like JPEGs,
see bench/README.md).

Other formats (PNG: the bundled default), and JPEGs libjpeg-turbo cannot turn into RGB
(CMYK/YCCK; the shard stage normalises those, foreign shards may hold them), render
exactly as before: full decode (`decode_rgb`) + `views.resize_views` (float, torch).

Transport. `dtype=torch.uint8` returns the rendered views quantised to uint8
(round(255 x)), what a DataLoader worker ships (4x fewer bytes than float32); the
consumer calls `normalize` once, on its device. A JPEG chunk whose views change colour by brightness alone (BEiT's jitter) never leaves uint8: PIL
resizes, maps each value through a 256-entry table computed by the float path's own ops,
and flips; the same bits as rendering in float and quantising, without the float passes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import simplejpeg
import torch
from PIL import Image

from pipeline.shardread import JPEG_MAGIC, decode_rgb
from pipeline.views import View, finish_views, resize_views

DCT_DENOMS = (8, 4, 2)  # libjpeg-turbo's SIMD IDCT scales (3/4, 7/8, ... are plain C and slower)
_RGB_JPEG = ("YCbCr", "RGB", "Gray")  # what simplejpeg decodes to RGB (decode_rgb's fast path)


class Encoded:
    """One stored image: its bytes, its size, and its decodes (cached per DCT scale, so
    the V views of an image in a tokenize batch decode it once per scale they need)."""

    __slots__ = ("data", "jpeg", "width", "height", "_decoded")

    def __init__(self, data: bytes):
        self.data = data
        self._decoded: dict[int, object] = {}
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

    def scaled(self, denom: int) -> Image.Image:
        """The JPEG decoded at 1/denom (denom 1: full size) as a PIL RGB image."""
        im = self._decoded.get(-denom)
        if im is None:
            w, h = -(-self.width // denom), -(-self.height // denom)  # libjpeg rounds scaled sizes up
            a = simplejpeg.decode_jpeg(self.data, colorspace="RGB", strict=False, min_width=w, min_height=h)
            if a.shape[:2] != (h, w):  # simplejpeg picked another scale: never expected; fail loudly
                raise ValueError(f"JPEG {self.width}x{self.height} at 1/{denom}: decoded {a.shape[1]}x{a.shape[0]}")
            im = self._decoded[-denom] = Image.fromarray(a)  # [h, w, 3]
        return im


def dct_denom(view: View, size: int) -> int:
    """The largest of 8, 4, 2 (else 1) at which the view's box still spans >= size pixels."""
    for d in DCT_DENOMS:
        if view.width >= size * d and view.height >= size * d:
            return d
    return 1


def _lut_only(view: View) -> bool:
    """True when the view's colour change is a per-value function of the uint8 pixel
    (brightness alone; contrast needs the view's mean, saturation its grey, hue HSV)."""
    return (view.contrast, view.saturation, view.hue) == (1.0, 1.0, 0.0)


def _brightness_lut(factor: float) -> bytes:
    """256 entries: what finish_views' brightness blend then `quantize` make of each uint8
    value, computed by the very same float32 torch ops (so the LUT is bit-exact)."""
    x = torch.arange(256, dtype=torch.float32).div_(255.0).view(1, 1, 16, 16)  # [1,1,16,16]
    f = torch.tensor([factor], dtype=torch.float32).view(-1, 1, 1, 1)
    y = (f * x + (1.0 - f) * torch.zeros_like(x)).clamp_(0.0, 1.0)  # views._blend with zeros
    return quantize(y).reshape(-1).numpy().tobytes()


def _jpeg_view_u8(src: Encoded, view: View, size: int) -> np.ndarray:
    """uint8 [size, size, 3], the whole view (resize, brightness, flip) in PIL's uint8 C code:
    the bits of the float path quantised (`_brightness_lut`), without two float passes."""
    im = _jpeg_resize(src, view, size)
    if view.brightness != 1.0:
        im = im.point(list(_brightness_lut(view.brightness)) * 3)  # one table per band
    if view.flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im)  # [size, size, 3]


def _jpeg_view(src: Encoded, view: View, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the view's box resized from the JPEG decoded at its DCT scale."""
    return np.asarray(_jpeg_resize(src, view, size))  # [size, size, 3]


def _jpeg_resize(src: Encoded, view: View, size: int) -> Image.Image:
    if (src.height, src.width) != (view.src_height, view.src_width):
        raise ValueError(f"view was drawn for a {view.src_width}x{view.src_height} image, "
                         f"got {src.width}x{src.height}")
    d = dct_denom(view, size)
    # Reduced pixel i covers source pixels [i*d, (i+1)*d) (DCT scaling averages 8x8 blocks
    # into 8/d x 8/d), so source coordinate x sits at x/d: the box, exactly, in reduced pixels.
    box = (view.left / d, view.top / d, (view.left + view.width) / d, (view.top + view.height) / d)
    return src.scaled(d).resize((size, size), Image.Resampling.BICUBIC, box=box)


def render_views(sources: Sequence[Encoded | bytes], views: Sequence[View], size: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Each view of each source rendered at size x size: [B, 3, size, size], float32 in
    [0, 1], or (dtype uint8) round(255 x) of it. Sources are `Encoded` or raw bytes."""
    if len(sources) != len(views):
        raise ValueError(f"{len(sources)} images but {len(views)} views")
    if size < 1:
        raise ValueError(f"output size must be >= 1, got {size}")
    if dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
    srcs = [s if isinstance(s, Encoded) else Encoded(s) for s in sources]
    jpeg = [i for i, s in enumerate(srcs) if s.jpeg]
    other = [i for i, s in enumerate(srcs) if not s.jpeg]
    if not other and dtype == torch.uint8 and all(_lut_only(v) for v in views):
        # uint8 end to end; the same bits as the float path below, quantised (tests/test_render.py)
        hwc = np.stack([_jpeg_view_u8(s, v, size) for s, v in zip(srcs, views)])  # [B, S, S, 3]
        return torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()  # [B, 3, S, S]
    x = torch.empty(len(srcs), 3, size, size)  # [B, 3, S, S]
    if jpeg:
        u8 = torch.from_numpy(np.stack([_jpeg_view(srcs[i], views[i], size) for i in jpeg]))  # [J, S, S, 3]
        x[jpeg] = u8.permute(0, 3, 1, 2).float().div_(255.0)  # [J, 3, S, S] in [0, 1]
    if other:
        x[other] = resize_views([srcs[i].full() for i in other], [views[i] for i in other], size)
    x = finish_views(x, views)
    return quantize(x) if dtype == torch.uint8 else x


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
