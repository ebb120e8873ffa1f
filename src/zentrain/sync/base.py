"""The two interfaces every gradient-sync scheme implements.

``GradSync`` is what the trainer and ``zentrain.DataParallel`` see: it is attached to a
model (``prepare``), is handed each gradient the moment autograd finishes it
(``on_grad_ready``, from a post-accumulate-grad hook, so communication overlaps the rest
of backward) and completes the step in ``finish``. Gradients leave ``finish`` averaged over
ranks (DDP semantics) and bit-identical on every rank.

``SparseReducer`` is the lower-level contract of the sparse schemes (ZEN, SparCML,
OmniReduce, AGsparse): sum a row-sparse tensor, given as COO rows, over all ranks.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

from zentrain.sync.comm import ByteCounter, rank, world


@dataclass
class SyncStats:
    """What one step's gradient sync cost this rank."""

    bytes_sent: int = 0
    """Bytes this rank put on the wire for gradient sync in the step."""
    bytes_recv: int = 0
    """Bytes this rank took off the wire for gradient sync in the step."""
    exposed_s: float = 0.0
    """Seconds from the start of ``finish`` until the synced gradients are ready: the
    sync not hidden behind backward. On CUDA it is measured on the device (from the end of
    the work queued before ``finish`` to the end of the sync), since NCCL's ``wait()``
    returns before the data has moved; on CPU it is host time. For ``ddp`` it is ~0 on
    CPU: DDP waits for its all-reduce inside backward, so that time is in backward."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Scheme-specific figures (imbalance ratios, chosen scheme per tensor...)."""


class _ExposedTimer:
    """Seconds until the sync's results are ready, started at construction.

    On CPU every collective here blocks the host until its data is in place, so host
    time is the answer. On CUDA the host only queues work (NCCL's ``wait()`` makes the
    current stream wait, not the host), so a host timer would read the launch time:
    an event marks the start on the device (when the work queued before ``finish``,
    i.e. backward, is done: compute that ran late is not charged to the sync), and the
    device is synchronized at the end, every stream, NCCL's included.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t0 = time.perf_counter()
        self.start = None
        if device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record(torch.cuda.current_stream(device))

    def stop(self) -> float:
        if self.start is None:
            return time.perf_counter() - self.t0
        torch.cuda.synchronize(self.device)
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        end.synchronize()
        return self.start.elapsed_time(end) / 1e3  # ms -> s


class GradSync(ABC):
    """Averages gradients over the data-parallel group; one subclass per scheme."""

    name: ClassVar[str] = "base"

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world_size = world(group)
        self.rank = rank(group)
        self.counter = ByteCounter()
        self._sync_enabled = True
        self._step_start = (0, 0)
        self.device = torch.device("cpu")
        """Where the gradients live (set by ``prepare``): decides how ``finish`` times."""

    # -- lifecycle -------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Attach to ``model`` (hooks, wrappers); returns the module to call forward on."""
        self.model = model
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return model

    def on_grad_ready(self, param: nn.Parameter) -> None:  # noqa: B027 - optional hook
        """Called by autograd as soon as ``param.grad`` is final for this backward."""

    @abstractmethod
    def _finish(self) -> dict[str, Any]:
        """Complete communication; gradients end averaged and identical on all ranks."""

    def finish(self) -> SyncStats:
        timer = _ExposedTimer(self.device if self._sync_enabled else torch.device("cpu"))
        extra = self._finish() if self._sync_enabled else {}
        sent0, recv0 = self._step_start
        stats = SyncStats(
            bytes_sent=self.counter.sent - sent0,
            bytes_recv=self.counter.recv - recv0,
            exposed_s=timer.stop(),
            extra=extra or {},
        )
        self._step_start = self.counter.snapshot()
        return stats

    @contextmanager
    def no_sync(self):
        """Skip communication for the backward passes inside (gradient accumulation)."""
        prev = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = prev

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"bytes_sent": self.counter.sent, "bytes_recv": self.counter.recv}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counter.sent = int(state.get("bytes_sent", 0))
        self.counter.recv = int(state.get("bytes_recv", 0))
        self._step_start = self.counter.snapshot()


class SparseReducer(ABC):
    """Sums a row-sparse tensor over all ranks of ``group`` (lossless).

    Input: ``indices`` (int64, shape [nnz], may hold duplicates, any order) and ``values``
    (shape [nnz, *row_shape]) of a tensor with ``num_rows`` rows. Output: unique indices
    in ascending order and the summed rows. Every rank must get bit-identical output:
    the summation order for each index is fixed (rank order), never arrival order.
    With one rank, no communication happens: duplicates are merged locally.
    """

    name: ClassVar[str] = "sparse"

    def __init__(self, group: dist.ProcessGroup | None, counter: ByteCounter) -> None:
        self.group = group
        self.counter = counter
        self.world_size = world(group)
        self.rank = rank(group)
        self.last_stats: dict[str, Any] = {}
        """Per-call figures such as ``push_imbalance`` and ``pull_imbalance``."""

    @abstractmethod
    def reduce(
        self, indices: torch.Tensor, values: torch.Tensor, num_rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        pass


def coalesce_rows(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge duplicate indices (sum) and sort ascending; deterministic on CPU and CUDA.

    ``index_add_`` is not deterministic on CUDA for floats, so duplicates are summed in a
    fixed order: a stable sort puts equal indices in input order, then a segmented
    sum via ``cumsum`` would lose precision, so we use ``index_add_`` only on CPU and a
    sorted ``segment_reduce`` elsewhere.
    """
    if indices.numel() == 0:
        return indices.to(torch.int64), values
    if bool((indices[1:] > indices[:-1]).all()):
        # Already sorted and unique (what ``rows_of`` yields for dense gradients): an
        # O(nnz) check instead of a sort. A copy, as the other paths return.
        return indices.to(torch.int64), values.clone()
    uniq, inv = torch.unique(indices, sorted=True, return_inverse=True)
    if uniq.numel() == indices.numel():
        order = torch.argsort(indices, stable=True)
        return indices[order].to(torch.int64), values[order]
    out = torch.zeros((uniq.numel(),) + tuple(values.shape[1:]), dtype=values.dtype,
                      device=values.device)
    if values.device.type == "cpu":
        out.index_add_(0, inv, values)
    else:
        order = torch.argsort(inv, stable=True)
        lengths = torch.bincount(inv, minlength=uniq.numel())
        flat = values[order].reshape(values.shape[0], -1)
        out = torch.segment_reduce(flat, "sum", lengths=lengths, axis=0).reshape(out.shape)
    return uniq.to(torch.int64), out
