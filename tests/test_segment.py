"""Segmentation: scene composition, ADE-layout input checks, the model's pyramid and position
resize, mIoU, and a tiny end-to-end `beit shard-seg` + `beit segment` for each init."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.beit import create_model, model_config, timm_export
from model.checkpoints import save_checkpoint
from model.classifier import BeitClassifier
from model.seg_metrics import IGNORE_INDEX as METRIC_IGNORE, confusion, scores
from model.segmentation import IGNORE_INDEX as MODEL_IGNORE, BeitSegmenter, fit_encoder_state, out_blocks
from model.schema import SegHeadConfig
from pipeline.schema import IGNORE_INDEX, SegDataConfig
from pipeline.segdata import SegView, open_seg_split, train_view
from pipeline.segsource import FOREGROUND, SEG_EXT, SceneSource, decode_mask
from pipeline.shardread import read_index, tar_samples
from pipeline.synthetic import write_fake_fashion_mnist
from tests.helpers import save_stand_in_encoder, tiny_params


def test_ignore_index_is_one_value():
    assert IGNORE_INDEX == MODEL_IGNORE == METRIC_IGNORE == 255


# ---------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fm")
    write_fake_fashion_mnist(root, 50, 20)
    return root


def test_scenes_are_deterministic_aligned_and_split_by_items(fm):
    cfg = SegDataConfig(root=str(fm), train_scenes=12, eval_scenes=6, canvas=48, item_size=(16, 30))
    a, b = SceneSource(cfg), SceneSource(cfg)
    train, test = a.list("train"), a.list("test")
    assert train == b.list("train") and len(train.entries) == 12 and len(test.entries) == 6
    counts = []
    for e in train.entries + test.entries:
        img, mask = a.read(e)
        img2, mask2 = b.read(e)
        assert np.array_equal(img, img2) and np.array_equal(mask, mask2)  # deterministic
        assert img.shape == mask.shape == (48, 48)
        assert np.array_equal(mask > 0, img > FOREGROUND)  # every labelled pixel is an item pixel, and back
        split, _, recipe = e.path.partition(":")
        rows = [int(p.split(",")[0]) for p in recipe.split("|")[1].split(";")]
        labels = a._split_labels(split)
        assert set(np.unique(mask)) <= {0, *(int(labels[r]) + 1 for r in rows)}
        assert max(rows) < (50 if split == "train" else 20)  # eval scenes from test items only
        counts.append(len(rows))
    assert [e.path.split(":")[0] for e in test.entries] == ["test"] * 6
    assert min(counts) >= 1 and max(counts) <= 4
    other = SceneSource(dataclasses.replace(cfg, scene_seed=1)).list("train")
    assert other.entries != train.entries  # the recipe (the path) follows scene_seed


def test_train_view_keeps_image_and_mask_aligned():
    image = torch.zeros(3, 32, 32)
    mask = torch.zeros(32, 32, dtype=torch.long)
    image[:, 4:20, 10:30] = 1.0
    mask[4:20, 10:30] = 3
    for seed in range(6):
        x, m = train_view(image, mask, 32, SegView((0.5, 2.0), 0.5), np.random.default_rng(seed))
        assert x.shape == (3, 32, 32) and m.shape == (32, 32)
        labelled = m == 3
        assert set(m.unique().tolist()) <= {0, 3, IGNORE_INDEX}  # nearest: no blended class ids
        # the same geometry for both: the labelled box and the bright box agree to a pixel
        # (bilinear blurs the image's edge by one pixel, nearest keeps the map's sharp)
        ys, xs = torch.nonzero(labelled, as_tuple=True)
        yb, xb = torch.nonzero(x[0] > 0.5, as_tuple=True)
        for a, b in ((ys, yb), (xs, xb)):
            assert abs(a.min() - b.min()) <= 1 and abs(a.max() - b.max()) <= 1
        assert (x[0][m == IGNORE_INDEX] == 0).all()  # padding: black image, ignored label
    x, m = train_view(image, mask, 32, SegView((1.0, 1.0), 1.0), np.random.default_rng(0))
    assert torch.equal(x, image.flip(-1)) and torch.equal(m, mask.flip(-1))  # scale 1 + flip: exact


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _ade_folder(root: Path) -> None:
    """ADE20K layout: 2 good pairs, one without a map, one map of another size, one with class 200."""
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)

    def pair(name, h=40, w=60, mask=None, split="training", write_mask=True):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "images" / split / f"{name}.jpg", quality=95)
        if write_mask:
            m = mask if mask is not None else rng.integers(0, 151, (h, w), dtype=np.uint8)
            (root / "annotations" / split / f"{name}.png").write_bytes(_png(m))

    pair("good1")
    m = np.zeros((40, 60), np.uint8)
    m[:, 30:] = 1
    m[:10] = 150
    pair("good2", mask=m)
    pair("nomask", write_mask=False)
    pair("wrongsize", mask=np.zeros((20, 60), np.uint8))
    pair("badclass", mask=np.full((40, 60), 200, np.uint8))
    pair("val1", split="validation")


def test_bad_segmentation_input_is_skipped_and_reported(tmp_path):
    from stages.shard_seg import shard_seg

    _ade_folder(tmp_path / "ade")
    params = tiny_params(tmp_path, outputs={"seg_shards": str(tmp_path / "seg")}, segment={"data": {
        "source": "ade20k", "root": str(tmp_path / "ade"), "splits": ["training", "validation"],
        "train_split": "training", "eval_split": "validation", "encode": {"resize_short": 20}}})
    (s,) = shard_seg(params, ("training",), progress=False)
    assert s.written == 2 and s.rejected == {"mask-class": 1, "mask-missing": 1, "mask-size": 1}
    rows = [json.loads(line) for line in (tmp_path / "seg/training/rejected.jsonl").read_text().splitlines()]
    assert {Path(r["source"].split("|")[0]).stem: r["reason"] for r in rows} == {
        "nomask": "mask-missing", "wrongsize": "mask-size", "badclass": "mask-class"}
    index = read_index(tmp_path / "seg/training")
    samples = {Path(x["json"] and json.loads(x["json"])["source"].split("|")[0]).stem: x
               for x in tar_samples(sorted(str(p) for p in (tmp_path / "seg/training").glob("*.tar")))}
    assert sorted(samples) == ["good1", "good2"] and len(index["key"]) == 2
    m = decode_mask(samples["good2"][SEG_EXT])
    # resize_short=20: 40x60 -> 20x30, nearest; reduce_zero_label: 0 -> 255, 1 -> 0, 150 -> 149
    assert m.shape == (20, 30)
    assert (m[5:, :15] == 255).all() and (m[5:, 15:] == 0).all() and (m[:5] == 149).all()
    img = np.asarray(Image.open(io.BytesIO(samples["good2"]["jpg"])))
    assert img.shape[:2] == m.shape  # the map follows the stored image's size
    split = open_seg_split(tmp_path / "seg/training")
    assert split.num_classes == 150 and split.num_samples == 2


# ---------------------------------------------------------------------------- model


def test_out_blocks_are_unilms():
    assert out_blocks(12) == (3, 5, 7, 11) and out_blocks(24) == (7, 11, 15, 23) and out_blocks(6) == (1, 2, 3, 5)


def test_pyramid_shapes_and_logits():
    torch.manual_seed(0)
    m = BeitSegmenter(model_config("micro", img_size=56), 11, SegHeadConfig(channels=16)).eval()
    x = torch.randn(2, 3, 56, 56)
    levels = m.pyramid(x)
    assert [tuple(t.shape) for t in levels] == [(2, 128, 56, 56), (2, 128, 28, 28), (2, 128, 14, 14),
                                               (2, 128, 7, 7)]  # strides 1, 2, 4, 8 for patch 4
    assert tuple(m(x).shape) == (2, 11, 56, 56)
    m.train()
    masks = torch.randint(0, 11, (2, 56, 56))
    masks[:, :10] = IGNORE_INDEX
    loss, metrics = m.loss(x, masks)
    assert torch.isfinite(loss) and "aux_loss" in metrics
    m.eval()  # no dropout, no aux head: the loss is the main head's cross-entropy over labelled pixels
    one = torch.full_like(masks, IGNORE_INDEX)
    one[:, 0, 0] = 3  # one labelled pixel per image
    logits = m(x)
    want = torch.nn.functional.cross_entropy(logits[:, :, 0, 0], torch.tensor([3, 3]))
    torch.testing.assert_close(m.loss(x, one)[0], want)
    fpn = BeitSegmenter(model_config("micro", img_size=56), 11, SegHeadConfig(kind="fpn", channels=16, aux_weight=0))
    assert tuple(fpn.eval()(x).shape) == (2, 11, 56, 56) and fpn.aux_head is None


def test_position_resize_against_a_direct_construction():
    torch.manual_seed(0)
    src = BeitClassifier(model_config("micro", img_size=28), 0)  # 7x7 grid
    direct = BeitClassifier(model_config("micro", img_size=56), 0)  # 14x14 grid, built at the new size

    def fill(model, ramp: bool):
        """Bias table = a function of the offset (dy, dx) the model's own index gives every pair;
        pos_embed = a constant per channel (ramp: + x position) with a distinct CLS row."""
        g = model.patch_embed.grid_size[0]
        with torch.no_grad():
            for blk in model.blocks:
                t = blk.attn.relative_position_bias_table  # [(2g-1)^2 + 3, heads]
                n = (2 * g - 1) ** 2
                dy, dx = torch.div(torch.arange(n), 2 * g - 1, rounding_mode="floor") - (g - 1), \
                    torch.arange(n) % (2 * g - 1) - (g - 1)
                t[:n] = (0.5 * dy + 0.25 * dx).float()[:, None]
                t[n:] = torch.tensor([[1.0], [2.0], [3.0]])  # cls->patch, patch->cls, cls->cls
            pe = model.pos_embed  # [1, 1+N, D]
            pe[:, 0] = -1.0
            xs = torch.arange(g).repeat(g).float() / (g - 1)  # x position of each patch, 0..1
            pe[:, 1:] = 0.3 + (xs[:, None] if ramp else 0.0)

    fill(src, ramp=False)
    fill(direct, ramp=False)
    sd = fit_encoder_state(src.state_dict(), direct)
    missing, unexpected = direct.load_state_dict(sd, strict=False)
    assert not unexpected and all("relative_position_index" in k for k in missing)  # every weight fits
    for k, v in direct.state_dict().items():
        if k in sd:
            assert sd[k].shape == v.shape, k
    ref = BeitClassifier(model_config("micro", img_size=56), 0)
    fill(ref, ramp=False)
    got, want = sd["blocks.0.attn.relative_position_bias_table"], ref.blocks[0].attn.relative_position_bias_table
    g, n = 14, 27 ** 2
    grid = got[:n, 0].reshape(27, 27)  # [2g-1, 2g-1] over (dy, dx), head 0
    wgrid = want[:n, 0].detach().reshape(27, 27)
    c = g - 1
    # unilm's resampling keeps offsets 0 and +-1 exactly (its geometric progression starts at 1) and the
    # three CLS entries; farther offsets are stretched, so they stay monotone in dy and dx
    torch.testing.assert_close(grid[c - 1:c + 2, c - 1:c + 2], wgrid[c - 1:c + 2, c - 1:c + 2], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[n:], want[n:].detach())
    assert (grid[1:, c] > grid[:-1, c]).all() and (grid[c, 1:] > grid[c, :-1]).all()
    # the pretrained extremes (+-6 patches at 7x7) now sit at +-13: the same range, not extrapolated
    assert abs(grid[-1, c].item() - 3.0) < 1e-3 and abs(grid[0, c].item() + 3.0) < 1e-3
    pe = sd["pos_embed"]
    assert pe.shape == ref.pos_embed.shape
    torch.testing.assert_close(pe[:, 0], torch.full_like(pe[:, 0], -1.0))  # CLS untouched
    torch.testing.assert_close(pe[:, 1:], torch.full_like(pe[:, 1:], 0.3), atol=1e-5, rtol=0)  # constant stays
    # the same grid: nothing changes
    same = fit_encoder_state(src.state_dict(), src)
    for k, v in same.items():
        assert torch.equal(v, src.state_dict()[k]), k
    # a ramp in x resamples to a ramp (interpolation, monotone along x)
    fill(src, ramp=True)
    pe = fit_encoder_state(src.state_dict(), direct)["pos_embed"][0, 1:, 0].reshape(14, 14)
    assert (pe[:, 1:] >= pe[:, :-1] - 1e-6).all() and pe[0, -1] - pe[0, 0] > 0.8


# ---------------------------------------------------------------------------- metric


def test_miou_on_a_hand_computed_example():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    conf = confusion(pred, target, 4)
    # labelled pixels: 7 (one 255). class 0: TP 1, FP 1 (pred 0 at a 2), FN 1 -> 1/3
    # class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: TP 1, FP 1 (pred 2 at a 1), FN 1 -> 1/3; class 3 absent
    s = scores(conf, ["a", "b", "c", "d"])
    assert s["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 0.5, "c": 1 / 3, "d": None})
    assert s["miou"] == pytest.approx((1 / 3 + 0.5 + 1 / 3) / 3)
    assert s["pixel_acc"] == pytest.approx(4 / 7) and s["pixels"] == 7


# ---------------------------------------------------------------------------- end to end


def _world(tmp: Path):
    write_fake_fashion_mnist(tmp / "fm", 40, 20)
    params = tiny_params(tmp, data={"image_size": 28}, outputs={"seg_shards": str(tmp / "seg")}, segment={
        "data": {"root": str(tmp / "fm"), "train_scenes": 16, "eval_scenes": 8, "canvas": 32,
                 "item_size": [12, 24]},
        "head": {"channels": 8}, "loop": {"epochs": 1, "batch_size": 8, "log_every": 1}, "figure_scenes": 4})
    from stages.shard_seg import shard_seg

    shard_seg(params, ("train", "test"), progress=False)
    return params


def test_segment_end_to_end_for_each_init(tmp_path):
    from stages.segment import segment

    params = _world(tmp_path)
    save_stand_in_encoder(params, img_size=28)  # pretrained at 28 px (7x7), segmented at 32 px (8x8)
    torch.manual_seed(3)
    clf = BeitClassifier.from_encoder(create_model(params.model, img_size=28), 10)
    save_checkpoint(params.outputs.finetune.dir, clf.state_dict(), clf.checkpoint_config(model=params.model))
    results = {}
    for init in ("pretrain", "intermediate", "scratch"):
        p = dataclasses.replace(params, segment=dataclasses.replace(params.segment, init=init))
        m = segment(p)
        results[init] = m
        assert m["init"] == init and m["eval_scenes"] == 8 and m["steps"] == 2
        assert 0.0 <= m["miou"] <= 1.0 and 0.0 <= m["pixel_acc"] <= 1.0 and len(m["per_class_iou"]) == 11
        saved = json.loads(Path(params.outputs.segment.metrics).read_text())
        assert saved["miou"] == m["miou"]
        with Image.open(params.outputs.segment.samples) as im:
            assert im.width >= 512
        assert Path(params.outputs.segment.curve).read_text().startswith("step\t")
    assert len({r["init_fingerprint"] for r in results.values()}) == 3  # three different encoders


def test_segment_without_a_pretrained_encoder_is_one_line(tmp_path):
    from click.testing import CliRunner

    import yaml

    from stages.segment import cli
    from tests.helpers import tiny_raw

    raw = tiny_raw(tmp_path, outputs={"seg_shards": str(tmp_path / "seg")})
    write_fake_fashion_mnist(tmp_path / "fm", 20, 10)
    raw["segment"]["data"].update({"root": str(tmp_path / "fm"), "train_scenes": 8, "eval_scenes": 4})
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    from stages.shard_seg import cli as shard_cli

    assert CliRunner().invoke(shard_cli, ["--params", str(tmp_path / "p.yaml"), "--no-progress"]).exit_code == 0
    res = CliRunner().invoke(cli, ["--params", str(tmp_path / "p.yaml")])
    assert res.exit_code == 1 and "no pretrained checkpoint" in res.output and "Traceback" not in res.output


def test_poly_schedule():
    from model.optim import lr_at, poly_lr_at

    assert poly_lr_at(0, 100, 10, 1.0) == lr_at(0, 100, 10, 1.0)  # the same warmup
    assert poly_lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert poly_lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)  # power 1: linear to min_lr
    assert poly_lr_at(100, 100, 10, 1.0, 0.1) == 0.1 and poly_lr_at(150, 100, 10, 1.0, 0.1) == 0.1


def test_segment_resumes_exactly(tmp_path):
    from stages.segment import segment

    params = _world(tmp_path)
    params = dataclasses.replace(params, segment=dataclasses.replace(
        params.segment, init="scratch", loop=dataclasses.replace(params.segment.loop, checkpoint_every=1)))
    assert segment(params, stop_after=1) == {"stopped_at": 1}
    resumed = segment(params)
    fresh = segment(dataclasses.replace(params, outputs=dataclasses.replace(params.outputs,
                                                                            runs=str(tmp_path / "runs2"))))
    for k in ("miou", "pixel_acc", "train_loss", "per_class_iou"):
        assert resumed[k] == fresh[k], k
