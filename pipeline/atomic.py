"""Atomic outputs: a reader (or a rerun after a kill) sees the old file or the new one, never a part.

Every output of the project is published through one of these two:

- `atomic_write(path, data)` (or `atomic_file(path)` for writers that want a path):
  a temp file in the same folder, fsync'ed, then `os.replace`d over `path`.
- `atomic_dir(path)`: build a whole folder beside `path`, fsync its files, then swap it
  in by rename (the old folder, if any, is renamed away first and deleted after).

The temp names start with "." and end in ".tmp", so a half-written output never has
the name of a complete one; a crash leaves at most a hidden temp file behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `path`; once the block returns, fsync it and rename it to `path`.
    On an exception the temp file is removed and `path` is left as it was.
    durable=False skips the fsync (still atomic, not crash-durable): for files whose loss or
    tearing in a power cut is detected and redone anyway, e.g. a shard's sidecar."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str, durable: bool = True) -> Path:
    """Write `data` (str is UTF-8) to `path` atomically; returns `path`."""
    with atomic_file(path, durable) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `path`; once the block returns, fsync its files and
    swap it in for `path` (replacing an old folder). On an exception `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
