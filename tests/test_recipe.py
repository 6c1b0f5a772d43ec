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
