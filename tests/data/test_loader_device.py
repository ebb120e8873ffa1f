"""Delivery to the device: buffer lifetimes (on CPU), and the CUDA path where there is one."""

import threading
import time

import pytest
import torch
from test_loader_workers import batches, cfg, same  # a sibling test module

from zentrain.config import ConfigError
from zentrain.data import build_loader
from zentrain.data.device import BufferRing, torch_dtype
from zentrain.data.workers import WorkerPool

pytestmark = pytest.mark.slow


class ThreadFence:
    """A fence another thread completes (as a GPU completes a CUDA event)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.waited = False

    def synchronize(self) -> None:
        self.waited = True
        assert self.done.wait(timeout=30), "the fence never completed"


def test_a_buffer_is_not_handed_out_before_its_last_copy_completed():
    made = []
    ring = BufferRing(lambda: made.append(torch.zeros(4)) or {"x": made[-1]}, 2)
    i0, b0 = ring.acquire()
    copying = ThreadFence()
    ring.release(i0, copying)  # an asynchronous copy is still reading buffer 0
    i1, b1 = ring.acquire()
    ring.release(i1, None)  # buffer 1: its copy is done
    assert (i0, i1) == (0, 1) and b0["x"] is not b1["x"]
    got = []
    taker = threading.Thread(target=lambda: got.append(ring.acquire()))
    taker.start()
    time.sleep(0.3)
    assert got == [] and copying.waited  # waiting for the copy, not handing buffer 0 out
    copying.done.set()
    taker.join(timeout=30)
    assert got and got[0][0] == 0 and got[0][1]["x"] is b0["x"]
    assert ring.acquire()[0] == 1  # in turn; buffer 1 was free
    assert ring.nbytes == 2 * 4 * 4


def test_slots_are_copied_into_the_callers_buffers_before_they_are_reused():
    """prefetch 2 with 1 worker: slots are refilled as soon as they are freed, so a batch
    taken from a slot after its release would show the next step's samples."""
    c = cfg(1, prefetch=2)
    ref = batches(build_loader(cfg(0), 0, 2, True), 12)
    ld = build_loader(c, 0, 2, True)
    pool = WorkerPool([s.recipe for s in ld.sources], ld._spec(), ld.planner.state_at(0),
                      ld.layout, 1, 2, stall_timeout_s=30.0)
    rows = ld.global_batch_size // ld.world
    ring = BufferRing(lambda: {k: torch.empty(rows, *shape, dtype=torch_dtype(dt))
                               for k, (shape, dt) in ld.layout.items()}, 2)
    got = []
    try:
        for s in range(12):
            i, buf = ring.acquire()
            res = pool.get(s, out=buf)
            assert all(res.batch[k].data_ptr() == buf[k].data_ptr() for k in buf)
            time.sleep(0.02)  # let the worker refill the freed slot meanwhile
            got.append({k: v.clone() for k, v in res.batch.items()})
            ring.release(i, None)
    finally:
        pool.close()
    assert same(got, ref)


def test_cpu_delivery_is_unchanged():
    ref = batches(build_loader(cfg(0), 0, 2, True), 6)
    ld = build_loader(cfg(2), 0, 2, True)
    ld.set_device("cpu")
    ld.warm_up()
    try:
        got = batches(ld, 6)
        assert same(got, ref) and all(t.device.type == "cpu" for b in got for t in b.values())
        assert ld._stager is None
    finally:
        ld.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_delivery_without_cuda_is_a_one_line_error():
    ld = build_loader(cfg(0), 0, 2, True)
    with pytest.raises(ConfigError, match=r"cannot deliver batches on cuda: CUDA is not "):
        ld.set_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("workers", [0, 2])
def test_cuda_batches_equal_the_cpu_batches(workers):
    ref = batches(build_loader(cfg(0), 0, 2, True), 12)
    ld = build_loader(cfg(workers), 0, 2, True)
    ld.set_device("cuda")
    try:
        got = []
        for s in range(12):
            b = ld.train_batch(s, 0)
            assert all(t.is_cuda for t in b.values())
            # Compute on the current stream right away: it must see the copied batch.
            got.append({k: (v * 1).cpu() for k, v in b.items()})
        assert same(got, ref)
        assert ld.memory_bytes() > 0
    finally:
        ld.close()
