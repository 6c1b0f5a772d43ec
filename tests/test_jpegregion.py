"""pipeline/jpegregion.py: which JPEGs have a per-MCU layout, and that a cut decodes to the
full decode's pixels (at every DCT scale, for every chroma subsampling and grey), but for
the 2 px chroma-upsampling edge at its inner sides."""
import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from conftest import photo_like
from pipeline import jpegregion
from pipeline.jpegregion import CHROMA_EDGE, MIN_MCUS, cut, layout, window
from pipeline.prepare import encode_jpeg


def pil_jpeg(img: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=save.pop("quality", 90), **save)
    return buf.getvalue()


def test_layout_only_for_a_marker_after_every_mcu():
    img = photo_like(90, 130)
    assert layout(encode_jpeg(img, 90)) is None  # no restart markers (simplejpeg, the default)
    assert layout(pil_jpeg(img, restart_marker_blocks=2)) is None  # another interval
    assert layout(pil_jpeg(img, restart_marker_blocks=1, progressive=True)) is None  # several scans
    lay = layout(encode_jpeg(img, 90, restart_markers=True))
    assert lay is not None and (lay.width, lay.height, lay.mcu_w, lay.mcu_h) == (130, 90, 16, 16)
    assert (lay.cols, lay.rows) == (9, 6) and len(lay.starts) == len(lay.ends) == 54
    assert np.all(lay.starts[1:] == lay.ends[:-1] + 2)  # each MCU's bytes, then its 2-byte marker
    data = encode_jpeg(img, 90, restart_markers=True)
    assert layout(data[: len(data) // 2]) is None  # truncated: no EOI, decodes whole (and fails there)
    assert layout(b"\xff\xd8\xff") is None and layout(b"not a jpeg at all") is None


CASES = [  # (width, height, PIL subsampling 0: 4:4:4, 1: 4:2:2, 2: 4:2:0; grey)
    (500, 375, 2, False), (257, 333, 1, False), (100, 67, 0, False), (203, 150, 2, True), (40, 30, 2, False),
]


@pytest.mark.parametrize("width,height,subsampling,grey", CASES)
def test_cut_decodes_to_the_full_decode_away_from_its_inner_edges(width, height, subsampling, grey):
    img = photo_like(height, width, seed=width)
    im = Image.fromarray(img).convert("L") if grey else Image.fromarray(img)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, subsampling=subsampling, restart_marker_blocks=1)
    data = buf.getvalue()
    lay = layout(data)
    assert lay is not None
    rng = np.random.default_rng(width)
    for d in (1, 2, 4, 8):
        full = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-width // d), min_height=-(-height // d))
        assert full.shape[:2] == (-(-height // d), -(-width // d))
        for _ in range(12):
            x0, y0 = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
            r0, r1, c0, c1 = window(lay, x0, y0, rng.uniform(x0 + 1, width), rng.uniform(y0 + 1, height), 0, 0)
            assert r1 - r0 >= min(MIN_MCUS, lay.rows) and c1 - c0 >= min(MIN_MCUS, lay.cols)
            cw = min(c1 * lay.mcu_w, width) - c0 * lay.mcu_w
            ch = min(r1 * lay.mcu_h, height) - r0 * lay.mcu_h
            part = simplejpeg.decode_jpeg(cut(data, lay, r0, r1, c0, c1), colorspace="RGB", strict=True,
                                          min_width=-(-cw // d), min_height=-(-ch // d))
            oy, ox = r0 * lay.mcu_h // d, c0 * lay.mcu_w // d
            want = full[oy:oy + part.shape[0], ox:ox + part.shape[1]]
            assert part.shape == want.shape
            keep = np.ones(part.shape[:2], dtype=bool)  # [h, w]: all but the inner edges
            e = CHROMA_EDGE
            keep[:e] &= r0 == 0
            keep[part.shape[0] - e:] &= r1 == lay.rows
            keep[:, :e] &= c0 == 0
            keep[:, part.shape[1] - e:] &= c1 == lay.cols
            assert np.array_equal(part[keep], want[keep]), (d, (r0, r1, c0, c1))


def test_window_grows_the_box_by_the_margin_and_keeps_three_mcus():
    lay = layout(encode_jpeg(photo_like(100, 200), 90, restart_markers=True))  # 13 x 7 MCUs
    assert window(lay, 40, 20, 60, 50, 0, 0) == (1, 4, 2, 5)  # rows 16..64, cols 32..80
    assert window(lay, 40, 20, 60, 50, 9, 5) == (0, 4, 1, 5)
    assert window(lay, 190, 90, 199, 99, 0, 0) == (4, 7, 10, 13)  # 1 x 1 MCU at the corner: 3 x 3
    with pytest.raises(ValueError, match="outside"):
        cut(b"", lay, 0, 8, 0, 1)
    assert jpegregion.MIN_MCUS == 3


def test_shard_stage_writes_markers_only_when_asked_and_keeps_old_fingerprints():
    from pipeline.prepare import prepare
    from pipeline.schema import EncodeConfig

    plain = encode_jpeg(photo_like(120, 160), 90)
    kw = dict(resize_short=None, max_pixels=10**8, jpeg_quality=90)
    assert prepare(plain, **kw).data == plain  # default: passed through as it is
    marked = prepare(plain, **kw, restart_markers=True)
    assert marked.reencoded and layout(marked.data) is not None
    again = prepare(marked.data, **kw, restart_markers=True)
    assert not again.reencoded and again.data == marked.data  # already marked: no second generation loss
    resized = prepare(plain, **{**kw, "resize_short": 64}, restart_markers=True)
    assert (resized.width, resized.height) == (85, 64) and layout(resized.data) is not None
    png = io.BytesIO()
    Image.fromarray(photo_like(30, 40)).save(png, "PNG")
    assert prepare(png.getvalue(), **kw, restart_markers=True).data[:4] == b"\x89PNG"  # lossless stays PNG
    # shards written before the setting existed keep their fingerprints
    assert "restart_markers" not in EncodeConfig().fingerprint()
    assert EncodeConfig(restart_markers=True).fingerprint()["restart_markers"] is True
