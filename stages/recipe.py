"""Which runs may be pooled: the recipe fingerprint of a params tree.

A verdict compares variants over seeds; that only means something when every pooled run
used the same recipe apart from the knobs being compared. Once the default recipe changes
(another view, a longer schedule), the experiments recorded under the old one stay in the
ledger and in the table, but must not be averaged with, or judged against, the new ones.

The fingerprint covers every param except
- the knobs a row is compared on: `seed`, `mask_ratio`, `masking`, `target`, and
  `segment.init` / `segment.init_path` (the segmentation table's rows);
- what changes no trajectory: `report`, `outputs`.

It is taken over the typed `Params` with every field still at its dataclass default left
out, so a params file that lacks a key and one that sets it to the default fingerprint
alike, and adding a field later (at the value that keeps the old behaviour) leaves every
recorded row's recipe as it was.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from pipeline.fingerprint import json_fingerprint
from stages.config import ConfigError, Params, from_dict

KNOBS = ("seed", "mask_ratio", "masking", "target")
NOT_RECIPE = ("report", "outputs")
SEGMENT_KNOBS = ("init", "init_path")


def _non_default(obj: Any) -> Any:
    """A dataclass as a dict of only the fields that differ from their defaults (recursively)."""
    if not dataclasses.is_dataclass(obj):
        return obj
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            sub = _non_default(value)
            if sub:
                out[f.name] = sub
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            out[f.name] = value
            continue
        if value != default:
            out[f.name] = value
    return out


def recipe_of(params: Params | dict | None) -> Optional[str]:
    """8 hex digits naming the recipe of `params` (typed, or a raw params.yaml tree as
    `dvc exp show` gives it); None when the tree is not a readable params file."""
    if params is None:
        return None
    if isinstance(params, dict):
        try:
            params = from_dict(Params, params)
        except (ConfigError, TypeError, ValueError):
            return None
    tree = _non_default(params)
    for key in (*KNOBS, *NOT_RECIPE):
        tree.pop(key, None)
    seg = tree.get("segment", {})
    for key in SEGMENT_KNOBS:
        seg.pop(key, None)
    if not seg:
        tree.pop("segment", None)
    return json_fingerprint(tree)[:8]
