"""Checkpoints as a directory: model.safetensors (tensors) + config.json (plain data).

Generic: any state dict of tensors and any JSON-serialisable config dict.
* Atomic (pipeline/atomic.py's atomic_dir): written into a temp directory beside
  the target, then renamed into place, so a crash never leaves a half-written
  checkpoint under the real name. Replacing an existing checkpoint moves the old
  one aside first (POSIX cannot rename a directory over a non-empty one), so there
  is a moment with no directory, never one with mixed files.
* Refuses pickles: .pt/.pth/.bin/.pkl files run arbitrary code when loaded.
  Convert those once, explicitly, elsewhere; safetensors cannot execute code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.atomic import atomic_dir

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


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


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a directory written by save_checkpoint -> (state_dict, config). Never unpickles."""
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
        raise FileNotFoundError(f"{path}: missing {WEIGHTS}")
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: missing {CONFIG}")
    try:
        state_dict = load_file(str(weights), device=str(device))
    except SafetensorError as err:
        raise ValueError(f"{weights}: not a valid safetensors file ({err})") from None
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: top level must be a JSON object")
    return state_dict, config


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
