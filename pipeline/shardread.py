"""The read side of a split's shards: its index, its tars, its images.

- `read_index(where, columns)`: OUT/<split>/index.parquet (the writer, pipeline/shards.py,
  writes it with `INDEX_SCHEMA`), with one clear error when it is missing;
  `shard_keys` groups its rows by shard, in shard order.
- `check_shards(shard_dir, shards, verify)`: are the tars what the shard stage wrote? Cheap by
  default (each tar exists and has its sidecar's `tar_bytes`), every image's sha256 against the
  index with `verify`; `CorruptShard` names the tar and the command that rewrites it.
- `tar_samples(urls)`: a fast reader for our own tars with WebDataset's sample semantics.
- `sample_key`, `image_bytes`, `decode_rgb`: a sample's key, its encoded image, its pixels.

The tar reader yields the same dicts as `wds.tarfile_to_samples()` over
`[{"url": u} for u in urls]`: `{"__key__", "__url__", <ext>: bytes, ...}`, one
per run of members sharing a key, extensions lower-cased, flushed at the end of
each shard, duplicate extensions refused, `__*__` meta members skipped.

Why: `tarfile` builds a TarInfo per member (decoding every header field) and
WebDataset adds three generator layers. On 28 px Fashion-MNIST that was ~45 us
per sample, a quarter of decode + augment. Our shards (pipeline/tarwriter.py)
have one header layout: plain ustar regular files, mode 0644, uid/gid 0,
mtime 0, no user names, no prefix. A header that matches that template byte for
byte, with a correct checksum (`tarwriter.parse_member_header`), is parsed from
two slices (name, size): a member costs two buffered reads.

Anything else (a gzip'ed tar, PAX/GNU headers, directories, links, a bad
checksum, a tar written by another tool) hands the stream from that header
on to WebDataset's own member iterator (`tarfile` underneath), so foreign tars
read exactly as before, and corrupt ones raise what they raised before. URLs
that are not local paths (`pipe:`, `s3://`, ...) go to WebDataset entirely.

`decode_rgb` is the one decoder: the shard stage (pipeline/prepare.py) stores
exactly what it turns into 8-bit RGB, upright, and every reader decodes with it.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import simplejpeg
from PIL import Image, UnidentifiedImageError

from pipeline.tarwriter import BLOCK, parse_member_header

INDEX_NAME = "index.parquet"
INDEX_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),  # tar file name, relative to OUT/<split>/
    ("position", pa.int32()),  # sample position in the tar, 0-based
    ("label", pa.int32()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("bytes", pa.int64()),  # size of the stored image
    ("sha256", pa.string()),  # of the stored image bytes
    ("ext", pa.string()),  # jpg | png
    ("source", pa.string()),  # path relative to the source root
])
IMAGE_EXTS = ("jpg", "png")  # what the shard stage stores (pipeline/prepare.py)
JPEG_MAGIC = b"\xff\xd8\xff"


# ---------------------------------------------------------------------------
# the index


def index_file(where: str | Path) -> Path:
    """The index of a split: `where` is its folder (OUT/<split>) or the index file itself."""
    where = Path(where)
    return where if where.suffix == ".parquet" else where / INDEX_NAME


def read_index(where: str | Path, columns: Optional[Sequence[str]] = None,
               shard: Optional[str] = None) -> dict[str, list]:
    """Columns of a split's index (all of them by default) as Python lists, in index
    order (shard order, then tar order); with `shard`, only that shard's rows."""
    path = index_file(where)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; run `beit shard` (or `dvc repro shard`)")
    filters = None if shard is None else [("shard", "=", shard)]
    return pq.read_table(path, columns=None if columns is None else list(columns),
                         filters=filters).to_pydict()


def shard_keys(index: dict[str, list], keep: Optional[frozenset[str]] = None) -> dict[str, list[str]]:
    """shard name -> its keys in tar order, shards in index order, from an index with the
    key and shard columns; with `keep`, only those keys (a shard with none stays, empty)."""
    by_shard: dict[str, list[str]] = {s: [] for s in dict.fromkeys(index["shard"])}
    for key, name in zip(index["key"], index["shard"]):
        if keep is None or key in keep:
            by_shard[name].append(key)
    return by_shard


# ---------------------------------------------------------------------------
# shard integrity


class CorruptShard(tarfile.ReadError):
    """A shard tar that is not what the shard stage wrote (truncated, altered, missing, or
    without its sidecar). A `tarfile.ReadError`, so code that caught the tar reader's own
    error still does. Build it with `CorruptShard.at(tar, what)`: the message names the tar
    and the command that rewrites it. Constructed from the message alone, so it survives
    pickling and torch's DataLoader re-raise (which calls `type(err)(message)`)."""

    @classmethod
    def at(cls, tar: str | Path, what: str) -> "CorruptShard":
        tar = Path(tar)
        split = tar.parent.name
        try:
            same_size = tar.stat().st_size == sidecar_tar_bytes(sidecar_of(tar))
        except (OSError, ValueError):
            same_size = False
        if same_size:  # pipeline/shards.py keeps a tar whose size matches its sidecar: it must go first
            fix = f"delete it and rerun `beit shard --split {split}`"
        else:  # pipeline/shards.py rewrites a tar that is missing, has no sidecar or another size
            fix = f"rerun `beit shard --split {split}` (or `dvc repro -f shard@{split}`)"
        return cls(f"{tar}: truncated or altered ({what}); {fix}")


def sidecar_of(tar: str | Path) -> Path:
    """<name>.tar -> <name>.stats.json, the shard stage's completion mark (pipeline/shardwrite.py)."""
    tar = Path(tar)
    return tar.with_name(tar.name.removesuffix(".tar") + ".stats.json")


_TAR_BYTES = re.compile(rb'"tar_bytes":\s*(\d+)')


def sidecar_tar_bytes(sidecar: Path) -> int:
    """The tar size a sidecar records. The writer puts `tar_bytes` before the per-sample
    rows, so the first KiB holds it: parsing a whole sidecar (one row per sample, ~240 B
    each) took 0.9 ms for a 985-image ImageNet shard, 1.2 s for the split's 1300; this is
    one small read. Falls back to the full parse; ValueError when the file holds no size."""
    with open(sidecar, "rb") as f:
        m = _TAR_BYTES.search(f.read(1024))
    if m is not None:
        return int(m.group(1))
    try:
        stats = json.loads(sidecar.read_bytes())
        return int(stats["tar_bytes"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"no tar_bytes ({type(err).__name__}: {err})") from None


def check_shards(shard_dir: str | Path, shards: Sequence[str], verify: bool = False) -> None:
    """Raise CorruptShard unless every tar in `shards` (names in OUT/<split>/) is what the
    shard stage wrote. Always: it exists, has its sidecar, and has the sidecar's size
    (one stat and one 1 KiB read per shard, measured 12 us: 16 ms for ImageNet's 1300).
    With `verify`: every image's sha256 against index.parquet, samples in index order
    (reads and hashes the whole split: 1.5 GB/s from the page cache, else the disk's
    speed; ~100 s for ImageNet's 140 GB at best)."""
    shard_dir = Path(shard_dir)
    for name in shards:
        tar = shard_dir / name
        try:
            size = tar.stat().st_size
        except FileNotFoundError:
            raise CorruptShard.at(tar, "missing, but listed in index.parquet") from None
        sidecar = sidecar_of(tar)
        try:
            want = sidecar_tar_bytes(sidecar)
        except FileNotFoundError:
            raise CorruptShard.at(tar, f"no {sidecar.name}: the shard was never completed") from None
        except ValueError as err:
            raise CorruptShard.at(tar, f"{sidecar.name} unreadable: {err}") from None
        if size != want:
            raise CorruptShard.at(tar, f"{size} bytes, {sidecar.name} says {want}")
    if verify:
        index = read_index(shard_dir, ["key", "shard", "sha256"])
        rows: dict[str, list[tuple[str, str]]] = {name: [] for name in shards}
        for key, name, sha in zip(index["key"], index["shard"], index["sha256"]):
            if name in rows:
                rows[name].append((key, sha))
        for name in shards:
            _verify_tar(shard_dir / name, rows[name])


def _verify_tar(tar: Path, rows: list[tuple[str, str]]) -> None:
    """Every sample of `tar` in order, its image's sha256 equal to the index row's."""
    n = 0
    for n, sample in enumerate(tar_samples([str(tar)]), 1):
        if n > len(rows):
            raise CorruptShard.at(tar, f"more than the {len(rows)} samples index.parquet lists")
        key, sha = rows[n - 1]
        if sample_key(sample) != key:
            raise CorruptShard.at(tar, f"sample {n - 1} is {sample_key(sample)!r}, index.parquet has {key!r}")
        if hashlib.sha256(image_bytes(sample)).hexdigest() != sha:
            raise CorruptShard.at(tar, f"sample {key}: image sha256 differs from index.parquet")
    if n < len(rows):
        raise CorruptShard.at(tar, f"ends after {n} of {len(rows)} samples")


# ---------------------------------------------------------------------------
# the tars

_ZERO_BLOCK = bytes(BLOCK)
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator default
_BASE_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_READ_BUFFER = 1 << 20


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith(("pipe:", "file:"))


def tar_members(url: str, stream) -> Iterator[tuple[str, bytes]]:
    """(file name, bytes) of every regular, non-meta member, in order.

    `stream` is an open binary file positioned at the start of the archive.
    Template headers are parsed here; from the first other header on, the rest of
    the stream is read by webdataset's `tar_file_iterator`."""
    read, skip_meta = stream.read, _SKIP_META.match
    hdr = read(BLOCK)
    offset = 0
    while True:
        member = parse_member_header(hdr)
        if member is None:
            break
        name, size = member
        data = read(size)
        if len(data) != size:
            break  # truncated: tarfile, from this header, raises what it always raised
        pad = -size % BLOCK
        offset += BLOCK + size + pad
        if not (name.startswith("__") and (skip_meta(name) or ("/" not in name and name.endswith("__")))):
            yield name, data
        hdr = read(pad + BLOCK)[pad:]
    if offset and _tarfile_stops_at(hdr):
        return  # end of archive (tarfile ends quietly on these after the first member)
    # Not ours (or not ours from here on): tarfile reads the rest, from this header.
    from webdataset.tariterators import tar_file_iterator

    stream.seek(offset)
    for item in tar_file_iterator(stream):
        yield item["fname"], item["data"]


def _tarfile_stops_at(hdr: bytes) -> bool:
    """True for a header at which `tarfile`, past the first member, ends the archive
    without an error: missing, short, all zeros, or a bad checksum."""
    if len(hdr) < BLOCK or hdr == _ZERO_BLOCK:
        return True
    try:
        return tarfile.nti(hdr[148:156]) not in tarfile.calc_chksums(hdr)
    except tarfile.InvalidHeaderError:
        return True


def _samples_of(url: str, members: Iterable[tuple[str, bytes]]) -> Iterator[dict]:
    """webdataset's group_by_keys over one shard (lcase=True, no suffix filter)."""
    current: Optional[dict] = None
    for fname, data in members:
        if "/" in fname:
            m = _BASE_EXT.match(fname)
            if m is None:
                continue
            prefix, suffix = m.group(1), m.group(2)
        else:
            prefix, dot, suffix = fname.partition(".")
            if not dot or not prefix:
                continue
        suffix = suffix.lower()
        if current is None or prefix != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": prefix, "__url__": url}
        if suffix in current:
            raise ValueError(f"{fname}: duplicate file name in tar file {suffix} {current.keys()}")
        current[suffix] = data
    if current is not None:
        yield current


def tar_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Samples of each shard in turn; a drop-in for `wds.tarfile_to_samples()` on
    `[{"url": u} for u in urls]`, except that a tar that cannot be read to its end raises
    CorruptShard naming it (a `tarfile.ReadError`, what webdataset raises)."""
    import webdataset as wds

    for url in urls:
        url = str(url)
        try:
            if not _is_local(url):
                yield from wds.tarfile_to_samples()(iter([{"url": url}]))
                continue
            with open(url, "rb", buffering=_READ_BUFFER) as f:
                yield from _samples_of(url, tar_members(url, f))
        except CorruptShard:
            raise
        except (tarfile.TarError, EOFError) as err:
            # webdataset appends " @ <stream>" to tarfile's message; the url is named anyway
            what = str(err.args[0] if err.args else err).split(" @ ")[0]
            raise CorruptShard.at(url, what) from None


# ---------------------------------------------------------------------------
# a sample


def sample_key(sample: dict) -> str:
    """The sample's key without the folder part a tar member name may carry."""
    key = sample["__key__"]
    return key[key.rfind("/") + 1:]


def image_bytes(sample: dict) -> bytes:
    """The encoded image of a shard sample (exactly one of .jpg / .png); a sample of a
    shard tar without one is CorruptShard (the shard stage stores one with every sample)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    url, what = sample.get("__url__"), f"sample {sample.get('__key__')} has no image"
    raise KeyError(what) if url is None else CorruptShard.at(url, what)


# ---------------------------------------------------------------------------
# the image


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode any stored image to uint8 [H, W, 3] RGB.

    JPEG through simplejpeg (libjpeg-turbo, fast), anything else through PIL
    with the same RGB normalisation as the shard stage (pipeline/prepare.py). Does not apply EXIF
    orientation: shards are already upright. Raises ValueError on bad data.
    """
    if data[:3] == JPEG_MAGIC:
        try:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False)
        except ValueError:
            pass  # CMYK/YCCK JPEGs: libjpeg-turbo cannot convert them to RGB; PIL can
    elif is_plain_png(data):
        try:
            return _decode_plain_png(data)
        except RuntimeError:
            pass  # corrupt: PIL names the problem below
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return pil_rgb(im)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ValueError(f"cannot decode image ({len(data)} bytes): {err}") from None


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_plain_png(data: bytes) -> bool:
    """An 8-bit grey or RGB PNG without transparency (the bundled default's kind): lossless,
    so libpng's decode is the same pixels as PIL's + `pil_rgb`. Other PNGs (palette, alpha,
    16-bit, tRNS) keep PIL and its RGB normalisation."""
    if data[:8] != _PNG_MAGIC or data[12:16] != b"IHDR" or data[24] != 8 or data[25] not in (0, 2):
        return False
    limit = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb guard applies here too
    if limit and int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big") > limit:
        return False
    idat = data.find(b"IDAT")
    return data.find(b"tRNS", 33, idat if idat > 0 else len(data)) < 0


def _decode_plain_png(data: bytes) -> np.ndarray:
    """uint8 [H, W, 3] through torchvision's libpng decode: ~21 against ~39 us per 28 px
    Fashion-MNIST PNG (one core; most of PIL's time there is its Python-level open).
    RuntimeError where that decoder is missing (torchvision deprecates its image codecs from
    0.29 on, for TorchCodec): decode_rgb then takes PIL, the same pixels."""
    global _png_decoder
    if _png_decoder is None:
        try:
            import warnings

            import torch
            from torchvision.io import ImageReadMode, decode_png

            # Each call warns that the codec is deprecated; the fallback above covers its removal.
            warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                    category=DeprecationWarning)
            _png_decoder = lambda b, grey: decode_png(  # noqa: E731
                torch.frombuffer(bytearray(b), dtype=torch.uint8),  # bytearray: frombuffer wants it writable
                mode=ImageReadMode.GRAY if grey else ImageReadMode.RGB).numpy()  # [1 or 3, H, W]
        except ImportError:
            _png_decoder = False
    if _png_decoder is False:
        raise RuntimeError("torchvision.io.decode_png is not available")
    grey = data[25] == 0
    x = _png_decoder(data, grey)  # [1 or 3, H, W]
    if grey:
        return np.repeat(x[0][:, :, None], 3, axis=2)  # [H, W] -> [H, W, 3], as PIL's L -> RGB
    return np.ascontiguousarray(x.transpose(1, 2, 0))  # [3, H, W] -> [H, W, 3]


_png_decoder = None  # resolved on first use: a callable, or False where torchvision has no decode_png


def pil_rgb(im: Image.Image) -> np.ndarray:
    """A loaded PIL image -> uint8 [H, W, 3] RGB (alpha composited on white)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.uint32)  # [H, W]
        if mode.startswith("I;16") or a.max(initial=0) > 255:
            a = (a * 255 + 32767) // 65535  # 16-bit range -> 8-bit, rounded
        a = np.clip(a, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[:, :, None], 3, axis=2))
    if mode == "F":
        im = im.convert("L")
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa") or (mode == "L" and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        a = np.asarray(im)  # [H, W, 4]
        alpha = a[:, :, 3:4].astype(np.uint16)
        rgb = (a[:, :, :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
        return rgb.astype(np.uint8)
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)  # [H, W, 3]
