"""BEiT MIM model: registry, loss at init, masking semantics, gradients, overfitting."""
from __future__ import annotations

import math

import pytest
import torch

from model.beit import MODELS, BeitConfig, BeitMIM, create_model, model_config

torch.set_num_threads(1)  # the dev box's 2 cores are shared


def batch(cfg: BeitConfig, b: int = 2, seed: int = 0):
    """images [b, C, H, W], mask bool [b, N] (~40% masked, differs per sample), tokens long [b, h, w]."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    n = cfg.num_patches
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(n, generator=g)[: max(1, round(0.4 * n))]] = True
    tokens = torch.randint(0, cfg.vocab_size, (b, *cfg.grid), generator=g)
    return images, mask, tokens


def micro(**overrides) -> BeitMIM:
    torch.manual_seed(0)
    return create_model("micro", **overrides).eval()  # eval: no drop path randomness


EXPECTED_PARAMS_M = {"tiny": 5.5, "small": 21.7, "base": 85.7, "large": 303.3}  # encoder only, in M


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_size_constructs_with_expected_size(name):
    with torch.device("meta"):  # no memory or init time for base/large
        model = create_model(name)
    cfg = model.config
    assert cfg.img_size % cfg.patch_size == 0
    encoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("lm_head", "mask_token")))
    if name in EXPECTED_PARAMS_M:  # within 2% of the ViT sizes (no abs pos emb, shared rel bias)
        assert encoder / 1e6 == pytest.approx(EXPECTED_PARAMS_M[name], rel=0.02)
    assert model.lm_head.out_features == cfg.vocab_size
    assert len(model.blocks) == cfg.depth


@pytest.mark.parametrize("name", ["micro"])
@pytest.mark.parametrize("target", ["tokens", "pixels"])
def test_small_sizes_forward_backward_all_params_get_finite_grads(name, target):
    model = create_model(name, target=target, drop_path=0.1).train()
    images, mask, tokens = batch(model.config)
    loss, metrics = model.forward_loss(images, mask, tokens)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"
    assert int(metrics["num_masked"]) == int(mask.sum())


def test_tiny_forward_shapes():
    # One real-size forward (224 px, 196 patches), no backward: keeps the suite fast.
    model = create_model("tiny", vocab_size=64).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = model.features(images)
    assert out.shape == (1, 1 + 196, 192)


def test_loss_at_init_is_ln_vocab():
    model = micro()
    images, mask, tokens = batch(model.config, b=8)
    with torch.no_grad():
        loss, metrics = model.forward_loss(images, mask, tokens)
    assert model.config.vocab_size == 1024
    assert abs(loss.item() - math.log(1024)) < 0.2
    assert 0.0 <= metrics["acc"].item() <= 1.0


def test_unmasked_targets_do_not_affect_loss():
    model = micro()
    images, mask, tokens = batch(model.config)
    changed = tokens.clone()
    visible = ~mask.reshape(tokens.shape)  # [b, h, w]
    changed[visible] = (changed[visible] + 17) % model.config.vocab_size
    with torch.no_grad():
        a, _ = model.forward_loss(images, mask, tokens)
        b, _ = model.forward_loss(images, mask, changed)
        changed[~visible] = (changed[~visible] + 17) % model.config.vocab_size
        c, _ = model.forward_loss(images, mask, changed)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # masked targets do matter


def test_masked_pixels_cannot_influence_the_encoder():
    model = micro()
    cfg = model.config
    images, mask, _ = batch(cfg)
    p, (h, w) = cfg.patch_size, cfg.grid
    pix_mask = mask.reshape(-1, 1, h, 1, w, 1).expand(-1, cfg.in_chans, h, p, w, p)
    pix_mask = pix_mask.reshape(images.shape)  # [b, C, H, W]: True inside masked patches
    noisy = torch.where(pix_mask, torch.randn_like(images) * 100, images)
    with torch.no_grad():
        a = model.forward_encoder(images, mask)
        b = model.forward_encoder(noisy, mask)
        c = model.forward_encoder(noisy, None)
        nan = model.forward_encoder(torch.where(pix_mask, torch.nan, images), mask)
    assert torch.equal(a, b)
    assert torch.equal(a, nan)  # replaced, not multiplied by zero
    assert not torch.allclose(a, c)  # without the mask those pixels do matter


def test_mask_token_is_used():
    model = micro()
    images, mask, _ = batch(model.config)
    with torch.no_grad():
        a = model.forward_encoder(images, mask)
        model.mask_token.add_(1.0)
        b = model.forward_encoder(images, mask)
        model.mask_token.sub_(1.0)
        d = model.forward_encoder(images, None)
        model.mask_token.add_(1.0)
        e = model.forward_encoder(images, None)
    assert not torch.allclose(a, b)
    assert torch.equal(d, e)  # no mask: the token plays no part


def test_mask_accepts_grid_shape_and_rejects_empty_or_wrong_shapes():
    model = micro()
    cfg = model.config
    images, mask, tokens = batch(cfg)
    with torch.no_grad():
        flat, _ = model.forward_loss(images, mask, tokens)
        grid, _ = model.forward_loss(images, mask.reshape(2, *cfg.grid), tokens)
    assert torch.equal(flat, grid)
    with pytest.raises(ValueError, match="no masked positions"):
        model.forward_loss(images, torch.zeros_like(mask), tokens)
    with pytest.raises(ValueError, match="mask shape"):
        model.forward_encoder(images, mask[:, :-1])
    with pytest.raises(ValueError, match="targets shape"):
        model.forward_loss(images, mask, tokens.reshape(2, -1))


def test_tiny_batch_overfits():
    torch.manual_seed(0)
    model = create_model("micro").train()
    images, mask, tokens = batch(model.config, b=4, seed=1)
    mask = mask[:1].expand(4, -1)  # fixed mask, shared by the batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss, metrics = model.forward_loss(images, mask, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    assert metrics["acc"].item() > 0.9


def test_pixel_target_regresses_normalised_patches():
    torch.manual_seed(0)
    model = create_model("micro", target="pixels").train()
    cfg = model.config
    assert model.lm_head.out_features == cfg.patch_size ** 2 * cfg.in_chans  # 48
    images, mask, _ = batch(cfg, b=4)
    # Targets are per-patch normalised and masked pixels never reach the
    # encoder, so a brightness/contrast change of the masked patches alone
    # leaves the loss unchanged; changing their content does not.
    p, (h, w) = cfg.patch_size, cfg.grid
    pix_mask = mask.reshape(-1, 1, h, 1, w, 1).expand(-1, cfg.in_chans, h, p, w, p).reshape(images.shape)
    with torch.no_grad():
        a, _ = model.forward_loss(images, mask, None)
        b, _ = model.forward_loss(torch.where(pix_mask, images * 3.0 + 1.0, images), mask, None)
        c, _ = model.forward_loss(torch.where(pix_mask, images.flip(-1), images), mask, None)
    assert a.item() == pytest.approx(1.0, abs=0.1)  # unit-variance targets, ~0 predictions
    assert b.item() == pytest.approx(a.item(), rel=1e-4)
    assert c.item() != pytest.approx(a.item(), rel=1e-4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(40):
        loss, _ = model.forward_loss(images, mask[:1].expand(4, -1), None)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_patchify_order():
    model = micro()
    p = model.config.patch_size
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    patches = model.patchify(images)  # [2, 64, 48]
    assert patches.shape == (2, 64, p * p * 3)
    # patch (row 1, col 2) of image 1, pixel (0, 1), channel 2
    assert patches[1, 1 * 8 + 2, (0 * p + 1) * 3 + 2] == images[1, 2, 1 * p + 0, 2 * p + 1]


def test_no_weight_decay_names_exist():
    model = micro()
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    assert {"cls_token", "pos_embed"} <= model.no_weight_decay()
    assert "mask_token" not in model.no_weight_decay()  # decayed, as in unilm


def test_registry_overrides_and_errors():
    cfg = model_config("micro", vocab_size=512, target="pixels")
    assert cfg.vocab_size == 512 and cfg.target == "pixels" and cfg.embed_dim == 128
    assert MODELS["micro"].vocab_size == 1024  # registry entry untouched (frozen)
    assert MODELS["large"].layer_scale_init == 1e-5 and MODELS["base"].layer_scale_init == 0.1
    assert MODELS["micro"].grid == (8, 8) and MODELS["base"].grid == (14, 14)
    with pytest.raises(ValueError, match="model='huge'"):
        create_model("huge")
    with pytest.raises(ValueError, match="unknown model override 'depht'"):
        create_model("micro", depht=3)
    with pytest.raises(ValueError, match="num_heads=5"):
        model_config("micro", num_heads=5)
    with pytest.raises(ValueError, match="img_size=30"):
        model_config("micro", img_size=30)
    with pytest.raises(ValueError, match="target='logits'"):
        model_config("micro", target="logits")


def test_init_rescales_residual_projections():
    torch.manual_seed(0)
    model = create_model("base", depth=4, vocab_size=16)  # same widths, fewer blocks
    # unilm truncates at +-1 std: a normal cut there has std 0.5376 of the uncut one
    cut = 0.5376
    stds = [blk.mlp.fc2.weight.std().item() for blk in model.blocks]
    for i, s in enumerate(stds):
        assert s == pytest.approx(cut * 0.02 / math.sqrt(2 * (i + 1)), rel=0.05)
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max().item() <= 0.02 and qkv.std().item() == pytest.approx(cut * 0.02, rel=0.05)
    assert model.mask_token.abs().max().item() <= 0.02
    assert model.blocks[0].gamma_1.eq(0.1).all()


@pytest.mark.parametrize("per_layer", [True, False])
def test_timm_export_loads_and_matches_features(per_layer):
    from timm.models.beit import Beit

    from model.beit import timm_export

    model = micro()
    with torch.no_grad():
        model.rel_pos_bias.relative_position_bias_table.normal_()  # make the bias matter
    sd, kwargs = timm_export(model, per_layer_rel_pos=per_layer)
    assert kwargs["global_pool"] == "avg"
    missing, unexpected = Beit(**kwargs, num_classes=10).load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    # Compare token features through the pretrained final norm: build timm with
    # a plain final norm instead of mean pooling + fc_norm.
    kwargs.update(global_pool="token", use_fc_norm=False)
    timm_model = Beit(**kwargs, num_classes=10).eval()
    missing, unexpected = timm_model.load_state_dict(sd, strict=False)
    assert not unexpected
    assert set(missing) <= {"head.weight", "head.bias", "norm.weight", "norm.bias"}
    timm_model.norm.load_state_dict(model.norm.state_dict())  # compare the same final norm
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(timm_model.forward_features(images), model.features(images), atol=1e-5)
