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
	$(BIN)/pip install --quiet -e '.[dev]'
	# OpenAI's reference DALL-E architecture (no weights) for the conversion tests; its
	# metadata pulls blobfile/mypy/unpinned torch, so install it without dependencies.
	$(BIN)/pip install --quiet --no-deps dall-e==0.1
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
