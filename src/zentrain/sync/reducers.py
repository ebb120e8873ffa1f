"""The sparse reducers' shared plumbing, the dense reference, and the registry.

``build_reducer(name, group, counter, **opts)`` makes one of

==============  ==========================================================================
``allreduce``   densify rows, dense all-reduce (the reference)            (this file)
``agsparse``    all-gather every rank's COO, reduce locally (DDP/DeepSpeed) ``agsparse.py``
``sparcml``     recursive doubling with incremental merge (Eq. 2)          ``sparcml.py``
``omnireduce``  push/pull to servers owning contiguous row ranges          ``omnireduce.py``
``zen``         balanced parallelism: hierarchical hashing + hash bitmap   ``zen.py``
``auto``        profiles density/densification, picks by the cost model    ``auto.py``
==============  ==========================================================================

``RowReducer`` gives every scheme the same front door: local input checks, a merge of
local duplicates, a no-communication path for one rank, and one small **metadata
all-gather** that both carries the scheme's counts (nnz, split sizes) and checks that all
ranks agree on ``num_rows``, dtype and row shape. Inputs that would make the payload
collectives mismatch (and gloo hang) thus raise the same ``ValueError`` on every rank.

Every call fills ``last_stats`` with at least ``bytes_sent``/``bytes_recv`` (this call),
``time_s``, ``nnz`` (this rank's unique rows), ``out_nnz`` (rows of the result), and where
the scheme knows them ``nnz_sum`` (Σ over ranks), ``density`` (``nnz_sum/(n·num_rows)``)
and ``gamma`` (densification ``out_nnz·n/nnz_sum``); schemes add their own keys.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from zentrain.sync import comm
from zentrain.sync.base import SparseReducer, coalesce_rows
from zentrain.sync.comm import DTYPE_CODES, ByteCounter, comm_device  # noqa: F401 (re-export)

_ERRORS = {
    1: "indices must be a 1-D integer tensor",
    2: "values.shape[0] must equal indices.numel()",
    3: "an index is outside [0, num_rows)",
    4: "values must be a floating-point tensor",
}
_HEADER = 9  # num_rows, dtype, row ndim, 4 row dims, row-shape hash, error code


def _shape_hash(shape: tuple[int, ...]) -> int:
    h = len(shape)
    for d in shape:
        h = (h * 1_000_003 + d + 1) % (1 << 61)
    return h


class RowReducer(SparseReducer):
    """Base of the schemes here; subclasses implement ``_reduce`` for ``world_size > 1``."""

    def reduce(
        self, indices: torch.Tensor, values: torch.Tensor, num_rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        sent0, recv0 = self.counter.snapshot()
        self.last_stats = {}
        if self.world_size == 1:
            idx, vals, err = self._prepare(indices, values, num_rows)
            if err:
                raise ValueError(f"{self.name} reducer: {_ERRORS[err]}")
            self._note_counts([idx.numel()], idx.numel(), num_rows)
            out = idx, vals
        else:
            out = self._reduce(indices, values, num_rows)
        self.last_stats.update(
            bytes_sent=self.counter.sent - sent0, bytes_recv=self.counter.recv - recv0,
            time_s=time.perf_counter() - t0)
        return out

    def _reduce(
        self, indices: torch.Tensor, values: torch.Tensor, num_rows: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # -- helpers for subclasses -------------------------------------------------------------
    @staticmethod
    def _prepare(
        indices: torch.Tensor, values: torch.Tensor, num_rows: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Local checks, then merge duplicates: (unique ascending indices, rows, error code)."""
        if indices.dim() != 1 or indices.dtype.is_floating_point or indices.is_complex():
            return indices, values, 1
        if values.dim() < 1 or values.shape[0] != indices.numel():
            return indices, values, 2
        if not values.dtype.is_floating_point:
            return indices, values, 4
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= num_rows):
            return indices, values, 3
        idx, vals = coalesce_rows(indices.to(torch.int64), values.detach())
        return idx, vals, 0

    def _exchange_meta(
        self, values: torch.Tensor, num_rows: int, err: int, extra: list[int]
    ) -> list[list[int]]:
        """All-gather header + ``extra`` from every rank; raise the same error everywhere.

        Returns each rank's ``extra`` (rank order). ``extra`` must have the same length on
        every rank (it does: its length depends only on the world size).
        """
        mine = torch.tensor(self._meta_row(values, num_rows, err, extra), dtype=torch.int64,
                            device=values.device)
        n = self.world_size
        allv = torch.empty(n * mine.numel(), dtype=torch.int64, device=values.device)
        comm.all_gather(allv, mine, self.counter, self.group)
        return self._check_meta(allv.view(n, -1).tolist())

    @staticmethod
    def _meta_row(values: torch.Tensor, num_rows: int, err: int, extra: list[int]) -> list[int]:
        row = tuple(values.shape[1:]) if values.dim() >= 1 else ()
        dims = (list(row) + [-1] * 4)[:4]
        return [num_rows, DTYPE_CODES.get(values.dtype, 99), len(row), *dims,
                _shape_hash(row), err, *extra]

    def _check_meta(self, rows: list[list[int]]) -> list[list[int]]:
        """Every rank's meta row (same on all ranks) -> their ``extra``s, or the error."""
        n = len(rows)
        bad = [(r, rows[r][_HEADER - 1]) for r in range(n) if rows[r][_HEADER - 1]]
        if bad:
            what = "; ".join(f"rank {r}: {_ERRORS.get(c, c)}" for r, c in bad)
            raise ValueError(f"{self.name} reducer: invalid input ({what})")
        for name, sl in (("num_rows", slice(0, 1)), ("values dtype", slice(1, 2)),
                         ("row shape (values.shape[1:])", slice(2, _HEADER - 1))):
            if any(rows[r][sl] != rows[0][sl] for r in range(n)):
                desc = "; ".join(f"rank {r}: {self._describe(name, rows[r])}" for r in range(n))
                raise ValueError(
                    f"{self.name} reducer: {name} differs across ranks ({desc}); "
                    "every rank must pass the same")
        return [r[_HEADER:] for r in rows]

    @staticmethod
    def _describe(name: str, row: list[int]) -> str:
        if name == "num_rows":
            return str(row[0])
        if name == "values dtype":
            inv = {v: k for k, v in DTYPE_CODES.items()}
            return str(inv.get(row[1], f"code {row[1]}"))
        nd = row[2]
        shown = [d for d in row[3:7] if d >= 0][:nd]
        return str(tuple(shown)) + ("..." if nd > 4 else "")

    def _note_counts(self, nnz_per_rank: list[int], out_nnz: int, num_rows: int) -> None:
        """Record nnz, density and densification (exact: out_nnz is the union size)."""
        n = len(nnz_per_rank)
        total = sum(nnz_per_rank)
        self.last_stats.update(
            nnz=nnz_per_rank[self.rank] if n > 1 else nnz_per_rank[0],
            nnz_sum=total, out_nnz=out_nnz, num_rows=num_rows,
            density=total / (n * num_rows) if num_rows else 0.0,
            gamma=out_nnz * n / total if total else 1.0)


class AllReduceReducer(RowReducer):
    """The reference: scatter rows into a dense ``[num_rows, *row]`` buffer, all-reduce.

    Summation order is the backend's (gloo/NCCL ring: each chunk is reduced once along
    the ring, then all-gathered), so all ranks get the same bits. The result lists the
    rows whose sum is non-zero (a dense sum cannot tell untouched rows from rows summing
    to zero), so it can hold fewer indices than the union the sparse schemes return.
    """

    name = "allreduce"

    def _reduce(self, indices, values, num_rows):
        idx, vals, err = self._prepare(indices, values, num_rows)
        nnz = self._exchange_meta(values, num_rows, err, [idx.numel()])
        dense = torch.zeros((num_rows, *vals.shape[1:]), dtype=vals.dtype, device=vals.device)
        dense.index_copy_(0, idx, vals)
        comm.all_reduce(dense, self.counter, self.group)
        rows = torch.nonzero((dense.reshape(num_rows, -1) != 0).any(1)).reshape(-1)
        total = sum(r[0] for r in nnz)
        self.last_stats.update(nnz=idx.numel(), nnz_sum=total, out_nnz=rows.numel(),
                               num_rows=num_rows,
                               density=total / (self.world_size * num_rows) if num_rows else 0.0)
        return rows, dense[rows]


REDUCERS = ("allreduce", "agsparse", "sparcml", "omnireduce", "zen", "auto")


def build_reducer(
    name: str, group: dist.ProcessGroup | None = None, counter: ByteCounter | None = None,
    **opts: Any,
) -> SparseReducer:
    """Make the reducer ``name`` (one of ``REDUCERS``); ``opts`` go to its constructor.

    Collective: ``zen`` and ``auto`` broadcast hash seeds, so every rank of ``group`` must
    build the same reducers in the same order.
    """
    counter = counter if counter is not None else ByteCounter()
    # Imported here: the scheme modules import RowReducer from this one.
    from zentrain.sync.agsparse import AGSparseReducer
    from zentrain.sync.auto import AutoReducer
    from zentrain.sync.omnireduce import OmniReduceReducer
    from zentrain.sync.sparcml import SparCMLReducer
    from zentrain.sync.zen import ZenReducer

    classes: dict[str, type[SparseReducer]] = {
        "allreduce": AllReduceReducer, "agsparse": AGSparseReducer,
        "sparcml": SparCMLReducer, "omnireduce": OmniReduceReducer,
        "zen": ZenReducer, "auto": AutoReducer,
    }
    if name not in classes:
        raise ValueError(f"unknown sparse reducer {name!r}; choose one of {', '.join(REDUCERS)}")
    return classes[name](group, counter, **opts)
