"""Parallelism schemes (ZEN Table 3): Push to servers, aggregate there, Pull back.

``ParallelReducer`` is the machinery both OmniReduce and ZEN use. Every rank is a worker
and a server (co-located, as in ZEN §3.1):

1. **Partition** the local (merged) COO by destination server — the only thing the two
   schemes do differently (contiguous row ranges here, hierarchical hashing in ZEN).
2. **Metadata**: one all-gather of every rank's split sizes (plus the input checks), so
   every rank knows the whole ``n × n`` split matrix: exact ``all_to_all`` splits, and
   the Push imbalance without further messages.
3. **Push**: ``all_to_all_single`` with uneven splits; one byte row per non-zero
   (index + values).
4. **Aggregate** on each server. Chunks arrive ordered by source rank, each free of
   duplicates, so every index is summed in rank order ``((r0 + r1) + r2) + ...``
   (``sum_rows_ordered``) exactly once, on its server.
5. **Pull**: the servers' result sizes are all-gathered, then each server's result —
   index section (COO, or ZEN's hash bitmap) + values — goes to every rank with one
   all-gather padded to the largest server. Every rank decodes the same bytes, so all
   end with the server-computed bits: identical everywhere.

A caller may set ``server_filter`` for its calls (``compress.global_topk`` does): each
server applies it to its aggregated rows between steps 4 and 5, so only the rows it keeps
are pulled. Every rank decodes what the servers kept, so results stay bit-identical.

``last_stats`` adds ``codec_s``: seconds spent partitioning, encoding and decoding (ZEN
reports the same figure as ``hash_s``).

``OmniReduceReducer``: server ``i`` owns rows ``[i·R/n, (i+1)·R/n)`` (blocks of rows),
COO on the wire. Under skewed indices (ZEN C3) one server gets most of the traffic, and
the padded Pull makes everyone pay for the largest server; ``last_stats`` shows it as
``push_imbalance``/``pull_imbalance`` (Definition 8) and ``skew``. (Real OmniReduce
streams fixed 256-element blocks; a row plays the role of a block here.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zentrain.sync import comm
from zentrain.sync.bitmap import (
    bytes_as,
    index_dtype,
    pack_coo,
    pad8,
    row_nbytes,
    sort_key,
    sum_rows_ordered,
    unpack_coo,
    values_from_bytes,
    values_to_bytes,
)
from zentrain.sync.hashing import Partition, imbalance_ratios
from zentrain.sync.reducers import RowReducer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


ServerFilter = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class ParallelReducer(RowReducer):
    """Push / aggregate / Pull; subclasses choose the partition and the Pull index format."""

    server_filter: ServerFilter | None = None
    """``(indices, summed values, number of servers) -> bool mask`` of the rows a server
    pulls back; None keeps all (lossless). Ids are the scheme's units (rows, or
    OmniReduce's blocks)."""

    def _partition(self, idx: torch.Tensor, num_rows: int) -> Partition:
        raise NotImplementedError

    def _pull_formats(self, num_rows: int, server_rows: list[int],
                      device: torch.device) -> list[str]:
        """Index format of each server's Pull payload: ``"coo"`` or ``"bitmap"``."""
        return ["coo"] * len(server_rows)

    def _encode_index(self, server: int, sidx: torch.Tensor, fmt: str,
                      idt: torch.dtype) -> torch.Tensor:
        return sidx.to(idt).view(torch.uint8)

    def _decode_index(self, server: int, raw: torch.Tensor, fmt: str, rows: int,
                      idt: torch.dtype) -> torch.Tensor:
        isz = torch.empty(0, dtype=idt).element_size()
        return bytes_as(raw[: rows * isz], idt).to(torch.int64)

    def _index_bytes(self, server: int, fmt: str, rows: int, idt: torch.dtype) -> int:
        return rows * torch.empty(0, dtype=idt).element_size()

    def _finish_stats(self) -> None:
        """Scheme-specific ``last_stats`` after a reduce (subclasses add theirs)."""

    def _to_units(self, idx: torch.Tensor, vals: torch.Tensor, num_rows: int
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The merged rows as the units the scheme moves: (ids, values, number of ids).
        Rows themselves by default; OmniReduce's fixed-size blocks override it."""
        return idx, vals, num_rows

    def _from_units(self, idx: torch.Tensor, vals: torch.Tensor, num_rows: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of ``_to_units`` on the summed result."""
        return idx, vals

    def _reduce(self, indices, values, num_rows):
        return parallel_reduce([self], [(indices, values, num_rows)])[0]


@dataclass
class _Job:
    """One table's state through the pipeline."""

    red: ParallelReducer
    values: torch.Tensor  # as passed (for the header checks)
    idx: torch.Tensor
    vals: torch.Tensor
    num_rows: int
    part: Partition | None
    units: int = 0  # ids the pipeline moves: rows, or OmniReduce blocks
    err: int = 0
    idt: torch.dtype = torch.int32
    rb: int = 0
    splits: list[list[int]] = field(default_factory=list)
    sidx: torch.Tensor | None = None
    svals: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return torch.empty(0, dtype=self.idt).element_size() + self.rb


def reduce_tables(reducers: list[ParallelReducer],
                  calls: list[tuple[torch.Tensor, torch.Tensor, int]]
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``reducer.reduce`` for several tables at once, one collective per phase for all.

    Same results, bit for bit, as reducing them one by one (each table's rows are summed
    on the same server in the same order); only the number of collectives changes, from
    four per table to four in all, which matters where latency dominates (small tables,
    slow links, many ranks sharing cores). The byte counts of the whole call are reported
    on the first table (``fused_tables`` on each).
    """
    first = reducers[0]
    if first.world_size == 1 or len(reducers) == 1:
        return [r.reduce(*c) for r, c in zip(reducers, calls)]
    t0 = time.perf_counter()
    sent0, recv0 = first.counter.snapshot()
    for r in reducers:
        r.last_stats = {}
    outs = parallel_reduce(reducers, calls)
    for k, r in enumerate(reducers):
        r.last_stats.update(
            bytes_sent=first.counter.sent - sent0 if k == 0 else 0,
            bytes_recv=first.counter.recv - recv0 if k == 0 else 0,
            time_s=time.perf_counter() - t0, fused_tables=len(reducers))
    return outs


def parallel_reduce(reducers: list[ParallelReducer],
                    calls: list[tuple[torch.Tensor, torch.Tensor, int]]
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The five steps of the module docstring for every table together."""
    first = reducers[0]
    n, me, group, counter = first.world_size, first.rank, first.group, first.counter
    dev = calls[0][1].device
    jobs: list[_Job] = []
    # 1. Partition, locally.
    for red, (indices, values, num_rows) in zip(reducers, calls):
        idx, vals, err = red._prepare(indices, values, num_rows)
        red._codec_s, part, units = 0.0, None, num_rows
        if not err:
            t0 = time.perf_counter()
            idx, vals, units = red._to_units(idx, vals, num_rows)
            part = red._partition(idx, units)
            _sync(dev)
            red._codec_s += time.perf_counter() - t0
        jobs.append(_Job(red, values, idx, vals, num_rows, part, units, err,
                         index_dtype(units), row_nbytes(vals)))
    # 2. Metadata: one all-gather of every table's header + splits (checks first).
    mine = [v for j in jobs for v in j.red._meta_row(
        j.values, j.num_rows, j.err, j.part.splits if j.part else [0] * n)]
    allv = torch.empty(n * len(mine), dtype=torch.int64, device=dev)
    comm.all_gather(allv, torch.tensor(mine, dtype=torch.int64, device=dev), counter, group)
    rows_all = allv.view(n, -1).tolist()
    size = len(mine) // len(jobs)  # every table's row has the same length (n splits)
    for t, j in enumerate(jobs):
        j.splits = j.red._check_meta([r[t * size: (t + 1) * size] for r in rows_all])
    _push(jobs, n, me, dev, counter, group)
    # 4-5. Pull.
    sizes = torch.empty(n * len(jobs), dtype=torch.int64, device=dev)
    comm.all_gather(sizes, torch.tensor([j.sidx.numel() for j in jobs], device=dev),
                    counter, group)
    srows = sizes.view(n, len(jobs)).t().tolist()  # srows[t][server]
    return _pull(jobs, srows, n, me, dev, counter, group)


def _push(jobs: list[_Job], n: int, me: int, dev: torch.device, counter, group) -> None:
    """3. Push: chunk j of every table goes to server j in one all-to-all; aggregate."""
    out_b = [sum(j.splits[i][me] * j.width for j in jobs) for i in range(n)]
    in_b = [sum(j.splits[me][k] * j.width for j in jobs) for k in range(n)]
    recv = torch.empty(sum(out_b), dtype=torch.uint8, device=dev)
    if any(any(any(r) for r in j.splits) for j in jobs):
        # Per destination: table 0's rows, table 1's, ... (flat bytes; fine when empty).
        pieces = [pack_coo(j.idx[j.part.order], j.vals[j.part.order], j.idt).split(
            j.splits[me]) for j in jobs]
        send = torch.cat([pieces[t][k].reshape(-1) for k in range(n)
                          for t in range(len(jobs))])
        comm.all_to_all(recv, send, out_b, in_b, counter, group)
    chunks = recv.split(out_b)
    for t, j in enumerate(jobs):
        mine = []
        for i in range(n):  # source rank order: the summation order
            start = sum(jobs[u].splits[i][me] * jobs[u].width for u in range(t))
            mine.append(chunks[i][start: start + j.splits[i][me] * j.width])
        buf = torch.cat(mine).view(-1, j.width)
        j.sidx, j.svals = sum_rows_ordered(
            *unpack_coo(buf, j.idt, j.vals.dtype, tuple(j.vals.shape[1:])))
        if j.red.server_filter is not None:
            keep = j.red.server_filter(j.sidx, j.svals, n)
            j.sidx, j.svals = j.sidx[keep], j.svals[keep]


def _pull(jobs: list[_Job], srows: list[list[int]], n: int, me: int, dev: torch.device,
          counter, group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each server's results for every table, one padded all-gather; all ranks decode."""
    fmts = [j.red._pull_formats(j.units, srows[t], dev) for t, j in enumerate(jobs)]
    isec = [[pad8(j.red._index_bytes(k, fmts[t][k], srows[t][k], j.idt)) for k in range(n)]
            for t, j in enumerate(jobs)]
    total = [[isec[t][k] + srows[t][k] * j.rb for k in range(n)] for t, j in enumerate(jobs)]
    sec = [[pad8(x) for x in tt] for tt in total]  # each table section 8-aligned
    base = [[sum(sec[u][k] for u in range(t)) for k in range(n)] for t in range(len(jobs))]
    per_server = [sum(sec[t][k] for t in range(len(jobs))) for k in range(n)]
    top = pad8(max(per_server))
    outs: list[tuple[torch.Tensor, torch.Tensor]] = []
    if top == 0:
        for j in jobs:
            outs.append((torch.empty(0, dtype=torch.int64, device=dev),
                         torch.empty((0, *j.vals.shape[1:]), dtype=j.vals.dtype, device=dev)))
    else:
        payload = torch.zeros(top, dtype=torch.uint8, device=dev)
        for t, j in enumerate(jobs):
            t0 = time.perf_counter()
            b = base[t][me]
            code = j.red._encode_index(me, j.sidx, fmts[t][me], j.idt)
            payload[b: b + code.numel()] = code
            payload[b + isec[t][me]: b + total[t][me]] = values_to_bytes(j.svals).reshape(-1)
            j.red._codec_s += time.perf_counter() - t0
        gathered = torch.empty(n * top, dtype=torch.uint8, device=dev)
        comm.all_gather(gathered, payload, counter, group)
        gathered = gathered.view(n, top)
        for t, j in enumerate(jobs):
            t0 = time.perf_counter()
            parts_i, parts_v = [], []
            for k in range(n):
                b = base[t][k]
                parts_i.append(j.red._decode_index(k, gathered[k, b: b + isec[t][k]],
                                                   fmts[t][k], srows[t][k], j.idt))
                parts_v.append(values_from_bytes(
                    gathered[k, b + isec[t][k]: b + total[t][k]].view(srows[t][k], j.rb),
                    j.vals.dtype, tuple(j.vals.shape[1:])))
            cat_i = torch.cat(parts_i)
            order = torch.argsort(sort_key(cat_i))
            outs.append((cat_i[order], torch.cat(parts_v)[order]))
            _sync(dev)
            j.red._codec_s += time.perf_counter() - t0
    for t, (j, (out_idx, _)) in enumerate(zip(jobs, outs)):
        red = j.red
        red._note_counts([sum(r) for r in j.splits], out_idx.numel(), j.units)
        red.last_stats.update(imbalance_ratios(torch.tensor(j.splits), srows[t]))
        red.last_stats.update(
            server_rows=srows[t], pull_formats=fmts[t], codec_s=red._codec_s,
            pad_bytes=(n - 1) * top - sum(per_server[k] for k in range(n) if k != me))
        red._finish_stats()
    return [j.red._from_units(i, v, j.num_rows) for j, (i, v) in zip(jobs, outs)]


class OmniReduceReducer(ParallelReducer):
    """Servers own contiguous row ranges; ``last_stats['skew']`` = hottest server / mean.

    Args:
        block_elems: None (default): the unit is one row, sent as COO. An int: the unit
            is a block of ``max(1, block_elems // row_numel)`` consecutive rows, as real
            OmniReduce streams fixed 256-element blocks: a block any row of which is
            non-zero on a rank travels whole (its zero rows included) with one block
            index, and servers own contiguous ranges of blocks. The result then lists
            every row of every block some rank sent (rows nobody had sum to 0, exactly);
            ``nnz``/``density``/``gamma`` in ``last_stats`` count blocks, and
            ``block_rows`` says how many rows a block has.
    """

    name = "omnireduce"

    def __init__(self, group, counter, *, block_elems: int | None = None) -> None:
        super().__init__(group, counter)
        if block_elems is not None and (isinstance(block_elems, bool) or block_elems < 1):
            raise ValueError(f"omnireduce: block_elems must be None or a positive int, "
                             f"got {block_elems!r}")
        self.block_elems = block_elems
        self._rows_per_block = 1

    def _to_units(self, idx, vals, num_rows):
        rpb = 1 if self.block_elems is None else max(
            1, self.block_elems // max(1, math.prod(vals.shape[1:])))
        self._rows_per_block = rpb  # for _from_units and the stats of this call
        if rpb == 1:
            return idx, vals, num_rows
        blocks, inv = torch.unique_consecutive(idx // rpb, return_inverse=True)  # idx ascending
        out = torch.zeros((blocks.numel(), rpb, *vals.shape[1:]), dtype=vals.dtype,
                          device=vals.device)
        out[inv, idx % rpb] = vals
        return blocks, out, -(-num_rows // rpb)

    def _from_units(self, idx, vals, num_rows):
        rpb = self._rows_per_block
        if rpb == 1:
            return idx, vals
        rows = (idx.unsqueeze(1) * rpb + torch.arange(rpb, device=idx.device)).reshape(-1)
        flat = vals.reshape(-1, *vals.shape[2:])
        keep = rows < num_rows  # the last block may run past the table
        return rows[keep], flat[keep]

    def _partition(self, idx, num_rows):
        n = self.world_size
        bounds = torch.tensor([(i * num_rows) // n for i in range(1, n)], dtype=torch.int64,
                              device=idx.device)
        dest = torch.bucketize(idx, bounds, right=True)
        # ``idx`` is ascending (merged), so rows are already grouped by server.
        return Partition(torch.arange(idx.numel(), device=idx.device),
                         torch.bincount(dest, minlength=n).tolist())

    def _finish_stats(self) -> None:
        if self.block_elems is not None:
            self.last_stats["block_rows"] = self._rows_per_block
        rows = self.last_stats["server_rows"]
        mean = sum(rows) / len(rows)
        self.last_stats["skew"] = max(rows) / mean if mean else 1.0
