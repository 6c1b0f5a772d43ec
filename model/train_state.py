"""Resumable training state as safetensors + JSON (never pickle).

A checkpoint is a folder `step-NNNNNNNN/` holding
    model.safetensors   the (unwrapped) model's state dict
    optim.safetensors   every tensor of the optimizer state, keyed "state.<param>.<name>"
    rng.safetensors     torch CPU (and CUDA) RNG states
    state.json          step, data position, optimizer param groups, scaler,
                        Python/NumPy RNG states, and anything the caller adds
It is written under a hidden temporary name and renamed when complete
(pipeline/atomic.py's atomic_dir), so a killed run never leaves a checkpoint
that looks whole; `latest_checkpoint` only sees complete ones. One damaged
afterwards makes `load_train_state` raise UnreadableCheckpoint naming it, before
anything is restored.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from model.checkpoints import UnreadableCheckpoint, read_json, read_tensors
from pipeline.atomic import atomic_dir

PREFIX = "step-"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler] = None,
    extra: Optional[dict] = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint `run_dir/step-<step>` atomically; keep the newest `keep`."""
    run_dir = Path(run_dir)
    final = run_dir / f"{PREFIX}{step:08d}"
    for stale in run_dir.glob(f".{final.name}.*.tmp"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    with atomic_dir(final) as tmp:  # hidden until complete; replaces an older same-step one
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  tmp / "model.safetensors")
        opt_tensors, opt_meta = _flatten_optimizer(optimizer)
        save_file(opt_tensors, tmp / "optim.safetensors")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = s
        save_file(rng, tmp / "rng.safetensors")
        np_state = np.random.get_state()
        py_state = random.getstate()
        state = {
            "step": step,
            "optimizer": opt_meta,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
            "extra": extra or {},
        }
        (tmp / "state.json").write_text(json.dumps(state))
    for old in sorted(run_dir.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old)
    return final


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    return sorted(p for p in Path(run_dir).glob(f"{PREFIX}*") if (p / "state.json").exists())


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def load_train_state(
    ckpt: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Optional[torch.amp.GradScaler] = None,
) -> dict:
    """Restore model, optimizer, scaler and all RNGs; return the state dict (step, extra).
    Every file is read and parsed before anything is restored: a damaged checkpoint is an
    UnreadableCheckpoint naming the folder (the caller may fall back to an older one)."""
    ckpt = Path(ckpt)
    fix = "delete it to resume from the previous checkpoint"
    try:
        state = read_json(ckpt / "state.json", fix)
        weights = read_tensors(ckpt / "model.safetensors", fix)
        opt_state = _unflatten_optimizer(read_tensors(ckpt / "optim.safetensors", fix), state["optimizer"])
        rng = read_tensors(ckpt / "rng.safetensors", fix)
        missing = [k for k in ("step", "extra", "scaler", "numpy_rng", "python_rng") if k not in state]
        if missing or "torch" not in rng:
            raise KeyError(", ".join(missing) or "rng.safetensors: torch")
    except UnreadableCheckpoint as err:
        raise UnreadableCheckpoint.at(ckpt, f"{err.path.name}: {err.why}", fix) from None
    except FileNotFoundError as err:
        raise UnreadableCheckpoint.at(ckpt, f"{Path(err.filename or '?').name} missing", fix) from None
    except (KeyError, ValueError, TypeError) as err:  # JSON of another shape than save_train_state's
        raise UnreadableCheckpoint.at(ckpt, f"state.json incomplete ({type(err).__name__}: {err})", fix) from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:  # tensors of other shapes or names than this model's
        raise UnreadableCheckpoint.at(ckpt, f"model.safetensors does not fit the model: "
                                      f"{' '.join(str(err).split())[:300]}", fix) from None
    optimizer.load_state_dict(opt_state)
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    kind, keys, pos, has_gauss, gauss = state["numpy_rng"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python_rng"]
    random.setstate((version, tuple(internal), gauss_next))
    return state
