"""The report's segmentation section (paper Table 3, RQ4): mIoU per `segment.init` over seeds.

Rows are stages/report.py's `dvc exp show` rows, which carry `segment_init` and
`segment_miou` (percent). Only runs of the default pre-training variant (blockwise masking,
token targets, mask ratio 0.4) are pooled, since the pre-trained and intermediate encoders
depend on it; the first row of each (init, seed) wins, the workspace only when nothing
committed has that pair (as stages/claims.py: by_variant). A verdict per ordering the paper
claims uses stages/claims.py's Welch t and thresholds.
"""
from __future__ import annotations

from typing import Optional

from stages.claims import DEFAULT, PAPER_SEGMENTATION, SEG_CLAIMS, spread, variant_of, verdict, welch_t
from stages.markdown import gap_cell, mean_sd, signed_cell, table

INITS = ("scratch", "pretrain", "intermediate")


def by_init(rows: list[dict]) -> dict[str, dict[int, float]]:
    """{init: {seed: mIoU %}} over the default variant's rows that have a segmentation score."""
    out: dict[str, dict[int, float]] = {}
    ordered = [r for r in rows if r.get("kind") != "workspace"] + [r for r in rows if r.get("kind") == "workspace"]
    for r in ordered:
        init, seed, miou = r.get("segment_init"), r.get("seed"), r.get("segment_miou")
        if r.get("error") or init is None or seed is None or miou is None or variant_of(r) != DEFAULT:
            continue
        out.setdefault(str(init), {}).setdefault(int(seed), float(miou))
    return out


def judge_segmentation(rows: list[dict]) -> list[dict]:
    """One dict per ordering: claim, gap (points), gap_sd, n, t, verdict, paper_gap."""
    groups = by_init(rows)
    out = []
    for claim, better, worse, paper_gap in SEG_CLAIMS:
        a = spread(list(groups.get(better, {}).values()))
        b = spread(list(groups.get(worse, {}).values()))
        t = welch_t(a, b)
        gap = None if a["mean"] is None or b["mean"] is None else a["mean"] - b["mean"]
        gap_sd = (a["sd"] ** 2 + b["sd"] ** 2) ** 0.5 if a["sd"] is not None and b["sd"] is not None else None
        out.append({"claim": claim, "gap": gap, "gap_sd": gap_sd, "n": (a["n"], b["n"]), "t": t,
                    "verdict": verdict(t, a["n"], b["n"]), "paper_gap": paper_gap})
    return out


PAPER_ROW = {"scratch": None, "pretrain": "BEiT (self-supervised)",
             "intermediate": "BEiT + intermediate fine-tuning on ImageNet-1k"}


def segmentation_section(rows: list[dict], this_run: Optional[dict] = None) -> list[str]:
    """Markdown lines: this run's mIoU, mean ± sd per init beside Table 3, a verdict per ordering."""
    lines = ["", "## Semantic segmentation (paper Table 3)", ""]
    if this_run is not None and isinstance(this_run.get("miou"), (int, float)):
        lines += [f"This run: init {this_run.get('init', '?')}, mIoU {100 * this_run['miou']:.2f} %, pixel accuracy "
                  f"{100 * this_run.get('pixel_acc', float('nan')):.2f} % on {this_run.get('eval_scenes', '?')} "
                  "evaluation scenes.", ""]
    groups = by_init(rows)
    body = []
    for init in INITS:
        s = spread(list(groups.get(init, {}).values()))
        paper = PAPER_ROW[init]
        body.append([init, ", ".join(map(str, sorted(groups.get(init, {})))) or "—", mean_sd(s),
                     f"{PAPER_SEGMENTATION[paper]:.1f} ({paper})" if paper else "— (not in Table 3)"])
    lines += table(["segment.init", "seeds", "mIoU here (%)", "paper, ADE20K (%)"], body)
    lines += ["", "Paper's other rows: " + ", ".join(f"{k} {v:.1f}" for k, v in PAPER_SEGMENTATION.items()
                                                    if k not in PAPER_ROW.values()) + "."]
    body = []
    for c in judge_segmentation(rows):
        paper = "—" if c["paper_gap"] is None else f"{c['paper_gap']:+.1f}"
        body.append([c["claim"], gap_cell(c["gap"], c["gap_sd"]), f"{c['n'][0]} / {c['n'][1]}", signed_cell(c["t"]),
                     f"**{c['verdict']}**", paper])
    lines += ["", *table(["ordering (mIoU)", "gap here (points)", "seeds", "Welch t", "verdict", "paper gap"], body)]
    if not groups:
        lines += ["", "No segmentation runs in `dvc exp show` yet: `dvc exp run -S segment.init=scratch -S seed=N` "
                      "(and `pretrain`, `intermediate`) for 3 seeds each."]
    lines += ["", "Scale: a 6-block micro ViT on 56 px Fashion-MNIST scenes (11 classes) against ViT-B on "
                  "ADE20K (150 classes); only the orderings compare."]
    return lines
