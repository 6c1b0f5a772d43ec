"""Training checkpoints: exact round trip of model, optimizer and RNGs; atomicity."""
import random

import numpy as np
import torch

from model.train_state import latest_checkpoint, load_train_state, save_train_state


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "weight_decay": 0.0},
                             {"params": model[2].parameters(), "weight_decay": 0.05}], lr=1e-2)
    return model, opt


def steps(model, opt, n):
    for _ in range(n):
        x = torch.randn(16, 4)
        loss = torch.nn.functional.dropout(model(x), 0.1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_resume_equals_uninterrupted(tmp_path):
    model, opt = make()
    steps(model, opt, 3)
    save_train_state(tmp_path, 3, model, opt, extra={"epoch": 0, "batch": 3})
    np_draw, py_draw = np.random.rand(), random.random()
    steps(model, opt, 3)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2 = make()  # fresh process stand-in: different params, empty optimizer
    state = load_train_state(latest_checkpoint(tmp_path), model2, opt2)
    assert state["step"] == 3 and state["extra"] == {"epoch": 0, "batch": 3}
    assert np.random.rand() == np_draw and random.random() == py_draw
    steps(model2, opt2, 3)
    for k, v in model2.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


def test_incomplete_checkpoint_is_invisible_and_old_ones_pruned(tmp_path):
    model, opt = make()
    for step in (1, 2, 3):
        save_train_state(tmp_path, step, model, opt, keep=2)
    (tmp_path / ".tmp-step-00000004").mkdir()  # a run killed mid-save
    (tmp_path / "step-00000005").mkdir()  # no state.json: not complete
    assert latest_checkpoint(tmp_path).name == "step-00000003"
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003", "step-00000005"]
