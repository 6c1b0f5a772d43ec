"""Linear probe and kNN on frozen features: the pure parts on synthetic features, the stages end to end."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from helpers import make_shards, save_stand_in_encoder, tiny_params
from reference_probe import autograd_objective, autograd_solve
from pipeline.classify import open_labelled
from stages.probe import knn, knn_scores, linear_probe, topk_accuracy, train_linear

torch.set_num_threads(1)


def blobs(n_per: int, classes: int, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g) * 4
    y = torch.arange(classes).repeat_interleave(n_per)  # [N]
    return centres[y] + torch.randn(len(y), dim, generator=g), y


def test_knn_weighted_vote():
    train_x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    train_y = torch.tensor([0, 0, 1])
    scores = knn_scores(train_x, train_y, torch.tensor([[0.2, 1.0]]), classes=2, k=3, temperature=0.1)
    # Votes are exp(cos / T) per neighbour, summed per class: class 1 has one very close neighbour.
    cos = torch.nn.functional.normalize(torch.tensor([[0.2, 1.0]]), dim=1) @ \
        torch.nn.functional.normalize(train_x, dim=1).T  # [1, 3]
    want = torch.tensor([[(cos[0, 0] / 0.1).exp() + (cos[0, 1] / 0.1).exp(), (cos[0, 2] / 0.1).exp()]])
    torch.testing.assert_close(scores, want)
    x, y = blobs(30, 4)
    tx, ty = blobs(10, 4, seed=0)
    assert topk_accuracy(knn_scores(x, y, tx, 4, k=20, temperature=0.07), ty)["top1"] > 0.95


def test_linear_probe_learns_separable_features():
    x, y = blobs(40, 5)
    linear, mean, std = train_linear(x * 10 + 3, y, 5, epochs=20, lr=1e-2, weight_decay=0.0,
                                     batch_size=32, seed=0)
    acc = topk_accuracy(linear((x * 10 + 3 - mean) / std), y)
    assert acc["top1"] > 0.95 and acc["top5"] == 1.0


def test_probe_and_knn_stages_share_cached_features(tmp_path, monkeypatch):
    params = tiny_params(tmp_path, probe={"num_workers": 0, "batch_size": 32, "train_fraction": 0.5, "epochs": 5,
                                          "block": "auto", "validation": 20, "lrs": [1e-3, 1e-1], "solver": "adamw"},
                         outputs={"runs": str(tmp_path / "runs"), "linear_probe": {"metrics": "metrics/linear_probe.json"},
                                  "knn": {"metrics": "metrics/knn.json"}})
    make_shards(tmp_path, params, n_train=80, n_test=30)
    save_stand_in_encoder(params, seed=0, depth=2)
    monkeypatch.chdir(tmp_path)
    lp = linear_probe(params)
    cache = sorted((tmp_path / "runs").glob("features-*/*.safetensors"))
    # three feature caches: the encoder's mean-pooled and token-grid features and the raw-pixel
    # reference's, each fit / holdout / eval
    names = ["test.safetensors", "train-holdout.safetensors", "train.safetensors"]
    assert sorted(p.name for p in cache) == sorted(names * 3)
    from safetensors.torch import load_file
    train = {f.shape: f for f in (load_file(str(p))["features"] for p in cache if p.name == "train.safetensors")}
    # pixels; both blocks of the 2-block encoder, mean-pooled and as the 8x8 grid of 128-d tokens
    assert sorted(train) == [(1, 40, 3 * 32 * 32), (2, 40, 128), (2, 40, 64 * 128)]
    grid = train[(2, 40, 64 * 128)].reshape(2, 40, 64, 128)  # [L, N, patches, D]
    assert torch.allclose(grid.mean(2), train[(2, 40, 128)], atol=1e-5)  # the same tokens, pooled
    assert lp["grid_feature_dim"] == 64 * 128 and 0.0 <= lp["grid_top1"] <= 1.0
    assert [(r["block"], r["setting"]) for r in lp["grid_holdout"]] == [(1, 1e-3), (1, 1e-1), (2, 1e-3), (2, 1e-1)]
    # block and lr: the best of every (block, lr) pair on the holdout, then the test split once
    rows = lp["holdout"]
    assert [(r["block"], r["setting"]) for r in rows] == [(1, 1e-3), (1, 1e-1), (2, 1e-3), (2, 1e-1)]
    best = max(rows, key=lambda r: r["top1"])
    assert (lp["block"], lp["lr"]) == (best["block"], best["setting"]) and lp["pixels_lr"] in (1e-3, 1e-1)
    stamps = [p.stat().st_mtime_ns for p in cache]
    kn = knn(params)
    assert [p.stat().st_mtime_ns for p in cache] == stamps  # knn reused the probe's features
    assert json.loads(Path("metrics/linear_probe.json").read_text()) == lp
    assert json.loads(Path("metrics/knn.json").read_text()) == kn
    assert lp["train_samples"] == 40 and lp["eval_samples"] == 30 and lp["feature_dim"] == 128
    assert kn["k"] == 20 and 0.0 <= kn["top1"] <= kn["top5"] <= 1.0
    assert kn["block"] == max(kn["holdout"], key=lambda r: r["top1"])["block"] and len(kn["holdout"]) == 2
    assert 0.0 <= lp["pixels_top1"] <= 1.0 and 0.0 <= kn["pixels_top1"] <= 1.0
    assert kn["grid_block"] == max(kn["grid_holdout"], key=lambda r: r["top1"])["block"]
    assert 0.0 <= kn["grid_top1"] <= 1.0
    # train_fraction null: exactly the fine-tuning label subset (same fraction, same seed)
    same = dataclasses.replace(params, probe=dataclasses.replace(params.probe, train_fraction=None),
                               finetune=dataclasses.replace(params.finetune, label_fraction=0.25))
    want = open_labelled(Path(params.outputs.shards) / "train", 0.25, params.seed).num_samples
    assert want != 40 and linear_probe(same)["train_samples"] == want


def test_fit_logistic_reaches_the_optimum_of_the_penalised_loss():
    from stages.convex_probe import fit_logistic

    # overlapping classes (not separable) in 16 correlated dims: an ill-conditioned problem
    x, y = blobs(60, 5)
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(16, 16, generator=g) @ torch.diag(torch.logspace(0, -3, 16))
    x = (x * 0.25) @ mix + 5.0
    for whiten in (False, True):
        probe = fit_logistic(x, y, 5, l2=1e-3, whiten=whiten, max_iter=500)
        assert probe.iterations < 500  # converged before the cap
        z = probe.inputs(x)
        w = probe.weight.clone().requires_grad_()
        b = probe.bias.clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(z @ w + b, y) + 0.5e-3 * (w * w).sum()
        gw, gb = torch.autograd.grad(loss, (w, b))
        assert gw.abs().max() < 1e-5 and gb.abs().max() < 1e-5  # a stationary point of a convex loss
    # unpenalised, the optimum's predictions do not depend on an invertible linear map of x
    a = fit_logistic(x, y, 5, l2=0.0, whiten=False, max_iter=1000)
    b = fit_logistic(x, y, 5, l2=0.0, whiten=True, max_iter=1000)
    assert (a(x).argmax(1) == b(x).argmax(1)).float().mean() > 0.97
    assert topk_accuracy(a(x), y)["top1"] > 0.8


@pytest.mark.parametrize("n,d", [(300, 40), (120, 700)])  # more images than columns, and fewer (a token grid)
def test_the_probe_objective_is_autograds_bit_for_bit(n, d):
    from stages.convex_probe import objective

    g = torch.Generator().manual_seed(n + d)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    y = torch.randint(0, 7, (n,), generator=g)
    w = torch.randn(d, 7, generator=g, dtype=torch.float64) * 0.1
    b = torch.randn(7, generator=g, dtype=torch.float64)
    for l2 in (0.0, 1e-4, 0.1, 10.0):
        ours = objective(z, z.T.contiguous(), y, w, b, l2)
        for a, o in zip(autograd_objective(z, y, w, b, l2), ours):
            assert a.dtype == o.dtype and a.shape == o.shape and torch.equal(a, o)


def test_solve_takes_autograds_lbfgs_path_bit_for_bit():
    """The fit with the hand-written closure ends on the very weights the autograd closure gave."""
    from stages.convex_probe import prepare, solve

    x, y = blobs(80, 5, dim=12)
    inputs = prepare(x, whiten=True)
    z = inputs(x)
    ours = solve(inputs, z, y, 5, l2=1e-2, max_iter=200)
    w, b, iterations = autograd_solve(z, y, 5, l2=1e-2, max_iter=200)
    assert ours.iterations == iterations > 5
    assert torch.equal(ours.weight, w) and torch.equal(ours.bias, b)


def test_fit_logistic_fits_repeated_columns_once_and_solves_the_full_problem():
    """A grey image replicated to RGB repeats every pixel: the fit keeps one copy of each
    (scaled by sqrt(copies)) and must still be the optimum of the problem over all columns."""
    from stages.convex_probe import distinct_columns, fit_logistic

    x, y = blobs(60, 5, dim=6)
    x = x * 0.5 + torch.linspace(-1.0, 1.0, 6)
    full = torch.cat([x, x, x[:, :4]], dim=1)  # columns 0-3 three times, 4-5 twice: [N, 16]
    columns, copies = distinct_columns(full)
    assert columns.tolist() == list(range(6)) and copies.tolist() == [3, 3, 3, 3, 2, 2]
    assert distinct_columns(x)[0] is None  # nothing repeats: the fit is the one it always was
    l2 = 1e-2
    probe = fit_logistic(full, y, 5, l2=l2, whiten=False, max_iter=500)
    assert probe.iterations < 500 and probe.weight.shape == (6, 5)
    # Expand to one weight per column of `full` (each copy gets v / sqrt(k)) and check that it is a
    # stationary point of the full, standardised problem, written out here independently.
    xd = full.double()
    z = (xd - xd.mean(0)) / xd.std(0)  # [N, 16]
    group = [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    w = (probe.weight[group] / copies[group, None].sqrt()).requires_grad_()  # [16, 5]
    b = probe.bias.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(z @ w + b, y) + 0.5 * l2 * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert gw.abs().max() < 1e-6 and gb.abs().max() < 1e-6
    assert torch.allclose(probe(full), (z @ w + b).float(), atol=1e-5)  # the same logits
    # Whitened: the repeats add only null directions, and whitening any column scaling of the same
    # data differs by a rotation, which L2 and L-BFGS from zero do not see: the fit on x predicts alike.
    a = fit_logistic(full, y, 5, l2=l2, whiten=True, max_iter=500)
    c = fit_logistic(x, y, 5, l2=l2, whiten=True, max_iter=500)
    assert torch.allclose(a(full), c(x), atol=1e-4)


def test_lbfgs_probe_stage_chooses_l2_and_whitening_on_the_holdout(tmp_path, monkeypatch):
    params = tiny_params(tmp_path, probe={"num_workers": 0, "batch_size": 32, "train_fraction": 0.5,
                                          "block": "auto", "validation": 20, "l2s": [1e-3, 1e-1],
                                          "whiten": [False, True], "max_iter": 50},
                         outputs={"runs": str(tmp_path / "runs"), "linear_probe": {"metrics": "metrics/linear_probe.json"},
                                  "knn": {"metrics": "metrics/knn.json"}})
    assert params.probe.solver == "lbfgs"  # the default
    make_shards(tmp_path, params, n_train=80, n_test=30)
    save_stand_in_encoder(params, seed=0, depth=2)
    monkeypatch.chdir(tmp_path)
    lp = linear_probe(params)
    settings = [{"l2": l2, "whiten": w} for w in (False, True) for l2 in (1e-3, 1e-1)]
    assert [(r["block"], r["setting"]) for r in lp["holdout"]] == [(b, s) for b in (1, 2) for s in settings]
    best = max(lp["holdout"], key=lambda r: r["top1"])  # ties: the first
    assert (lp["block"], {"l2": lp["l2"], "whiten": lp["whiten"]}) == (best["block"], best["setting"])
    assert lp["solver"] == "lbfgs" and 1 <= lp["iterations"] <= 50 and "lr" not in lp
    assert {"l2": lp["pixels_l2"], "whiten": lp["pixels_whiten"]} in settings and 0.0 <= lp["pixels_top1"] <= 1.0
    # each holdout score is that of a probe fit alone (the stage maps the inputs once per block)
    from stages.convex_probe import fit_logistic
    from stages.probe import probe_data

    data = probe_data(params)
    for row in lp["holdout"]:
        i, s = row["block"] - 1, row["setting"]
        alone = fit_logistic(data.fit[0][i], data.fit[1], data.classes, s["l2"], s["whiten"], 50)
        assert topk_accuracy(alone(data.holdout[0][i]), data.holdout[1])["top1"] == row["top1"]
    # the token grid: whitened fits only (standardised ones on thousands of columns run for minutes)
    assert [(r["block"], r["setting"]) for r in lp["grid_holdout"]] == [
        (b, s) for b in (1, 2) for s in settings if s["whiten"]]
    assert lp["grid_whiten"] is True and lp["grid_feature_dim"] == 64 * 128


def test_choose_prefers_the_block_that_separates_on_the_holdout():
    from stages.probe import ProbeData, choose

    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    signal = torch.nn.functional.one_hot(y, 4).float() * 3 + torch.randn(200, 4, generator=g) * 0.3
    noise = torch.randn(200, 4, generator=g)
    x = torch.stack([noise, signal])  # [L=2, N, D]: block 1 is noise, block 2 separates the classes
    data = ProbeData((x[:, :100], y[:100]), (x[:, 100:], y[100:]), (x, y), (1, 2), 4)
    knn_top1 = lambda i, k: topk_accuracy(knn_scores(data.fit[0][i], data.fit[1], data.holdout[0][i], 4, k, 0.07),  # noqa: E731
                                          data.holdout[1])["top1"]
    (i, k), rows = choose(data, [(0, 5), (1, 5)], knn_top1)
    assert i == 1 and k == 5 and rows[1]["top1"] > 0.9 > rows[0]["top1"]
    no_holdout = ProbeData(data.fit, None, data.eval, (1, 2), 4)
    assert choose(no_holdout, [(0, 5), (1, 5)], knn_top1) == ((0, 5), [])  # nothing to choose on


def test_each_feature_sets_input_map_is_prepared_once(tmp_path, monkeypatch):
    """A whitened token grid's map costs an eigendecomposition: the final fit of the chosen set
    reuses the one its holdout fits made, even when the search has moved on to another set."""
    from stages import probe as stage
    from stages.probe import ProbeData, fit_linear_scored

    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 3
    signal = torch.nn.functional.one_hot(y, 3).float() * 3 + torch.randn(120, 3, generator=g) * 0.3
    x = torch.stack([signal, torch.randn(120, 3, generator=g)])  # [L=2, N, D]: block 1 is the one to choose
    data = ProbeData((x[:, :60], y[:60]), (x[:, 60:], y[60:]), (x, y), (1, 2), 3)
    calls, original = [], stage.prepare

    def counting(features, whiten):
        calls.append((features.data_ptr(), whiten))
        return original(features, whiten)

    monkeypatch.setattr(stage, "prepare", counting)
    params = tiny_params(tmp_path, probe={"l2s": [1e-2, 1.0], "whiten": [False, True], "max_iter": 50})
    m = fit_linear_scored(params, data)
    assert m["block"] == 1 and len(m["holdout"]) == 8
    assert sorted(calls) == sorted({(x[i, :60].data_ptr(), w) for i in (0, 1) for w in (False, True)})


def test_probe_validation_too_large_names_the_key(tmp_path):
    from stages.config import ConfigError
    from stages.probe import probe_data

    params = tiny_params(tmp_path, probe={"num_workers": 0, "train_fraction": 0.5, "validation": 500})
    make_shards(tmp_path, params, n_train=80, n_test=30)
    save_stand_in_encoder(params, seed=0, depth=2)
    with pytest.raises(ConfigError, match=r"probe\.validation=500: must be in \[1, 40\]"):
        probe_data(params)


def test_whitening_with_fewer_images_than_columns_uses_the_gram_matrix():
    """N < D (a token grid): whitening from the N x N Gram matrix gives unit-covariance inputs of
    rank < N and the probe the D x D route would give (its extra directions carry no fit data)."""
    from stages.convex_probe import EIGEN_FLOOR, prepare, solve

    x, y = blobs(10, 3, dim=50)  # [30, 50]: more columns than images
    x = x @ torch.randn(50, 50, generator=torch.Generator().manual_seed(2))
    inputs = prepare(x, whiten=True)
    z = inputs(x)  # [30, r]
    assert inputs.transform.shape[0] == 50 and z.shape[1] <= 29
    assert torch.allclose(torch.cov(z.T), torch.eye(z.shape[1], dtype=torch.float64), atol=1e-8)
    dual = solve(inputs, z, y, 3, l2=1e-2, max_iter=500)
    # the D x D route, written out: eigh of the 50 x 50 covariance, small eigenvalues floored
    xd = x.double()
    eig, vec = torch.linalg.eigh(torch.cov(xd.T))
    t = vec / eig.clamp_min(EIGEN_FLOOR * eig[-1]).sqrt()
    zp = (xd - xd.mean(0)) @ t
    w = torch.zeros(50, 3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-10,
                            tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(zp @ w + b, y) + 0.5e-2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    new = torch.randn(20, 50, generator=torch.Generator().manual_seed(3)) @ torch.randn(50, 50)
    primal = lambda v: ((v.double() - xd.mean(0)) @ t @ w + b).float()  # noqa: E731
    assert torch.allclose(dual(x), primal(x), atol=1e-3)
    assert (dual(new).argmax(1) == primal(new).argmax(1)).float().mean() >= 0.9


def test_pooled_blocks_grid_keeps_every_patch_token_in_place(tmp_path):
    from model.classifier import BeitClassifier

    params = tiny_params(tmp_path)
    model = BeitClassifier.from_pretrained(save_stand_in_encoder(params), num_classes=0, drop_path=0.0).eval()
    size = params.data.image_size
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        grid = model.pooled_blocks(images, (1, 2), pool="grid")  # [2, B, N*D]
        mean = model.pooled_blocks(images, (1, 2))  # [2, B, D]
        last = model.forward_blocks(images, 2)[:, 1:]  # [B, N, D] patch tokens after block 2
    n, d = last.shape[1:]
    assert grid.shape == (2, 3, n * d) and mean.shape == (2, 3, d)
    assert torch.equal(grid[1], last.flatten(1))  # grid order: token i's D numbers at [i*D, (i+1)*D)
    torch.testing.assert_close(grid.view(2, 3, n, d).mean(2), mean)
    with pytest.raises(ValueError, match="pool='cls'"):
        model.pooled_blocks(images, (1,), pool="cls")
    with torch.no_grad():
        both = model.pooled_blocks_by(images, (1, 2), ("mean", "grid"))  # one pass, both pools
    assert torch.equal(both["mean"], mean) and torch.equal(both["grid"], grid)


def test_one_encoder_pass_caches_the_mean_and_grid_features_alike(tmp_path, monkeypatch):
    """With probe.grid, each split's encoder pass fills both caches, and the features are the
    bits a pass for one pool alone gives."""
    import stages.probe as probe_mod
    from stages.probe import cached_features

    params = tiny_params(tmp_path, probe={"num_workers": 0, "batch_size": 16, "block": "auto", "grid": True},
                         outputs={"runs": str(tmp_path / "runs")})
    make_shards(tmp_path, params, n_train=24, n_test=8)
    save_stand_in_encoder(params, seed=0, depth=2)
    split = open_labelled(Path(params.outputs.shards) / "test")
    passes = []
    real = probe_mod.extract_features
    monkeypatch.setattr(probe_mod, "extract_features", lambda *a, **k: passes.append(a[-1]) or real(*a, **k))
    mean, labels, blocks = cached_features(params, split, "test")
    grid, grid_labels, _ = cached_features(params, split, "test", pool="grid")
    assert passes == [("mean", "grid")] and blocks == (1, 2) and torch.equal(labels, grid_labels)
    alone = dataclasses.replace(params, probe=dataclasses.replace(params.probe, grid=False),
                                outputs=dataclasses.replace(params.outputs, runs=str(tmp_path / "alone")))
    assert torch.equal(cached_features(alone, split, "test")[0], mean)
    assert torch.equal(cached_features(alone, split, "test", pool="grid")[0], grid)
    assert passes[1:] == [("mean",), ("grid",)]  # grid off: one pool a pass
