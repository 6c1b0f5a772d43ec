"""A ring of batch buffers in shared memory that DataLoader workers fill and reuse.

    main: BatchRing(spec, workers, slots) -> DataLoader workers (fork or spawn carry it)
    worker: slot, out = ring.acquire(worker)  -> fill `out` in place -> yield slot (two ints)
    main:   batch = ring.take(slot)           -> private copies; the slot is free again

Why not let the DataLoader ship the worker's tensors: each batch then lives in fresh shared
memory (a new segment per tensor, every page faulted and zeroed in the worker, its fd passed to
the main process and mapped there). At 28 px that is ~4 faults and ~15-25 us of system time per
image in the worker; reusing the buffers took the 1-worker loader from 232 to 190 us/img, the
in-process speed (186), in an interleaved 6-round run (bench/README.md, "A ring of batch
buffers"). The main process pays one memcpy per batch instead, on its own core.

Flow control: a worker may fill slot k only after the main process has copied what it last
wrote there. One counting semaphore per worker (initially `slots`) says how many of its slots are
free; a worker writes its slots in order and the main process takes each worker's batches in the
order they were written, so the count alone names the free slot. The semaphore's futex is also
the memory barrier between the main process's copy and the worker's next write.
"""
from __future__ import annotations

import math
import multiprocessing
import os
from typing import NamedTuple

import torch

class RingMemoryError(RuntimeError):
    """The ring's shared buffers do not fit in /dev/shm."""


Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]  # buffer name -> (shape of one batch, dtype)


class Slot(NamedTuple):
    """What a worker yields instead of a batch: which of the ring's buffers holds it."""

    worker: int
    index: int


class BatchRing:
    """`slots` batch buffers per worker, each batch a dict of tensors shaped by `spec`."""

    def __init__(self, spec: Spec, workers: int, slots: int):
        if workers < 1 or slots < 1:
            raise ValueError(f"a ring needs workers >= 1 and slots >= 1, not {workers} and {slots}")
        # [W, K, *shape] per name: one segment per name for the whole ring, mapped once per process
        self.buffers = {}
        for name, (shape, dtype) in spec.items():
            buf = torch.empty((workers, slots, *shape), dtype=dtype)
            try:
                self.buffers[name] = buf.share_memory_()
            except RuntimeError as err:  # /dev/shm too small (a container's default is 64 MB)
                need = sum(torch.empty(0, dtype=d).element_size() * math.prod(s) for s, d in spec.values())
                raise RingMemoryError(
                    f"shared memory (/dev/shm) cannot hold the loader's batch ring: {workers} workers x "
                    f"{slots} batches x {need / 2**20:.0f} MiB; give the container more (docker run "
                    f"--shm-size), or lower the loader's num_workers or the batch size ({err})") from None
        self.slots = slots
        self._free = [multiprocessing.Semaphore(slots) for _ in range(workers)]
        self._owner = os.getpid()  # the consumer: a worker stops waiting when it is gone
        self._closed = multiprocessing.Event()
        self._written = 0  # per process: the next slot this worker fills is _written % slots

    def acquire(self, worker: int) -> tuple[Slot, dict[str, torch.Tensor]]:
        """(slot, its tensors) for the worker to fill; waits until the consumer copied it out
        (or stopped reading: `close`)."""
        while not self._free[worker].acquire(timeout=0.05):
            if self._closed.is_set():
                break  # the consumer stopped: what is written now is never read
            if os.getpid() != self._owner and os.getppid() != self._owner:
                raise SystemExit(0)  # the main process died: nobody will free the slot
        slot = Slot(worker, self._written % self.slots)
        self._written += 1
        return slot, {name: buf[slot.worker, slot.index] for name, buf in self.buffers.items()}

    def take(self, slot: Slot, pin: bool = False) -> dict[str, torch.Tensor]:
        """The batch in `slot` as tensors of its own (pinned for a GPU copy with `pin`)."""
        batch = {name: buf[slot.worker, slot.index] for name, buf in self.buffers.items()}
        batch = {name: t.pin_memory() if pin else t.clone() for name, t in batch.items()}
        self.release(slot)
        return batch

    def release(self, slot: Slot) -> None:
        """Free `slot` without copying it (a skipped batch)."""
        self._free[slot.worker].release()

    def close(self) -> None:
        """The consumer reads no more: a worker waiting for a slot goes on, so the DataLoader
        can shut it down at once instead of after its 5 s join timeout."""
        self._closed.set()
