"""`beit report`: this run's numbers beside the paper's, as Markdown + a bar chart.

Reads whichever metric JSON files exist (a stage not run yet is listed as
missing, never an error), puts them next to the BEiT paper's ImageNet-1k
numbers with a caption saying the scales differ and only directions compare,
and, when DVC experiments exist, adds the ablation table parsed from
`dvc exp show --json` (a note instead when dvc is unavailable or fails).

Everything but `cli` and `run_dvc_exp_show` is a pure function over dicts, so
the tests need neither dvc nor trained models.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import click
import yaml

from pipeline.atomic import atomic_file, atomic_write
from stages.claims import (DEFAULT, METRIC_FIELDS, METRICS, PAPER_ABLATION, PAPER_HEADLINE, by_variant, floors, judge,
                           shadowed_workspace, spread, summary, variant_of)
from stages.config import Params, load_params
from stages.errors import one_line_errors
from stages.ledger import read_ledger, record_rows, with_ledger, write_ledger
from stages.markdown import gap_cell, mean_sd, signed_cell, table
from stages.recipe import metric_params, recipe_of, recipes_of, stage_graph
from stages.seg_report import segmentation_section
from stages.vis_report import visualize_section

EXP_PARAMS = ("mask_ratio", "masking", "target", "seed")  # top-level keys `dvc exp run -S` overrides

def metric_sources(params: Any) -> dict[str, Optional[str]]:
    """name -> metric JSON path each stage writes (None: this pipeline has no such path).

    Every path comes from params.outputs, the same values dvc.yaml interpolates.
    """
    out = params.outputs
    return {name: getattr(getattr(out, name, None), "metrics", None)
            for name in ("tokenizer", "pretrain", "finetune", "scratch", "linear_probe", "knn", "segment",
                         "visualize")}


def load_metrics(sources: dict[str, Optional[str]], root: str | Path = ".") -> dict[str, Optional[dict]]:
    """name -> parsed JSON dict, or None when the file is missing/unconfigured/unreadable."""
    out: dict[str, Optional[dict]] = {}
    for name, rel in sources.items():
        out[name] = None
        if rel is None:
            continue
        path = Path(root) / rel
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        out[name] = data if isinstance(data, dict) else None
    return out


def _num(d: Optional[dict], key: str) -> Optional[float]:
    v = (d or {}).get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _pct(d: Optional[dict], key: str) -> Optional[float]:
    """Accuracy stored as a fraction -> percent."""
    v = _num(d, key)
    return None if v is None else 100.0 * v


# (section, label, metrics name, key, kind, paper reference)  kind: pct | num
ROWS = [
    ("Fine-tuning", "fine-tune top-1 (%)", "finetune", "top1", "pct", "83.2 (BEiT-B)"),
    ("Fine-tuning", "fine-tune top-5 (%)", "finetune", "top5", "pct", ""),
    ("Fine-tuning", "scratch top-1 (%)", "scratch", "top1", "pct", "81.8 (DeiT-B)"),
    ("Fine-tuning", "scratch top-5 (%)", "scratch", "top5", "pct", ""),
    ("Frozen features", "linear probe top-1 (%)", "linear_probe", "top1", "pct", ""),
    ("Frozen features", "kNN top-1 (%)", "knn", "top1", "pct", ""),
    ("Frozen features", "linear probe on the token grid top-1 (%)", "linear_probe", "grid_top1", "pct", ""),
    ("Frozen features", "kNN on the token grid top-1 (%)", "knn", "grid_top1", "pct", ""),
    ("Frozen features", "raw-pixel linear probe top-1 (%), the floor", "linear_probe", "pixels_top1", "pct", ""),
    ("Frozen features", "raw-pixel kNN top-1 (%), the floor", "knn", "pixels_top1", "pct", ""),
    ("Pretraining", "masked-token accuracy, held out (%)", "pretrain", "eval_acc", "pct", ""),
    ("Pretraining", "masked-token accuracy on non-background patches (%)", "pretrain", "eval_acc_foreground",
     "pct", ""),
    ("Pretraining", "non-background share of masked patches (%)", "pretrain", "eval_foreground_share", "pct", ""),
    ("Pretraining", "MIM loss, held out", "pretrain", "eval_loss", "num", "≈ ln(8192) = 9.01 at init (8192 codes)"),
    ("Pretraining", "MIM loss, last train step", "pretrain", "train_loss", "num", ""),
    ("Tokenizer", "codebook usage (% of codes)", "tokenizer", "codebook_usage", "pct", ""),
    ("Tokenizer", "code perplexity", "tokenizer", "perplexity", "num", ""),
    ("Tokenizer", "reconstruction MSE", "tokenizer", "recon_mse", "num", ""),
    ("Tokenizer", "floor: patch-mean reconstruction MSE", "tokenizer", "patch_mean_mse", "num", ""),
    ("Tokenizer", "floor: average-pool + bicubic MSE", "tokenizer", "avgpool_mse", "num", ""),
    ("Tokenizer", "all-background share of token cells (%)", "tokenizer", "background_share", "pct", ""),
    ("Segmentation", "mIoU (%)", "segment", "miou", "pct", "45.6 (BEiT-B, ADE20K)"),
    ("Segmentation", "pixel accuracy (%)", "segment", "pixel_acc", "pct", ""),
]


def result_rows(metrics: dict[str, Optional[dict]]) -> list[dict]:
    """One row per reported number: section, label, value (None: missing), source, paper."""
    rows = []
    for section, label, name, key, kind, paper in ROWS:
        d = metrics.get(name)
        value = _pct(d, key) if kind == "pct" else _num(d, key)
        rows.append({"section": section, "label": label, "value": value, "source": name,
                     "present": d is not None, "paper": paper})
    return rows


def direction(metrics: dict[str, Optional[dict]]) -> Optional[dict]:
    """Fine-tune minus scratch top-1 (points) against the paper's +1.4; None if either is missing."""
    ft, sc = _pct(metrics.get("finetune"), "top1"), _pct(metrics.get("scratch"), "top1")
    if ft is None or sc is None:
        return None
    paper = PAPER_HEADLINE["BEiT-B (800 ep pretraining)"] - PAPER_HEADLINE["DeiT-B from scratch"]
    delta = ft - sc
    return {"delta": delta, "paper_delta": paper, "same_direction": (delta > 0) == (paper > 0)}


# ---- `dvc exp show --json` ------------------------------------------------------------------

def _params_of(data: dict) -> dict:
    files = data.get("params") or {}
    if not isinstance(files, dict):
        return {}
    chosen = files.get("params.yaml")
    if chosen is None and files:
        chosen = next(iter(files.values()))
    chosen = (chosen or {}).get("data") if isinstance(chosen, dict) else None
    return chosen if isinstance(chosen, dict) else {}


def _metrics_file(data: dict, path: Optional[str]) -> Optional[dict]:
    """The parsed metrics JSON at `path` in one `dvc exp show` entry, or None."""
    files = data.get("metrics") or {}
    if path is None or not isinstance(files, dict):
        return None
    want = Path(path).as_posix().removeprefix("./")
    for name, entry in files.items():
        if Path(str(name)).as_posix().removeprefix("./") == want and isinstance(entry, dict):
            return entry.get("data") if isinstance(entry.get("data"), dict) else None
    return None


def _metric_of(data: dict, path: Optional[str], key: str) -> Optional[float]:
    return _pct(_metrics_file(data, path), key)


TRAINED = ("pretrain", "finetune", "scratch")  # the stages whose metrics say their arithmetic ("amp")


def precision(files: list[Optional[dict]]) -> Optional[str]:
    """The arithmetic the training stages' metrics files say they really ran in ("bf16", "fp32",
    or e.g. "bf16/fp32" when they differ): `amp: bf16` falls back to fp32 on a CPU without bf16
    kernels, so one recipe runs in either, by machine. A run resumed on another machine says both
    parts ("fp32+bf16", stages/loop.py: FitResult.amp). None before the stages wrote it."""
    seen: list[str] = []
    for data in files:
        amp = (data or {}).get("amp")
        if isinstance(amp, str):
            amp = "+".join("fp32" if part == "none" else part for part in amp.split("+"))
            if amp not in seen:
                seen.append(amp)
    return "/".join(seen) or None


def _exp_row(entry: dict, kind: str, name: Optional[str], baseline: Optional[str],
             sources: dict[str, Optional[str]], keys: Optional[dict[str, set[str]]] = None) -> Optional[dict]:
    data = entry.get("data") if isinstance(entry, dict) else None
    if not isinstance(data, dict):
        return None
    rev = str(entry.get("rev") or data.get("rev") or "")
    params = _params_of(data)
    row = {"name": name or entry.get("name") or (rev[:7] if rev != "workspace" else "workspace"),
           "rev": rev if rev == "workspace" else rev[:7], "kind": kind, "baseline": baseline,
           "error": bool(entry.get("error"))}
    row.update({k: params.get(k) for k in EXP_PARAMS})
    row["recipe"] = recipe_of(params)  # rows are pooled only within one recipe (stages/recipe.py)
    row["recipes"] = recipes_of(params, keys) if keys else None  # ... or, per metric, its upstream params
    row["finetune_top1"] = _metric_of(data, sources.get("finetune"), "top1")
    # scratch reads none of masking / target / mask_ratio (its DVC params): a pretraining
    # variant's row could only repeat the default run of its seed, or, after a targeted
    # `dvc exp run finetune linear-probe knn -S masking=...`, hold a stale copy of another
    # seed's. The default variant's rows carry it.
    row["scratch_top1"] = (_metric_of(data, sources.get("scratch"), "top1")
                           if variant_of(row) in (DEFAULT, None) else None)
    # Frozen-feature scores carry no fine-tuning noise: the cleaner read of a pretraining ablation.
    row["linear_probe_top1"] = _metric_of(data, sources.get("linear_probe"), "top1")
    row["knn_top1"] = _metric_of(data, sources.get("knn"), "top1")
    # the floors they must clear, per run (the label subset changes with the seed)
    row["linear_probe_pixels"] = _metric_of(data, sources.get("linear_probe"), "pixels_top1")
    row["knn_pixels"] = _metric_of(data, sources.get("knn"), "pixels_top1")
    # the same probes on the patch-token grid, not mean-pooled (probe.grid)
    row["linear_probe_grid"] = _metric_of(data, sources.get("linear_probe"), "grid_top1")
    row["knn_grid"] = _metric_of(data, sources.get("knn"), "grid_top1")
    row["mim_acc"] = _metric_of(data, sources.get("pretrain"), "eval_acc")
    row["precision"] = precision([_metrics_file(data, sources.get(stage)) for stage in TRAINED])
    seg = params.get("segment")
    row["segment_init"] = seg.get("init") if isinstance(seg, dict) else None
    row["segment_miou"] = _metric_of(data, sources.get("segment"), "miou")
    # RQ5 over seeds: CLS attention mass on foreground patches (percent), per encoder
    for enc in ("pretrain", "random", "finetune"):
        row[f"attention_{enc}"] = _metric_of(data, sources.get("visualize"), f"{enc}_mass")
    return row


def parse_exp_show(raw: Any, sources: dict[str, Optional[str]],
                   keys: Optional[dict[str, set[str]]] = None) -> list[dict]:
    """Rows (workspace, baseline commits, their experiments) from `dvc exp show --json` (dvc 3.x).

    Tolerates missing/None fields and entries without data (failed or queued
    experiments are skipped); anything that is not the expected list gives []."""
    rows: list[dict] = []
    if not isinstance(raw, list):
        return rows
    for top in raw:
        if not isinstance(top, dict):
            continue
        is_ws = top.get("rev") == "workspace"
        base = _exp_row(top, "workspace" if is_ws else "baseline", None, None, sources, keys)
        if base is not None:
            rows.append(base)
        base_name = top.get("name") or str(top.get("rev") or "")[:7]
        for exp in top.get("experiments") or []:
            if not isinstance(exp, dict):
                continue
            revs = [r for r in exp.get("revs") or [] if isinstance(r, dict)]
            if not revs:
                continue
            row = _exp_row(revs[0], "experiment", exp.get("name") or revs[0].get("name"), base_name, sources, keys)
            if row is not None:
                row["baseline_rev"] = str(top.get("rev") or "")[:7]  # the commit (base_name may be a branch)
                rows.append(row)
    return _without_clean_workspace(rows)


def _without_clean_workspace(rows: list[dict]) -> list[dict]:
    """`dvc exp show` always lists the workspace; when its params and metrics equal a
    baseline commit's (a `dvc repro` that reproduced HEAD, or nothing run since), the row
    is a copy of that baseline and would count twice in the table."""
    def same(a: dict, b: dict) -> bool:
        return {k: v for k, v in a.items() if k not in ("name", "rev", "kind")} == \
               {k: v for k, v in b.items() if k not in ("name", "rev", "kind")}
    bases = [r for r in rows if r["kind"] == "baseline"]
    return [r for r in rows if r["kind"] != "workspace" or not any(same(r, b) for b in bases)]


def run_dvc_exp_show(timeout: float = 300.0) -> tuple[Optional[list], str]:
    """(parsed JSON, "") or (None, why not). Never raises."""
    exe = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    if not Path(exe).exists():
        return None, "dvc is not installed (no `dvc` on PATH)"
    try:
        proc = subprocess.run([exe, "exp", "show", "--json"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"`dvc exp show --json` failed: {err}"
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return None, f"`dvc exp show --json` failed: {why}"
    try:
        return json.loads(proc.stdout), ""
    except ValueError:
        return None, "`dvc exp show --json` printed no JSON"


# ---- rendering --------------------------------------------------------------------------------

def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    return str(v)


def scale_caption(context: dict) -> str:
    return (f"**Different scales: compare directions, not values.** The paper trains ViT-B/16 on "
            f"ImageNet-1k (1.28M images, 1000 classes, 224 px; 800 pretraining epochs, ablation 300, "
            f"100 fine-tuning epochs, all labels). This run: model `{context.get('model')}` on "
            f"`{context.get('source')}` at {context.get('image_size')} px, "
            f"{context.get('pretrain_epochs')} pretraining / {context.get('finetune_epochs')} fine-tuning "
            f"epochs, {_fmt(context.get('label_fraction'), 2)} of the labels. Only the direction is "
            f"comparable: pretraining > from scratch, blockwise > random masking, tokens > pixels.")


def render_markdown(context: dict, sources: dict[str, Optional[str]], metrics: dict[str, Optional[dict]],
                    experiments: Optional[list[dict]], exp_note: str, figure: Optional[str] = None,
                    recipe: Optional[str] = None, recipes: Optional[dict[str, str]] = None) -> str:
    """The whole report; `experiments` None or without experiment rows -> `exp_note` instead of a table.
    Every row is listed; only the rows of `recipe` (the params at hand), and of other rows the
    metrics whose per-metric recipe is in `recipes`, are pooled and judged."""
    lines = ["# BEiT pipeline results", ""]
    lines.append("Run: " + ", ".join(f"{k}={_fmt(context.get(k))}" for k in
                                     ("model", "source", "image_size", "mask_ratio", "masking", "target",
                                      "seed"))
                 + f", precision={precision([metrics.get(stage) for stage in TRAINED]) or '—'}")
    lines.append("")
    lines += [scale_caption(context), ""]
    if figure:
        lines += [f"![results]({figure})", ""]

    lines += ["## This run", ""]
    body = []
    for r in result_rows(metrics):
        if r["present"]:
            value = _fmt(r["value"], 2 if "%" in r["label"] else 4)
        else:
            value = "not run" if sources.get(r["source"]) else "no stage writes it"
        body.append([r["section"], r["label"], value, f"`{sources.get(r['source']) or '—'}`", r["paper"] or ""])
    lines += table(["stage", "metric", "this run", "file", "paper (ViT-B, ImageNet-1k)"], body)
    missing = [f"`{p}`" for n, p in sources.items() if p and metrics.get(n) is None]
    unconfigured = [n for n, p in sources.items() if p is None]
    if missing:
        lines += ["", "Missing (stage not run yet): " + ", ".join(missing) + "."]
    if unconfigured:
        lines += ["", "No metrics file configured for: " + ", ".join(unconfigured) + "."]
    d = direction(metrics)
    lines.append("")
    if d is None:
        lines.append("Direction (fine-tune vs scratch): needs both `finetune` and `scratch` metrics.")
    else:
        verdict = "same direction as the paper" if d["same_direction"] else "opposite direction to the paper"
        lines.append(f"Direction: fine-tune − scratch = {d['delta']:+.2f} points top-1 "
                     f"(paper: {d['paper_delta']:+.1f}): **{verdict}**.")

    lines += ["", "## Paper reference (Bao et al. 2021, arXiv 2106.08254)", ""]
    lines += table(["model", "ImageNet-1k top-1 (%)"], [[k, f"{v:.1f}"] for k, v in PAPER_HEADLINE.items()])
    lines += ["", "Ablation (Table 4; ViT-B, 300 pretraining epochs):", ""]
    lines += table(["variant", "masking", "target", "top-1 (%)", "ADE20K mIoU"],
                    [[n, m, t, f"{a:.2f}", f"{s:.2f}"] for n, m, t, a, s in PAPER_ABLATION])

    lines += ["", "## DVC experiments (this pipeline's ablation)", ""]
    exps = [r for r in (experiments or []) if r["kind"] == "experiment"]
    if not exps:
        lines.append(exp_note or "No DVC experiments yet: try `dvc exp run -S masking=random`, "
                                 "`-S target=pixels`, `-S mask_ratio=0.3`, then `beit report`.")
    else:
        head = ["experiment", "rev", "recipe", "pooled", *EXP_PARAMS, "finetune top-1 (%)", "scratch top-1 (%)",
                "finetune − scratch", "linear probe (%)", "kNN (%)", "masked-token acc (%)", "precision"]
        body = []
        for r in experiments or []:
            delta = (r["finetune_top1"] - r["scratch_top1"]
                     if r["finetune_top1"] is not None and r["scratch_top1"] is not None else None)
            label = {"workspace": "workspace", "baseline": f"{r['name']} (baseline)"}.get(r["kind"], r["name"])
            if r.get("from_ledger"):
                label += f" (recorded {r.get('recorded', '?')}, on {r.get('baseline_rev') or r.get('baseline') or '?'})"
            mark = r.get("recipe") or "?"
            mark = f"**{mark}**" if mark == recipe else mark
            body.append([label, r["rev"], mark, _pooled_label(r, recipe, recipes), *(_fmt(r[k]) for k in EXP_PARAMS), _fmt(r["finetune_top1"]),
                         _fmt(r["scratch_top1"]), "—" if delta is None else f"{delta:+.2f}",
                         _fmt(r["linear_probe_top1"]), _fmt(r["knn_top1"]), _fmt(r["mim_acc"]),
                         r.get("precision") or "—"])
        lines += table(head, body)
        recorded = sum(bool(r.get("from_ledger")) for r in exps)
        source = (f"{len(exps) - recorded} from `dvc exp show --json`, {recorded} recorded in the ledger "
                  "(`report.ledger`: runs whose DVC refs are not in this clone, each marked with its "
                  "date and baseline commit)" if recorded else "from `dvc exp show --json`")
        lines += ["", f"{len(exps)} experiment(s), {source}; the paper's ablation "
                      "above is the reference for the direction of each change."]
        lines += recipe_note(experiments or [], recipe)
        lines += claims_section(same_recipe(experiments, recipe, recipes))
    lines += segmentation_section(same_recipe(experiments, recipe, recipes), metrics.get("segment"))
    return "\n".join(lines) + "\n"


def pooled_fields(row: dict, recipe: Optional[str], recipes: Optional[dict[str, str]]) -> Optional[set[str]]:
    """The row's metric fields that may be pooled with this run: all when the whole recipe is
    this run's (or unknown), else those whose per-metric recipe is this run's; None: all."""
    if recipe is None or row.get("recipe") == recipe:
        return None
    theirs = row.get("recipes") or {}
    return {f for f, m in METRIC_FIELDS.items() if recipes and theirs.get(m) is not None
            and theirs.get(m) == recipes.get(m)}


def same_recipe(rows: Optional[list[dict]], recipe: Optional[str],
                recipes: Optional[dict[str, str]] = None) -> list[dict]:
    """The rows that may be pooled with this run: its recipe (every row when the recipe is
    unknown), and rows of another recipe with only the metrics whose own recipe is this run's
    (stages/recipe.py `recipes_of`) left in, the others blanked, after them."""
    whole, partial = [], []
    for r in rows or []:
        keep = pooled_fields(r, recipe, recipes)
        if keep is None:
            whole.append(r)
        elif any(r.get(f) is not None for f in keep):
            partial.append({**r, **{f: None for f in METRIC_FIELDS if f not in keep}})
    # whole-recipe rows first: the first row of a (variant, seed) is the one judged (claims.by_variant);
    # within each, live rows, then the ledger's newest recorded first, so a rerun of a seed under the
    # same recipe (after a code change that moved its numbers) supersedes the older record
    return sorted(whole, key=_newest_first) + sorted(partial, key=_newest_first)


def _newest_first(row: dict) -> tuple:
    """Sort key: live rows (never recorded) first in their order, then recorded rows by date, newest
    first; `sorted` is stable, so rows recorded the same day keep their order."""
    if not row.get("from_ledger"):
        return (0, 0)
    digits = "".join(c for c in str(row.get("recorded") or "") if c.isdigit())  # "2026-12-07" -> 20261207
    return (1, -int(digits)) if digits else (2, 0)  # undated records last


def _pooled_label(row: dict, recipe: Optional[str], recipes: Optional[dict[str, str]]) -> str:
    keep = pooled_fields(row, recipe, recipes)
    if keep is None:
        return "all"
    names = sorted({METRIC_FIELDS[f] for f in keep if row.get(f) is not None})
    return ", ".join(n.replace("_", " ") for n in names) or "none"


def recipe_note(rows: list[dict], recipe: Optional[str]) -> list[str]:
    others = sorted({str(r.get("recipe") or "?") for r in rows if r.get("recipe") != recipe})
    if recipe is None or not others:
        return []
    n = sum(r.get("recipe") != recipe for r in rows)
    return ["", f"Recipe **{recipe}** is this run's params (`stages/recipe.py`: every param but the seed, "
                f"the ablation knobs and `segment.init`). The {n} row(s) of recipe {', '.join(others)} ran "
                "another recipe: of those, only the metrics in the `pooled` column enter the means, verdicts "
                "and charts below. A metric pools when its own recipe, the params its stage and every stage "
                "upstream of it in dvc.yaml read (the graph `dvc repro` reruns by), is this run's; rows "
                "recorded before per-metric recipes existed pool nothing."]


def claims_section(rows: list[dict]) -> list[str]:
    """Mean ± sd over seeds per variant, then a verdict per paper claim (stages/claims.py)."""
    groups = by_variant(rows)
    if not groups:
        return []
    lines = ["", "### Over seeds: mean ± sd", ""]
    body = []
    for (masking, target, ratio), seeds in sorted(groups.items()):
        s = summary(seeds)
        body.append([masking, target, _fmt(ratio), ", ".join(map(str, s["seeds"])),
                     *(mean_sd(s[m]) for m in METRICS)])
    lines += table(["masking", "target", "mask ratio", "seeds", "fine-tune (%)", "scratch (%)",
                     "linear probe (%)", "kNN (%)", "linear probe on pixels (%)", "kNN on pixels (%)",
                     "linear probe, token grid (%)", "kNN, token grid (%)"], body)
    lines += ["", "Scratch is one run per seed, on the default variant's row: its stage reads none of "
                  "masking, target or mask_ratio."]
    for r in shadowed_workspace(rows):
        lines += ["", f"**Not pooled: the workspace's seed {r['seed']}** ({r.get('masking')}, {r.get('target')}, "
                      f"mask ratio {_fmt(r.get('mask_ratio'))}) differs from the committed run of that seed, which "
                      "these means and verdicts use; commit the workspace's outputs (`dvc.lock`, metrics) "
                      "to pool it instead."]
    lines += ["", "### The paper's claims at this scale", ""]
    body = []
    for c in judge(rows):
        body.append([c["claim"], gap_cell(c["gap"], c["gap_sd"]), f"{c['n'][0]} / {c['n'][1]}", signed_cell(c["t"]),
                     f"**{c['verdict']}**", f"{c['paper_gap']:+.2f}"])
    lines += table(["claim (fine-tune top-1)", "gap here (points)", "seeds", "Welch t", "verdict", "paper gap"], body)
    lines += ["", "Verdict: reproduced when t > 2 in the paper's direction, reversed when t < -2, "
                  "not reproduced otherwise; fewer than 3 seeds on a side gives no verdict. "
                  "Pretraining vs scratch uses the per-seed differences of the same runs."]
    lines += ["", "### Against the raw-pixel floors (default variant)", ""]
    body = []
    for c in floors(rows):
        body.append([c["claim"], gap_cell(c["gap"], c["gap_sd"]), str(c["n"]), signed_cell(c["t"]),
                     signed_cell(c["sds"]), f"**{c['verdict']}**"])
    lines += table(["comparison (test top-1)", "learned - pixels (points)", "seeds", "paired t",
                     "gap / sd", "verdict"], body)
    lines += ["", "Per-seed differences of the same runs; the floor is cleared when the paired t > 2, "
                  "missed when t < -2. `gap / sd` is the mean difference in units of its own spread."]
    return lines


def plot_results(metrics: dict[str, Optional[dict]], experiments: Optional[list[dict]], path: str | Path,
                 context: dict) -> None:
    """Bar chart: this run's top-1 numbers | the paper's | (if any runs over seeds) `seed_panel`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Learned numbers beside the floor they must clear: the same probes fit on raw pixels.
    ours = [(label, _pct(metrics.get(name), key), colour) for label, name, key, colour in (
        ("fine-tune", "finetune", "top1", "C0"), ("scratch", "scratch", "top1", "C1"),
        ("linear\nprobe", "linear_probe", "top1", "C2"), ("probe,\ntoken grid", "linear_probe", "grid_top1", "C2"),
        ("linear probe\non pixels", "linear_probe", "pixels_top1", "C7"),
        ("kNN", "knn", "top1", "C3"), ("kNN,\ntoken grid", "knn", "grid_top1", "C3"),
        ("kNN on\npixels", "knn", "pixels_top1", "C7"))]
    groups = by_variant(experiments or [])
    show_exps = bool(groups)
    fig, axes = plt.subplots(1, 3 if show_exps else 2, figsize=(16 if show_exps else 12, 4.4), squeeze=False)
    ax = axes[0][0]
    xs = range(len(ours))
    ax.bar(xs, [v or 0.0 for _, v, _ in ours], color=[c for _, _, c in ours])
    for x, (_, v, _) in zip(xs, ours):
        ax.text(x, (v or 0.0) + 1, "not run" if v is None else f"{v:.1f}", ha="center", fontsize=8)
    floor = max((v for label, v, _ in ours if "pixels" in label and v is not None), default=None)
    if floor is not None:
        ax.axhline(floor, color="C7", ls="--", lw=1, label=f"raw-pixel floor {floor:.1f}")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xticks(list(xs), [l for l, _, _ in ours], fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"this run: {context.get('model')} on {context.get('source')}", fontsize=10)

    ax = axes[0][1]
    paper = [("BEiT-B", PAPER_HEADLINE["BEiT-B (800 ep pretraining)"], "C0"),
             ("DeiT-B\nscratch", PAPER_HEADLINE["DeiT-B from scratch"], "C1")]
    paper += [(lbl, a, "C4") for lbl, (_, _, _, a, _) in
              zip(["abl: BEiT", "abl: random\nmask", "abl: pixel\ntarget", "abl: both"], PAPER_ABLATION)]
    ax.bar(range(len(paper)), [v for _, v, _ in paper], color=[c for _, _, c in paper])
    for x, (_, v, _) in enumerate(paper):
        ax.text(x, v + 0.1, f"{v:.2f}".rstrip("0").rstrip("."), ha="center", fontsize=8)
    ax.set_xticks(range(len(paper)), [l for l, _, _ in paper], fontsize=7)
    ax.set_ylim(78, 84.5)  # the differences are ~1-2 points: note the axis starts at 78
    ax.set_ylabel("top-1 (%), axis from 78")
    ax.set_title("paper: ViT-B, ImageNet-1k (ablation: 300 ep)", fontsize=10)

    if show_exps:
        seed_panel(axes[0][2], groups)
    for a in axes[0]:
        a.grid(axis="y", alpha=0.3)
    fig.suptitle("Different scales: only the direction is comparable with the paper", fontsize=11)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def seed_panel(ax, groups: dict[tuple, dict[int, dict]]) -> None:
    """Fine-tune top-1 per variant over its seeds (dots) with mean ± sd, the honest scratch
    baseline the same way, and the raw-pixel linear probe as a band: the differences that
    matter here are ~1 point, so the axis is fitted to the data, not started at 0."""
    order = sorted(groups, key=lambda v: (v != DEFAULT, v))
    entries = [(f"{m}\n{t}\n{_fmt(r)}", [s["finetune_top1"] for s in groups[(m, t, r)].values()
                                          if s.get("finetune_top1") is not None],
                "C0" if (m, t, r) == DEFAULT else "C4") for m, t, r in order]
    entries = [e for e in entries if e[1]]  # a variant whose seeds ran frozen-feature stages only
    base = groups.get(DEFAULT, {})
    scratch = [s["scratch_top1"] for s in base.values() if s.get("scratch_top1") is not None]
    if scratch:
        entries.append(("scratch", scratch, "C1"))
    pixels = [s["linear_probe_pixels"] for s in base.values() if s.get("linear_probe_pixels") is not None]
    shown = [v for _, vals, _ in entries for v in vals]
    if pixels:
        p = spread(pixels)
        p_mean, p_sd = p["mean"], p["sd"] or 0.0
        ax.axhspan(p_mean - p_sd, p_mean + p_sd, color="C7", alpha=0.25, lw=0)
        ax.axhline(p_mean, color="C7", ls="--", lw=1, label=f"linear probe on pixels {p_mean:.1f}")
        shown.append(p_mean)
    for x, (label, vals, colour) in enumerate(entries):
        ax.scatter([x] * len(vals), vals, s=14, color=colour, alpha=0.6, zorder=3)
        v = spread(vals)  # the claims' own mean ± sd, so the panel and the tables agree by construction
        mean, sd = v["mean"], v["sd"] or 0.0
        ax.errorbar([x + 0.18], [mean], yerr=[sd], fmt="o", color=colour, ms=5, capsize=3, zorder=4)
        ax.text(x + 0.18, mean + sd + 0.3, f"{mean:.1f}\nn={len(vals)}", ha="center", fontsize=7)
    ax.set_xticks(range(len(entries)), [label for label, _, _ in entries], fontsize=7)
    lo, hi = min(shown), max(shown)
    ax.set_ylim(math.floor(lo - 1.5), math.ceil(hi + 2.0))
    ax.set_xlim(-0.6, len(entries) - 0.4)
    ax.set_ylabel("fine-tune top-1 (%), axis fitted")
    ax.set_title("over seeds: dots = seeds, marker = mean ± sd", fontsize=10)
    if pixels:
        ax.legend(loc="lower left", fontsize=7)


def context_of(params: Params) -> dict:
    return {"model": params.model, "source": params.data.source, "image_size": params.data.image_size,
            "mask_ratio": params.mask_ratio, "masking": params.masking, "target": params.target,
            "seed": params.seed, "pretrain_epochs": params.pretrain.loop.epochs,
            "finetune_epochs": params.finetune.loop.epochs, "label_fraction": params.finetune.label_fraction}


def recipe_keys(root: str | Path, sources: dict[str, Optional[str]]) -> Optional[dict[str, set[str]]]:
    """metric -> the params upstream of it, from root's dvc.yaml resolved against its params.yaml;
    None without a dvc.yaml (then rows pool only by their whole recipe)."""
    dvc, tree = Path(root) / "dvc.yaml", Path(root) / "params.yaml"
    if not dvc.exists() or not tree.exists():
        return None
    graph = stage_graph(yaml.safe_load(dvc.read_text()) or {}, yaml.safe_load(tree.read_text()) or {})
    return metric_params(graph, sources)


def report(params: Params, exp_json: Optional[list] = None, experiments: Optional[bool] = None,
           root: str | Path = ".", record_as: Optional[str] = None) -> dict:
    """Write outputs.report (Markdown + figure); `exp_json` replaces running `dvc exp show --json`.
    `record_as` (a date): first write the live experiments into the ledger (stages/ledger.py)."""
    cfg, paths = params.report, params.outputs.report
    sources = metric_sources(params)
    metrics = load_metrics(sources, root)
    keys = recipe_keys(root, sources)
    rows, note = None, ""
    if exp_json is not None:
        rows = parse_exp_show(exp_json, sources, keys)
    elif (cfg.experiments if experiments is None else experiments):
        raw, note = run_dvc_exp_show()
        rows = parse_exp_show(raw, sources, keys) if raw is not None else None
        if raw is not None and not rows:
            note = "`dvc exp show --json` returned nothing usable."
    else:
        note = "Experiments table disabled (report.experiments: false / --no-experiments)."
    ledger_path = Path(root) / cfg.ledger if cfg.ledger else None
    ledger = read_ledger(ledger_path)
    if record_as is not None:
        if ledger_path is None:
            raise ValueError("report.ledger is null: set a path to record experiments")
        ledger = record_rows(ledger, rows or [], record_as)
        write_ledger(ledger_path, ledger)
    rows = with_ledger(rows, ledger)
    if rows is not None and not any(r["kind"] == "experiment" for r in rows) and not note:
        note = ("No DVC experiments yet: try `dvc exp run -S masking=random`, `-S target=pixels`, "
                "`-S mask_ratio=0.3`, then `beit report`.")
    out, fig = Path(root) / paths.markdown, Path(root) / paths.figure
    context, recipe = context_of(params), recipe_of(params)
    recipes = recipes_of(params, keys) if keys else None
    plot_results(metrics, None if rows is None else same_recipe(rows, recipe, recipes), fig, context)
    text = render_markdown(context, sources, metrics, rows, note,
                           figure=os.path.relpath(fig, out.parent).replace(os.sep, "/"), recipe=recipe,
                           recipes=recipes)
    vis = params.outputs.visualize
    text += "\n".join(visualize_section(metrics.get("visualize"), vis, out.parent, root,
                                         same_recipe(rows, recipe, recipes))) + "\n"
    atomic_write(out, text)
    return {"report": paths.markdown, "figure": paths.figure,
            "metrics_found": sorted(n for n, d in metrics.items() if d is not None),
            "experiments": sum(r["kind"] == "experiment" for r in rows or [])}


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--experiments/--no-experiments", default=None,
              help="Include the `dvc exp show --json` table [default: report.experiments].")
@click.option("--exp-json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Use this saved `dvc exp show --json` output instead of running dvc.")
@click.option("--record", is_flag=True,
              help="Write the live experiments into report.ledger (commit it: a fresh clone has no DVC refs).")
@one_line_errors
def cli(params_path: str, experiments: Optional[bool], exp_json: Optional[str], record: bool) -> None:
    """Write reports/results.md + results.png: this run's metrics beside the paper's."""
    params = load_params(params_path)
    raw = json.loads(Path(exp_json).read_text()) if exp_json else None
    today = datetime.date.today().isoformat() if record else None
    summary = report(params, raw, experiments, record_as=today)
    click.echo(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    cli()
