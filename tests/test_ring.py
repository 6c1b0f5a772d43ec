"""The loader's batch ring (pipeline/ring.py): workers reuse shared buffers, and what the
consumer gets is still its own copy of every batch, the same bits as in-process."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from helpers import mim_world
from pipeline.masking import MaskGenerator
from pipeline.mim import MIMDataset
from pipeline.ring import BatchRing, RingMemoryError, Slot
from pipeline.schema import LoaderConfig, MaskingConfig
from pipeline.stream import batches

SPEC = {"x": ((4, 2), torch.float32), "y": ((4,), torch.int64)}


def test_a_worker_waits_for_the_slot_the_consumer_has_not_copied():
    ring = BatchRing(SPEC, workers=1, slots=2)
    first, out = ring.acquire(0)
    out["x"].fill_(1.0)
    second, _ = ring.acquire(0)
    assert (first, second) == (Slot(0, 0), Slot(0, 1))
    got = []
    waiter = threading.Thread(target=lambda: got.append(ring.acquire(0)[0]))
    waiter.start()
    time.sleep(0.3)
    assert not got  # both slots are written and not yet taken
    batch = ring.take(first)
    waiter.join(timeout=5)
    assert got == [Slot(0, 0)]  # slot 0 again, now that its batch was copied out
    ring.buffers["x"][0, 0].fill_(7.0)  # the worker overwrites it ...
    assert torch.equal(batch["x"], torch.ones(4, 2))  # ... and the taken batch is its own copy


def test_close_lets_a_waiting_worker_go_on():
    ring = BatchRing(SPEC, workers=1, slots=1)
    ring.acquire(0)
    done = threading.Event()
    threading.Thread(target=lambda: (ring.acquire(0), done.set())).start()
    assert not done.wait(0.2)
    ring.close()
    assert done.wait(5)


def test_a_ring_larger_than_shared_memory_says_what_to_do(monkeypatch):
    def full(self):
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device (28)")

    monkeypatch.setattr(torch.Tensor, "share_memory_", full)
    with pytest.raises(RingMemoryError, match=r"/dev/shm.*--shm-size.*num_workers"):
        BatchRing(SPEC, workers=8, slots=3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return mim_world(tmp_path_factory.mktemp("ring"))


def test_ring_batches_equal_in_process_batches_and_survive_an_abandoned_epoch(world):
    _, params, split = world
    cfg, bs = LoaderConfig(num_workers=0, shuffle_buffer=50), 8
    masks = MaskGenerator((8, 8), MaskingConfig(kind="block", mask_ratio=0.4))
    one = dataclasses.replace(cfg, num_workers=1)
    for epoch in (0, 1):
        want = list(batches(MIMDataset(split, cfg, 32, masks, params.seed), bs, 0, epoch))
        data = MIMDataset(split, one, 32, masks, params.seed)
        # kept all at once: more batches than the ring has slots, each still intact
        got = list(batches(data, bs, 1, epoch))
        plain = list(batches(data, bs, 1, epoch, ring=False))
        assert len(got) == len(plain) == len(want) > 3  # > 3: the ring holds 3 per worker
        for g, p, w in zip(got, plain, want):
            assert list(g) == list(w) == list(p)
            assert all(torch.equal(g[k], w[k]) and torch.equal(p[k], w[k]) for k in w)
        resumed = list(batches(data, bs, 1, epoch, skip=2))
        assert len(resumed) == len(want) - 2
        assert all(torch.equal(r[k], w[k]) for r, w in zip(resumed, want[2:]) for k in w)
        start = time.monotonic()
        it = batches(data, bs, 1, epoch)
        next(it)
        it.close()  # a consumer that stops early: the worker is not left waiting for a slot
        assert time.monotonic() - start < 4.0
        assert data.ring is None
