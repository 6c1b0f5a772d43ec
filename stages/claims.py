"""The paper's claims, judged from seeds: mean ± sd per variant and a verdict per claim.

Rows come from `dvc exp show` (stages/report.py parses them): one per committed run or
experiment, with the top-level knobs (`masking`, `target`, `mask_ratio`, `seed`) and the
metrics. A variant is a (masking, target, mask_ratio) triple; its seeds are pooled.

A verdict compares two variants' means on fine-tuning top-1 (the paper's metric) with
Welch's t statistic, t = (mean_a - mean_b) / sqrt(sd_a^2/n_a + sd_b^2/n_b), signed so
that positive is the paper's direction:

- reproduced: t > 2 (the paper's direction, beyond the seed spread);
- reversed: t < -2 (the opposite direction, beyond the spread);
- not reproduced: |t| <= 2 (no difference the seeds can resolve);
- needs seeds: fewer than 3 seeds on either side (the verdict would not mean much).

Pretraining vs scratch pairs the two numbers of the same runs (finetune_top1 and
scratch_top1 of the default variant), so it is judged on the per-seed differences.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional

# Paper (Bao et al. 2021), ImageNet-1k top-1 after fine-tuning, ViT-B/16 at 224 px.
PAPER_HEADLINE = {"BEiT-B (800 ep pretraining)": 83.2, "DeiT-B from scratch": 81.8}
# Paper Table 4 ablation: ViT-B, 300 pretraining epochs; (ImageNet top-1, ADE20K mIoU).
PAPER_ABLATION = [
    ("BEiT (blockwise masking, token targets)", "block", "tokens", 82.86, 44.65),
    ("random masking", "random", "tokens", 82.77, 42.93),
    ("pixel regression instead of tokens", "block", "pixels", 81.04, 41.38),
    ("random masking + pixel regression", "random", "pixels", 80.50, 37.09),
]

DEFAULT = ("block", "tokens", 0.4)
MIN_SEEDS = 3
METRICS = ("finetune_top1", "scratch_top1", "linear_probe_top1", "knn_top1", "linear_probe_pixels", "knn_pixels",
           "linear_probe_grid", "knn_grid")

_ABL = {(m, t): a for _, m, t, a, _ in PAPER_ABLATION}
# (claim, the variant compared with the default, the paper's fine-tuning gap default - variant)
CLAIMS = tuple((claim, (m, t, 0.4), _ABL[("block", "tokens")] - _ABL[(m, t)]) for claim, m, t in (
    ("blockwise beats random masking", "random", "tokens"),
    ("visual tokens beat pixel regression", "block", "pixels"),
    ("blockwise + tokens beat random + pixels", "random", "pixels"),
))
PAPER_SCRATCH_GAP = PAPER_HEADLINE["BEiT-B (800 ep pretraining)"] - PAPER_HEADLINE["DeiT-B from scratch"]


def variant_of(row: dict) -> Optional[tuple]:
    try:
        return (row["masking"], row["target"], float(row["mask_ratio"]))
    except (KeyError, TypeError, ValueError):
        return None


# Every metric field of a row, with the stage that writes it: the unit of pooling (a metric's
# recipe is its stage's, stages/recipe.py) and of merging rows of one (variant, seed) below.
METRIC_FIELDS = {"finetune_top1": "finetune", "scratch_top1": "scratch", "linear_probe_top1": "linear_probe",
                 "linear_probe_pixels": "linear_probe", "knn_top1": "knn", "knn_pixels": "knn",
                 "linear_probe_grid": "linear_probe", "knn_grid": "knn",
                 "mim_acc": "pretrain", "segment_miou": "segment", "attention_pretrain": "visualize",
                 "attention_random": "visualize", "attention_finetune": "visualize"}


def by_variant(rows: list[dict]) -> dict[tuple, dict[int, dict]]:
    """{variant: {seed: row}}, one merged row per (variant, seed): each metric from the first row
    that has it. Rows arrive pooled (stages/report.py `same_recipe`): every metric left in a row
    ran this recipe's upstream, so one seed's fine-tuning from a full run and its probe from a
    later probe-only rerun (`dvc repro linear-probe` after a probe change) are the same seed's
    numbers. Committed rows only merge with committed rows; the workspace row counts only when
    nothing committed has that pair (it may hold uncommitted changes)."""
    out: dict[tuple, dict[int, dict]] = {}
    committed = [r for r in rows if r.get("kind") != "workspace"]
    workspace = [r for r in rows if r.get("kind") == "workspace"]
    for group, may_merge in ((committed, True), (workspace, False)):
        for r in group:
            v, seed = variant_of(r), r.get("seed")
            if v is None or seed is None or r.get("error") or all(r.get(f) is None for f in METRIC_FIELDS):
                continue
            seeds = out.setdefault(v, {})
            have = seeds.get(int(seed))
            if have is None:
                seeds[int(seed)] = dict(r)
            elif may_merge and have.get("kind") != "workspace":
                have.update({f: r[f] for f in METRIC_FIELDS if have.get(f) is None and r.get(f) is not None})
    return out


def shadowed_workspace(rows: list[dict]) -> list[dict]:
    """Workspace rows that `by_variant` sets aside although their numbers differ: a committed row
    of the same (variant, seed) holds other values for a metric both have. After a `dvc repro`
    whose outputs are not committed yet, the report's "This run" shows them while the means still
    pool the committed run of that seed; the report says so instead of leaving it to be noticed."""
    committed: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("kind") != "workspace" and variant_of(r) is not None and r.get("seed") is not None:
            committed.setdefault((variant_of(r), int(r["seed"])), []).append(r)
    out = []
    for r in rows:
        if r.get("kind") != "workspace" or variant_of(r) is None or r.get("seed") is None:
            continue
        for c in committed.get((variant_of(r), int(r["seed"])), []):
            if any(r.get(f) is not None and c.get(f) is not None and r[f] != c[f] for f in METRIC_FIELDS):
                out.append(r)
                break
    return out


def spread(values: list[float]) -> dict:
    """{"n", "mean", "sd"} (sd: sample standard deviation; None below 2 values)."""
    return {"n": len(values), "mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) >= 2 else None}


def summary(seeds: dict[int, dict]) -> dict:
    """Per metric: mean ± sd over the variant's seeds, plus the seeds themselves."""
    out = {"seeds": sorted(seeds)}
    for m in METRICS:
        out[m] = spread([seeds[s][m] for s in sorted(seeds) if seeds[s].get(m) is not None])
    return out


def _t(diff: float, se: float) -> float:
    """diff / se; a gap without any spread is infinitely sure, no gap is 0."""
    return diff / se if se else (math.copysign(math.inf, diff) if diff else 0.0)


def welch_t(a: dict, b: dict) -> Optional[float]:
    """Two independent groups of seeds (spread() dicts); None below 2 on either side."""
    if a["n"] < 2 or b["n"] < 2:
        return None
    return _t(a["mean"] - b["mean"], math.sqrt(a["sd"] ** 2 / a["n"] + b["sd"] ** 2 / b["n"]))


def paired_t(d: dict) -> Optional[float]:
    """Per-seed differences of the same runs (a spread() dict); None below 2."""
    return None if d["n"] < 2 else _t(d["mean"], d["sd"] / math.sqrt(d["n"]))



def paired_gap(seeds: dict[int, dict], a: str, b: str) -> dict:
    """spread() of the per-seed differences a - b within the same runs, over the seeds that have both."""
    return spread([seeds[s][a] - seeds[s][b] for s in sorted(seeds)
                   if seeds[s].get(a) is not None and seeds[s].get(b) is not None])

def verdict(t: Optional[float], n_a: int, n_b: int, paper_sign: float = 1.0) -> str:
    if t is None or min(n_a, n_b) < MIN_SEEDS:
        return f"needs {MIN_SEEDS} seeds"
    t *= math.copysign(1.0, paper_sign)
    return "reproduced" if t > 2 else "reversed" if t < -2 else "not reproduced"


def judge(rows: list[dict]) -> list[dict]:
    """One dict per claim: claim, gap (points, default - variant or finetune - scratch), its sd,
    seeds on each side, t, verdict, paper gap."""
    groups = by_variant(rows)
    base = groups.get(DEFAULT, {})
    out = []
    d = paired_gap(base, "finetune_top1", "scratch_top1")
    t = paired_t(d)
    out.append({"claim": "pretraining beats training from scratch", "gap": d["mean"], "gap_sd": d["sd"],
                "n": (d["n"], d["n"]), "t": t, "verdict": verdict(t, d["n"], d["n"]), "paper_gap": PAPER_SCRATCH_GAP})
    a = spread([r["finetune_top1"] for r in base.values() if r.get("finetune_top1") is not None])
    for claim, variant, paper_gap in CLAIMS:
        b = spread([r["finetune_top1"] for r in groups.get(variant, {}).values() if r.get("finetune_top1") is not None])
        t = welch_t(a, b)
        gap = None if a["mean"] is None or b["mean"] is None else a["mean"] - b["mean"]
        gap_sd = (math.sqrt(a["sd"] ** 2 + b["sd"] ** 2) if a["sd"] is not None and b["sd"] is not None else None)
        out.append({"claim": claim, "gap": gap, "gap_sd": gap_sd, "n": (a["n"], b["n"]), "t": t,
                    "verdict": verdict(t, a["n"], b["n"], paper_gap), "paper_gap": paper_gap})
    return out


# The project's floors (issue 11), not paper claims: each learned number of the default variant
# against the same-seed number of the raw-pixel baseline (same labels, same split).
FLOORS = (
    ("fine-tuning clears the raw-pixel linear probe", "finetune_top1", "linear_probe_pixels"),
    ("the linear probe clears the raw-pixel linear probe", "linear_probe_top1", "linear_probe_pixels"),
    ("kNN clears kNN on raw pixels", "knn_top1", "knn_pixels"),
    # the same tokens without mean pooling, which drops the layout the pixels keep (probe.grid)
    ("the linear probe on the token grid clears the raw-pixel linear probe", "linear_probe_grid", "linear_probe_pixels"),
    ("kNN on the token grid clears kNN on raw pixels", "knn_grid", "knn_pixels"),
)
_FLOOR_WORDS = {"reproduced": "clears the floor", "reversed": "below the floor", "not reproduced": "not resolved"}


def floors(rows: list[dict]) -> list[dict]:
    """One dict per FLOORS entry: the per-seed differences learned - pixels of the default
    variant (paired: both numbers come from the same run), their mean, sd, paired t, the mean in
    units of that sd, and a verdict in the words of a floor (t > 2 clears it, t < -2 is below)."""
    base = by_variant(rows).get(DEFAULT, {})
    out = []
    for claim, learned, floor in FLOORS:
        d = paired_gap(base, learned, floor)
        t = paired_t(d)
        v = verdict(t, d["n"], d["n"])
        out.append({"claim": claim, "gap": d["mean"], "gap_sd": d["sd"], "n": d["n"], "t": t,
                    "sds": None if not d["sd"] else d["mean"] / d["sd"], "verdict": _FLOOR_WORDS.get(v, v)})
    return out


# Paper Table 3: ADE20K semantic segmentation, mIoU (%), ViT-B + UperNet at 512 px.
PAPER_SEGMENTATION = {
    "supervised pre-training on ImageNet": 45.3,
    "DINO (self-supervised)": 44.1,
    "BEiT (self-supervised)": 45.6,
    "BEiT + intermediate fine-tuning on ImageNet-1k": 47.7,
}
# (claim, better init, worse init, the paper's gap in mIoU points or None where Table 3 has no number)
SEG_CLAIMS = (
    ("pre-training beats training from scratch", "pretrain", "scratch", None),
    ("intermediate fine-tuning beats pre-training alone", "intermediate", "pretrain",
     PAPER_SEGMENTATION["BEiT + intermediate fine-tuning on ImageNet-1k"] - PAPER_SEGMENTATION["BEiT (self-supervised)"]),
)
