"""`beit visualize` end to end on the tiny fixtures, and its report section."""
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from helpers import make_shards, save_stand_in_encoder, save_tiny_tokenizer, tiny_params, tiny_raw
from model.beit import load_encoder
from model.checkpoints import save_checkpoint
from model.classifier import BeitClassifier
from stages.vis_report import visualize_section


def _world(tmp_path, target="tokens", **visualize):
    params = tiny_params(tmp_path, target=target, visualize={"images": 30, "show": 3, "batch_size": 16, **visualize})
    make_shards(tmp_path, params, n_train=40, n_test=40)
    save_stand_in_encoder(params, vocab_size=64, img_size=32, target=target)
    fine = BeitClassifier.from_encoder(load_encoder(params.outputs.pretrain.dir), num_classes=10)
    save_checkpoint(params.outputs.finetune.dir, fine.state_dict(), fine.checkpoint_config(model=params.model))
    save_tiny_tokenizer(params.outputs.tokenizer.dir)
    return params


def _png_width(path):
    with Image.open(path) as im:
        return im.size[0]


@pytest.mark.parametrize("target", ["tokens", "pixels"])
def test_visualize_end_to_end(tmp_path, target):
    from stages.visualize import visualize

    params = _world(tmp_path, target)
    m = visualize(params)
    out = params.outputs.visualize
    assert json.loads(open(out.metrics).read()) == pytest.approx(m, nan_ok=True)
    assert m["images"] == 30 and 0 < m["images_scored"] <= 30
    for name in ("pretrain", "random", "finetune", "chance"):
        for key in ("mass", "iou"):
            assert 0.0 <= m[f"{name}_{key}"] <= 1.0 and m[f"{name}_{key}_se"] >= 0.0
    # A random encoder's CLS attention is near uniform, so its mass sits near chance.
    assert abs(m["random_mass"] - m["chance_mass"]) < 0.1 and m["random_entropy"] > 0.99
    # The stand-in fine-tuned model is the pretrained encoder plus a head: the classifier's
    # per-block bias tables and the MIM encoder's shared one must give the same last-layer map.
    assert m["finetune_mass"] == pytest.approx(m["pretrain_mass"], abs=1e-5)
    assert m["finetune_iou"] == pytest.approx(m["pretrain_iou"], abs=1e-5)
    for path in (out.attention, out.heads, out.recon):
        assert _png_width(path) >= 512


def test_random_init_is_pretrainings_starting_point(tmp_path):
    """The "random init" column is the very init `beit pretrain` starts from (same seed, same constructor)."""
    from stages.pretrain import build_model
    from stages.visualize import encoders

    params = _world(tmp_path)
    rand = encoders(params, torch.device("cpu"))["random"][0]
    start = build_model(params, 64, (8, 8))
    assert all(torch.equal(a, b) for a, b in zip(rand.state_dict().values(), start.state_dict().values()))


def test_missing_finetune_is_one_line(tmp_path):
    from stages.visualize import cli

    params = _world(tmp_path)
    import shutil

    shutil.rmtree(params.outputs.finetune.dir)
    p = tmp_path / "params.yaml"
    import yaml

    raw = tiny_raw(tmp_path, visualize={"images": 30, "show": 3, "batch_size": 16})
    p.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(cli, ["--params", str(p)])
    assert result.exit_code == 1
    assert "no finetune checkpoint; run `beit finetune`" in result.output
    assert "Traceback" not in result.output


def test_report_section(tmp_path):
    params = tiny_params(tmp_path)
    out = params.outputs.visualize
    assert "Not run yet" in " ".join(visualize_section(None, out, tmp_path / "reports", tmp_path))
    m = {"images": 10, "images_scored": 9, "pretrain_mass": 0.61, "pretrain_mass_se": 0.02, "random_mass": 0.4,
         "random_mass_se": 0.01, "finetune_mass": 0.5, "finetune_mass_se": 0.03, "chance_mass": 0.4,
         "chance_mass_se": 0.01, "pretrain_iou": 0.5, "pretrain_iou_se": float("nan")}
    text = "\n".join(visualize_section(m, out, tmp_path / "reports", tmp_path))
    assert "| pretrained | 0.610 ± 0.020 | 0.500 | — |" in text
    assert "| random init | 0.400 ± 0.010 | — | — |" in text
    assert "(../plots/attention.png)" in text  # relative to the report


def test_report_judges_attention_over_seeds():
    def row(seed, pre, rnd):
        return {"kind": "experiment", "masking": "block", "target": "tokens", "mask_ratio": 0.4, "seed": seed,
                "finetune_top1": 75.0, "attention_pretrain": pre, "attention_random": rnd, "attention_finetune": 55.0}
    from stages.vis_report import over_seeds
    assert over_seeds([]) == []
    two = " ".join(over_seeds([row(0, 76.0, 48.0), row(1, 75.0, 47.0)]))
    assert "needs 3 seeds" in two
    clear = " ".join(over_seeds([row(0, 76.0, 48.0), row(1, 75.0, 47.5), row(2, 77.0, 48.5)]))
    assert "pretrained 76.0 ± 1.0" in clear and "+28.0 ± 0.5 points" in clear and "**reproduced**" in clear
    noisy = " ".join(over_seeds([row(0, 50.0, 48.0), row(1, 46.0, 47.5), row(2, 49.0, 48.5)]))
    assert "**not reproduced**" in noisy
    # another variant (random masking) does not count as the default's seeds
    other = {**row(3, 90.0, 10.0), "masking": "random"}
    assert "Over seeds 0, 1, 2 " in " ".join(over_seeds([row(0, 76.0, 48.0), row(1, 75.0, 47.5),
                                                          row(2, 77.0, 48.5), other]))
