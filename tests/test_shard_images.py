"""pipeline/prepare.py: the RGB normaliser used by `beit shard`, and pipeline/shardread.py's decode_rgb."""
from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageOps

from pipeline.prepare import Rejected, jpeg_orientation, prepare, target_size
from pipeline.shardread import decode_rgb

OPTS = dict(resize_short=None, max_pixels=10_000_000, jpeg_quality=90)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG from uint16 [H, W, 3] (PIL cannot write one)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    h, w, _ = arr.shape
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row
    ihdr = w.to_bytes(4, "big") + h.to_bytes(4, "big") + bytes([16, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def exif_rotated_jpeg(photo, orientation: int) -> bytes:
    arr = photo(48, 64)  # [48, 64, 3]: a left-dark / right-bright pattern makes rotation visible
    arr[:, :32] //= 4
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())


def test_rgb_jpeg_is_stored_as_is(photo):
    data = simplejpeg.encode_jpeg(photo(40, 60), quality=90)
    out = prepare(data, **OPTS)
    assert (out.data, out.ext, out.width, out.height, out.reencoded) == (data, "jpg", 60, 40, False)


def test_resize_shrinks_short_side_never_enlarges(photo):
    big = simplejpeg.encode_jpeg(photo(120, 200), quality=90)
    out = prepare(big, **{**OPTS, "resize_short": 50})
    assert (out.width, out.height, out.ext, out.reencoded) == (83, 50, "jpg", True)
    assert decode_rgb(out.data).shape == (50, 83, 3)
    small = simplejpeg.encode_jpeg(photo(40, 60), quality=90)
    assert prepare(small, **{**OPTS, "resize_short": 50}).data == small
    png = encode(Image.fromarray(photo(100, 60)), "PNG")
    out = prepare(png, **{**OPTS, "resize_short": 30})
    assert (out.width, out.height, out.ext) == (30, 50, "png")
    assert target_size(60, 100, None) is None and target_size(60, 100, 60) is None


def test_resize_is_close_to_pil():
    y, x = np.mgrid[0:256, 0:384]
    img = np.stack([127 + 120 * np.sin(x / (40 + 9 * c) + y / 50) for c in range(3)], -1).astype(np.uint8)
    out = prepare(simplejpeg.encode_jpeg(img, quality=98), **{**OPTS, "resize_short": 64})
    ref = np.asarray(Image.fromarray(img).resize((96, 64), Image.BICUBIC), dtype=np.float32)
    assert np.abs(decode_rgb(out.data).astype(np.float32) - ref).mean() < 3


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_and_reencoded(photo, orientation):
    data = exif_rotated_jpeg(photo, orientation)
    assert jpeg_orientation(data) == orientation
    out = prepare(data, **OPTS)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    got = decode_rgb(out.data)
    assert out.reencoded and out.orientation == orientation
    assert got.shape == upright.shape and (out.orig_width, out.orig_height) == (upright.shape[1], upright.shape[0])
    assert np.abs(got.astype(np.int16) - upright).mean() < 6
    assert jpeg_orientation(out.data) == 1  # re-encoded without EXIF: no reader rotates it again


@pytest.mark.parametrize("name", ["gray-jpeg", "cmyk-jpeg", "palette", "rgba", "gray16", "gray", "rgb16"])
def test_modes_become_rgb(photo, name):
    rgb = photo(20, 30)
    gray = rgb[:, :, 0]
    if name == "gray-jpeg":
        data, ext = encode(Image.fromarray(gray), "JPEG", quality=95), "jpg"
    elif name == "cmyk-jpeg":
        data, ext = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), "jpg"
    elif name == "palette":
        data, ext = encode(Image.fromarray(rgb).convert("P"), "PNG"), "png"
    elif name == "rgba":
        rgba = np.dstack([rgb, np.full(gray.shape, 255, np.uint8)])
        rgba[:10, :, 3] = 0  # top half transparent -> white
        data, ext = encode(Image.fromarray(rgba), "PNG"), "png"
    elif name == "gray16":
        data, ext = encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"), "png"
    elif name == "rgb16":
        data, ext = png16_rgb(rgb.astype(np.uint16) * 257), "png"
    else:
        data, ext = encode(Image.fromarray(gray), "PNG"), "png"
    out = prepare(data, **OPTS)
    got = decode_rgb(out.data)
    assert out.ext == ext and got.shape == (20, 30, 3) and got.dtype == np.uint8
    with Image.open(io.BytesIO(out.data)) as im:
        assert im.mode == "RGB"  # stored files are RGB themselves, not only after decode_rgb
    if name == "rgba":
        assert (got[:10] == 255).all()
        assert np.array_equal(got[10:], rgb[10:])
    if name == "rgb16":
        assert np.array_equal(got, rgb)
    if name in ("gray16", "gray"):
        assert np.array_equal(got[:, :, 0], gray) and np.array_equal(got[:, :, 2], gray)
    if name == "cmyk-jpeg":
        assert np.abs(got.astype(np.int16) - rgb).mean() < 10


def test_png_named_jpeg_is_stored_as_png(photo):
    out = prepare(encode(Image.fromarray(photo(10, 12)), "PNG"), **OPTS)
    assert out.ext == "png" and out.data[:4] == b"\x89PNG"


def test_pixel_arrays_become_rgb_png():
    gray = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    out = prepare(gray, **OPTS)
    assert out.ext == "png" and np.array_equal(decode_rgb(out.data), np.repeat(gray[:, :, None], 3, 2))


@pytest.mark.parametrize(
    "reason, make",
    [
        ("empty", lambda photo: b""),
        ("truncated", lambda photo: simplejpeg.encode_jpeg(photo(64, 64), quality=90)[:1500]),
        ("not-an-image", lambda photo: b"hello, I am a text file\n"),
        ("undecodable", lambda photo: b"\xff\xd8\xff\xe0" + bytes(200)),
        ("undecodable", lambda photo: encode(Image.fromarray(photo(8, 8)), "PNG")[:16] + b"garbage" * 20),
        ("too-many-pixels", lambda photo: simplejpeg.encode_jpeg(photo(200, 300), quality=50)),
        ("too-many-pixels", lambda photo: encode(Image.fromarray(photo(200, 300)), "PNG")),
    ],
)
def test_bad_inputs_are_rejected_with_reason(photo, reason, make):
    with pytest.raises(Rejected) as info:
        prepare(make(photo), **{**OPTS, "max_pixels": 50_000})
    assert info.value.reason == reason


def test_corrupt_jpeg_body_is_caught_by_verify(photo):
    full = simplejpeg.encode_jpeg(photo(64, 64), quality=90)
    data = full[: full.index(b"\xff\xda") + 300] + full[-2:]  # entropy data cut short, end marker kept
    assert prepare(data, **OPTS).reencoded is False  # the fast path trusts header + end marker
    with pytest.raises(Rejected):
        prepare(data, **OPTS, verify=True)


def test_decode_rgb_rejects_garbage():
    with pytest.raises(ValueError):
        decode_rgb(b"not an image")


def test_decode_rgb_png_fast_path_same_pixels_as_pil(monkeypatch):
    """8-bit grey/RGB PNGs decode through libpng (torchvision), the rest through PIL; both
    must give what PIL + pil_rgb gives, and a corrupt PNG still fails with ValueError."""
    from pipeline import shardread
    from pipeline.shardread import is_plain_png, pil_rgb

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (13, 37, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (9, 5, 4), dtype=np.uint8)
    grey_trns = Image.fromarray(grey[:7, :11])
    cases = {  # name: (png bytes, takes the fast path)
        "grey": (encode(Image.fromarray(grey), "PNG"), True),
        "rgb odd size": (encode(Image.fromarray(rgb), "PNG"), True),
        "rgb interlaced": (encode(Image.fromarray(rgb), "PNG", interlace=1), True),
        "one pixel": (encode(Image.fromarray(grey[:1, :1]), "PNG"), True),
        "rgba": (encode(Image.fromarray(alpha), "PNG"), False),
        "palette": (encode(Image.fromarray(rgb).quantize(16), "PNG"), False),
        "grey + tRNS": (encode(grey_trns, "PNG", transparency=int(grey[0, 0])), False),
        "16-bit rgb": (png16_rgb(rng.integers(0, 65536, (6, 4, 3)).astype(np.uint16)), False),
        "1-bit": (encode(Image.fromarray(grey > 127), "PNG"), False),
    }
    for name, (data, fast) in cases.items():
        assert is_plain_png(data) is fast, name
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            want = pil_rgb(im)
        got = decode_rgb(data)
        assert got.dtype == np.uint8 and got.flags.c_contiguous and np.array_equal(got, want), name
    monkeypatch.setattr(shardread, "_png_decoder", False)  # a torchvision without its PNG codec: PIL
    for name, (data, _) in cases.items():
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert np.array_equal(decode_rgb(data), pil_rgb(im)), name
    monkeypatch.undo()
    data = cases["grey"][0]
    cut = data[: data.index(b"IDAT") + 20]  # a plain PNG header, its pixel data cut short
    assert is_plain_png(cut)
    with pytest.raises(ValueError):
        decode_rgb(cut)


def test_resize_writes_hwc_directly_same_pixels_as_interpolate():
    """resize_rgb has torch write into an HWC buffer (no copy back from CHW); it must give
    exactly what F.interpolate(bicubic, antialias) gives, for odd shapes too."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from pipeline.prepare import resize_rgb

    rng = np.random.default_rng(0)
    for h, w, th, tw in ((375, 500, 256, 341), (1, 50, 1, 20), (61, 7, 30, 4)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None], size=(th, tw), mode="bicubic", antialias=True)
        out = resize_rgb(img, tw, th)
        assert out.shape == (th, tw, 3) and out.flags.c_contiguous
        assert np.array_equal(out, ref[0].permute(1, 2, 0).numpy())
