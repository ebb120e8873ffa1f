"""SparCML-style Hierarchical Centralization: recursive doubling with incremental merge
(SparCML's SSAR_Recursive_double; ZEN Table 3 and Eq. 2).

With ``p`` the largest power of two ≤ n: stage ``i`` (``0 ≤ i < log2 p``) pairs rank ``r``
with ``r ^ 2^i``; the two swap their current sum and merge, so after the last stage every
rank holds the whole sum, and an index present everywhere was received only ``log2 p``
times (Lemma 2). Each stage first swaps a 2-int header (format, rows), then the payload.

* **Sparse → dense switch**: a rank whose merged sum would be bigger as COO than as a
  dense block (``R·row_bytes`` + an ``R/8``-byte presence bitmap, so the result still
  lists exactly the union of indices) switches to dense for the remaining stages, as
  SparCML's sparse streams do. ``dense_threshold`` replaces the byte rule with a density.
* **n not a power of two**: ranks ``p..n-1`` first send their data to rank ``r - p``
  (which folds it in as the higher-ranked operand), sit out the stages, and get the final
  sum back from ``r - p``.

Summation order: a fixed binary tree. Each merge adds the lower-ranked group's sum and
the higher-ranked group's (fp32 for fp16/bf16, rounded per stage: partial sums travel in
the input dtype). Both partners merge the same operands in the same order, and the
switch decision is a function of data they share, so all members of a group — after the
last stage, all ranks — hold identical bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zentrain.sync import comm
from zentrain.sync.bitmap import (
    accumulate_dtype,
    index_dtype,
    pack_bits,
    pack_coo,
    pad8,
    row_nbytes,
    sum_rows_ordered,
    unpack_bits,
    unpack_coo,
    values_from_bytes,
    values_to_bytes,
)
from zentrain.sync.comm import ByteCounter
from zentrain.sync.reducers import RowReducer

_SPARSE, _DENSE = 0, 1


@dataclass
class _Sum:
    """A partial sum: sparse (``idx`` ascending unique, ``vals``) or dense (``present``)."""

    vals: torch.Tensor
    idx: torch.Tensor | None = None
    present: torch.Tensor | None = None

    @property
    def dense(self) -> bool:
        return self.present is not None

    def rows(self) -> int:
        return int(self.present.sum()) if self.dense else self.idx.numel()


class SparCMLReducer(RowReducer):
    """Recursive doubling; ``last_stats`` adds ``stages`` and ``dense_stage`` (the first
    stage this rank sent dense, -1 if never)."""

    name = "sparcml"

    def __init__(self, group: dist.ProcessGroup | None, counter: ByteCounter, *,
                 dense_threshold: float | None = None) -> None:
        super().__init__(group, counter)
        if dense_threshold is not None and not 0.0 <= dense_threshold <= 1.0:
            raise ValueError(f"sparcml: dense_threshold must be in [0, 1], got {dense_threshold}")
        self.dense_threshold = dense_threshold

    # -- wire format -------------------------------------------------------------------------
    def _encode(self, s: _Sum) -> torch.Tensor:
        if not s.dense:
            return pack_coo(s.idx, s.vals, self._idt).reshape(-1)
        bits = pack_bits(s.present)
        buf = torch.zeros(pad8(bits.numel()) + s.vals.numel() * s.vals.element_size(),
                          dtype=torch.uint8, device=s.vals.device)
        buf[: bits.numel()] = bits
        buf[pad8(bits.numel()):] = values_to_bytes(s.vals).reshape(-1)
        return buf

    def _nbytes(self, kind: int, rows: int) -> int:
        if kind == _SPARSE:
            return rows * (self._isz + self._rb)
        return pad8((self._R + 7) // 8) + self._R * self._rb

    def _decode(self, kind: int, rows: int, buf: torch.Tensor) -> _Sum:
        if kind == _SPARSE:
            idx, vals = unpack_coo(buf.view(rows, self._isz + self._rb), self._idt,
                                   self._dtype, self._row)
            return _Sum(vals, idx=idx)
        nb = pad8((self._R + 7) // 8)
        present = unpack_bits(buf[: (self._R + 7) // 8], self._R)
        vals = values_from_bytes(buf[nb:].view(self._R, self._rb), self._dtype, self._row)
        return _Sum(vals, present=present)

    def _densify(self, s: _Sum) -> _Sum:
        if s.dense:
            return s
        vals = torch.zeros((self._R, *self._row), dtype=s.vals.dtype, device=s.vals.device)
        vals.index_copy_(0, s.idx, s.vals)
        present = torch.zeros(self._R, dtype=torch.bool, device=s.vals.device)
        present[s.idx] = True
        return _Sum(vals, present=present)

    def _merge(self, low: _Sum, high: _Sum) -> _Sum:
        """``low + high`` (``low`` from the lower-ranked group), deterministic."""
        if not low.dense and not high.dense:
            idx, vals = sum_rows_ordered(torch.cat([low.idx, high.idx]),
                                         torch.cat([low.vals, high.vals]))
            merged = _Sum(vals, idx=idx)
            return self._densify(merged) if self._want_dense(idx.numel()) else merged
        a, b = self._densify(low), self._densify(high)
        acc = accumulate_dtype(a.vals.dtype)
        vals = (a.vals.to(acc) + b.vals.to(acc)).to(a.vals.dtype)
        return _Sum(vals, present=a.present | b.present)

    def _want_dense(self, rows: int) -> bool:
        if self.dense_threshold is not None:
            return rows > self.dense_threshold * self._R
        return self._nbytes(_SPARSE, rows) > self._nbytes(_DENSE, rows)

    # -- point-to-point --------------------------------------------------------------------
    def _header(self, s: _Sum) -> torch.Tensor:
        return torch.tensor([_DENSE if s.dense else _SPARSE, s.rows()], dtype=torch.int64,
                            device=self._dev)

    def _swap(self, s: _Sum, peer: int) -> _Sum:
        hdr = torch.empty(2, dtype=torch.int64, device=self._dev)
        comm.exchange(self._header(s), hdr, peer, self.counter, self.group)
        kind, rows = hdr.tolist()
        got = torch.empty(self._nbytes(kind, rows), dtype=torch.uint8, device=self._dev)
        comm.exchange(self._encode(s), got, peer, self.counter, self.group)
        return self._decode(kind, rows, got)

    def _send(self, s: _Sum, peer: int) -> None:
        comm.send(self._header(s), peer, self.counter, self.group)
        comm.send(self._encode(s), peer, self.counter, self.group)

    def _recv(self, peer: int) -> _Sum:
        hdr = torch.empty(2, dtype=torch.int64, device=self._dev)
        comm.recv(hdr, peer, self.counter, self.group)
        kind, rows = hdr.tolist()
        got = torch.empty(self._nbytes(kind, rows), dtype=torch.uint8, device=self._dev)
        comm.recv(got, peer, self.counter, self.group)
        return self._decode(kind, rows, got)

    # -------------------------------------------------------------------------------------
    def _reduce(self, indices, values, num_rows):
        n, me = self.world_size, self.rank
        idx, vals, err = self._prepare(indices, values, num_rows)
        nnz = [r[0] for r in self._exchange_meta(values, num_rows, err, [idx.numel()])]
        self._R, self._row, self._dtype, self._dev = num_rows, tuple(vals.shape[1:]), \
            vals.dtype, vals.device
        self._idt = index_dtype(num_rows)
        self._isz = torch.empty(0, dtype=self._idt).element_size()
        self._rb = row_nbytes(vals)
        p = 1 << (n.bit_length() - 1)
        stages = int(math.log2(p))
        cur = _Sum(vals, idx=idx)
        if self._want_dense(idx.numel()):
            cur = self._densify(cur)
        dense_stage = -1
        if me >= p:                      # fold into rank me - p, wait for the result
            self._send(cur, me - p)
            dense_stage = 0 if cur.dense else -1
            cur = self._recv(me - p)
        else:
            if me + p < n:
                cur = self._merge(cur, self._recv(me + p))
            for i in range(stages):
                peer = me ^ (1 << i)
                if cur.dense and dense_stage < 0:
                    dense_stage = i
                other = self._swap(cur, peer)
                cur = self._merge(cur, other) if me < peer else self._merge(other, cur)
            if me + p < n:
                self._send(cur, me + p)
        if cur.dense:
            out_idx = torch.nonzero(cur.present).reshape(-1)
            out_vals = cur.vals[out_idx]
        else:
            out_idx, out_vals = cur.idx, cur.vals
        self._note_counts(nnz, out_idx.numel(), num_rows)
        self.last_stats.update(stages=stages + (1 if n > p else 0), dense_stage=dense_stage)
        return out_idx, out_vals
