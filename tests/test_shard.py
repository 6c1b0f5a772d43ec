"""`beit shard` end to end: round trip, determinism, resume, bad inputs, CLI errors."""
from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import simplejpeg
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

import pipeline.shardwrite as shardwrite
from pipeline.schema import EncodeConfig, ShardConfig
from pipeline.shardread import decode_rgb
from pipeline.shards import list_shards, shard_split
from pipeline.sources import Entry, ImageFolderSource, SourceError, check_unique, make_source
from stages.shard import cli

REPO = Path(__file__).resolve().parents[1]
SETTINGS = EncodeConfig(resize_short=None, max_pixels=10_000_000, jpeg_quality=90)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_folder(root: Path, photo, per_class: int = 6, classes=("cat", "dog", "emu")) -> dict[str, tuple[int, bytes]]:
    """ROOT/train/<class>/...: clean RGB JPEGs (some nested, upper-case extensions); returns path -> (label, bytes)."""
    expected = {}
    for label, cls in enumerate(classes):
        for i in range(per_class):
            rel = f"train/{cls}/{'sub/' if i % 3 == 0 else ''}img{i}.{'JPEG' if i % 2 else 'jpg'}"
            data = simplejpeg.encode_jpeg(photo(24 + i, 32, seed=label * 100 + i), quality=85)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            expected[rel] = (label, data)
    (root / "train" / "cat" / "README.txt").write_text("not an image")
    return expected


def read_split(out: Path) -> dict[str, dict]:
    """key -> webdataset sample, over the split's shards in order."""
    urls = [str(p) for p in list_shards(out)]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def run(root, out, seed=0, progress=False, **kw):
    cfg = ShardConfig(**{"shard_size": 5, "workers": 1, "encode": SETTINGS, **kw})
    return shard_split(ImageFolderSource(root), "train", out, cfg, seed=seed, progress=progress)


# ---------------------------------------------------------------------------


def test_round_trip_imagefolder(tmp_path, photo):
    expected = make_folder(tmp_path / "src", photo)
    summary = run(tmp_path / "src", tmp_path / "out")
    out = tmp_path / "out" / "train"
    assert (summary.written, summary.shards, summary.ignored, summary.rejected) == (18, 4, 1, {})
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog", "emu"]
    samples = read_split(out)
    by_source = {json.loads(s["json"])["source"]: s for s in samples.values()}
    assert sorted(by_source) == sorted(expected)  # every input exactly once
    for rel, (label, data) in expected.items():
        s = by_source[rel]
        assert int(s["cls"]) == label and s["jpg"] == data  # stored as is: no re-encode
        meta = json.loads(s["json"])
        assert (meta["orig_width"], meta["orig_height"], meta["class"]) == (32, 24 + int(rel.rsplit("img", 1)[1].split(".")[0]), rel.split("/")[1])
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [r["key"] for r in index] == list(samples)  # index order == tar order
    assert len({r["key"] for r in index}) == 18 and all("." not in r["key"] for r in index)
    row = index[0]
    data = samples[row["key"]]["jpg"]
    assert (row["shard"], row["position"], row["bytes"]) == ("train-000000.tar", 0, len(data))
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    labels_per_shard = [{r["label"] for r in index if r["shard"] == t} for t in ("train-000000.tar", "train-000001.tar")]
    assert all(len(s) > 1 for s in labels_per_shard)  # shuffled across classes before cutting


def test_round_trip_fashion_mnist(tmp_path, fashion_mnist_dir):
    from pipeline.sources import read_idx

    source = make_source("fashion-mnist", str(fashion_mnist_dir))
    for split, prefix, n in (("train", "train", 30), ("test", "t10k", 12)):
        summary = shard_split(source, split, tmp_path / "out", ShardConfig(shard_size=7, workers=1, encode=SETTINGS),
                              seed=1, progress=False)
        assert summary.written == n
        images = read_idx(fashion_mnist_dir / f"{prefix}-images-idx3-ubyte.gz")
        labels = read_idx(fashion_mnist_dir / f"{prefix}-labels-idx1-ubyte.gz")
        samples = read_split(tmp_path / "out" / split)
        assert sorted(samples) == [f"{split}-{i:06d}" for i in range(n)]
        for key, s in samples.items():
            i = int(key.rsplit("-", 1)[1])
            assert int(s["cls"]) == labels[i]
            rgb = decode_rgb(s["png"])  # [28, 28, 3], lossless
            assert rgb.shape == (28, 28, 3) and np.array_equal(rgb[:, :, 1], images[i])


def test_deterministic_and_independent_of_workers(tmp_path, photo):
    make_folder(tmp_path / "src", photo)
    run(tmp_path / "src", tmp_path / "a", workers=1)
    run(tmp_path / "src", tmp_path / "b", workers=2)
    a, b = tars(tmp_path / "a" / "train"), tars(tmp_path / "b" / "train")
    assert len(a) == 4 and a == b
    assert (tmp_path / "a/train/index.parquet").read_bytes() == (tmp_path / "b/train/index.parquet").read_bytes()
    run(tmp_path / "src", tmp_path / "c", seed=1)
    assert tars(tmp_path / "c" / "train") != a  # the seed changes the shuffle


def test_resume_after_exception_keeps_finished_shards(tmp_path, photo, monkeypatch):
    make_folder(tmp_path / "src", photo)
    run(tmp_path / "src", tmp_path / "ref")
    real, calls = shardwrite.prepare, []

    def dying(*args, **kw):  # dies in the middle of the third shard
        calls.append(1)
        if len(calls) == 12:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(shardwrite, "prepare", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "src", tmp_path / "out")
    monkeypatch.setattr(shardwrite, "prepare", real)
    out = tmp_path / "out" / "train"
    assert not (out / "train-000002.tar").exists() and not list(out.glob("*.tmp"))  # the failing shard: removed
    assert not (out / "index.parquet").exists()
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}
    assert sorted(before) == ["train-000000.tar", "train-000001.tar"]
    summary = run(tmp_path / "src", tmp_path / "out")
    assert summary.shards_written == 2
    assert {n: (out / n).stat().st_ino for n in before} == {n: v[0] for n, v in before.items()}
    assert {n: (out / n).stat().st_mtime_ns for n in before} == {n: v[1] for n, v in before.items()}
    assert tars(out) == tars(tmp_path / "ref" / "train") and not list(out.glob("*.tmp"))
    assert (out / "index.parquet").read_bytes() == (tmp_path / "ref/train/index.parquet").read_bytes()


def test_resume_after_sigkill(tmp_path, photo):
    make_folder(tmp_path / "src", photo, per_class=8)
    run(tmp_path / "src", tmp_path / "ref", shard_size=2)
    script = textwrap.dedent(f"""
        import time, pipeline.shardwrite as s
        from tests.test_shard import run
        real = s.prepare
        s.prepare = lambda *a, **k: (time.sleep(0.05), real(*a, **k))[1]  # slow enough to be killed mid-run
        run({str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, shard_size=2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    out = tmp_path / "out" / "train"
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.stats.json"))) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    assert 3 <= len(finished) < 12, "the run was not interrupted mid-way"
    summary = run(tmp_path / "src", tmp_path / "out", shard_size=2)
    kept = {n for n, ino in finished.items() if (out / n).stat().st_ino == ino}
    assert len(kept) >= len(finished) - 1  # a tar renamed just before the kill may lack its sidecar: rewritten
    assert summary.shards_written == 12 - len(kept)
    assert tars(out) == tars(tmp_path / "ref" / "train")


def test_changed_plan_rewrites_stale_and_removes_extra_shards(tmp_path, photo):
    make_folder(tmp_path / "src", photo)
    run(tmp_path / "src", tmp_path / "out", shard_size=3)  # 6 shards
    run(tmp_path / "src", tmp_path / "out", shard_size=5)  # 4 shards
    run(tmp_path / "src", tmp_path / "ref", shard_size=5)
    assert tars(tmp_path / "out" / "train") == tars(tmp_path / "ref" / "train")
    assert len(list((tmp_path / "out" / "train").glob("*.stats.json"))) == 4


def make_messy_folder(root: Path, photo) -> None:
    """Bad inputs and awkward formats, next to one clean JPEG."""
    a, b = root / "train" / "a", root / "train" / "b"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    rgb = photo(24, 32)
    good = simplejpeg.encode_jpeg(rgb, quality=90)
    (a / "good.jpg").write_bytes(good)
    (a / "empty.jpg").write_bytes(b"")
    (a / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (a / "text.jpg").write_text("hello\n")
    (a / "undecodable.png").write_bytes(png_bytes(Image.fromarray(rgb))[:20] + b"garbage" * 10)
    (a / "bomb.png").write_bytes(png_bytes(Image.new("RGB", (120, 100))))  # 12000 px > max_pixels 10000
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "JPEG")
    (b / "cmyk.jpg").write_bytes(buf.getvalue())
    (b / "png_named.JPEG").write_bytes(png_bytes(Image.fromarray(rgb)))
    (b / "palette.png").write_bytes(png_bytes(Image.fromarray(rgb).convert("P")))
    (b / "rgba.png").write_bytes(png_bytes(Image.fromarray(np.dstack([rgb, np.full((24, 32), 128, np.uint8)]))))
    (b / "gray16.png").write_bytes(png_bytes(Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257)))
    (b / "gray.jpg").write_bytes(simplejpeg.encode_jpeg(rgb[:, :, :1].copy(), colorspace="GRAY", quality=90))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", exif=exif.tobytes())
    (b / "rotated.jpg").write_bytes(buf.getvalue())


def write_params(path: Path, **shard) -> Path:
    params = {"data": {"source": "imagefolder", "splits": ["train"]},
              "shard": {"shard_size": 4, "workers": 1, "encode": {"max_pixels": 10000}, **shard}}
    path.write_text(json.dumps(params))  # JSON is YAML
    return path


def test_bad_inputs_skipped_listed_and_rest_stored_as_rgb(tmp_path, photo):
    make_messy_folder(tmp_path / "src", photo)
    params = write_params(tmp_path / "params.yaml")
    result = CliRunner().invoke(
        cli, ["--params", str(params), "--root", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "skipped 5: empty=1, not-an-image=1, too-many-pixels=1, truncated=1, undecodable=1" in result.output
    out = tmp_path / "out" / "train"
    rejected = {Path(r["source"]).name: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").open())}
    assert rejected == {"empty.jpg": "empty", "truncated.jpg": "truncated", "text.jpg": "not-an-image",
                        "undecodable.png": "undecodable", "bomb.png": "too-many-pixels"}
    samples = read_split(out)
    stored = {Path(json.loads(s["json"])["source"]).name: s for s in samples.values()}
    assert sorted(stored) == ["cmyk.jpg", "good.jpg", "gray.jpg", "gray16.png", "palette.png",
                              "png_named.JPEG", "rgba.png", "rotated.jpg"]
    exts = {name: next(e for e in ("jpg", "png") if e in s) for name, s in stored.items()}
    assert exts == {"cmyk.jpg": "jpg", "good.jpg": "jpg", "gray.jpg": "jpg", "gray16.png": "png",
                    "palette.png": "png", "png_named.JPEG": "png", "rgba.png": "png", "rotated.jpg": "jpg"}
    for name, s in stored.items():
        data = s[exts[name]]
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == "RGB", name
        shape = (32, 24, 3) if name == "rotated.jpg" else (24, 32, 3)
        assert decode_rgb(data).shape == shape, name
    assert stored["good.jpg"]["jpg"] == (tmp_path / "src/train/a/good.jpg").read_bytes()
    decoded = list(wds.WebDataset([str(p) for p in list_shards(out)], shardshuffle=False).decode("rgb8"))
    assert len(decoded) == 8 and all(s[next(e for e in ("jpg", "png") if e in s)].shape[2] == 3 for s in decoded)
    listed = subprocess.run(["tar", "-tf", str(out / "train-000000.tar")], capture_output=True, text=True, check=True)
    assert len(listed.stdout.split()) == 3 * pq.read_table(out / "index.parquet").filter(
        pq.read_table(out / "index.parquet")["shard"].to_numpy() == "train-000000.tar").num_rows


def test_strict_stops_at_first_bad_file(tmp_path, photo):
    make_messy_folder(tmp_path / "src", photo)
    params = write_params(tmp_path / "params.yaml")
    result = CliRunner().invoke(cli, ["--params", str(params), "--root", str(tmp_path / "src"),
                                      "--out", str(tmp_path / "out"), "--strict", "--no-progress"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "Error: " in result.output and "rerun without --strict" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--root", "{tmp}/missing"], "not a directory"),
        (["--root", "{tmp}/empty"], "no images found"),
        (["--source", "imagenet"], "unknown source 'imagenet'"),
        (["--root", "{tmp}/src", "--shard-size", "0"], "shard_size=0: must be >= 1"),
        (["--root", "{tmp}/src", "--workers", "0"], "workers=0: must be >= 1"),
        (["--source", "imagefolder", "--root", "{tmp}/src", "--split", "val"], "no such split folder"),
        (["--source", "fashion-mnist", "--root", "{tmp}/empty"], "missing"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, photo, args, message):
    make_folder(tmp_path / "src", photo, per_class=1)
    (tmp_path / "empty" / "train" / "cls").mkdir(parents=True)
    params = write_params(tmp_path / "params.yaml")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(cli, ["--params", str(params), "--out", str(tmp_path / "out"), "--no-progress", *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_imagefolder_needs_a_root(tmp_path):
    with pytest.raises(SourceError, match="needs a root"):
        make_source("imagefolder", None)


def test_key_collisions_are_detected():
    with pytest.raises(SourceError, match="collision"):
        check_unique([Entry("k", "a.jpg", 0, 1), Entry("k", "b.jpg", 0, 1)])
    with pytest.raises(SourceError, match="must not contain"):
        check_unique([Entry("a.b", "a.jpg", 0, 1)])


def test_failed_publish_surfaces_and_leaves_shard_incomplete(tmp_path, photo, monkeypatch):
    """fsync + rename + sidecar run on a helper thread while the next shard is written; a failure
    there must still stop the run, and that shard must not look complete."""
    make_folder(tmp_path / "src", photo)
    run(tmp_path / "src", tmp_path / "ref")
    real, calls = os.fsync, []

    def failing(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return real(fd)

    monkeypatch.setattr(shardwrite.os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output") as info:
        run(tmp_path / "src", tmp_path / "out")
    monkeypatch.setattr(shardwrite.os, "fsync", real)
    out = tmp_path / "out" / "train"
    assert info.value.filename == str(out / "train-000001.tar")  # the one-line error names it
    assert (out / "train-000000.stats.json").exists() and (out / "train-000000.tar").exists()
    assert not (out / "train-000001.stats.json").exists() and not (out / "index.parquet").exists()
    assert not (out / "train-000001.tar").exists() and not list(out.glob("*.tmp"))  # nothing of it is left
    summary = run(tmp_path / "src", tmp_path / "out")
    assert summary.shards_written == 3
    assert tars(out) == tars(tmp_path / "ref" / "train") and not list(out.glob("*.tmp"))
