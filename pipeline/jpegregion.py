"""Decode only the MCUs of a JPEG that a view needs.

A baseline JPEG's entropy-coded data is one bit stream: to reach any MCU (the 16x16 px
unit of a 4:2:0 image), every MCU before it must be Huffman-decoded, because code words
are not byte-aligned and DC coefficients are coded as differences from the previous
block. A restart marker (RSTn) resets both, so the bytes after it decode on their own.
JPEGs written with a marker after every MCU (the shard stage's
`shard.encode.restart_markers`) therefore hold an index of themselves: `layout` finds
each MCU's bytes with one vectorised scan for the markers, and `cut` re-wraps any
rectangle of MCUs as a small JPEG of its own (the same tables, a smaller frame size,
the markers renumbered). libjpeg then decodes just that rectangle: Huffman decoding,
IDCT and colour conversion all shrink with it. (libjpeg-turbo's `jpeg_skip_scanlines`
still Huffman-decodes every row above a crop, and neither PIL nor simplejpeg exposes
it or `jpeg_crop_scanline`.)

Exactness. The IDCT works per 8x8 block and colour conversion per pixel, at every DCT
scale; only libjpeg's "fancy" chroma upsampling reads one chroma sample across a block
edge. So the pixels of a cut equal the full decode's (at the same 1/1..1/8 scale)
except within 2 px of the cut's inner edges (tests/test_jpegregion.py checks every
pixel). `window` adds that margin plus the resize filter's reach around the view's
box, so a view rendered from its cut equals the view rendered from the full decode
(pipeline/render.py; tests/test_render.py).

Cost (bench/README.md): the marker scan and the cut take ~20-60 us against ~0.6-1.5 ms
for a full decode of a 256-600 px image; the markers add ~2% to the file and ~5-10%
to a full decode. JPEGs without a marker after every MCU (progressive, arithmetic-coded,
another restart interval, several scans: most originals) get `layout(...) is None` and
decode whole, as before.
"""
from __future__ import annotations

import dataclasses
import math
import struct
from typing import Optional

import numpy as np

_SOF_BASELINE = (0xC0, 0xC1)  # Huffman, sequential (8 or 12 bit; libjpeg decodes 8 here)
_SOF_OTHER = frozenset(range(0xC2, 0xD0)) - {0xC4, 0xC8, 0xCC}  # progressive, lossless, arithmetic
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # markers without a length field
CHROMA_EDGE = 2  # px (at the decode scale) next to a cut edge that may differ from the full decode
# libjpeg-turbo upsamples chroma with its "fancy" filter only where the subsampled width exceeds
# 2 samples (box upsampling below), which a cut 1-2 MCUs wide can fall under at 1/8: cuts keep 3.
MIN_MCUS = 3


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """Where each MCU's bytes sit in a JPEG with a restart marker after every MCU."""

    width: int
    height: int
    mcu_w: int  # px: 8 x the largest horizontal sampling factor (8 for one component)
    mcu_h: int
    cols: int  # MCUs per row
    rows: int
    sof: int  # offset of the SOF marker (its frame size is rewritten in a cut)
    scan: int  # offset of the first entropy-coded byte
    starts: np.ndarray  # int64 [rows * cols]: first byte of each MCU's segment
    ends: np.ndarray  # int64 [rows * cols]: one past its last byte (its marker, or the final EOI)

    def extent(self, r0: int, r1: int, c0: int, c1: int) -> tuple[int, int]:
        """(width, height) in px of MCU rows [r0, r1) x columns [c0, c1) (the last ones may be partial)."""
        return min(c1 * self.mcu_w, self.width) - c0 * self.mcu_w, min(r1 * self.mcu_h, self.height) - r0 * self.mcu_h


def layout(data: bytes) -> Optional[Layout]:
    """The MCU segments of a baseline JPEG with one interleaved scan and a restart marker
    after every MCU; None for any other JPEG (it decodes whole)."""
    n, pos = len(data), 2
    sof, interval, components = None, 0, 0
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_BASELINE:
            sof = pos
            components = data[pos + 9] if pos + 10 <= n else 0
        elif marker in _SOF_OTHER:
            return None
        elif marker == 0xDD and length == 4:
            interval = (data[pos + 4] << 8) | data[pos + 5]
        elif marker == 0xDA:
            if sof is None or interval != 1 or components < 1 or data[pos + 4] != components:
                return None  # no frame yet, another restart interval, or a non-interleaved scan
            scan = pos + 2 + length
            break
        pos += 2 + length
    height, width = struct.unpack(">HH", data[sof + 5:sof + 9])
    if height == 0 or width == 0 or sof + 10 + 3 * components > n:
        return None
    sampling = [data[sof + 11 + 3 * i] for i in range(components)]
    # one component: the MCU is one 8x8 block whatever its sampling factors say
    hmax = 1 if components == 1 else max(s >> 4 for s in sampling)
    vmax = 1 if components == 1 else max(s & 15 for s in sampling)
    if not (1 <= hmax <= 4 and 1 <= vmax <= 4):
        return None
    mcu_w, mcu_h = 8 * hmax, 8 * vmax
    cols, rows = -(-width // mcu_w), -(-height // mcu_h)

    body = np.frombuffer(data, dtype=np.uint8, offset=scan)  # [bytes after the SOS header]
    ff = np.flatnonzero(body[:-1] == 0xFF)  # candidate markers (FF 00 is a stuffed data byte)
    after = body[ff + 1]
    rst = (after & 0xF8) == 0xD0
    other = (after != 0x00) & (after != 0xFF) & ~rst
    stop = ff[other]
    if len(stop) == 0 or after[other][0] != 0xD9:
        return None  # the scan must end at EOI (another scan follows: not ours)
    end = int(stop[0])
    marks = ff[rst]
    marks = marks[marks < end]
    if len(marks) != rows * cols - 1:
        return None
    starts = np.empty(rows * cols, dtype=np.int64)
    starts[0], starts[1:] = 0, marks + 2
    ends = np.empty(rows * cols, dtype=np.int64)
    ends[:-1], ends[-1] = marks, end
    return Layout(width, height, mcu_w, mcu_h, cols, rows, sof, scan, starts + scan, ends + scan)


def window(lay: Layout, left: float, top: float, right: float, bottom: float,
           margin_x: float, margin_y: float) -> tuple[int, int, int, int]:
    """MCU rows [r0, r1) and columns [c0, c1) covering the box (source px) grown by the
    margins, at least MIN_MCUS (or all) of each."""
    c0, c1 = _span(math.floor((left - margin_x) / lay.mcu_w), math.ceil((right + margin_x) / lay.mcu_w), lay.cols)
    r0, r1 = _span(math.floor((top - margin_y) / lay.mcu_h), math.ceil((bottom + margin_y) / lay.mcu_h), lay.rows)
    return r0, r1, c0, c1


def _span(lo: int, hi: int, n: int) -> tuple[int, int]:
    lo, hi = max(0, lo), min(n, hi)
    short = min(MIN_MCUS, n) - (hi - lo)
    if short > 0:  # widen to the right, then to the left
        hi = min(n, hi + short)
        lo = max(0, hi - min(MIN_MCUS, n))
    return lo, hi


def cut(data: bytes, lay: Layout, r0: int, r1: int, c0: int, c1: int) -> bytes:
    """A JPEG of MCU rows [r0, r1) x columns [c0, c1) of `data`: its pixels are the full
    decode's [r0*mcu_h : r1*mcu_h, c0*mcu_w : c1*mcu_w] (but for CHROMA_EDGE at inner edges)."""
    if not (0 <= r0 < r1 <= lay.rows and 0 <= c0 < c1 <= lay.cols):
        raise ValueError(f"MCU window rows [{r0}, {r1}) cols [{c0}, {c1}) outside {lay.rows}x{lay.cols}")
    width, height = lay.extent(r0, r1, c0, c1)
    header = b"".join((data[:lay.sof + 5], struct.pack(">HH", height, width), data[lay.sof + 9:lay.scan]))
    ncol = c1 - c0
    first = np.arange(r0, r1, dtype=np.int64) * lay.cols + c0  # [R] first MCU of each row
    seg = first[:, None] + np.arange(ncol)  # [R, C]
    src0 = lay.starts[first]  # [R] a row's MCUs are contiguous in the file, markers included
    src1 = lay.ends[first + ncol - 1]  # [R]
    row_len = src1 - src0 + 2  # [R] + the marker (EOI after the last row) written after it
    row_off = len(header) + np.cumsum(row_len) - row_len  # [R] where each row lands
    markers = (lay.ends[seg] - src0[:, None] + row_off[:, None]).reshape(-1)  # [R*C] the marker after each MCU
    out = bytearray(len(header) + int(row_len.sum()))
    out[:len(header)] = header
    view = memoryview(data)
    for a, b, o in zip(src0.tolist(), src1.tolist(), row_off.tolist()):
        out[o:o + b - a] = view[a:b]
    arr = np.frombuffer(out, dtype=np.uint8)  # writable view of `out`
    arr[markers] = 0xFF
    arr[markers + 1] = 0xD0 + (np.arange(len(markers)) & 7)  # restart numbers count 0..7 in stream order
    arr[markers[-1] + 1] = 0xD9  # the last MCU ends the image
    return bytes(out)
