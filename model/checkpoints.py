"""Checkpoints as a directory: model.safetensors (tensors) + config.json (plain data).

Generic: any state dict of tensors and any JSON-serialisable config dict.
* Atomic (pipeline/atomic.py's atomic_dir): written into a temp directory beside
  the target, then renamed into place, so a crash never leaves a half-written
  checkpoint under the real name. Replacing an existing checkpoint moves the old
  one aside first (POSIX cannot rename a directory over a non-empty one), so there
  is a moment with no directory, never one with mixed files.
* Refuses pickles: .pt/.pth/.bin/.pkl files run arbitrary code when loaded.
  Convert those once, explicitly, elsewhere; safetensors cannot execute code.
* A checkpoint damaged after it was written (truncated copy, disk error) is an
  `UnreadableCheckpoint` naming the file, why, and the command that rewrites it.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_dir

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
REWRITE = "rerun the stage that wrote it"  # the remedy when the caller does not name the stage


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that is truncated, corrupt or not what its writer writes."""

    @classmethod
    def at(cls, path: str | Path, why: str, fix: str = REWRITE) -> "UnreadableCheckpoint":
        err = cls(f"{path}: unreadable checkpoint ({why}); {fix}")
        err.path, err.why = Path(path), why
        return err


def read_tensors(path: str | Path, fix: str = REWRITE, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a damaged file is an UnreadableCheckpoint (a missing one
    stays FileNotFoundError)."""
    try:
        return load_file(str(path), device=device)
    except FileNotFoundError:  # safetensors' own names no file
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path)) from None
    except SafetensorError as err:
        raise UnreadableCheckpoint.at(path, f"not a valid safetensors file: {err}", fix) from None


def read_json(path: str | Path, fix: str = REWRITE) -> dict:
    """A JSON object from `path`; damaged or not an object: UnreadableCheckpoint."""
    try:
        config = json.loads(Path(path).read_bytes())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise UnreadableCheckpoint.at(path, f"not valid JSON: {err}", fix) from None
    if not isinstance(config, dict):
        raise UnreadableCheckpoint.at(path, "top level must be a JSON object", fix)
    return config


def save_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write `path`/model.safetensors and `path`/config.json atomically; returns `path`.

    An existing checkpoint at `path` is replaced; a directory holding anything
    else is refused (nothing unrelated gets deleted).
    """
    path = Path(path)
    tensors = _to_saveable(state_dict)
    if not isinstance(config, dict):
        raise TypeError(f"config: expected a dict, got {type(config).__name__}")
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config: must be JSON-serialisable plain data ({err})") from None
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path}: exists and is not a checkpoint directory")
        extra = sorted(p.name for p in path.iterdir() if p.name not in (WEIGHTS, CONFIG))
        if extra:
            raise ValueError(f"{path}: holds files other than a checkpoint ({', '.join(extra[:3])}); refusing to replace it")

    with atomic_dir(path) as tmp:  # fsyncs the files, then swaps the folder in
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(config_text + "\n")
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", fix: str = REWRITE
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a directory written by save_checkpoint -> (state_dict, config). Never unpickles.
    `fix`: what the error for a damaged file tells the user to do (e.g. "rerun `beit pretrain`")."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{path}: refusing to load a pickle (it can run arbitrary code); "
                             "convert it once to safetensors with an explicit, trusted step")
        raise ValueError(f"{path}: expected a checkpoint directory holding {WEIGHTS} and {CONFIG}")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    weights, config_file = path / WEIGHTS, path / CONFIG
    if not weights.exists():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(f"{path}: only pickle files ({', '.join(pickles)}), refusing to load them; "
                             "convert once to safetensors with an explicit, trusted step")
        raise FileNotFoundError(f"{path}: missing {WEIGHTS}; {fix}")
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: missing {CONFIG}; {fix}")
    return read_tensors(weights, fix, str(device)), read_json(config_file, fix)


def _to_saveable(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no shared storage (safetensors rejects aliased tensors, e.g. tied weights)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict key {name!r}: must be a string")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}]: expected a tensor, got {type(value).__name__}")
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in storages or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # aliased or a view into a bigger buffer: store its own copy
            ptr = t.untyped_storage().data_ptr()
        storages.add(ptr)
        out[name] = t
    return out
