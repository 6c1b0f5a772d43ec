"""Finding / fetching Fashion-MNIST without root and without the network (fake apt-get)."""
import os
import shutil
import stat
import subprocess

import pytest

import pipeline.fetch as fetch
from pipeline.fetch import FILES, DatasetUnavailable, find_fashion_mnist
from pipeline.synthetic import write_fake_fashion_mnist


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("BEIT_CACHE", str(tmp_path / "cache"))


def test_explicit_root_must_hold_the_files(tmp_path):
    with pytest.raises(DatasetUnavailable, match="missing train-images-idx3-ubyte.gz") as err:
        find_fashion_mnist(tmp_path)
    assert "\n" not in str(err.value)
    write_fake_fashion_mnist(tmp_path, 10, 10)
    assert find_fashion_mnist(tmp_path) == tmp_path


def test_without_apt_get_the_error_says_how(monkeypatch, tmp_path, no_system_copy):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(DatasetUnavailable, match="apt-get is missing; install it with"):
        find_fashion_mnist()


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_apt_get_download_is_unpacked_into_the_cache(monkeypatch, tmp_path, no_system_copy):
    # Build a real .deb with the package's layout, and an `apt-get` that "downloads" it.
    tree = tmp_path / "pkg"
    write_fake_fashion_mnist(tree / "usr/share/datasets/fashion-mnist", 10, 10)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN/control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 1\nArchitecture: all\n"
        "Maintainer: test <t@t>\nDescription: test\n")
    deb = tmp_path / "dataset-fashion-mnist_1_all.deb"
    subprocess.run(["dpkg-deb", "-b", str(tree), str(deb)], check=True, capture_output=True)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "apt-get"
    fake.write_text(f"#!/bin/sh\n[ \"$1\" = download ] && cp {deb} . \n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    folder = find_fashion_mnist()
    assert folder == tmp_path / "cache" / "fashion-mnist"
    assert all((folder / name).is_file() for name in FILES)
    assert find_fashion_mnist(fetch=False) == folder  # found in the cache next time
