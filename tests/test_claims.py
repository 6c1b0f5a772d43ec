"""Verdicts over seeds follow from the spreads, in the paper's direction."""
from __future__ import annotations

import math

from stages.claims import by_variant, floors, judge, shadowed_workspace, spread, verdict, welch_t
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
    # the set-aside workspace differs from the committed seed 0: the report says which numbers it pooled
    assert shadowed_workspace(rows) == [rows[-1]] and "**Not pooled: the workspace's seed 0**" in text
    same = [r for r in rows[:-1]] + [dict(rows[0], kind="workspace")]
    assert shadowed_workspace(same) == [] and "Not pooled" not in "\n".join(claims_section(same))


def test_floors_pair_each_learned_number_with_its_own_seeds_pixel_baseline():
    # pixel probe 82 + seed (82, 83, 84); fine-tune 84.5 + 1.1 * seed beats it by 2.5 + 0.1 * seed
    rows = [dict(row(seed=s, ft=84.5 + 1.1 * s), knn_top1=80.0 + 0.1 * s) for s in range(3)]
    rows += [row("random", seed=0, ft=10.0)]  # another variant never enters the default's floors
    got = {c["claim"]: c for c in floors(rows)}
    ft = got["fine-tuning clears the raw-pixel linear probe"]
    assert ft["n"] == 3 and math.isclose(ft["gap"], 2.6) and ft["verdict"] == "clears the floor"
    assert math.isclose(ft["sds"], 2.6 / 0.1)  # a paired gap: the floor's own seed spread cancels
    probe = got["the linear probe clears the raw-pixel linear probe"]  # 60 against 82..84
    assert probe["gap"] == -23.0 and probe["verdict"] == "below the floor"
    knn = got["kNN clears kNN on raw pixels"]  # 80.0, 80.1, 80.2 against 80: t = 1.73
    assert knn["verdict"] == "not resolved"
    assert floors(rows[:2])[0]["verdict"] == "needs 3 seeds"
    grid = got["the linear probe on the token grid clears the raw-pixel linear probe"]
    assert grid["n"] == 0 and grid["verdict"] == "needs 3 seeds"  # rows without probe.grid numbers
    # the token grid judged against the same floor, seed by seed: +0.5, +1.0, +1.5 (t = 3.46)
    with_grid = [dict(r, linear_probe_grid=r["linear_probe_pixels"] + 0.5 * (r["seed"] + 1)) for r in rows[:3]]
    grid = {c["claim"]: c for c in floors(with_grid)}["the linear probe on the token grid clears the raw-pixel linear probe"]
    assert grid["n"] == 3 and math.isclose(grid["gap"], 1.0) and grid["verdict"] == "clears the floor"
    text = "\n".join(claims_section(rows))
    assert "+2.60 ± 0.10" in text and "**clears the floor**" in text and "**below the floor**" in text


def test_paired_t_without_spread():
    from stages.claims import paired_t

    assert paired_t(spread([2.0, 2.0, 2.0])) == math.inf  # the same gain every seed
    assert paired_t(spread([0.0, 0.0, 0.0])) == 0.0  # no gain at all is no evidence
    assert paired_t(spread([1.0])) is None


def test_segmentation_orderings_over_seeds():
    import pytest

    from stages.seg_report import by_init, judge_segmentation, segmentation_section

    def row(init, seed, miou, kind="experiment", masking="block"):
        return {"kind": kind, "seed": seed, "masking": masking, "target": "tokens", "mask_ratio": 0.4,
                "segment_init": init, "segment_miou": miou, "error": False}

    rows = [row("scratch", s, 30.0 + s) for s in range(3)] + [row("pretrain", s, 40.0 + s) for s in range(3)]
    rows += [row("intermediate", s, 40.5 + s) for s in range(3)]
    rows += [row("pretrain", 0, 99.0, kind="workspace"), row("pretrain", 5, 99.0, masking="random")]
    groups = by_init(rows)
    assert groups["pretrain"] == {0: 40.0, 1: 41.0, 2: 42.0}  # committed rows win; other variants are left out
    first, second = judge_segmentation(rows)
    assert first["gap"] == pytest.approx(10.0) and first["verdict"] == "reproduced" and first["paper_gap"] is None
    assert second["gap"] == pytest.approx(0.5) and second["verdict"] == "not reproduced"
    assert second["paper_gap"] == pytest.approx(2.1)
    md = "\n".join(segmentation_section(rows, {"init": "pretrain", "miou": 0.41, "pixel_acc": 0.9}))
    assert "| pretrain | 0, 1, 2 | 41.00 ± 1.00 | 45.6 (BEiT (self-supervised)) |" in md
    assert judge_segmentation(rows[:2])[0]["verdict"] == "needs 3 seeds"


def test_a_probe_only_rerun_fills_its_seeds_metrics_and_the_first_row_keeps_its_own():
    """A seed's fine-tuning from a full run and its probe from a later `dvc repro linear-probe`
    (after a probe change) merge into one row; values already present are never overwritten."""
    full = [row(seed=s, ft=86.0 + s, sc=83.0) for s in range(3)]
    probe_only = [{**row(seed=s), "finetune_top1": None, "scratch_top1": None, "knn_top1": None,
                   "knn_pixels": None, "linear_probe_top1": 85.0 + s, "linear_probe_pixels": 82.0} for s in range(3)]
    # the probe-only rows come first (whole recipe), the full runs' rows after (their probe blanked)
    pooled = probe_only + [{**r, "linear_probe_top1": None, "linear_probe_pixels": None} for r in full]
    seeds = by_variant(pooled)[("block", "tokens", 0.4)]
    assert [seeds[s]["finetune_top1"] for s in range(3)] == [86.0, 87.0, 88.0]
    assert [seeds[s]["linear_probe_top1"] for s in range(3)] == [85.0, 86.0, 87.0]
    assert seeds[0]["knn_top1"] == 55.0 and seeds[0]["linear_probe_pixels"] == 82.0
    probe = {c["claim"]: c for c in floors(pooled)}["the linear probe clears the raw-pixel linear probe"]
    assert probe["n"] == 3 and probe["gap"] == 4.0 and probe["verdict"] == "clears the floor"
    claims = {c["claim"]: c for c in judge(pooled)}
    assert claims["pretraining beats training from scratch"]["n"] == (3, 3)
    # a first row that has the metric keeps it: the later row only fills gaps
    both = [row(seed=0, ft=80.0), row(seed=0, ft=70.0)]
    assert by_variant(both)[("block", "tokens", 0.4)][0]["finetune_top1"] == 80.0


def test_probe_only_seeds_do_not_enter_the_fine_tuning_claims():
    rows = [{**row(seed=s), "finetune_top1": None, "scratch_top1": None} for s in range(3)]
    claims = {c["claim"]: c for c in judge(rows)}
    assert claims["blockwise beats random masking"]["n"][0] == 0
    assert by_variant(rows)[("block", "tokens", 0.4)][2]["linear_probe_top1"] == 60.0
    assert "60.00 ± 0.00" in "\n".join(claims_section(rows))  # the probe's mean over the 3 seeds
