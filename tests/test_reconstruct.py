"""model/reconstruct.py: un-normalising regressed pixels, filling predicted tokens, the masked view."""
import torch

from model.beit import create_model
from model.reconstruct import masked_input, predicted_pixels, predicted_tokens, unpatchify


def test_unpatchify_inverts_patchify():
    model = create_model("micro", img_size=16)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(unpatchify(model.patchify(x), 4, 3, (4, 4)), x)


def test_a_perfect_norm_pix_prediction_gives_the_image_back(monkeypatch):
    model = create_model("micro", img_size=16, target="pixels").eval()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :5] = mask[1, 7:] = True

    def perfect(images, m):  # what the norm_pix loss rewards most: each patch normalised by itself
        p = model.patchify(images)[m]
        return (p - p.mean(-1, keepdim=True)) / (p.var(-1, keepdim=True) + 1e-6).sqrt()

    monkeypatch.setattr(model, "predict", perfect)
    assert torch.allclose(predicted_pixels(model, x, mask), x, atol=1e-4)


def test_predicted_tokens_only_replace_masked_positions():
    torch.manual_seed(0)
    model = create_model("micro", img_size=16, vocab_size=50).eval()
    true = torch.full((2, 4, 4), 99)  # outside the vocabulary: any prediction differs
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 3] = mask[1, 10:12] = True
    ids = predicted_tokens(model, torch.randn(2, 3, 16, 16), mask, true)
    changed = (ids != 99).reshape(2, 16)
    assert torch.equal(changed, mask) and int(ids.reshape(2, 16)[mask].max()) < 50


def test_masked_input_paints_whole_patches():
    img = torch.zeros(1, 3, 8, 8)
    out = masked_input(img, torch.tensor([[False, True, False, False]]), patch=4, fill=0.5)
    assert (out[0, :, :4, 4:] == 0.5).all() and out[0, :, :4, :4].eq(0).all() and out[0, :, 4:].eq(0).all()
