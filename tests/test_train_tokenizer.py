"""train-tokenizer stage: end to end on the tiny fixture (dvae), adopting a converted DALL-E
tokenizer (kind dalle), and one-line refusals of unusable DALL-E folders."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from helpers import make_shards, tiny_params
from model.dalle import DalleConfig, DalleVAE
from model.dvae import DVAE
from model.schema import DVAEConfig
from model.tokenizer import load_tokenizer, save_tokenizer
from stages.config import ConfigError
from stages.train_tokenizer import TokenizerError, cli, train_tokenizer

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
FAST = dict(steps=6, batch_size=16, loader={"num_workers": 0, "shuffle_buffer": 50}, log_every=2, eval_samples=24,
            model={"hidden": 8, "vocab_size": 64, "codebook_dim": 8},
            schedule={"restart_every": 2, "restart_until_frac": 1.0})


def params_for(tmp: Path, name: str, **over):
    d = tmp / name
    paths = dict(dir=str(d / "models/tokenizer"), metrics=str(d / "metrics/tokenizer.json"),
                 curve=str(d / "plots/tokenizer.tsv"), figure=str(d / "plots/tokenizer.png"),
                 recon=str(d / "plots/tokenizer_recon.png"))
    return tiny_params(tmp, tokenizer={**FAST, **over}, outputs={"tokenizer": paths})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tok")
    make_shards(tmp, tiny_params(tmp), n_train=120, n_test=40)
    return tmp


def test_dvae_stage_writes_loadable_tokenizer_metrics_and_pictures(world):
    params = params_for(world, "dvae")
    metrics = train_tokenizer(params, progress=False)
    cfg = params.outputs.tokenizer
    tok = load_tokenizer(cfg.dir)
    assert (tok.kind, tok.grid, tok.vocab_size) == ("dvae", (8, 8), 64)
    assert json.loads(Path(cfg.metrics).read_text()) == json.loads(json.dumps(metrics))
    assert metrics["kind"] == "dvae" and metrics["steps"] == 6 and metrics["train_img_per_s"] > 0
    assert 0 < metrics["recon_mse"] < 1 and 1 <= metrics["perplexity"] <= 64
    assert metrics["codes_used"] == round(metrics["codebook_usage"] * 64) >= 2
    assert metrics["codebook_usage_pct"] == pytest.approx(100 * metrics["codebook_usage"])
    with open(cfg.curve) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["step"]) for r in rows] == [2, 4, 6] and all(float(r["mse"]) > 0 for r in rows)
    assert Image.open(cfg.figure).size[0] > 0
    # 16 held-out images, 8 per row: 2 rows of originals over 2 rows of reconstructions, 34 px tiles.
    assert Image.open(cfg.recon).size == (2 * (8 * 34 + 2), 2 * (4 * 34 + 2))  # x2: at least 512 px wide
    out = Path(cfg.dir)
    assert sorted(p.name for p in out.iterdir()) == ["decoder.safetensors", "encoder.safetensors", "tokenizer.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_dvae_stage_replaces_an_existing_tokenizer_whole(world):
    params = params_for(world, "replace")
    out = Path(params.outputs.tokenizer.dir)
    save_tokenizer(DalleVAE(DalleConfig(image_size=32, n_hid=8, vocab_size=64)), DalleConfig(image_size=32, n_hid=8, vocab_size=64), out)
    (out / "stray.txt").write_text("left over")
    train_tokenizer(params, progress=False)
    assert load_tokenizer(out).kind == "dvae" and not (out / "stray.txt").exists()


def _dalle_dir(path: Path, decoder: bool) -> Path:
    torch.manual_seed(0)
    cfg = DalleConfig(image_size=32, n_hid=8, n_blk_per_group=1, vocab_size=64, n_init=8, has_decoder=decoder)
    return save_tokenizer(DalleVAE(cfg), cfg, path)


@pytest.mark.parametrize("decoder", [False, True])
def test_dalle_kind_copies_the_converted_tokenizer_and_scores_it(world, decoder):
    src = _dalle_dir(world / f"converted-{decoder}", decoder)
    params = params_for(world, f"dalle-{decoder}", kind="dalle", dalle_path=str(src))
    metrics = train_tokenizer(params, progress=False)
    out = Path(params.outputs.tokenizer.dir)
    names = sorted(p.name for p in src.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    assert all((out / n).read_bytes() == (src / n).read_bytes() for n in names)
    assert load_tokenizer(out).fingerprint == load_tokenizer(src).fingerprint
    assert metrics["kind"] == "dalle" and metrics["steps"] == 0 and metrics["grid"] == 4
    assert 0 < metrics["codebook_usage"] <= 1 and metrics["perplexity"] >= 1
    assert ("recon_mse" in metrics) == decoder
    assert Image.open(params.outputs.tokenizer.recon).size == (2 * (8 * 34 + 2), 2 * (4 * 34 + 2))  # token map when no decoder
    assert Path(params.outputs.tokenizer.curve).read_text().startswith("step\t")


def test_dalle_kind_refuses_missing_or_invalid_folders(world):
    with pytest.raises(TokenizerError, match="no tokenizer.json; run `beit convert-dalle") as err:
        train_tokenizer(params_for(world, "missing", kind="dalle", dalle_path=str(world / "nope")))
    assert "\n" not in str(err.value)
    # A dVAE folder is a valid tokenizer but not a DALL-E one.
    ours = save_tokenizer(DVAE(DVAEConfig(hidden=4, vocab_size=16)), DVAEConfig(hidden=4, vocab_size=16), world / "ours")
    with pytest.raises(TokenizerError, match="'dvae' tokenizer, not a converted DALL-E"):
        train_tokenizer(params_for(world, "ours", kind="dalle", dalle_path=str(ours)))
    # Weights swapped under the JSON: the fingerprint check refuses it, in one line.
    bad = _dalle_dir(world / "bad", decoder=False)
    other = _dalle_dir(world / "other", decoder=False)
    torch.manual_seed(1)
    cfg = DalleConfig(image_size=32, n_hid=8, n_blk_per_group=1, vocab_size=64, n_init=8)
    save_tokenizer(DalleVAE(cfg), cfg, other)
    (bad / "encoder.safetensors").write_bytes((other / "encoder.safetensors").read_bytes())
    with pytest.raises(TokenizerError, match="not a valid tokenizer .*fingerprint mismatch") as err:
        train_tokenizer(params_for(world, "bad", kind="dalle", dalle_path=str(bad)))
    assert "\n" not in str(err.value)
    assert not Path(params_for(world, "bad").outputs.tokenizer.dir).exists()  # nothing half-written


def test_cli_refusals_are_one_line(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tokenizer"].update(kind="dalle", dalle_path=str(tmp_path / "nope"))
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(cli, ["--params", str(tmp_path / "p.yaml")])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0, result.output
    assert result.output.startswith("Error: tokenizer.dalle_path=") and "convert-dalle" in result.output
    raw["tokenizer"].update(dalle_path=None)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(cli, ["--params", str(tmp_path / "p.yaml")])
    assert result.exit_code == 1 and "needs tokenizer.dalle_path" in result.output
    assert result.output.strip().count("\n") == 0
    with pytest.raises(ConfigError, match="unknown key tokenizer.model.widht"):
        tiny_params(tmp_path, tokenizer={"model": {"widht": 3}})
