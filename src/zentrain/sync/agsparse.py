"""AGsparse: all-gather every rank's COO and reduce locally (what PyTorch DDP's gloo
sparse all-reduce and DeepSpeed do; ZEN Table 3: One-shot + Centralization).

Each rank receives every other rank's non-zeros, so its traffic grows linearly with the
number of ranks and overlapping indices are received n-1 times (ZEN §2.4). Like gloo it
pads every rank's COO to the largest nnz (the counts are all-gathered first) and does one
regular all-gather.

Summation order: every rank sums the gathered rows of each index in rank order,
``((r0 + r1) + r2) + ...`` (``sum_rows_ordered``), on identical data, so all ranks get the
same bits.
"""

from __future__ import annotations

import torch

from zentrain.sync import comm
from zentrain.sync.bitmap import index_dtype, pack_coo, sum_rows_ordered, unpack_coo
from zentrain.sync.reducers import RowReducer


class AGSparseReducer(RowReducer):
    """All-gather of padded COO; ``last_stats`` adds ``pad_rows`` (padding sent)."""

    name = "agsparse"

    def _reduce(self, indices, values, num_rows):
        idx, vals, err = self._prepare(indices, values, num_rows)
        nnz = [r[0] for r in self._exchange_meta(values, num_rows, err, [idx.numel()])]
        row_shape = tuple(vals.shape[1:])
        top = max(nnz)
        if top == 0:
            self._note_counts(nnz, 0, num_rows)
            return idx, vals
        idt = index_dtype(num_rows)
        mine = pack_coo(idx, vals, idt)
        buf = torch.zeros((top, mine.shape[1]), dtype=torch.uint8, device=vals.device)
        buf[: idx.numel()] = mine
        n = self.world_size
        out = torch.empty((n * top, mine.shape[1]), dtype=torch.uint8, device=vals.device)
        comm.all_gather(out, buf, self.counter, self.group)
        # Drop each rank's padding, keeping rank order.
        keep = torch.cat([torch.arange(r * top, r * top + nnz[r], device=vals.device)
                          for r in range(n)])
        gidx, gvals = unpack_coo(out[keep], idt, vals.dtype, row_shape)
        res = sum_rows_ordered(gidx, gvals)
        self._note_counts(nnz, res[0].numel(), num_rows)
        self.last_stats["pad_rows"] = top - idx.numel()
        return res
