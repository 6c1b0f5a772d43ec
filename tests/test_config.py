"""params.yaml -> frozen dataclasses: typos and wrong types must fail loudly."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from stages.config import ConfigError, Params, load_params

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, data) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repo_params_load_and_are_frozen():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.seed = 1  # type: ignore[misc]
    assert isinstance(params.data.splits, tuple)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"mask_ratoi": 0.4}, "unknown key mask_ratoi"),
        ({"shard": {"shard_sise": 10}}, "unknown key shard.shard_sise"),
        ({"shard": {"shard_size": "big"}}, "shard.shard_size='big': expected an integer"),
        ({"shard": {"workers": 1.5}}, "shard.workers=1.5: expected an integer"),
        ({"masking": "grid"}, "masking='grid': must be one of block, random"),
        ({"mask_ratio": 1.2}, "mask_ratio=1.2: must be in"),
        ({"data": {"splits": "train"}}, "data.splits: expected a list"),
        ({"shard": {"strict": "yes"}}, "shard.strict='yes': expected true or false"),
        ({"views": {"scale": [0.5]}}, "views.scale: expected 2 values, got 1"),
        ({"views": {"scale": [0.9, 0.1]}}, "views.scale=.*need 0 < min <= max"),
        ({"tokenize": {"views": 0}}, "tokenize.views=0: must be >= 1"),
    ],
)
def test_bad_params_name_the_key(tmp_path, data, match):
    with pytest.raises(ConfigError, match=match):
        load_params(write(tmp_path, data))


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="not found") as err:
        load_params(tmp_path / "nope.yaml")
    assert "\n" not in str(err.value)


def test_optional_and_int_to_float(tmp_path):
    params = load_params(write(tmp_path, {"shard": {"encode": {"resize_short": 256}}, "data": {"root": None}}))
    assert params.shard.encode.resize_short == 256 and params.data.root is None
    assert isinstance(load_params(write(tmp_path, {"mask_ratio": 1 / 2})).mask_ratio, float)


def test_scratch_stage_reads_every_finetune_field_but_the_optimiser_and_init():
    """`beit scratch` takes finetune's data, views, budget and augmentation but its own optimiser:
    DVC must rerun it when any of those change, and not when finetune.optim does."""
    from stages.config import FinetuneConfig

    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["scratch"]
    read = {p for p in stage["params"] if isinstance(p, str)}
    want = {f"finetune.{f.name}" for f in dataclasses.fields(FinetuneConfig)} - {"finetune.optim", "finetune.init"}
    assert {p for p in read if p.startswith("finetune")} == want
    assert "scratch" in read
