import dataclasses
import json

import pytest
import torch
from PIL import Image

import math

from model.dvae import DVAE, DVAE_112, gumbel_noise, gumbel_softmax, kmeanspp
from model.dvae_train import codebook_usage, evaluate_dvae, perplexity, schedule_at, train_dvae
from model.schema import DVAEConfig, DVAESchedule
from model.tokenizer import load_tokenizer, save_tokenizer
from stages.figures import save_recon_grid

TINY = DVAEConfig(hidden=16)  # default 32 px -> 8x8 x 1024 codes, narrower so CPU tests take seconds


def shapes(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """float [n,3,size,size] in [0,1]: a rectangle and a disc in random colours on a random background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        colours = torch.rand(3, 3, 1, 1, generator=g)
        img = colours[0].expand(3, size, size).clone()
        x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        w, h = torch.randint(size // 4, size // 2, (2,), generator=g).tolist()
        img[:, y0 : y0 + h, x0 : x0 + w] = colours[1]
        cx, cy = torch.randint(size // 4, 3 * size // 4, (2,), generator=g).tolist()
        r = int(torch.randint(size // 8, size // 4, (1,), generator=g))
        img[:, (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colours[2].view(3, 1)
        out[i] = img
    return out


def test_encode_decode_shapes_default_and_112():
    torch.manual_seed(0)
    m = DVAE(DVAEConfig())
    assert DVAEConfig().grid == (8, 8)
    ids = m.encode(torch.rand(2, 3, 32, 32))
    assert ids.dtype == torch.long and ids.shape == (2, 8, 8) and int(ids.max()) < 1024
    img = m.decode(ids)
    assert img.shape == (2, 3, 32, 32) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert DVAE_112.grid == (14, 14) and DVAE_112.widths == [64, 128, 256, 512]
    narrow_112 = DVAE(dataclasses.replace(DVAE_112, hidden=4, vocab_size=64))  # same topology, cheap widths
    assert narrow_112.encode(torch.rand(1, 3, 112, 112)).shape == (1, 14, 14)
    with pytest.raises(ValueError, match=r"float \[B,3,32,32\]"):
        m.encode(torch.rand(2, 3, 28, 28))


def test_loss_backward_reaches_every_parameter():
    torch.manual_seed(0)
    m = DVAE(TINY)
    loss, stats = m.loss(torch.rand(2, 3, 32, 32), temperature=1.0, kl_weight=0.1)
    loss.backward()
    assert set(stats) >= {"loss", "mse", "kl", "codes_in_batch"} and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_gumbel_noise_has_the_gumbel_distribution():
    torch.manual_seed(0)
    g = gumbel_noise(torch.Size([1_000_000]), torch.device("cpu")).double()  # [N]
    assert torch.isfinite(g).all()
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6; sd of the sample mean ~0.0013
    assert abs(float(g.mean()) - 0.5772156649) < 0.006
    assert abs(float(g.var()) - math.pi ** 2 / 6) < 0.02
    # Kolmogorov-Smirnov against the CDF exp(-exp(-x)): the 1% critical value at N = 1e6 is 0.0016
    x, _ = g.sort()
    cdf = torch.exp(-torch.exp(-x))
    n = x.numel()
    ks = max(float((torch.arange(1, n + 1) / n - cdf).max()), float((cdf - torch.arange(n) / n).max()))
    assert ks < 0.0016


def test_gumbel_softmax_samples_the_softmax_and_hard_passes_soft_gradients():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0]).log_softmax(0)  # [4]
    draws = gumbel_softmax(logits.expand(200_000, 4), tau=1.0, hard=True, dim=1)  # [N, 4] one-hot
    assert set(draws.unique().tolist()) == {0.0, 1.0} and torch.equal(draws.sum(1), torch.ones(200_000))
    # Gumbel-max: the argmax of logits + noise is a draw from softmax(logits); sd per share < 0.0012
    assert torch.allclose(draws.mean(0), logits.exp(), atol=0.006)
    soft = gumbel_softmax(logits.expand(8, 4), tau=0.5, dim=1)  # [8, 4]
    assert torch.allclose(soft.sum(1), torch.ones(8)) and (soft > 0).all()
    leaf = torch.zeros(3, 4, requires_grad=True)
    torch.manual_seed(1)
    gumbel_softmax(leaf, tau=1.0, hard=True, dim=1)[:, 0].sum().backward()
    torch.manual_seed(1)
    relaxed = torch.zeros(3, 4, requires_grad=True)
    gumbel_softmax(relaxed, tau=1.0, dim=1)[:, 0].sum().backward()
    assert leaf.grad.abs().sum() > 0 and torch.equal(leaf.grad, relaxed.grad)  # straight-through


def test_schedule_anneals_temperature_and_warms_kl():
    s = DVAESchedule(temp_start=1.0, temp_end=1 / 16, temp_anneal_frac=0.5, kl_weight=0.2, kl_warmup_frac=0.1)
    first, mid, last = schedule_at(s, 0, 1000), schedule_at(s, 250, 1000), schedule_at(s, 999, 1000)
    assert first["temperature"] == 1.0 and first["kl_weight"] == 0.0
    assert 1 / 16 < mid["temperature"] < 1.0 and mid["kl_weight"] == pytest.approx(0.2)
    assert last["temperature"] == pytest.approx(1 / 16) and last["lr"] < first["lr"] * 50


def test_codebook_metrics():
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert codebook_usage(ids, 16) == 0.25
    assert perplexity(ids, 16) == pytest.approx(4.0)
    assert perplexity(torch.zeros(10, dtype=torch.long), 16) == pytest.approx(1.0)


def test_training_reduces_recon_error_and_uses_many_codes(tmp_path):
    torch.manual_seed(0)
    train, held = shapes(64), shapes(64, seed=1)
    m = DVAE(TINY)
    before = evaluate_dvae(m, held)
    seen = []
    history = train_dvae(m, list(train.split(16)), steps=150, schedule=DVAESchedule(lr=3e-3),
                         on_step=lambda step, s: seen.append(step))
    after = evaluate_dvae(m, held)
    assert seen == list(range(150)) and len(history) == 150
    assert history[-1]["temperature"] == pytest.approx(1 / 16)
    # Hard-code (argmax) reconstructions on unseen images, the metric that matters for tokens
    # (observed: 0.079 -> 0.032, 493 codes, perplexity 240; before the codebook fixes in
    # DVAESchedule's defaults: 0.041, 25 codes, perplexity 14).
    assert after["recon_mse"] < 0.5 * before["recon_mse"], (before, after)
    assert after["codebook_usage"] * 1024 >= 200 and after["perplexity"] > 100, after
    path = save_recon_grid(held[:8], m.decode(m.encode(held[:8])), tmp_path / "recon.png", cols=4)
    assert Image.open(path).size == (4 * (4 * 34 + 2), 4 * (4 * 34 + 2))  # enlarged x4 to >= 512 px wide


def test_kmeanspp_seeds_one_code_per_cluster():
    torch.manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)  # [4,8]
    feats = centres.repeat_interleave(50, dim=0)  # [200,8]: 4 tight clusters
    picks = kmeanspp(feats, torch.empty(0, 8), 4)
    assert sorted((picks // 50).tolist()) == [0, 1, 2, 3]
    # Seeded against live codes: new picks avoid the clusters already covered.
    assert set((kmeanspp(feats, centres[:2], 2) // 50).tolist()) == {2, 3}


def test_spent_iterator_is_an_error():
    with pytest.raises(ValueError, match="ran out"):
        train_dvae(DVAE(TINY), iter([torch.rand(2, 3, 32, 32)]), steps=3)


def test_save_load_round_trip_identical_ids(tmp_path):
    torch.manual_seed(0)
    m = DVAE(TINY).eval()
    x = torch.rand(3, 3, 32, 32)
    save_tokenizer(m, TINY, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    assert (tok.kind, tok.input_size, tok.grid, tok.vocab_size) == ("dvae", 32, (8, 8), 1024)
    assert torch.equal(tok.encode(x), m.encode(x))
    assert torch.allclose(tok.decode(m.encode(x)), m.decode(m.encode(x)))
    # Same weights + config -> same fingerprint; different weights -> different one.
    save_tokenizer(m, TINY, tmp_path / "again")
    assert load_tokenizer(tmp_path / "again").fingerprint == tok.fingerprint
    save_tokenizer(DVAE(TINY), TINY, tmp_path / "other")
    assert load_tokenizer(tmp_path / "other").fingerprint != tok.fingerprint
    assert not list((tmp_path / "tok").glob("*.tmp")) and not list((tmp_path / "tok").glob("*.pkl"))


def test_load_rejects_weights_that_do_not_match_config(tmp_path):
    torch.manual_seed(0)
    save_tokenizer(DVAE(TINY), TINY, tmp_path / "a")
    save_tokenizer(DVAE(TINY), TINY, tmp_path / "b")
    (tmp_path / "a" / "encoder.safetensors").write_bytes((tmp_path / "b" / "encoder.safetensors").read_bytes())
    with pytest.raises(ValueError, match="fingerprint mismatch"):
        load_tokenizer(tmp_path / "a")
    meta = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    assert meta["kind"] == "dvae" and meta["config"]["vocab_size"] == 1024
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_recon_floors_on_images_with_known_answers():
    from model.dvae_train import recon_floors

    flat = torch.rand(2, 3, 2, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)  # constant 4x4 cells [2,3,8,8]
    floors = recon_floors([flat], patch=4)
    assert floors["patch_mean_mse"] == pytest.approx(0.0, abs=1e-12) and floors["background_share"] == 0.0
    half = torch.zeros(1, 3, 8, 8)
    half[..., :, 4:] = 1.0  # the right half white, the left half black: 2 of 4 cells background
    floors = recon_floors([half], patch=4)
    assert floors["background_share"] == 0.5 and floors["patch_mean_mse"] == pytest.approx(0.0, abs=1e-12)
    noisy = torch.rand(1, 3, 8, 8)
    floors = recon_floors([noisy], patch=4)
    assert floors["patch_mean_mse"] > 0 and floors["avgpool_mse"] > 0
