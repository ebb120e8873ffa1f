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

``last_stats`` adds ``codec_s``: seconds spent partitioning, encoding and decoding (ZEN
reports the same figure as ``hash_s``).

``OmniReduceReducer``: server ``i`` owns rows ``[i·R/n, (i+1)·R/n)`` (blocks of rows),
COO on the wire. Under skewed indices (ZEN C3) one server gets most of the traffic, and
the padded Pull makes everyone pay for the largest server; ``last_stats`` shows it as
``push_imbalance``/``pull_imbalance`` (Definition 8) and ``skew``. (Real OmniReduce
streams fixed 256-element blocks; a row plays the role of a block here.)
"""

from __future__ import annotations

import time

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


class ParallelReducer(RowReducer):
    """Push / aggregate / Pull; subclasses choose the partition and the Pull index format."""

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

    # -------------------------------------------------------------------------------------
    def _reduce(self, indices, values, num_rows):
        n, me, dev = self.world_size, self.rank, values.device
        idx, vals, err = self._prepare(indices, values, num_rows)
        self._codec_s = 0.0
        part = None
        if not err:
            t0 = time.perf_counter()
            part = self._partition(idx, num_rows)
            _sync(dev)
            self._codec_s += time.perf_counter() - t0
        splits = self._exchange_meta(values, num_rows, err, part.splits if part else [0] * n)
        row_shape = tuple(vals.shape[1:])
        idt = index_dtype(num_rows)
        rb = row_nbytes(vals)
        width = torch.empty(0, dtype=idt).element_size() + rb

        # Push: my chunk j goes to server j; I receive chunk `me` of every rank, rank order.
        in_splits = splits[me]
        out_splits = [splits[j][me] for j in range(n)]
        recv = torch.empty(sum(out_splits) * width, dtype=torch.uint8, device=dev)
        if any(any(r) for r in splits):
            # Flat bytes (splits in bytes): also fine when this rank sends no rows.
            send = pack_coo(idx[part.order], vals[part.order], idt).reshape(-1)
            comm.all_to_all(recv, send, [s * width for s in out_splits],
                            [s * width for s in in_splits], self.counter, self.group)
        sidx, svals = sum_rows_ordered(
            *unpack_coo(recv.view(-1, width), idt, vals.dtype, row_shape))

        # Pull: result sizes first, so formats and padding are known to every rank.
        sizes = torch.empty(n, dtype=torch.int64, device=dev)
        comm.all_gather(sizes, torch.tensor([sidx.numel()], device=dev), self.counter,
                        self.group)
        rows = sizes.tolist()
        fmts = self._pull_formats(num_rows, rows, dev)
        isec = [pad8(self._index_bytes(j, fmts[j], rows[j], idt)) for j in range(n)]
        total = [isec[j] + rows[j] * rb for j in range(n)]
        top = pad8(max(total))
        if top == 0:
            out_idx = torch.empty(0, dtype=torch.int64, device=dev)
            out_vals = torch.empty((0, *row_shape), dtype=vals.dtype, device=dev)
        else:
            t0 = time.perf_counter()
            payload = torch.zeros(top, dtype=torch.uint8, device=dev)
            code = self._encode_index(me, sidx, fmts[me], idt)
            payload[: code.numel()] = code
            payload[isec[me]: total[me]] = values_to_bytes(svals).reshape(-1)
            self._codec_s += time.perf_counter() - t0
            gathered = torch.empty(n * top, dtype=torch.uint8, device=dev)
            comm.all_gather(gathered, payload, self.counter, self.group)
            gathered = gathered.view(n, top)
            t0 = time.perf_counter()
            parts_i, parts_v = [], []
            for j in range(n):
                parts_i.append(self._decode_index(j, gathered[j, : isec[j]], fmts[j], rows[j],
                                                  idt))
                parts_v.append(values_from_bytes(
                    gathered[j, isec[j]: total[j]].view(rows[j], rb), vals.dtype, row_shape))
            cat_i = torch.cat(parts_i)
            order = torch.argsort(sort_key(cat_i))
            out_idx, out_vals = cat_i[order], torch.cat(parts_v)[order]
            _sync(dev)
            self._codec_s += time.perf_counter() - t0

        self._note_counts([sum(r) for r in splits], out_idx.numel(), num_rows)
        self.last_stats.update(imbalance_ratios(torch.tensor(splits), rows))
        self.last_stats.update(server_rows=rows, pull_formats=fmts, codec_s=self._codec_s,
                               pad_bytes=(n - 1) * top - sum(total[j] for j in range(n)
                                                             if j != me))
        return out_idx, out_vals


class OmniReduceReducer(ParallelReducer):
    """Servers own contiguous row ranges; ``last_stats['skew']`` = hottest server / mean."""

    name = "omnireduce"

    def _partition(self, idx, num_rows):
        n = self.world_size
        bounds = torch.tensor([(i * num_rows) // n for i in range(1, n)], dtype=torch.int64,
                              device=idx.device)
        dest = torch.bucketize(idx, bounds, right=True)
        # ``idx`` is ascending (merged), so rows are already grouped by server.
        return Partition(torch.arange(idx.numel(), device=idx.device),
                         torch.bincount(dest, minlength=n).tolist())

    def _reduce(self, indices, values, num_rows):
        out = super()._reduce(indices, values, num_rows)
        rows = self.last_stats["server_rows"]
        mean = sum(rows) / len(rows)
        self.last_stats["skew"] = max(rows) / mean if mean else 1.0
        return out
