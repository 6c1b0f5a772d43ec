import sys

import pytest
import torch
from click.testing import CliRunner

from model.dalle import DalleConfig, DalleDecoder, DalleEncoder
from model.tokenizer import load_tokenizer
from stages.cli import main as beit
from stages.convert_dalle import PickleRefused, load_dalle_pickles

dall_e = pytest.importorskip("dall_e")
from dall_e.utils import map_pixels as ref_map_pixels  # noqa: E402
from dall_e.utils import unmap_pixels as ref_unmap_pixels  # noqa: E402

# Smallest sizes the reference's validators accept, so the test runs in seconds on CPU.
SMALL = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)


def shapes_of(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def pickles(tmp_path_factory):
    """OpenAI-style whole-module pickles with random weights."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("dalle")
    enc = dall_e.Encoder(**SMALL)
    dec = dall_e.Decoder(n_init=32, **SMALL)
    torch.save(enc, d / "encoder.pkl")
    torch.save(dec, d / "decoder.pkl")
    return d, enc, dec


def test_full_size_state_dict_matches_reference_exactly():
    meta = torch.device("meta")  # shapes only: no 50M-parameter allocation
    with meta:
        ours_enc, ours_dec = DalleEncoder(DalleConfig()), DalleDecoder(DalleConfig())
    assert shapes_of(ours_enc) == shapes_of(dall_e.Encoder(device=meta))
    assert shapes_of(ours_dec) == shapes_of(dall_e.Decoder(device=meta))
    assert shapes_of(ours_enc)["blocks.output.conv.w"] == (8192, 2048, 1, 1)


def test_convert_gives_identical_ids_and_pictures(pickles, tmp_path):
    d, enc, dec = pickles
    out = tmp_path / "tok"
    res = CliRunner().invoke(
        beit, ["convert-dalle", str(d / "encoder.pkl"), str(d / "decoder.pkl"), str(out),
               "--trust-pickle", "--image-size", "32"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["decoder.safetensors", "encoder.safetensors", "tokenizer.json"]
    tok = load_tokenizer(out)
    assert (tok.kind, tok.input_size, tok.grid, tok.vocab_size) == ("dalle", 32, (4, 4), 512)

    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_ids = enc(ref_map_pixels(x)).argmax(dim=1)  # [4,4,4]
        ids = tok.encode(x)
        assert ids.dtype == torch.long and ids.shape == (4, 4, 4)
        assert torch.equal(ids, ref_ids)
        one_hot = torch.nn.functional.one_hot(ref_ids, 512).permute(0, 3, 1, 2).float()  # [B,h,w,V] -> [B,V,h,w]
        ref_img = ref_unmap_pixels(torch.sigmoid(dec(one_hot)[:, :3]))
        assert torch.allclose(tok.decode(ids), ref_img, atol=1e-5)


def test_refuses_without_trust_pickle(pickles, tmp_path):
    d, _, _ = pickles
    out = tmp_path / "tok"
    res = CliRunner().invoke(beit, ["convert-dalle", str(d / "encoder.pkl"), str(out)])
    assert res.exit_code != 0
    assert "arbitrary code" in res.output and "--trust-pickle" in res.output
    assert not out.exists()
    with pytest.raises(PickleRefused):
        load_dalle_pickles(d / "encoder.pkl")


def test_conversion_does_not_need_the_dall_e_package(pickles, monkeypatch):
    d, enc, _ = pickles
    for name in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
        monkeypatch.setitem(sys.modules, name, None)  # any import of dall_e now fails
    model, cfg = load_dalle_pickles(d / "encoder.pkl", trust_pickle=True, image_size=32)
    assert (cfg.n_hid, cfg.n_blk_per_group, cfg.vocab_size, cfg.has_decoder) == (64, 1, 512, False)
    ref = enc.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.encoder.state_dict().items())
    with pytest.raises(ValueError, match="no decoder"):
        model.decode(torch.zeros(1, 4, 4, dtype=torch.long))
