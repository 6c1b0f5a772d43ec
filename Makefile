# Two entry points (see README): `make pipeline` and `make test`.
# Both create the virtual environment from pyproject.toml on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: pipeline test venv bench clean-venv

venv: $(VENV)/.installed

# torch==2.14.1 / torchvision==0.29.1 (pinned in pyproject.toml) install from this
# machine's local wheel cache through pip; uv/poetry would download GBs instead.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet --no-compile -e '.[dev]'
	# OpenAI's reference DALL-E architecture (no weights) for the conversion tests; its
	# metadata pulls blobfile/mypy/unpinned torch, so install it without dependencies.
	$(BIN)/pip install --quiet --no-compile --no-deps dall-e==0.1
	# pip byte-compiles one file at a time: 33 of the install's 81 s on 2 cores; compileall on
	# every core took 16 s. A few files of newer syntax (torch's py312 test helpers) never
	# compile under 3.11, which pip ignores too, hence `|| true`.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
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
