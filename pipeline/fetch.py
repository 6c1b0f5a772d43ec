"""Locate (and if needed fetch) the bundled default dataset, Fashion-MNIST.

Debian ships it as the package `dataset-fashion-mnist`. We prefer the system
copy; otherwise `apt-get download` + `dpkg-deb -x` unpack it into a user cache
without root. Nothing is fetched from anywhere else.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "dataset-fashion-mnist"
PACKAGE_PATH = "usr/share/datasets/fashion-mnist"  # inside the .deb
SYSTEM_DIR = Path("/") / PACKAGE_PATH
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
HOW_TO = (
    f"install it with `apt-get install {PACKAGE}` (or `apt-get download {PACKAGE}` and "
    f"`dpkg-deb -x` it), or set data.root to a folder holding {', '.join(FILES)}"
)


class DatasetUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("BEIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "beit-pipeline"
    )
    return Path(base)


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


def _download_deb(workdir: Path) -> Path:
    def attempt() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["apt-get", "download", PACKAGE], cwd=workdir, capture_output=True, text=True
        )

    if shutil.which("apt-get") is None:
        raise DatasetUnavailable(f"Fashion-MNIST not found and apt-get is missing; {HOW_TO}")
    result = attempt()
    if result.returncode != 0 and os.geteuid() == 0:
        # A fresh machine may have empty package lists: refresh once and retry.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        result = attempt()
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no .deb"]
        raise DatasetUnavailable(f"`apt-get download {PACKAGE}` failed ({reason[0]}); {HOW_TO}")
    return debs[0]


def find_fashion_mnist(root: str | Path | None = None, fetch: bool = True) -> Path:
    """Return a folder holding the four Fashion-MNIST idx files.

    `root` given: it must hold them. Otherwise: the system copy, then the cache,
    then (if `fetch`) a download into the cache. Raises DatasetUnavailable with
    a one-line explanation.
    """
    if root is not None:
        root = Path(root)
        if not _complete(root):
            missing = [n for n in FILES if not (root / n).is_file()]
            raise DatasetUnavailable(f"{root}: missing {', '.join(missing)}; {HOW_TO}")
        return root
    cached = cache_dir() / "fashion-mnist"
    for folder in (SYSTEM_DIR, cached):
        if _complete(folder):
            return folder
    if not fetch:
        raise DatasetUnavailable(f"Fashion-MNIST not found in {SYSTEM_DIR} or {cached}; {HOW_TO}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        tmp = Path(tmp)
        deb = _download_deb(tmp)
        unpacked = tmp / "root"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        src = unpacked / PACKAGE_PATH
        if not _complete(src):
            raise DatasetUnavailable(f"{deb.name} did not contain the idx files; {HOW_TO}")
        staging = tmp / "fashion-mnist"
        shutil.move(str(src), staging)
        if cached.exists():  # an incomplete leftover from an interrupted fetch
            shutil.rmtree(cached)
        os.replace(staging, cached)  # atomic: a half-unpacked cache never looks complete
    return cached
