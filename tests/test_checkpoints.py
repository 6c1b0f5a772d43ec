"""safetensors + JSON checkpoints: round trip, atomic replace, refusing pickles."""
from __future__ import annotations

import pickle

import pytest
import torch

from model.beit import create_model, model_config
from model.checkpoints import CONFIG, WEIGHTS, load_checkpoint, save_checkpoint


def test_round_trip_model(tmp_path):
    torch.manual_seed(0)
    model = create_model("micro", depth=2)
    cfg = {"name": "micro", "overrides": {"depth": 2}, "step": 7}
    out = save_checkpoint(tmp_path / "ckpt", model.state_dict(), cfg)
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS, CONFIG])
    state, loaded_cfg = load_checkpoint(out)
    assert loaded_cfg == cfg
    fresh = create_model("micro", depth=2)
    fresh.load_state_dict(state)  # strict: same keys, same shapes
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_shared_views_dtypes_and_empty(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    sd = {
        "a": base, "tied": base, "view": base[2:5], "t": base.reshape(3, 4).t(),
        "half": torch.ones(2, dtype=torch.bfloat16), "long": torch.tensor([1, 2]),
        "empty": torch.zeros(0), "empty2": torch.zeros(0, 3),
    }
    save_checkpoint(tmp_path / "c", sd, {})
    state, _ = load_checkpoint(tmp_path / "c")
    for k, v in sd.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k


def test_replace_is_clean_and_leaves_no_temp(tmp_path):
    save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, {"v": 1})
    save_checkpoint(tmp_path / "c", {"w": torch.ones(3)}, {"v": 2})
    state, cfg = load_checkpoint(tmp_path / "c")
    assert cfg == {"v": 2} and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no .tmp-/.old- left over


def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "c", {"w": torch.zeros(2)}, {"v": 1})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "c", {"w": torch.ones(2)}, {"bad": float("nan")})
    with pytest.raises(TypeError, match=r"state_dict\['x'\]"):
        save_checkpoint(tmp_path / "c", {"x": [1, 2]}, {})
    state, cfg = load_checkpoint(tmp_path / "c")
    assert cfg == {"v": 1} and torch.equal(state["w"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_refuses_to_clobber_unrelated_directory(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes.txt"):
        save_checkpoint(tmp_path / "c", {"w": torch.zeros(1)}, {})
    assert (tmp_path / "c" / "notes.txt").read_text() == "keep me"


def test_refuses_pickles(tmp_path):
    evil = tmp_path / "encoder.pkl"
    evil.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match="refusing to load a pickle"):
        load_checkpoint(evil)
    d = tmp_path / "old"
    d.mkdir()
    torch.save({"w": torch.zeros(1)}, d / "model.pt")
    with pytest.raises(ValueError, match="model.pt.*refusing"):
        load_checkpoint(d)
    # A pickle renamed to model.safetensors is rejected by the parser, not run.
    (d / WEIGHTS).write_bytes(pickle.dumps({"w": 1}))
    (d / CONFIG).write_text("{}")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_checkpoint(d)


def test_missing_pieces_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope")
    save_checkpoint(tmp_path / "c", {"w": torch.zeros(1)}, {})
    (tmp_path / "c" / CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG):
        load_checkpoint(tmp_path / "c")


def test_config_dataclass_round_trips_via_asdict(tmp_path):
    import dataclasses

    cfg = model_config("micro", vocab_size=256)
    save_checkpoint(tmp_path / "c", {"w": torch.zeros(1)}, {"model": dataclasses.asdict(cfg)})
    _, loaded = load_checkpoint(tmp_path / "c")
    assert type(cfg)(**loaded["model"]) == cfg
