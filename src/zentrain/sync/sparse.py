"""Sparse schemes (zen, sparcml, omnireduce, agsparse, auto) inside a training step.

Embedding tables get their gradient synced by a ``SparseReducer`` (one per table); every
other parameter keeps the bucketed, overlapped dense all-reduce. A table's gradient is
accepted in both forms the issue names: a torch sparse COO tensor (``sparse=True``
embeddings) or a dense tensor whose untouched rows are zero. Either way only the non-zero
rows travel; the result is written back as a dense gradient so any optimizer works.

Before any payload moves, one small all-gather (for all tables at once) exchanges (rows, row width, dtype,
nnz): mismatched tables across ranks become a clear error on every rank instead of a hang,
and the agreed maximum density decides — identically on all ranks — whether the table is
sent dense instead (``dense_threshold``), where sparse formats stop paying (ZEN §2.2).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zentrain.sync import comm
from zentrain.sync.base import GradSync, SparseReducer
from zentrain.sync.dense import DenseSync
from zentrain.sync.omnireduce import ParallelReducer, reduce_tables
from zentrain.sync.touched import TouchedRows


def embedding_params(model: nn.Module) -> list[nn.Parameter]:
    """Embedding tables: the parameters whose gradients are row-sparse."""
    seen: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.weight.requires_grad:
            seen.setdefault(id(m.weight), m.weight)
    return list(seen.values())


def tied_tables(model: nn.Module) -> list[str]:
    """Names of trainable embedding tables whose weight is also a parameter of a module
    that is not an embedding (a head tied to the table): their gradients are dense."""
    ids = {id(p) for p in embedding_params(model)}
    tied = {id(p) for m in model.modules() if not isinstance(m, nn.Embedding | nn.EmbeddingBag)
            for p in m.parameters(recurse=False) if id(p) in ids}
    return [n for n, p in model.named_parameters() if id(p) in tied]


def rows_of(grad: torch.Tensor | None, num_rows: int, like: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of the non-zero rows of a dense or COO gradient."""
    if grad is None:
        return (torch.empty(0, dtype=torch.int64, device=like.device),
                like.new_zeros((0,) + tuple(like.shape[1:])))
    if grad.is_sparse:
        return grad._indices()[0], grad._values()
    nz = grad.reshape(num_rows, -1).ne(0).any(dim=1).nonzero().squeeze(1)
    return nz, grad[nz]


class SparseSync(GradSync):
    """Dense buckets for ordinary parameters, a ``SparseReducer`` per embedding table."""

    def __init__(self, scheme: str, group: dist.ProcessGroup | None = None,
                 bucket_mb: float = 25.0, dense_threshold: float = 0.5,
                 reducer_opts: dict[str, Any] | None = None) -> None:
        super().__init__(group)
        self.name = scheme  # type: ignore[misc]
        self.scheme = scheme
        self.bucket_mb = bucket_mb
        self.dense_threshold = dense_threshold
        self.reducer_opts = dict(reducer_opts or {})
        # ``seed``: the hash seeds of ZEN (also inside ``auto``) derive from it, one per
        # table, so a rerun puts every row on the same server (same bytes per server).
        # Without it they are drawn at random; the sums are exact either way.
        self.seed: int | None = self.reducer_opts.pop("seed", None)
        self.tables: list[nn.Parameter] = []
        self.reducers: list[SparseReducer] = []

    def prepare(self, model: nn.Module) -> nn.Module:
        from zentrain.sync.reducers import build_reducer

        super().prepare(model)
        self.tables = embedding_params(model)
        self.touched = TouchedRows(model, self.tables)
        self.dense = DenseSync(self.group, self.bucket_mb, exclude=set(self.tables),
                               counter=self.counter)
        self.dense.prepare(model)
        names = {id(p): n for n, p in model.named_parameters()}
        self._maybe_warn_tied(model, names)
        # ``auto`` names its tensor in the log line of each choice.
        label = (lambda p: {"tensor": names.get(id(p))}) if self.scheme == "auto" else (
            lambda p: {})
        self.reducers = [build_reducer(self.scheme, self.group, self.counter,
                                       **self._table_opts(i), **label(p))
                         for i, p in enumerate(self.tables)]
        return model

    def _maybe_warn_tied(self, model: nn.Module, names: dict[int, str]) -> None:
        """A table tied to the output layer has a dense gradient (every row, every step):
        this scheme then sends it whole, often the largest tensor of the model. Say so
        once, with the fix, where a compressor has not already taken it."""
        tied = set(tied_tables(model)) & {names[id(p)] for p in self.tables}
        if tied and self.rank == 0 and self.world_size > 1:
            warnings.warn(
                f"{', '.join(sorted(tied))} is tied to the output layer: its gradient is "
                f"dense, so sync scheme {self.scheme!r} sends it whole every step; to send "
                f"less, compress it (compress method 'auto' gives it top-k; "
                f"docs/compression.md)", stacklevel=4)

    def _table_opts(self, i: int) -> dict[str, Any]:
        """The reducer options of table ``i``: its own hash seed where the scheme hashes.
        Per table, not shared: tables indexed by the same ids (DeepFM's ``embedding`` and
        ``first_order``) would otherwise put the same hot rows on the same server."""
        if self.seed is None or self.scheme not in ("zen", "auto"):
            return self.reducer_opts
        from zentrain.compress.base import derive_seed

        seed = derive_seed(self.seed, "zen-table", i)
        if self.scheme == "zen":
            return {**self.reducer_opts, "seed": seed}
        zen = {**self.reducer_opts.get("zen_opts", {}), "seed": seed}
        return {**self.reducer_opts, "zen_opts": zen}

    def no_sync(self):
        return _both_no_sync(super().no_sync(), self.dense.no_sync())

    def _finish(self) -> dict[str, Any]:
        try:
            return self._finish_tables()
        finally:
            self.touched.clear()

    def _finish_tables(self) -> dict[str, Any]:
        if self.world_size == 1:
            # No communication; COO grads still become dense for the optimizer.
            for p in self.tables:
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.to_dense()
            return {}
        extra: dict[str, Any] = {}
        # Dense buckets first: a bucket left waiting on a parameter unused on this rank must
        # be issued before the table collectives, in the same place on every rank.
        self.dense.launch_remaining()
        local = [self._local_rows(p) for p in self.tables]
        # One small all-gather for every table's (rows, width, dtype, nnz): mismatches become
        # a clear error before any payload moves, and the density decision is the same on
        # every rank. One collective per step rather than one per table: on a slow or shared
        # link each collective costs a round of latency.
        mine = [v for p, (idx, vals) in zip(self.tables, local) for v in (
            p.shape[0], vals[0].numel() if vals.dim() > 1 else 1,
            comm.DTYPE_CODES.get(vals.dtype, -1), idx.numel())]
        allr = comm.gather_ints(mine, self.counter, self.group)
        sparse: list[int] = []
        density: dict[int, float] = {}
        for i, p in enumerate(self.tables):
            path = self._check_table(p, [r[4 * i: 4 * i + 4] for r in allr])
            density[i] = path["density"]
            if path["path"] == "dense":
                extra.update({f"table{i}.{k}": v for k, v in path.items()})
            else:
                sparse.append(i)
        reds = [self.reducers[i] for i in sparse]
        calls = [(local[i][0], local[i][1], self.tables[i].shape[0]) for i in sparse]
        if len(reds) > 1 and all(type(r) is type(reds[0]) and isinstance(r, ParallelReducer)
                                 for r in reds):
            # ZEN / OmniReduce: all tables in one pipeline, four collectives per step.
            outs = reduce_tables(reds, calls)  # type: ignore[arg-type]
        else:
            outs = [r.reduce(*c) for r, c in zip(reds, calls)]
        for i, (out_idx, out_vals) in zip(sparse, outs):
            p, reducer, idx = self.tables[i], self.reducers[i], local[i][0]
            # A dense local gradient is zero outside ``idx``: clearing those rows is
            # enough (no full-table memset).
            grad = (torch.zeros_like(p) if p.grad is None or p.grad.is_sparse
                    else p.grad.index_fill_(0, idx, 0))
            grad.index_copy_(0, out_idx, out_vals.to(grad.dtype).div_(self.world_size))
            p.grad = grad
            extra.update({f"table{i}.{k}": v for k, v in {
                "path": reducer.name, "density": density[i], **reducer.last_stats}.items()})
        self.dense._finish()
        return extra

    def _local_rows(self, p: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
        num_rows = p.shape[0]
        rows = (self.touched.rows(p, p.grad, num_rows)
                if p.grad is not None and not p.grad.is_sparse else None)
        return (rows, p.grad[rows]) if rows is not None else rows_of(p.grad, num_rows, p)

    def _check_table(self, p: nn.Parameter, rows: list[list[int]]) -> dict[str, Any]:
        """Shapes agree on every rank (else a clear error); a table denser than
        ``dense_threshold`` on any rank is all-reduced dense right here."""
        num_rows = p.shape[0]
        shapes = [r[:3] for r in rows]
        if any(s != shapes[0] for s in shapes):
            desc = "; ".join(f"rank {i}: rows={s[0]} width={s[1]} dtype={s[2]}"
                             for i, s in enumerate(shapes))
            raise ValueError(f"embedding gradient of shape {tuple(p.shape)} differs across "
                             f"ranks ({desc}); every rank must hold the same model")
        max_density = max(r[3] for r in rows) / max(1, num_rows)
        if max_density > self.dense_threshold:
            dense = p.grad.to_dense() if p.grad is not None and p.grad.is_sparse else (
                p.grad if p.grad is not None else torch.zeros_like(p))
            sent0, recv0 = self.counter.snapshot()
            comm.all_reduce(dense, self.counter, self.group)
            p.grad = dense.div_(self.world_size)
            return {"path": "dense", "density": max_density,
                    "bytes_sent": self.counter.sent - sent0,
                    "bytes_recv": self.counter.recv - recv0}
        return {"path": "sparse", "density": max_density}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reducers": [r.state_dict() for r in self.reducers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for r, s in zip(self.reducers, state.get("reducers", [])):
            r.load_state_dict(s)


class _both_no_sync:
    def __init__(self, *cms):
        self.cms = cms

    def __enter__(self):
        for cm in self.cms:
            cm.__enter__()

    def __exit__(self, *exc):
        for cm in reversed(self.cms):
            cm.__exit__(*exc)
        return False
