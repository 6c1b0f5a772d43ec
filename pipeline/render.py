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

Region decode. A JPEG written with a restart marker after every MCU (the shard stage's
`shard.encode.restart_markers`, on in configs/imagenet-base.yaml) is also cut to the MCUs
the view's box needs before decoding (pipeline/jpegregion.py): the box grown by the
resize filter's reach and libjpeg's 2 px chroma-upsampling edge, so the rendered view has
the same bits as one rendered from the whole decode (tests/test_render.py), while Huffman
decoding, IDCT and colour conversion only run over that rectangle. A source with several
views in one call (the tokenize stage) is decoded whole once instead, which costs less
than V cuts and renders the same pixels.

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

import collections
import math
from typing import Optional, Sequence

import numpy as np
import simplejpeg
import torch
from PIL import Image

from pipeline import jpegregion
from pipeline.shardread import JPEG_MAGIC, decode_rgb
from pipeline.views import View, finish_views, resize_views

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
        w = -(-(min(c1 * lay.mcu_w, lay.width) - c0 * lay.mcu_w) // denom)
        h = -(-(min(r1 * lay.mcu_h, lay.height) - r0 * lay.mcu_h) // denom)
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


def _jpeg_view_u8(src: Encoded, view: View, size: int, whole: bool) -> np.ndarray:
    """uint8 [size, size, 3], the whole view (resize, brightness, flip) in uint8 C code:
    the bits of the float path quantised (`_brightness_lut`), without two float passes."""
    a = _jpeg_resize(src, view, size, whole)  # [size, size, 3]
    if view.brightness == 1.0 and not view.flip:
        return a
    im = Image.fromarray(a)
    if view.brightness != 1.0:
        im = im.point(list(_brightness_lut(view.brightness)) * 3)  # one table per band
    if view.flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im)  # [size, size, 3]


def _reach(extent: float, denom: int, size: int) -> float:
    """Source px around a box side that may differ in a cut or that the resize reads: the
    chroma-upsampling edge; at a DCT scale (PIL resizes the fractional box) also PIL's bicubic
    support (2 x the downscale, at least 2) + 1.5 for its window rounding; at the decode scale."""
    if denom == 1:
        return float(jpegregion.CHROMA_EDGE)  # the box is cropped exactly, then resized alone
    return denom * (2.0 * max(1.0, extent / (denom * size)) + 1.5 + jpegregion.CHROMA_EDGE)


def _jpeg_resize(src: Encoded, view: View, size: int, whole: bool = True) -> np.ndarray:
    """uint8 [size, size, 3]: the view's box from the JPEG decoded at its DCT scale (and, with a
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
        if win != (0, lay.rows, 0, lay.cols):
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
    return np.asarray(resize_box(im, box, size))  # [size, size, 3]


def resize_u8(crop: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, 3] -> [size, size, 3]: torch's antialiased bicubic on uint8 (channels-last)."""
    x = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)  # [1, 3, h, w], HWC strides (channels-last)
    y = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return y[0].permute(1, 2, 0).numpy()  # [size, size, 3]


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
    # a source with several views here (tokenize) decodes whole once; one view: just its MCUs
    uses = collections.Counter(id(s) for s in srcs)
    whole = [uses[id(s)] > 1 for s in srcs]
    if not other and dtype == torch.uint8 and all(_lut_only(v) for v in views):
        # uint8 end to end; the same bits as the float path below, quantised (tests/test_render.py)
        hwc = np.stack([_jpeg_view_u8(s, v, size, w) for s, v, w in zip(srcs, views, whole)])  # [B, S, S, 3]
        return torch.from_numpy(hwc).permute(0, 3, 1, 2).contiguous()  # [B, 3, S, S]
    x = torch.empty(len(srcs), 3, size, size)  # [B, 3, S, S]
    if jpeg:
        u8 = torch.from_numpy(np.stack([_jpeg_resize(srcs[i], views[i], size, whole[i]) for i in jpeg]))  # [J, S, S, 3]
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
