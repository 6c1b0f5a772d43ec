"""Which runs may be pooled: the recipe fingerprint of a params tree.

A verdict compares variants over seeds; that only means something when every pooled run
used the same recipe apart from the knobs being compared. Once the default recipe changes
(another view, a longer schedule), the experiments recorded under the old one stay in the
ledger and in the table, but must not be averaged with, or judged against, the new ones.

The fingerprint covers every param except
- the knobs a row is compared on: `seed`, `mask_ratio`, `masking`, `target`, and
  `segment.init` / `segment.init_path` (the segmentation table's rows);
- what changes no trajectory: `report`, `outputs`, and `finetune.eval_samples` (how much of the
  eval split is scored between epochs: the reported score is the last epoch's whole split, and
  tests/test_finetune.py checks the weights come out the same).

Per metric (`recipes_of`): a metric's fingerprint covers only the params its stage and the
stages upstream of it read, as dvc.yaml declares them (`metric_params`). That is exactly the
graph that decides what `dvc repro` reruns, so a change to `scratch.optim` leaves every
fine-tune, probe and pretraining number of the older runs poolable, and only their scratch
numbers drop out.

It is taken over the typed `Params` with every field still at its dataclass default left
out, so a params file that lacks a key and one that sets it to the default fingerprint
alike, and adding a field later (at the value that keeps the old behaviour) leaves every
recorded row's recipe as it was.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Optional

from pipeline.fingerprint import json_fingerprint
from stages.config import ConfigError, Params, from_dict

KNOBS = ("seed", "mask_ratio", "masking", "target")
NOT_RECIPE = ("report", "outputs")
SEGMENT_KNOBS = ("init", "init_path")
# (section, field) pairs left out, as above: the segmentation table's knobs, and the scoring between epochs
NOT_RECIPE_FIELDS = (*(("segment", k) for k in SEGMENT_KNOBS), ("finetune", "eval_samples"))


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


def _recipe_tree(params: Params | dict | None) -> Optional[dict]:
    """The non-default params minus the knobs and what changes no trajectory; None when
    `params` is not a readable params file."""
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
    for section, field in NOT_RECIPE_FIELDS:
        sub = tree.get(section, {})
        sub.pop(field, None)
        if not sub:
            tree.pop(section, None)
    return tree


def recipe_of(params: Params | dict | None) -> Optional[str]:
    """8 hex digits naming the recipe of `params` (typed, or a raw params.yaml tree as
    `dvc exp show` gives it); None when the tree is not a readable params file."""
    tree = _recipe_tree(params)
    return None if tree is None else json_fingerprint(tree)[:8]


# ---- per metric: the params upstream of its stage in dvc.yaml ---------------------------------

_VAR = re.compile(r"\$\{([^}]+)\}")


def _lookup(ctx: dict, dotted: str) -> Any:
    node: Any = ctx
    for part in dotted.strip().split("."):
        if not isinstance(node, dict) or part not in node:
            raise ValueError(f"dvc.yaml: ${{{dotted}}} is not in params.yaml")
        node = node[part]
    return node


def _interp(value: Any, ctx: dict) -> Any:
    """DVC's `${...}` templating for the strings this graph needs; a whole-string `${x}` keeps
    x's type (a foreach list), anything else is string substitution."""
    if not isinstance(value, str):
        return value
    whole = _VAR.fullmatch(value)
    if whole:
        return _lookup(ctx, whole.group(1))
    return _VAR.sub(lambda m: str(_lookup(ctx, m.group(1))), value)


def _paths(entries: Iterable[Any], ctx: dict) -> set[str]:
    """deps / outs / metrics / plots entries (a path, or {path: options}) as normalised paths."""
    out = set()
    for e in entries or []:
        for path in (e if isinstance(e, dict) else [e]):
            out.add(str(_interp(path, ctx)).rstrip("/").removeprefix("./"))
    return out


def stage_graph(dvc: dict, tree: dict) -> dict[str, dict[str, set[str]]]:
    """stage -> {"params", "deps", "outs"} from a parsed dvc.yaml, `${...}` resolved against the
    raw params tree; a foreach stage's items are merged under its name. Only params.yaml keys
    count (a `- other.yaml: [...]` entry is another file's)."""
    graph: dict[str, dict[str, set[str]]] = {}
    for name, stage in (dvc.get("stages") or {}).items():
        items = [None]
        if "foreach" in stage:
            items = _interp(stage["foreach"], tree)
            items = list(items.values() if isinstance(items, dict) else items)
            stage = stage["do"]
        node = graph.setdefault(name, {"params": set(), "deps": set(), "outs": set()})
        for item in items:
            ctx = {**tree, "item": item}
            for p in stage.get("params") or []:
                if isinstance(p, str):
                    node["params"].add(p)
                elif isinstance(p, dict):
                    node["params"].update(k for k in p.get("params.yaml") or [])
            node["deps"] |= _paths(stage.get("deps"), ctx)
            for kind in ("outs", "metrics", "plots"):
                node["outs"] |= _paths(stage.get(kind), ctx)
    return graph


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def upstream(graph: dict[str, dict[str, set[str]]], stage: str) -> set[str]:
    """`stage` and every stage whose outputs it reads, transitively (DVC's own DAG rule)."""
    seen, todo = set(), [stage]
    while todo:
        s = todo.pop()
        if s in seen:
            continue
        seen.add(s)
        todo += [o for o, node in graph.items() if o not in seen and any(
            _overlaps(d, out) for d in graph[s]["deps"] for out in node["outs"])]
    return seen


def metric_params(graph: dict[str, dict[str, set[str]]], metric_files: dict[str, Optional[str]]) -> dict[str, set[str]]:
    """metric name -> the dotted params its stage and the stages upstream of it read; a metric
    no stage writes is left out."""
    out = {}
    for metric, path in metric_files.items():
        owners = [s for s, node in graph.items() if path and path.removeprefix("./") in node["outs"]]
        if owners:
            out[metric] = set().union(*(graph[s]["params"] for s in upstream(graph, owners[0])))
    return out


def _select(tree: dict, keys: Iterable[str]) -> dict:
    """The subtrees of `tree` at the dotted `keys` (absent ones: at their default, so left out)."""
    out: dict = {}
    for dotted in sorted(keys):
        *path, leaf = dotted.split(".")
        src, dst = tree, out
        for part in path:
            src = src.get(part) if isinstance(src, dict) else None
            if src is None:
                break
            dst = dst.setdefault(part, {})
        if isinstance(src, dict) and leaf in src:
            dst[leaf] = src[leaf]
    return out


def recipes_of(params: Params | dict | None, keys: dict[str, set[str]]) -> Optional[dict[str, str]]:
    """metric -> 8 hex digits over only the params upstream of it (`metric_params`); None when
    `params` is not a readable params file."""
    tree = _recipe_tree(params)
    if tree is None:
        return None
    return {metric: json_fingerprint(_select(tree, ks))[:8] for metric, ks in sorted(keys.items())}
