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
from zentrain.sync.omnireduce import ParallelReducer

if TYPE_CHECKING:
    from zentrain.compress import CompressConfig

ReducerFactory = Callable[[dist.ProcessGroup | None, ByteCounter], SparseReducer]


@dataclass
class SparsePayload:
    indices: torch.Tensor
    """int64 positions in the flattened tensor (no duplicates)."""
    values: torch.Tensor
    """Values at ``indices``, in ``compress.wire_dtype`` (float32 or bfloat16)."""
    shape: torch.Size
    dtype: torch.dtype

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape.numel(), dtype=torch.float32, device=self.values.device)
        out[self.indices] = self.values.to(torch.float32)
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


def keep_largest(indices: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                 budgets: torch.Tensor) -> torch.Tensor:
    """Mask of the ``budgets[s]`` largest ``|values|`` among the ``indices`` of segment ``s``
    (``starts[s] <= index < starts[s + 1]``); ties go to the lower index.

    Deterministic on CPU and CUDA (stable sorts, no ``topk``), so every rank that runs it
    on the same rows keeps the same ones. ``indices`` must be ascending (reducer output).
    """
    n = indices.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=indices.device)
    starts, budgets = starts.to(indices.device), budgets.to(indices.device)
    seg = torch.bucketize(indices, starts[1:-1], right=True)
    mag = values.reshape(n, -1).abs().amax(1).to(torch.float32)
    order = torch.argsort(mag, descending=True, stable=True)
    order = order[torch.argsort(seg[order], stable=True)]  # by segment, largest first
    s_ord = seg[order]
    counts = torch.bincount(s_ord, minlength=budgets.numel())
    first = torch.cumsum(counts, 0) - counts
    place = torch.arange(n, device=indices.device) - first[s_ord]
    keep = torch.zeros(n, dtype=torch.bool, device=indices.device)
    keep[order] = place < budgets[s_ord]
    return keep


def default_reducer_factory(scheme: str, seed: int = 0) -> ReducerFactory:
    """``scheme``'s reducer. ZEN's hash seeds come from ``seed`` (``compress.seed``), not
    drawn at random: with ``global_topk`` each server keeps its share of the largest sums
    *of its partition*, so which entries survive depends on the partition, and a random
    one would make two runs with the same seed differ."""
    opts = {"seed": derive_seed(seed, "topk-zen")} if scheme == "zen" else {}

    def make(group: dist.ProcessGroup | None, counter: ByteCounter) -> SparseReducer:
        from zentrain.sync.reducers import build_reducer
        return build_reducer(scheme, group, counter, **opts)
    return make


class TopK(Compressor):
    """Keep the ``ratio`` largest-magnitude entries; the rest wait in the residual."""

    name = "topk"

    def __init__(self, cfg: CompressConfig,
                 reducer_factory: ReducerFactory | None = None) -> None:
        self.reducer_factory = reducer_factory or default_reducer_factory(cfg.sparse_scheme,
                                                                          cfg.seed)
        self.reducers: dict[str, SparseReducer] = {}
        self.momenta: dict[str, torch.Tensor] = {}
        self._reducer_states: dict[str, Any] = {}
        self._queue: list[tuple[str, SparsePayload]] = []
        self._results: dict[str, torch.Tensor] = {}
        self.wire = getattr(torch, cfg.wire_dtype)
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
        sent = vals.to(self.wire)
        if self.keeps_residual(name):
            # float32: 0. bfloat16: the rounding error, exact in float32, so that
            # sent + residual == accumulated still holds bit for bit.
            acc[idx] = vals - sent.to(torch.float32) if sent is not vals else 0.0
            if self.cfg.momentum_correction:
                self.momenta[name][idx] = 0.0
        return SparsePayload(idx, sent, grad.shape, grad.dtype)

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
        if self.cfg.global_topk:
            idx, vals = self._reduce_global(queue, offsets, total, idx, vals)
        else:
            idx, vals = self.reducer("fused").reduce(idx, vals.unsqueeze(1), total)
        out = torch.zeros(total, dtype=torch.float32, device=vals.device)
        out[idx] = vals.reshape(-1).to(torch.float32)
        out.div_(self.world_size)
        for off, (name, pl) in zip(offsets, queue):
            self._results[name] = out[off:off + pl.shape.numel()].view(pl.shape)

    def _reduce_global(self, queue, offsets, total, idx, vals):
        """gTop-k: reduce, keeping each matrix's ``global_topk_factor * k`` largest sums;
        dropped entries of this rank go back to its residual."""
        red = self.reducer("fused")
        starts = torch.tensor([*offsets, total], dtype=torch.int64)
        f = self.cfg.global_topk_factor
        budgets = torch.tensor([min(pl.shape.numel(), math.ceil(f * self.k(pl.shape.numel())))
                                for _, pl in queue])
        on_servers = isinstance(red, ParallelReducer) and getattr(red, "block_elems", None) is None
        if on_servers:  # each server keeps its share of every matrix's k
            red.server_filter = lambda i, v, n: keep_largest(i, v, starts, -(-budgets // n))
        try:
            out_idx, out_vals = red.reduce(idx, vals.unsqueeze(1), total)
        finally:
            red.server_filter = None
        if not on_servers:  # same rows on every rank: the same selection everywhere
            keep = keep_largest(out_idx, out_vals, starts, budgets)
            out_idx, out_vals = out_idx[keep], out_vals[keep]
        for off, (name, pl) in zip(offsets, queue):
            if not self.keeps_residual(name) or pl.indices.numel() == 0:
                continue
            mine = pl.indices + off
            pos = torch.searchsorted(out_idx, mine).clamp_(max=max(out_idx.numel() - 1, 0))
            dropped = (out_idx[pos] != mine) if out_idx.numel() else torch.ones_like(
                mine, dtype=torch.bool)
            # The residual there holds 0 (or the rounding error): adding the sent value
            # restores the accumulated entry exactly.
            self.residuals[name][pl.indices[dropped]] += pl.values[dropped].to(torch.float32)
        return out_idx, out_vals

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
