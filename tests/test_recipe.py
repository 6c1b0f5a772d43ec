"""stages/recipe.py: which runs share a recipe (and so may be pooled over seeds)."""
import copy
from pathlib import Path

import yaml

from stages.recipe import recipe_of

TREE = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())


def tree(**edits):
    t = copy.deepcopy(TREE)
    for dotted, value in edits.items():
        *path, leaf = dotted.split("__")
        node = t
        for p in path:
            node = node[p]
        node[leaf] = value
    return t


def test_knobs_and_outputs_are_not_the_recipe():
    base = recipe_of(tree())
    assert len(base) == 8
    assert recipe_of(tree(seed=3, mask_ratio=0.2, masking="random", target="pixels", segment__init="scratch",
                          report__ledger=None, outputs__runs="elsewhere")) == base


def test_scoring_between_epochs_is_not_the_recipe():
    """finetune.eval_samples only draws a curve (the weights are the same: test_finetune.py), so
    rows recorded when 2,000 test images were scored every epoch pool with today's."""
    base = recipe_of(tree())
    assert TREE["finetune"]["eval_samples"] == 0
    assert recipe_of(tree(finetune__eval_samples=2000)) == recipe_of(tree(finetune__eval_samples=None)) == base
    assert recipe_of(tree(segment__eval_samples=50)) != base  # segment's is still part of it


def test_a_key_left_out_equals_its_default():
    """Old params files lack the fields added since; their rows keep their recipe."""
    t = tree()
    assert t["pretrain"]["mask_draw"] == "per-sample" and t["shard"]["encode"]["restart_markers"] is False
    del t["pretrain"]["mask_draw"], t["shard"]["encode"]["restart_markers"]
    assert recipe_of(t) == recipe_of(tree())


def test_a_real_change_is_another_recipe():
    base = recipe_of(tree())
    assert recipe_of(tree(finetune__views__scale=[0.6, 1.0])) != base
    assert recipe_of(tree(pretrain__mask_draw="batched")) != base
    assert recipe_of(tree(model="tiny")) != base


def test_unreadable_trees_have_no_recipe():
    assert recipe_of(None) is None
    assert recipe_of({"finetune": {"epochs": 5}}) is None  # a key this schema does not have


# ---- per metric: only the params upstream of its stage in dvc.yaml ----------------------------

from stages.recipe import metric_params, recipes_of, stage_graph, upstream  # noqa: E402
from stages.report import METRIC_FIELDS, metric_sources, same_recipe  # noqa: E402
from stages.config import from_dict, Params  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GRAPH = stage_graph(yaml.safe_load((ROOT / "dvc.yaml").read_text()), TREE)
KEYS = metric_params(GRAPH, metric_sources(from_dict(Params, copy.deepcopy(TREE))))


def changed(**edits):
    a, b = recipes_of(tree(), KEYS), recipes_of(tree(**edits), KEYS)
    return {m for m in a if a[m] != b[m]}


def test_the_graph_is_dvc_yaml_s():
    assert upstream(GRAPH, "scratch") == {"scratch", "shard"}
    assert upstream(GRAPH, "finetune") == {"finetune", "pretrain", "tokenize", "train-tokenizer", "shard"}
    assert set(KEYS) == {"tokenizer", "pretrain", "finetune", "scratch", "linear_probe", "knn", "segment",
                         "visualize"}


def test_a_change_reaches_only_the_metrics_downstream_of_it():
    assert changed(scratch__optim__lr=5e-4) == {"scratch"}
    assert changed(probe__epochs=99) == {"linear_probe"}
    assert changed(tokenizer__steps=123) == {"tokenizer", "pretrain", "finetune", "linear_probe", "knn",
                                           "segment", "visualize"}
    assert changed(shard__shard_size=777) == set(KEYS)  # everything reads the shards
    assert changed(seed=5, masking="random") == set()  # the knobs stay out, per metric too


def test_rows_of_another_recipe_pool_only_their_matching_metrics():
    now, old = recipes_of(tree(), KEYS), recipes_of(tree(scratch__optim__lr=5e-4), KEYS)
    full = {f: 1.0 for f in METRIC_FIELDS}
    rows = [{"name": "old", "recipe": "aaaaaaaa", "recipes": old, **full},
            {"name": "legacy", "recipe": "bbbbbbbb", **full},  # recorded before per-metric recipes
            {"name": "new", "recipe": "cccccccc", "recipes": now, **full}]
    pooled = same_recipe(rows, "cccccccc", now)
    assert [r["name"] for r in pooled] == ["new", "old"]  # whole-recipe rows first; legacy pools nothing
    assert pooled[1]["scratch_top1"] is None and pooled[1]["finetune_top1"] == 1.0
    assert pooled[0] == rows[2]


def test_a_later_record_of_the_same_seed_and_recipe_is_the_one_pooled():
    """A seed rerun after a code change that moved its numbers (same params, so the same recipe):
    the newest record is judged, the older one stays in the table but not in the means."""
    from stages.claims import by_variant

    now = recipes_of(tree(), KEYS)
    base = {"recipe": "cccccccc", "recipes": now, "seed": 1, "masking": "block", "target": "tokens",
            "mask_ratio": 0.4, "kind": "experiment", "from_ledger": True,
            **{f: 1.0 for f in METRIC_FIELDS}}
    rows = [{**base, "name": "old-s1", "recorded": "2026-12-04", "finetune_top1": 80.0},
            {**base, "name": "new-s1", "recorded": "2026-12-07", "finetune_top1": 83.0},
            {**base, "name": "undated", "recorded": None, "finetune_top1": 70.0},
            {**base, "name": "live", "from_ledger": False, "recorded": None, "seed": 2}]
    pooled = same_recipe(rows, "cccccccc", now)
    assert [r["name"] for r in pooled] == ["live", "new-s1", "old-s1", "undated"]
    (variant,) = by_variant(pooled)
    assert by_variant(pooled)[variant][1]["finetune_top1"] == 83.0
    # the same day keeps the ledger's order (sorted is stable): no silent reshuffle
    same_day = [{**rows[0], "recorded": "2026-12-07"}, rows[1]]
    assert [r["name"] for r in same_recipe(same_day, "cccccccc", now)] == ["old-s1", "new-s1"]
