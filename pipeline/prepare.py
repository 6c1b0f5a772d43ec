"""The shard-time image normaliser: `prepare` turns a source image into what a shard stores.

Contract of what the shard stage stores, so that nothing downstream has to
think about colour modes or orientation:

- Every stored image decodes to 8-bit, 3-channel RGB, upright (through the one
  decoder, `pipeline.shardread.decode_rgb`, which every reader uses).
- A valid RGB/YCbCr JPEG that needs no resize and has no EXIF rotation is
  stored as its original bytes, never re-encoded (no generation loss).
- Everything else is decoded, normalised and encoded once:
  grayscale / CMYK / palette / 16-bit -> 8-bit RGB; alpha is composited on
  white; EXIF orientation is applied HERE (the pixels are transposed and the
  result re-encoded, so the stored image no longer depends on EXIF; a
  re-encoded image carries no EXIF at all); then the image is shrunk so the
  shorter side is at most `resize_short` (never enlarged).
  JPEG sources are re-encoded as JPEG (quality `jpeg_quality`), any other
  (lossless-or-unknown) source as PNG.
- `restart_markers=True` (`shard.encode.restart_markers`): every stored JPEG has a restart
  marker after each MCU, so the loader decodes just the MCUs a view needs
  (pipeline/jpegregion.py). Such a JPEG passes through as above; any other JPEG is
  re-encoded (by PIL, which writes the markers; 4:2:0, `jpeg_quality`): a generation loss
  paid once at shard time, and ~2% more bytes.
- Resizing uses libjpeg's DCT-domain downscaling (simplejpeg `min_height` /
  `min_width`, scale 1/2, 1/4 or 1/8, never below the target) followed by an antialiased
  bicubic resize on uint8 tensors (torch); ~2x faster than PIL.
- Bad inputs raise `Rejected(reason, detail)`; reasons are `REASONS`.
  Decompression bombs are refused from the header (w*h > max_pixels) before
  any pixel is decoded.

Validation cost: a pass-through JPEG is checked from its header (libjpeg
parses it) and its end-of-image marker; the entropy-coded data is decoded only
when the marker is missing (a likely truncation) or `verify=True`, because a
full decode costs ~10x the rest of the sharding work per image.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import warnings
from typing import Iterator, Union

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from pipeline.jpegregion import layout

from pipeline.shardread import JPEG_MAGIC, pil_rgb

# Listing a source (pipeline/sources.py) finds the last three: an entry or folder that may not be read,
# a link to nothing, a link that loops (itself, or a folder back to one above it).
REASONS = ("empty", "truncated", "not-an-image", "undecodable", "too-many-pixels", "unreadable",
           "dangling-link", "link-loop",
           # segmentation samples (pipeline/segsource.py): no label map, one of another size, a class id
           # outside the class list
           "mask-missing", "mask-size", "mask-class")
EOI = b"\xff\xd9"
# Signatures of formats we expect; a file that has one but PIL cannot identify is broken, not "not an image".
IMAGE_MAGICS = (b"\x89PNG", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")

# What a source may hand over: encoded bytes, or already-decoded pixels
# (uint8 [H, W] grayscale or [H, W, 3] RGB) from array datasets like Fashion-MNIST.
Raw = Union[bytes, np.ndarray]


class Rejected(Exception):
    """An input that cannot become a stored image; `reason` is one of REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Stored:
    data: bytes  # the bytes that go into the tar
    ext: str  # "jpg" | "png": the real format of `data`
    width: int  # of the stored image
    height: int
    orig_width: int  # upright size of the source (after EXIF orientation)
    orig_height: int
    orientation: int  # EXIF orientation of the source (1 = none)
    reencoded: bool  # False: `data` is the source's own bytes


# ---------------------------------------------------------------------------
# geometry


def target_size(width: int, height: int, resize_short: int | None) -> tuple[int, int] | None:
    """(width, height) with the shorter side shrunk to `resize_short`, or None
    when no resize is needed (already small enough, or resizing disabled)."""
    short = min(width, height)
    if not resize_short or short <= resize_short:
        return None
    scale = resize_short / short
    if width <= height:
        return resize_short, max(1, round(height * scale))
    return max(1, round(width * scale)), resize_short


def resize_rgb(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Antialiased bicubic resize of uint8 [H, W, 3] -> uint8 [height, width, 3]."""
    if img.shape[0] == height and img.shape[1] == width:
        return img
    import torch  # heavy (~3 s to import): only processes that resize pay for it

    if not img.flags.writeable or not img.flags.c_contiguous:  # e.g. np.asarray(PIL image); torch warns
        img = np.array(img)
    t = torch.from_numpy(img).permute(2, 0, 1)[None]  # [1, 3, H, W], channels-last view of the HWC pixels
    # The kernel writes straight into an HWC buffer (a channels-last `out`), so no copy back from CHW:
    # that copy used to cost ~0.5 ms, as much as the resize itself. Same kernel and bytes as
    # F.interpolate(t, mode="bicubic", antialias=True), which has no `out=`.
    hwc = torch.empty((1, height, width, 3), dtype=torch.uint8)
    try:
        res = torch.ops.aten._upsample_bicubic2d_aa.out(t, [height, width], False, None, None, out=hwc.permute(0, 3, 1, 2))
        if res.data_ptr() == hwc.data_ptr() and res.stride() == hwc.permute(0, 3, 1, 2).stride():
            return hwc[0].numpy()  # [height, width, 3]
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without this overload
        pass
    import torch.nn.functional as F

    out = F.interpolate(t, size=(height, width), mode="bicubic", antialias=True)  # uint8 in, uint8 out
    return np.ascontiguousarray(out[0].numpy().transpose(1, 2, 0))  # [height, width, 3]


def dct_scale(width: int, height: int, target_w: int, target_h: int) -> dict:
    """simplejpeg min_width/min_height selecting the smallest of the scales 1/8, 1/4, 1/2
    whose output still covers the target. Only these: libjpeg-turbo has SIMD IDCTs for
    them, while e.g. 3/4 or 7/8 use plain C and decode slower than full size."""
    for denom in (8, 4, 2):
        w, h = -(-width // denom), -(-height // denom)  # libjpeg rounds scaled sizes up
        if w >= target_w and h >= target_h:
            return {"min_width": w, "min_height": h}
    return {}


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Make an [H, W, C] image upright given its EXIF orientation (1..8)."""
    if orientation == 2:
        img = img[:, ::-1]
    elif orientation == 3:
        img = img[::-1, ::-1]
    elif orientation == 4:
        img = img[::-1]
    elif orientation == 5:
        img = img.transpose(1, 0, 2)
    elif orientation == 6:
        img = img.transpose(1, 0, 2)[:, ::-1]  # rotate 90 deg clockwise
    elif orientation == 7:
        img = img.transpose(1, 0, 2)[::-1, ::-1]
    elif orientation == 8:
        img = img.transpose(1, 0, 2)[::-1]  # rotate 90 deg counter-clockwise
    return np.ascontiguousarray(img)


def jpeg_orientation(data: bytes) -> int:
    """EXIF orientation (1..8) of a JPEG from its APP1 segment; 1 if absent.

    A tiny marker walk instead of PIL.Image.open + getexif (~20x slower),
    because it runs on every pass-through JPEG.
    """
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return 1
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan: no more metadata
            return 1
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\0\0":
            return _tiff_orientation(data[i + 10 : i + 2 + length])
        i += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        if len(entry) < 12:
            return 1
        if int.from_bytes(entry[0:2], order) == 0x0112:  # Orientation, type SHORT
            value = int.from_bytes(entry[8:10], order)
            return value if 1 <= value <= 8 else 1
    return 1


# ---------------------------------------------------------------------------
# encoding


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)  # no timestamps: reproducible
    return buf.getvalue()


def encode_jpeg(img: np.ndarray, quality: int, restart_markers: bool = False) -> bytes:
    if restart_markers:  # simplejpeg cannot write them; PIL's libjpeg-turbo can (same encoder)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img)).save(buf, format="JPEG", quality=quality, subsampling=2,
                                                       restart_marker_blocks=1)
        return buf.getvalue()
    return simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=quality, colorspace="RGB", colorsubsampling="420")


# ---------------------------------------------------------------------------
# the shard-time normaliser


def prepare(
    raw: Raw, *, resize_short: int | None, max_pixels: int, jpeg_quality: int, verify: bool = False,
    restart_markers: bool = False,
) -> Stored:
    """Turn one source image into what the shard stores (see module docstring).
    Raises Rejected for inputs that cannot be stored."""
    if isinstance(raw, np.ndarray):
        return _prepare_pixels(raw, resize_short, max_pixels)
    if len(raw) == 0:
        raise Rejected("empty", "zero-byte file")
    if raw[:3] == JPEG_MAGIC:
        return _prepare_jpeg(raw, resize_short, max_pixels, jpeg_quality, verify, restart_markers)
    return _prepare_pil(raw, resize_short, max_pixels, jpeg_quality, restart_markers)


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise Rejected("too-many-pixels", f"{width}x{height} > shard.max_pixels={max_pixels}")


def _prepare_pixels(arr: np.ndarray, resize_short: int | None, max_pixels: int) -> Stored:
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise Rejected("undecodable", f"array {arr.dtype} {arr.shape}: expected uint8 [H, W] or [H, W, 3]")
    height, width = arr.shape[:2]
    _check_pixels(width, height, max_pixels)
    img = np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr  # [H, W, 3]
    size = target_size(width, height, resize_short)
    if size:
        img = resize_rgb(img, *size)
    return Stored(encode_png(img), "png", img.shape[1], img.shape[0], width, height, 1, True)


def _jpeg_error(err: Exception) -> Rejected:
    msg = str(err)
    if "premature end" in msg.lower() or "truncated" in msg.lower():
        return Rejected("truncated", msg)
    return Rejected("undecodable", msg)


def _decode_jpeg_checked(data: bytes, **kwargs) -> np.ndarray:
    """simplejpeg decode; truncation is an error, other libjpeg warnings
    (e.g. extraneous bytes before a marker) are tolerated as browsers do."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, **kwargs)
    except ValueError as err:
        rejected = _jpeg_error(err)
        if rejected.reason == "truncated":
            raise rejected from None
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False, **kwargs)
    except ValueError as err:
        raise _jpeg_error(err) from None


def _prepare_jpeg(data: bytes, resize_short: int | None, max_pixels: int, quality: int, verify: bool,
                  restart_markers: bool = False) -> Stored:
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError as err:
        raise _jpeg_error(err) from None
    _check_pixels(width, height, max_pixels)
    if colorspace not in ("YCbCr", "RGB", "Gray"):  # CMYK / YCCK: PIL knows Adobe's inverted CMYK
        return _prepare_pil(data, resize_short, max_pixels, quality, restart_markers)
    orientation = jpeg_orientation(data)
    upright = (height, width) if orientation >= 5 else (width, height)
    size = target_size(width, height, resize_short)  # in the file's own (pre-rotation) frame
    if size is None and orientation == 1 and colorspace != "Gray" and (not restart_markers or layout(data)):
        if verify or not data.rstrip(b"\0").endswith(EOI):
            _decode_jpeg_checked(data)  # raises Rejected("truncated"/"undecodable")
        return Stored(data, "jpg", width, height, width, height, 1, False)
    if size:
        # DCT-domain downscale (1/2, 1/4, 1/8) to the smallest scale still >= the target, then a real filter.
        # fastdct/fastupsample: ~10% faster; their small error is below what the resize filter removes.
        img = _decode_jpeg_checked(data, fastdct=True, fastupsample=True, **dct_scale(width, height, *size))
        img = resize_rgb(img, *size)
    else:
        img = _decode_jpeg_checked(data)  # [H, W, 3]
    img = apply_orientation(img, orientation)
    return Stored(encode_jpeg(img, quality, restart_markers), "jpg", img.shape[1], img.shape[0], *upright,
                  orientation, True)


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    # Our own check (from the header) decides; keep PIL's bomb guard out of the way.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _prepare_pil(data: bytes, resize_short: int | None, max_pixels: int, jpeg_quality: int,
                 restart_markers: bool = False) -> Stored:
    with _pil_pixel_limit(max_pixels):
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            if data.startswith(IMAGE_MAGICS):
                raise Rejected("undecodable", f"broken image header (starts with {data[:8]!r})") from None
            raise Rejected("not-an-image", f"not a recognised image format (starts with {data[:8]!r})") from None
        except Exception as err:  # noqa: BLE001 - a broken header can raise anything
            raise Rejected("undecodable", f"{type(err).__name__}: {err}") from None
        with im:
            fmt = im.format
            width, height = im.size
            _check_pixels(width, height, max_pixels)
            try:
                im.load()
            except OSError as err:
                reason = "truncated" if "truncated" in str(err).lower() else "undecodable"
                raise Rejected(reason, f"{fmt}: {err}") from None
            except Exception as err:  # noqa: BLE001 - decoders raise SyntaxError, ValueError, ...
                raise Rejected("undecodable", f"{fmt}: {type(err).__name__}: {err}") from None
            orientation = im.getexif().get(0x0112, 1)
            orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
            img = pil_rgb(im)  # [H, W, 3]
    size = target_size(width, height, resize_short)
    if size:
        img = resize_rgb(img, *size)
    img = apply_orientation(img, orientation)
    upright = (height, width) if orientation >= 5 else (width, height)
    if fmt == "JPEG":
        data = encode_jpeg(img, jpeg_quality, restart_markers)
        return Stored(data, "jpg", img.shape[1], img.shape[0], *upright, orientation, True)
    return Stored(encode_png(img), "png", img.shape[1], img.shape[0], *upright, orientation, True)
