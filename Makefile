# Two entry points (see README): `make pipeline` and `make test`.
# Both create the virtual environment from pyproject.toml on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: pipeline test venv bench clean-venv

venv: $(VENV)/.installed

# torch==2.14.1 / torchvision==0.29.1 (pinned in pyproject.toml) come from this machine's local
# wheel indexes, which pip is configured with. uv installs what pip would (every index's best
# match: --index-strategy unsafe-best-match), unpacking torch's 5.5 GB CUDA build and compiling
# the bytecode on every core: `make venv` took 37 s (installing uv included, its cache empty)
# against 69 s for pip + compileall, on 2 cores (2026-12-07). uv reads no pip config, so
# tools/uv_sources.py hands it pip's sources; without them it would download the same builds
# (~3 GB) from PyPI.
UV_VERSION := 0.13.10
UV_INSTALL = UV_NO_PROGRESS=1 $(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode \
	--index-strategy unsafe-best-match $$($(BIN)/python tools/uv_sources.py $(BIN)/pip)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)
	$(UV_INSTALL) -e '.[dev]'
	# OpenAI's reference DALL-E architecture (no weights) for the conversion tests; its
	# metadata pulls blobfile/mypy/unpinned torch, so install it without dependencies.
	$(UV_INSTALL) --no-deps dall-e==0.1
	touch $@

# dvc.yaml's commands call `beit`, so the venv's bin goes first on PATH.
pipeline: venv
	$(BIN)/beit fetch-data
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/python bench/shard.py

clean-venv:
	rm -rf $(VENV)
