"""A minimal, reproducible tar writer for WebDataset shards.

Why not `tarfile` or `webdataset.ShardWriter`: both build a TarInfo per member
and (ShardWriter) encode every sample through its handler table; on ~100 KB
JPEGs that costs 2x in throughput. Here a member header is 512 bytes built
from a constant template, and the output is byte-identical to
`tarfile.open(format=tarfile.USTAR_FORMAT)` given TarInfo(mtime=0, uid=gid=0,
uname=gname="", mode=0o644): no PAX headers, no timestamps, no user names, so
the same members always give the same bytes (tests/test_shard_tar.py checks
the equivalence against tarfile). `parse_member_header` reads that template
back: the shard reader's fast path (pipeline/shardread.py), so the template
is known to this file only.
"""
from __future__ import annotations

import io
import os
from typing import BinaryIO, Iterable, Optional

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads the archive to whole 10 KiB records; so do we
MODE = 0o644


def _octal(value: int, width: int) -> bytes:
    # tarfile's itn(): width-1 octal digits, zero padded, then NUL.
    return b"%0*o\0" % (width - 1, value)


# Header fields after the name, up to chksum, which are the same for every member.
_MODE_UID_GID = _octal(MODE, 8) + _octal(0, 8) + _octal(0, 8)
_MTIME = _octal(0, 12)
_AFTER_CHKSUM = (
    b"0"  # typeflag: regular file
    + bytes(100)  # linkname
    + b"ustar\x0000"  # magic + version (POSIX ustar)
    + bytes(32)  # uname
    + bytes(32)  # gname
    + bytes(8)  # devmajor (empty for regular files, as tarfile writes it)
    + bytes(8)  # devminor
    + bytes(155)  # prefix
    + bytes(12)  # pad to 512
)
MAX_SIZE = 8**11 - 1  # 8 GiB: the most a ustar size field holds
_ZEROS = bytes(BLOCK)
_CONST_SUM = 8 * 32 + sum(_MODE_UID_GID) + sum(_MTIME) + sum(_AFTER_CHKSUM)  # chksum field counts as 8 spaces


def member_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file `name` of `size` bytes."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes (ustar limit); use shorter keys")
    if size > MAX_SIZE:
        raise ValueError(f"tar member {name!r} is {size} bytes; ustar members must be < 8 GiB")
    size_field = _octal(size, 12)
    chksum = sum(raw) + sum(size_field) + _CONST_SUM
    return b"".join((raw.ljust(100, b"\0"), _MODE_UID_GID, size_field, _MTIME, b"%06o\0 " % chksum, _AFTER_CHKSUM))


def parse_member_header(hdr: bytes) -> Optional[tuple[str, int]]:
    """The inverse of `member_header`: (name, size) if `hdr` is a header exactly as it
    writes them (same template bytes, a correct checksum), else None. The fast path of
    pipeline/shardread.py's reader; anything else goes to `tarfile` there."""
    if (len(hdr) != BLOCK or hdr[100:124] != _MODE_UID_GID or hdr[136:148] != _MTIME
            or hdr[156:] != _AFTER_CHKSUM):
        return None
    raw_name = hdr[:100].split(b"\0", 1)[0]
    size_field = hdr[124:136]
    try:
        size = int(size_field[:11], 8)
        chksum = int(hdr[148:154], 8)
    except ValueError:
        return None
    if size_field[11] != 0 or hdr[154:156] != b"\0 " or not raw_name:
        return None
    # member_header pads the name with NULs; the checksum counts the chksum field as 8 spaces.
    if chksum != sum(raw_name) + sum(size_field) + _CONST_SUM:
        return None
    try:
        return raw_name.decode("utf-8"), size
    except UnicodeDecodeError:
        return None  # tarfile's surrogateescape decoding: leave it to tarfile


class TarWriter:
    """Append regular files to an open binary stream; `close()` writes the end
    blocks and pads to a whole record, as tarfile does. Does not close `fileobj`.

    Given an unbuffered file (open(..., buffering=0)), `add_many` hands all of a
    sample's members to the kernel in one writev(): no copy through a Python
    buffer and one system call per sample instead of one per piece.

    An OSError from writing (a full disk) carries `name` as its file name, or the
    stream's own name: a write to a descriptor names no file by itself."""

    def __init__(self, fileobj: BinaryIO, name: Optional[str] = None) -> None:
        self._f = fileobj
        self._offset = 0
        self._fd = fileobj.fileno() if isinstance(fileobj, io.FileIO) and hasattr(os, "writev") else None
        self._name = name if name is not None else getattr(fileobj, "name", None)

    def add(self, name: str, data: bytes) -> None:
        self.add_many(((name, data),))

    def add_many(self, members: Iterable[tuple[str, bytes]]) -> None:
        """`add` each (name, data) in order."""
        bufs = []
        for name, data in members:
            size = len(data)
            bufs.append(member_header(name, size))
            bufs.append(data)
            pad = -size % BLOCK
            if pad:
                bufs.append(_ZEROS[:pad])
            self._offset += BLOCK + size + pad
        self._write(bufs)

    def close(self) -> int:
        """Finish the archive; returns its total size in bytes."""
        end = 2 * BLOCK
        end += -(self._offset + end) % RECORD
        self._write([bytes(end)])
        self._offset += end
        return self._offset

    def _write(self, bufs: list) -> None:
        try:
            self._write_all(bufs)
        except OSError as err:
            if err.filename is None and isinstance(self._name, str):
                err.filename = self._name
            raise

    def _write_all(self, bufs: list) -> None:
        if self._fd is None:
            for b in bufs:
                self._f.write(b)
            return
        total = sum(map(len, bufs))
        done = os.writev(self._fd, bufs)
        while done < total:  # a short write (rare for files): write the rest, in order
            skip, rest = done, []
            for b in bufs:
                if skip >= len(b):
                    skip -= len(b)
                    continue
                rest.append(memoryview(b)[skip:])
                skip = 0
            bufs, total = rest, total - done
            done = os.writev(self._fd, bufs)
