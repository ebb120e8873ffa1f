"""Top-k and random-k sparsification with error feedback (DGC, ``zen.md`` §2.4).

Each step a rank keeps ``k = ceil(ratio * numel)`` entries of ``grad + residual`` and zeroes
them in the residual, so ``sent + residual == grad + old residual`` holds exactly (the
kept entries are copied, not recomputed). With ``momentum_correction`` (DGC §3.2) the
momentum ``u = m * u + grad`` is accumulated instead of the raw gradient, and the sent
entries are also cleared from ``u`` (momentum factor masking); the optimizer should then
run without momentum.

The kept entries form a sparse tensor with ``numel`` rows of one element. A
``SparseReducer`` (ZEN by default) sums it over ranks and guarantees that every rank gets
the same bits, so compression and the sparse schemes compose. The payloads of one step are
reduced together: ``communicate`` only queues a payload, and the first ``wait`` reduces
every queued matrix in one call over their concatenated index space (offsets in queue
order). One reduce per step instead of one per matrix saves each matrix's metadata
all-gather and push/pull round trips (18 matrices in the GPT debug config); it gives up no
overlap, because a reduce blocks the backward hook that would issue it. Every rank queues
the same matrices in the same order (``CompressedSync`` launches them so), hence issues the
same collectives. The cost: one float32 buffer as large as the queued matrices while the
result is split. Random-k draws its indices
from a seed shared by all ranks (step and parameter name), so every rank keeps the same
entries and the reducer's union stays at ``k`` rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from zentrain.compress.base import Compressor, Pending, derive_seed, generator
from zentrain.sync.base import SparseReducer
from zentrain.sync.comm import ByteCounter

if TYPE_CHECKING:
    from zentrain.compress import CompressConfig

ReducerFactory = Callable[[dist.ProcessGroup | None, ByteCounter], SparseReducer]


@dataclass
class SparsePayload:
    indices: torch.Tensor
    """int64 positions in the flattened tensor (no duplicates)."""
    values: torch.Tensor
    """float32 values at ``indices``."""
    shape: torch.Size
    dtype: torch.dtype

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape.numel(), dtype=torch.float32, device=self.values.device)
        out[self.indices] = self.values
        return out.view(self.shape)


_CHUNK = 1 << 22


def topk_abs(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``|x|`` (unordered), exact, in bounded memory.

    ``torch.topk`` on CPU copies the whole input into (value, index) pairs, ~16 bytes per
    entry (0.6 GB for a 38.6M-entry GPT-2 output layer). Past a few million entries we take
    the top k of each 4M-entry chunk, then the top k of those candidates: every global
    top-k entry is in its chunk's top k, so the result is exact.
    """
    if x.numel() <= 2 * _CHUNK or k > _CHUNK // 8:
        return torch.topk(x.abs(), k, sorted=False).indices
    cands = [torch.topk(x[s:s + _CHUNK].abs(), min(k, x[s:s + _CHUNK].numel()),
                        sorted=False).indices.add_(s) for s in range(0, x.numel(), _CHUNK)]
    cand = torch.cat(cands)
    return cand[torch.topk(x[cand].abs(), k, sorted=False).indices]


def default_reducer_factory(scheme: str) -> ReducerFactory:
    def make(group: dist.ProcessGroup | None, counter: ByteCounter) -> SparseReducer:
        from zentrain.sync.reducers import build_reducer
        return build_reducer(scheme, group, counter)
    return make


class TopK(Compressor):
    """Keep the ``ratio`` largest-magnitude entries; the rest wait in the residual."""

    name = "topk"

    def __init__(self, cfg: CompressConfig,
                 reducer_factory: ReducerFactory | None = None) -> None:
        self.reducer_factory = reducer_factory or default_reducer_factory(cfg.sparse_scheme)
        self.reducers: dict[str, SparseReducer] = {}
        self.momenta: dict[str, torch.Tensor] = {}
        self._reducer_states: dict[str, Any] = {}
        self._queue: list[tuple[str, SparsePayload]] = []
        self._results: dict[str, torch.Tensor] = {}
        super().__init__(cfg)

    def bind(self, group: dist.ProcessGroup | None, counter: ByteCounter,
             reducer_factory: ReducerFactory | None = None) -> None:
        super().bind(group, counter)
        if reducer_factory is not None:
            self.reducer_factory = reducer_factory
        self.reducers = {}  # rebuilt lazily on the new group
        self._queue, self._results = [], {}

    def k(self, numel: int) -> int:
        return max(1, min(numel, math.ceil(self.cfg.ratio * numel)))

    def select(self, name: str, acc: torch.Tensor, k: int) -> torch.Tensor:
        return topk_abs(acc, k)

    def compress(self, name: str, grad: torch.Tensor) -> SparsePayload:
        if self.cfg.momentum_correction:
            g = grad.detach().reshape(-1)
            u = self.momenta.get(name)
            u = g.to(torch.float32, copy=True) if u is None else u.to(g.device).mul_(
                self.cfg.momentum).add_(g)
            self.momenta[name] = u
            acc = self.accumulate(name, u)
        else:
            acc = self.accumulate(name, grad)
        idx = self.select(name, acc, self.k(acc.numel()))
        vals = acc[idx]  # a copy: the residual can be cleared below without touching it
        if self.keeps_residual(name):
            acc[idx] = 0.0
            if self.cfg.momentum_correction:
                self.momenta[name][idx] = 0.0
        return SparsePayload(idx, vals, grad.shape, grad.dtype)

    def reducer(self, name: str) -> SparseReducer:
        r = self.reducers.get(name)
        if r is None:
            r = self.reducers[name] = self.reducer_factory(self.group, self.counter)
            if name in self._reducer_states:
                r.load_state_dict(self._reducer_states.pop(name))
        return r

    def communicate(self, name: str, payload: SparsePayload) -> Pending:
        if any(n == name for n, _ in self._queue) or name in self._results:
            raise RuntimeError(f"top-k: {name!r} was queued twice before its result was taken")
        self._queue.append((name, payload))
        return Pending(then=lambda: self._take(name))

    def _take(self, name: str) -> torch.Tensor:
        if name not in self._results:
            self._flush()
        return self._results.pop(name)

    def _flush(self) -> None:
        """Reduce every queued payload in one call; results are views of one buffer."""
        queue, self._queue = self._queue, []
        offsets, total = [], 0
        for _, pl in queue:
            offsets.append(total)
            total += pl.shape.numel()
        idx = torch.cat([pl.indices + off for off, (_, pl) in zip(offsets, queue)])
        vals = torch.cat([pl.values for _, pl in queue])
        idx, vals = self.reducer("fused").reduce(idx, vals.unsqueeze(1), total)
        out = torch.zeros(total, dtype=torch.float32, device=vals.device)
        out[idx] = vals.reshape(-1).to(torch.float32)
        out.div_(self.world_size)
        for off, (name, pl) in zip(offsets, queue):
            self._results[name] = out[off:off + pl.shape.numel()].view(pl.shape)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "momenta": {k: v.detach().clone() for k, v in self.momenta.items()},
                "reducers": {k: r.state_dict() for k, r in self.reducers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.momenta = {k: v.detach().clone() for k, v in state.get("momenta", {}).items()}
        self.reducers = {}
        self._reducer_states = dict(state.get("reducers", {}))


class RandomK(TopK):
    """Keep ``ratio`` of the entries chosen at random, the same entries on every rank.

    Indices are drawn with replacement and de-duplicated (O(k) memory, no permutation of
    ``numel``), so slightly fewer than ``k`` entries may be kept; every rank draws the
    same ones because the seed depends only on the step and the parameter's name.
    """

    name = "randomk"

    def select(self, name: str, acc: torch.Tensor, k: int) -> torch.Tensor:
        g = generator(acc.device, derive_seed(self.cfg.seed, "randomk", self.step, name))
        idx = torch.randint(acc.numel(), (k,), generator=g, device=acc.device)
        return torch.unique(idx)
