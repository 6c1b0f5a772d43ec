"""Verdicts over seeds follow from the spreads, in the paper's direction."""
from __future__ import annotations

import math

from stages.claims import by_variant, judge, spread, verdict, welch_t
from stages.report import claims_section


def row(masking="block", target="tokens", ratio=0.4, seed=0, ft=80.0, sc=70.0, kind="experiment"):
    return {"masking": masking, "target": target, "mask_ratio": ratio, "seed": seed, "kind": kind,
            "finetune_top1": ft, "scratch_top1": sc, "linear_probe_top1": 60.0, "knn_top1": 55.0,
            "linear_probe_pixels": 82.0 + seed, "knn_pixels": 80.0, "error": False}


def test_spread_and_welch():
    a, b = spread([1.0, 2.0, 3.0]), spread([0.0, 0.0, 0.0])
    assert (a["n"], a["mean"], a["sd"]) == (3, 2.0, 1.0)
    assert math.isclose(welch_t(a, b), 2 * math.sqrt(3))  # (2 - 0) / sqrt(1/3 + 0)
    assert welch_t(spread([1.0]), b) is None


def test_verdicts_follow_the_sign_and_size_of_t():
    assert verdict(3.0, 3, 3) == "reproduced"
    assert verdict(-3.0, 3, 3) == "reversed"
    assert verdict(1.0, 3, 3) == "not reproduced"
    assert verdict(3.0, 2, 3) == "needs 3 seeds"
    assert verdict(3.0, 3, 3, paper_sign=-1.0) == "reversed"  # the paper's gap points the other way


def test_judge_pools_seeds_per_variant_and_judges_each_claim():
    rows = [row(seed=s, ft=80 + d, sc=70 + d) for s, d in enumerate((0.0, 0.5, -0.5))]
    rows += [row("random", seed=s, ft=85 + d) for s, d in enumerate((0.0, 0.4, -0.4))]  # random clearly better
    rows += [row(target="pixels", seed=s, ft=80 + d) for s, d in enumerate((0.3, -0.2, 0.1))]  # a tie
    rows += [row(seed=0, ft=99.0, kind="workspace")]  # the workspace never replaces a committed seed
    claims = {c["claim"]: c for c in judge(rows)}
    scratch = claims["pretraining beats training from scratch"]
    assert scratch["verdict"] == "reproduced" and scratch["gap"] == 10.0 and scratch["n"] == (3, 3)
    assert claims["blockwise beats random masking"]["verdict"] == "reversed"
    assert claims["visual tokens beat pixel regression"]["verdict"] == "not reproduced"
    assert claims["blockwise + tokens beat random + pixels"]["verdict"] == "needs 3 seeds"
    assert by_variant(rows)[("block", "tokens", 0.4)][0]["finetune_top1"] == 80.0
    text = "\n".join(claims_section(rows))
    assert "80.00 ± 0.50" in text and "**reversed**" in text and "**needs 3 seeds**" in text
    assert "83.00 ± 1.00" in text  # the raw-pixel floor over the seeds, beside the learned numbers


def test_paired_t_without_spread():
    from stages.claims import paired_t

    assert paired_t(spread([2.0, 2.0, 2.0])) == math.inf  # the same gain every seed
    assert paired_t(spread([0.0, 0.0, 0.0])) == 0.0  # no gain at all is no evidence
    assert paired_t(spread([1.0])) is None
