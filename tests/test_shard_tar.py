"""pipeline/tarwriter.py: byte-identical to tarfile's USTAR output, readable by tar."""
from __future__ import annotations

import io
import shutil
import subprocess
import tarfile

import pytest

from pipeline.tarwriter import TarWriter, member_header

MEMBERS = [("k0.cls", b"3"), ("k0.jpg", b"\xff\xd8" + bytes(1000)), ("k0.json", b"{}" * 300), ("k1.cls", b"")]


def test_matches_tarfile_ustar_with_fixed_metadata():
    ours = io.BytesIO()
    writer = TarWriter(ours)
    for name, data in MEMBERS:
        writer.add(name, data)
    size = writer.close()
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in MEMBERS:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data), 0, 0o644, 0, 0, "", "")
            tf.addfile(info, io.BytesIO(data))
    assert ours.getvalue() == ref.getvalue() and size == len(ref.getvalue())


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar binary")
def test_gnu_tar_lists_members(tmp_path):
    path = tmp_path / "a.tar"
    with open(path, "wb") as f:
        writer = TarWriter(f)
        for name, data in MEMBERS:
            writer.add(name, data)
        writer.close()
    listed = subprocess.run(["tar", "-tf", str(path)], check=True, capture_output=True, text=True).stdout.split()
    assert listed == [name for name, _ in MEMBERS]


def test_long_names_are_refused():
    with pytest.raises(ValueError, match="100 bytes"):
        member_header("x" * 101, 1)


def test_unbuffered_writev_path_and_short_writes(tmp_path, monkeypatch):
    """With an unbuffered file, add_many writes each sample with one writev(); a short write
    (legal, if rare, for files) must still give the same bytes."""
    import os

    ref = io.BytesIO()
    writer = TarWriter(ref)
    for name, data in MEMBERS:
        writer.add(name, data)
    writer.close()
    real = os.writev
    calls = []

    def short(fd, bufs):  # writes at most a third of what it is given
        data = b"".join(bytes(b) for b in bufs)
        calls.append(len(data))
        return real(fd, [data[: max(1, len(data) // 3)]])

    monkeypatch.setattr(os, "writev", short)
    path = tmp_path / "a.tar"
    with open(path, "wb", buffering=0) as f:
        writer = TarWriter(f)
        writer.add_many(MEMBERS[:3])
        writer.add_many(MEMBERS[3:])
        size = writer.close()
    assert len(calls) > 3  # the writev path was taken, and retried
    assert path.read_bytes() == ref.getvalue() and size == len(ref.getvalue())
