"""Pretrain stage: end to end on the tiny fixture, resume equivalence, fingerprinted
run dirs, and DDP (gloo, 2 processes) equal to one process on the same global batch."""
import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from helpers import fake_tokens, make_shards, tiny_params
from model.engine import effective_amp
from stages.pretrain import pretrain, run_fingerprint


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    params = tiny_params(tmp)
    make_shards(tmp, params, n_train=120, n_test=40)
    for split in ("train", "test"):
        fake_tokens(params, split)
    return tmp, params


def with_paths(params, root):
    """`params` with every pretrain output under `root`."""
    record = type(params.outputs.pretrain)(str(root / "model"), str(root / "m.json"), str(root / "c.tsv"),
                                           str(root / "c.png"))
    return dataclasses.replace(params, outputs=dataclasses.replace(
        params.outputs, runs=str(root / "runs"), pretrain=record))


def weights(root):
    return load_file(root / "model" / "model.safetensors")


def test_end_to_end_writes_model_metrics_and_curves(world):
    tmp, params = world
    p = with_paths(params, tmp / "e2e")
    metrics = pretrain(p)
    assert metrics["steps"] == 2 * (120 // 16)
    saved = json.loads((tmp / "e2e/m.json").read_text())
    assert set(saved) >= {"train_loss", "train_acc", "eval_loss", "eval_acc", "img_per_s"}
    # the arithmetic the steps really ran in: `amp` as configured, or "none" where bf16 fell back
    assert saved["amp"] == effective_amp(p.pretrain.optim.amp, torch.device("cpu"))
    assert 0.0 <= saved["eval_acc_foreground"] <= 1.0 and 0.0 < saved["eval_foreground_share"] <= 1.0
    # fake tokens have 64 levels: loss starts near ln(64) and must have moved down
    rows = (tmp / "e2e/c.tsv").read_text().splitlines()
    first = float(rows[1].split("\t")[3])
    assert abs(first - torch.log(torch.tensor(64.0)).item()) < 1.0
    assert saved["train_loss"] < first
    assert (tmp / "e2e/c.png").stat().st_size > 1000
    config = json.loads((tmp / "e2e/model/config.json").read_text())
    assert config["vocab_size"] == 64 and config["model"] == "micro"


def test_resume_after_interruption_equals_uninterrupted(world):
    tmp, params = world
    full = with_paths(params, tmp / "full")
    pretrain(full)
    cut = with_paths(params, tmp / "cut")
    assert pretrain(cut, stop_after=5) == {"stopped_at": 5}  # preempted mid-epoch 0
    assert not (tmp / "cut/model").exists()  # no final model from an unfinished run
    pretrain(cut)  # resumes from step 5 (model, optimizer, RNG, data position)
    a, b = weights(tmp / "full"), weights(tmp / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # the curve has each step once, no duplicates from the replayed part
    steps = [int(r.split("\t")[0]) for r in (tmp / "cut/c.tsv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == 14


def test_changed_param_never_resumes_an_old_run(world):
    tmp, params = world
    base = with_paths(params, tmp / "fp")
    pretrain(base, stop_after=3)
    changed = dataclasses.replace(base, mask_ratio=0.5)
    assert run_fingerprint(changed, {}) != run_fingerprint(base, {})
    assert run_fingerprint(with_paths(base, tmp / "elsewhere"), {}) == run_fingerprint(base, {})
    pretrain(changed, stop_after=1)
    assert len(list((tmp / "fp/runs").iterdir())) == 2  # two runs side by side


# ------------------------------------------------------------------ DDP (gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world: int, port: int, out: str, steps: int = 3) -> None:
    """Each rank trains on its slice of the same global batches (accumulation 2)."""
    from model.beit import create_model
    from model.engine import Stepper, setup_distributed, teardown_distributed
    from model.schema import OptimConfig

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = setup_distributed("cpu")
    torch.manual_seed(0)
    model = create_model("micro", vocab_size=32, drop_path=0.0, depth=2)
    stepper = Stepper(model, OptimConfig(lr=1e-3, clip_grad=1.0), env)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        images = torch.randn(8, 3, 32, 32, generator=g)
        tokens = torch.randint(0, 32, (8, 8, 8), generator=g)
        mask = torch.rand(8, 64, generator=g) < 0.4
        mine = slice(rank * 8 // world, (rank + 1) * 8 // world)  # this rank's share
        batch = {"image": images[mine], "tokens": tokens[mine], "mask": mask[mine]}
        # two micro-batches per step
        n = batch["image"].shape[0] // 2
        micro = [{k: v[:n] for k, v in batch.items()}, {k: v[n:] for k, v in batch.items()}]

        def loss_fn(net, b):
            # token-level mean over the global batch = mean of per-rank means here,
            # because every rank sees the same number of masked tokens per micro-batch
            loss, m = net(b["image"], b["mask"], b["tokens"])
            return loss, {}
        stepper.step(micro, loss_fn)
    if rank == 0:
        torch.save(stepper.model.state_dict(), out)
    teardown_distributed()


def test_ddp_two_processes_equal_one_on_the_same_global_batch(tmp_path, monkeypatch):
    # Equal masked counts per micro-batch make per-rank mean losses average to the global mean.
    orig = torch.rand

    def fixed_rand(*shape, generator=None, **kw):
        x = orig(*shape, generator=generator, **kw)
        if shape == (8, 64):
            x = torch.sort(x, dim=1).indices.float() / 64  # exactly 26 masked per row
        return x
    monkeypatch.setattr(torch, "rand", fixed_rand)
    _train(0, 1, _free_port(), str(tmp_path / "one.pt"))
    monkeypatch.undo()
    mp.spawn(_ddp_entry, args=(2, _free_port(), str(tmp_path / "two.pt")), nprocs=2, join=True)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)


def _ddp_entry(rank, world, port, out):
    orig = torch.rand

    def fixed_rand(*shape, generator=None, **kw):
        x = orig(*shape, generator=generator, **kw)
        if shape == (8, 64):
            x = torch.sort(x, dim=1).indices.float() / 64
        return x
    torch.rand = fixed_rand
    _train(rank, world, port, out)


def test_rerun_of_a_finished_run_reports_the_same_metrics(world):
    """Resumed at the last step (its checkpoint exists), nothing is left to train: the
    metrics still report the logged last step, not a null train loss."""
    tmp, params = world
    p = with_paths(params, tmp / "again")
    p = dataclasses.replace(p, pretrain=dataclasses.replace(
        p.pretrain, loop=dataclasses.replace(p.pretrain.loop, checkpoint_every=7)))  # 14 steps: one at the end
    first = pretrain(p)
    again = pretrain(p)
    assert again["train_loss"] is not None
    for key in ("train_loss", "train_acc", "eval_loss", "eval_acc", "steps"):
        assert again[key] == pytest.approx(first[key], rel=1e-6), key
