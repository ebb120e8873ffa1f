"""``SyncStats.exposed_s`` is the time until the synced gradients are ready.

On CPU the collectives block the host, so host time is right. On CUDA the host only
queues work (NCCL's ``wait()`` does not block it), so ``finish`` must measure on the
device; the CUDA test runs only where a GPU is present.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from zentrain.sync.base import GradSync


class _Busy(GradSync):
    """A scheme whose sync is ``work()``: whatever the test queues."""

    name = "busy"

    def __init__(self, work) -> None:
        super().__init__(None)
        self.work = work

    def _finish(self):
        self.work()
        return {}


def test_cpu_exposed_time_is_host_time():
    sync = _Busy(lambda: time.sleep(0.05))
    sync.prepare(nn.Linear(2, 2))
    assert sync.device == torch.device("cpu")
    assert 0.05 <= sync.finish().exposed_s < 1.0
    with sync.no_sync():  # nothing to wait for
        assert sync.finish().exposed_s < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_exposed_time_waits_for_the_device():
    dev = torch.device("cuda", torch.cuda.current_device())
    a = torch.randn(4096, 4096, device=dev)

    def queue_matmuls():  # returns long before the device is done
        x = a
        for _ in range(40):
            x = torch.tanh(x @ a)

    queue_matmuls()  # warm-up (cuBLAS handles, kernels)
    torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    queue_matmuls()
    torch.cuda.synchronize(dev)
    device_s = time.perf_counter() - t0
    sync = _Busy(queue_matmuls)
    sync.prepare(nn.Linear(2, 2).to(dev))
    t0 = time.perf_counter()
    stats = sync.finish()
    host_s = time.perf_counter() - t0
    # The device work is inside the measurement, and finish() returned only after it.
    assert stats.exposed_s >= 0.7 * device_s, (stats.exposed_s, device_s)
    assert host_s >= 0.7 * device_s
    assert stats.exposed_s <= host_s + 1e-3
