"""stages/loop.py: the arithmetic a run records is that of every process that trained it."""
from __future__ import annotations

import torch

from model.engine import Dist, Stepper
from model.schema import OptimConfig
from model.train_state import save_train_state
from stages.config import LoopConfig
from stages.loop import UNRECORDED_AMP, Task, fit, plan_steps

LOOP = LoopConfig(epochs=2, batch_size=4, warmup_epochs=0.5, checkpoint_every=1000, log_every=1)
STEPS_PER_EPOCH = 3


def task() -> Task:
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, 5, generator=g), "y": torch.randn(4, 1, generator=g)} for _ in range(STEPS_PER_EPOCH)]

    def loss(net, batch):
        return torch.nn.functional.mse_loss(net(batch["x"]).float(), batch["y"]), {}

    return Task("toy", ("step", "epoch", "lr", "loss", "img_per_s"), lambda epoch, skip: iter(data[skip:]),
                lambda batch, step, j: batch, loss)


def stepper(amp: str) -> Stepper:
    torch.manual_seed(0)
    s = Stepper(torch.nn.Linear(5, 1), OptimConfig(amp="none", clip_grad=None), Dist())
    s.amp = amp  # what effective_amp chose on "this machine"
    return s


def run(run_dir, amp: str, stop_after=None):
    plan = plan_steps(lambda e: STEPS_PER_EPOCH, LOOP, 12, "toy")
    return fit(task(), stepper(amp), plan, LOOP, run_dir, Dist(), seed=0, stop_after=stop_after)


def test_an_uninterrupted_run_records_its_one_arithmetic(tmp_path):
    assert run(tmp_path / "run", "none").amp == "none"


def test_a_run_resumed_in_other_arithmetic_records_both_in_order(tmp_path):
    """Stopped on a CPU without bf16 kernels (amp: bf16 fell back to none) and resumed on one with
    them: the metrics must not say the whole run was bf16."""
    assert run(tmp_path / "run", "none", stop_after=4).stopped_at == 4
    assert run(tmp_path / "run", "bf16").amp == "none+bf16"
    # rerun, the run resumes from its newest checkpoint (step 4, written by the first process: the
    # last steps are never checkpointed) and retrains the rest: the record follows the weights
    assert run(tmp_path / "run", "none").amp == "none"


def test_the_same_arithmetic_again_is_recorded_once(tmp_path):
    run(tmp_path / "run", "bf16", stop_after=2)
    assert run(tmp_path / "run", "bf16").amp == "bf16"


def test_a_checkpoint_that_predates_the_record_says_unknown(tmp_path):
    """Steps from a checkpoint written before checkpoints carried their arithmetic are not guessed."""
    run_dir = tmp_path / "run"
    run(run_dir, "none", stop_after=2)
    old = stepper("none")
    save_train_state(run_dir, 2, old.model, old.optimizer, old.scaler, {"epoch": 0, "in_epoch": 2, "last": {}})
    assert run(run_dir, "bf16").amp == f"{UNRECORDED_AMP}+bf16"
