"""`beit shard` under faults (-m faults): bad links and unreadable inputs are listed, never fatal;
a full disk (injected, then a real small tmpfs) ends in one line naming the file, keeps every
shard completed before it, and a rerun with space writes only the missing shards and ends
byte-identical to an uninterrupted run."""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import simplejpeg
from click.testing import CliRunner

import pipeline.shards as shards
import pipeline.tarwriter as tarwriter
from stages.shard import cli
from tests.test_shard import make_folder, read_split, write_params

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
# Root reads a chmod 000 file; without these two capabilities file permissions bind it too.
DROP_DAC = ["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--bounding-set=-dac_override,-dac_read_search"]

SHARDS = 13  # source_with_a_bad_file: 24 images + an empty file in the plan, shards of 2


def shard_cli(tmp: Path, src: Path, out: Path, *args: str, **shard):
    params = write_params(tmp / "params.yaml", **{"shard_size": 2, **shard})
    args = ["--params", str(params), "--root", str(src), "--out", str(out), "--no-progress", *args]
    return CliRunner().invoke(cli, args)


def files(split_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(split_dir.iterdir())}


def marks(split_dir: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime) of each tar and sidecar: a rewritten file changes both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(split_dir.iterdir())
            if p.name.endswith((".tar", ".stats.json"))}


def rejected(split_dir: Path) -> dict[str, dict]:
    return {r["source"]: r for r in map(json.loads, (split_dir / "rejected.jsonl").read_text().splitlines())}


def source_with_a_bad_file(tmp: Path, photo) -> Path:
    src = tmp / "src"
    make_folder(src, photo, per_class=8)
    (src / "train" / "dog" / "empty.jpg").write_bytes(b"")  # a reject inside a shard: rejected.jsonl is not empty
    (src / "train" / "cat" / "gone.jpg").symlink_to("nowhere.jpg")  # and one found by the listing
    return src


def assert_left_nothing_complete_looking(split: Path, kept: dict) -> None:
    """After a failure: only complete shards (tar + sidecar), no temp file, no index."""
    names = {p.name for p in split.iterdir()}
    tars = {n[: -len(".tar")] for n in names if n.endswith(".tar")}
    sidecars = {n[: -len(".stats.json")] for n in names if n.endswith(".stats.json")}
    assert tars == sidecars, names  # the failing shard left neither name
    assert not [n for n in names if n.endswith(".tmp")], names
    assert "index.parquet" not in names
    assert set(kept) == {f"{n}.tar" for n in tars} | {f"{n}.stats.json" for n in sidecars}


def assert_rerun_kept_and_finished(result, split: Path, kept: dict, ref: Path) -> None:
    assert result.exit_code == 0, result.output
    n = len(kept) // 2
    assert f"({SHARDS - n} written now, {n} already complete)" in result.output
    assert {k: v for k, v in marks(split).items() if k in kept} == kept  # not one kept file rewritten
    assert files(split) == files(ref)  # tars, sidecars, index.parquet, rejected.jsonl, classes.json


# ---------------------------------------------------------------------------
# bad links and unreadable inputs


def test_bad_links_are_listed_with_a_reason_and_leave_the_shards_as_they_were(tmp_path, photo):
    src = tmp_path / "src"
    expected = make_folder(src, photo)
    ref = shard_cli(tmp_path, src, tmp_path / "ref")  # the same folder before the bad links
    assert ref.exit_code == 0, ref.output
    train = src / "train"
    (train / "cat" / "gone.jpg").symlink_to("nowhere.jpg")
    (train / "dog" / "album").symlink_to(tmp_path / "no-such-folder")  # no extension: may have been a folder
    (train / "dog" / "notes.txt").symlink_to("nowhere.txt")  # not an image by its name: ignored, as a file would be
    (train / "emu" / "self.jpg").symlink_to("self.jpg")
    (train / "emu" / "sub" / "up").symlink_to("../..")  # back to train/: a loop, not an endless walk
    result = shard_cli(tmp_path, src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "skipped 4: dangling-link=2, link-loop=2 (see" in result.output
    assert "ignored 2 files" in result.output
    out = tmp_path / "out" / "train"
    rows = rejected(out)
    assert {s: r["reason"] for s, r in rows.items()} == {
        "train/cat/gone.jpg": "dangling-link", "train/dog/album": "dangling-link",
        "train/emu/self.jpg": "link-loop", "train/emu/sub/up/": "link-loop"}
    assert rows["train/cat/gone.jpg"]["detail"] == "links to nowhere.jpg, which does not exist"
    assert all(r["shard"] is None for r in rows.values())  # not in the plan: in no shard
    assert rows["train/emu/sub/up/"]["key"] is None  # a folder is no sample
    assert sorted(json.loads(s["json"])["source"] for s in read_split(out).values()) == sorted(expected)
    # Found at listing, not planned: every other output is byte for byte what it was without them.
    assert {n: b for n, b in files(out).items() if n != "rejected.jsonl"} == \
        {n: b for n, b in files(tmp_path / "ref" / "train").items() if n != "rejected.jsonl"}

    strict = shard_cli(tmp_path, src, tmp_path / "strict", "--strict")
    assert strict.exit_code == 1 and len(strict.output.strip().splitlines()) == 1, strict.output
    assert "train/cat/gone.jpg: dangling-link (links to nowhere.jpg" in strict.output
    assert "rerun without --strict" in strict.output and not (tmp_path / "strict" / "train").exists()


def test_unreadable_files_and_folders_are_listed_and_the_rest_stored(tmp_path, photo):
    src = tmp_path / "src"
    expected = make_folder(src, photo)
    data = simplejpeg.encode_jpeg(photo(24, 32), quality=85)
    secret, locked = src / "train" / "cat" / "secret.jpg", src / "train" / "dog" / "locked"
    secret.write_bytes(data)
    locked.mkdir()
    (locked / "inside.jpg").write_bytes(data)
    (src / "train" / "emu" / "hidden.jpg").symlink_to(locked / "inside.jpg")  # a link we may not follow
    os.chmod(secret, 0)
    os.chmod(locked, 0)
    try:
        code, output = shard_where_permissions_apply(tmp_path, src, tmp_path / "out", secret)
        assert code == 0, output
        assert "skipped 3: unreadable=3 (see" in output
        out = tmp_path / "out" / "train"
        rows = rejected(out)
        assert {s: r["reason"] for s, r in rows.items()} == {
            "train/cat/secret.jpg": "unreadable", "train/dog/locked/": "unreadable",
            "train/emu/hidden.jpg": "unreadable"}
        assert all("PermissionError" in r["detail"] for r in rows.values())
        assert sorted(json.loads(s["json"])["source"] for s in read_split(out).values()) == sorted(expected)
    finally:
        os.chmod(locked, 0o755)
        os.chmod(secret, 0o644)


def shard_where_permissions_apply(tmp: Path, src: Path, out: Path, probe: Path) -> tuple[int, str]:
    """(exit code, output) of `beit shard` run so that `probe` (chmod 000) is unreadable: here, or,
    as root (who reads everything), in a child without the capabilities that override permissions.
    Skips the test where neither is possible."""
    if not os.access(probe, os.R_OK):
        result = shard_cli(tmp, src, out)
        return result.exit_code, result.output
    check = f"import os, sys; sys.exit(3 if os.access({str(probe)!r}, os.R_OK) else 0)"
    if shutil.which("setpriv") is None or subprocess.run([*DROP_DAC, sys.executable, "-c", check]).returncode != 0:
        pytest.skip("running as root, who reads chmod 000 files, and cannot drop CAP_DAC_OVERRIDE (setpriv)")
    params = write_params(tmp / "params.yaml", shard_size=2)
    child = subprocess.run([*DROP_DAC, sys.executable, "-m", "stages.cli", "shard", "--params", str(params),
                            "--root", str(src), "--out", str(out), "--no-progress"],
                           cwd=REPO, capture_output=True, text=True)
    return child.returncode, child.stdout + child.stderr


# ---------------------------------------------------------------------------
# a full disk, injected


def fill_disk_at(monkeypatch, shard: str) -> None:
    """The tar writer's writev fails as a full disk makes it fail (ENOSPC, no file name) once it
    writes `shard`; in whichever process writes it (pool workers are forked with this patch)."""
    real = os.writev

    def writev(fd, bufs):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f"/{shard}.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, bufs)

    monkeypatch.setattr(tarwriter.os, "writev", writev)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file of a descriptor in /proc")
@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_keeps_completed_shards_and_the_rerun_writes_only_the_rest(tmp_path, photo, monkeypatch, workers):
    src = source_with_a_bad_file(tmp_path, photo)
    assert shard_cli(tmp_path, src, tmp_path / "ref", workers=workers).exit_code == 0
    ref = tmp_path / "ref" / "train"
    assert len(list(ref.glob("*.tar"))) == SHARDS and rejected(ref)
    split = tmp_path / "out" / "train"

    fill_disk_at(monkeypatch, "train-000005.tar")
    result = shard_cli(tmp_path, src, tmp_path / "out", workers=workers)
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        f"Error: disk full while writing {split / 'train-000005.tar'}: free space (or point outputs.* at a larger "
        "disk) and rerun the same command; everything completed before the failure is kept"]
    kept = marks(split)
    assert_left_nothing_complete_looking(split, kept)
    if workers == 1:  # in order: 0-4 complete (4 was in flight, its publish still finished), 5 failed
        assert sorted(kept) == sorted(f"train-{i:06d}.{e}" for i in range(5) for e in ("tar", "stats.json"))
    for name in kept:
        assert (split / name).read_bytes() == (ref / name).read_bytes()

    monkeypatch.undo()
    assert_rerun_kept_and_finished(shard_cli(tmp_path, src, tmp_path / "out", workers=workers), split, kept, ref)


def test_disk_full_is_an_enospc_oserror_naming_the_file(tmp_path, photo, monkeypatch):
    """What reaches stages/errors.py: the OSError itself, errno ENOSPC, filename set."""
    from tests.test_shard import run

    src = source_with_a_bad_file(tmp_path, photo)
    fill_disk_at(monkeypatch, "train-000002.tar")
    with pytest.raises(OSError) as info:
        run(src, tmp_path / "out", shard_size=2)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(tmp_path / "out" / "train" / "train-000002.tar")


def test_disk_full_at_the_index_keeps_every_shard(tmp_path, photo, monkeypatch):
    src = source_with_a_bad_file(tmp_path, photo)
    assert shard_cli(tmp_path, src, tmp_path / "ref").exit_code == 0
    split = tmp_path / "out" / "train"
    real = shards.pq.write_table

    def full(table, where, **kw):  # as pyarrow reports it: errno set, no file name
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(shards.pq, "write_table", full)
    result = shard_cli(tmp_path, src, tmp_path / "out")
    assert result.exit_code == 1 and f"disk full while writing {split / 'index.parquet'}: " in result.output
    kept = marks(split)
    assert len(kept) == 2 * SHARDS and not (split / "index.parquet").exists()
    assert not list(split.glob("*.tmp")) and not list(split.glob(".*"))
    monkeypatch.setattr(shards.pq, "write_table", real)
    assert_rerun_kept_and_finished(shard_cli(tmp_path, src, tmp_path / "out"), split, kept, tmp_path / "ref" / "train")


# ---------------------------------------------------------------------------
# a real full disk


@pytest.mark.parametrize("workers", [1, 2])
def test_a_real_full_disk(tmp_path, photo, workers):
    """A 96 KiB tmpfs (root only; skipped where mounting is refused) fills up after a few shards."""
    src = source_with_a_bad_file(tmp_path, photo)
    assert shard_cli(tmp_path, src, tmp_path / "ref", workers=workers).exit_code == 0
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: a real full disk is not tested")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs ({(mounted.stderr or mounted.stdout).strip()}): "
                    "a real full disk is not tested")
    try:
        split = disk / "out" / "train"
        result = shard_cli(tmp_path, src, disk / "out", workers=workers)
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: disk full while writing {split}/train-"), lines
        kept = marks(split)
        assert_left_nothing_complete_looking(split, kept)
        assert 0 < len(kept) < 2 * SHARDS, sorted(kept)  # the disk filled up mid-way
        for name in kept:
            assert (split / name).read_bytes() == (tmp_path / "ref" / "train" / name).read_bytes()
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)  # space freed
        assert_rerun_kept_and_finished(shard_cli(tmp_path, src, disk / "out", workers=workers), split, kept,
                                       tmp_path / "ref" / "train")
    finally:
        subprocess.run(["umount", str(disk)], check=False)
