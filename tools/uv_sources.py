"""Print pip's configured package sources as `uv pip install` options.

uv reads no pip.conf and no PIP_* variable, so without this it would ignore what pip is
told here: the local indexes and wheel folders that hold torch's pinned builds (and the
constraints beside them), and would download the same builds again. Only sources cross
over; with none configured this prints nothing and uv, like pip, uses PyPI alone.

Usage (the Makefile): uv pip install $(python tools/uv_sources.py PIP) ...
"""
from __future__ import annotations

import shlex
import subprocess
import sys

# pip's key (any section: global, install, :env:) -> uv's option; pip reads each of these as
# a whitespace-separated list
OPTIONS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
           "find-links": "--find-links", "constraint": "--constraint"}


def uv_options(pip_config_list: str) -> list[str]:
    """`pip config list` output -> uv options, each source once, in pip's order."""
    pairs: dict[tuple[str, str], None] = {}  # ordered set: a pip.conf key and its PIP_ twin name one source
    for line in pip_config_list.splitlines():
        key, _, value = line.partition("=")  # global.find-links='/opt/wheels'
        option = OPTIONS.get(key.rpartition(".")[2])
        if option is not None and value:
            pairs.update(((option, item), None) for item in shlex.split(value)[0].split())
    return [part for pair in pairs for part in pair]


if __name__ == "__main__":
    pip = sys.argv[1] if len(sys.argv) > 1 else "pip"
    listed = subprocess.run([pip, "config", "list"], capture_output=True, text=True, check=True).stdout
    print(" ".join(shlex.quote(o) for o in uv_options(listed)))
