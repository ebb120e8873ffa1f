"""OmniReduce with ``block_elems``: fixed-size blocks travel whole, as in real OmniReduce.

(The block configuration also runs against the float64 reference on every drawn and
seeded case in ``test_sparse_reducers.py``.)
"""

from __future__ import annotations

import pytest
import torch

from zentrain.sync.comm import ByteCounter
from zentrain.sync.reducers import build_reducer
from zentrain.testing import run_ranks


def _blocks_case(rank: int, world: int) -> dict:
    # 64 rows of one fp32 element, blocks of 8 rows: servers own blocks 0-3 and 4-7.
    rows = {0: [[0, 1, 17]], 1: [[2], [2, 3, 4, 5]]}[rank]
    out = []
    for r in rows + ([rows[0]] if rank == 0 else []):  # rank 0 sends the same twice
        red = build_reducer("omnireduce", None, ByteCounter(), block_elems=8)
        idx = torch.tensor(r + ([40] if rank == 1 else []))
        i, v = red.reduce(idx, idx.float() + 1, 64)
        out.append((i.tolist(), v.tolist(), red.last_stats["bytes_sent"],
                    red.last_stats["block_rows"]))
    return out


@pytest.mark.slow
def test_omnireduce_blocks_travel_whole():
    res = run_ranks(_blocks_case, 2, timeout=60)
    i, v, _, rpb = res[0][0]
    assert rpb == 8 and res[1][0][:2] == (i, v)  # the same result on both ranks
    # Every row of blocks 0, 2 and 5 (rows 0-7, 16-23, 40-47); sums exact, zeros elsewhere.
    assert list(i) == [*range(8), *range(16, 24), *range(40, 48)]
    want = {0: 1.0, 1: 2.0, 17: 18.0, 2: 3.0, 40: 41.0}
    assert list(v) == [want.get(r, 0.0) for r in i]
    # A block costs the same however many of its rows are non-zero: rank 1 sends block 0
    # with one row and with four non-zero rows for the same bytes.
    assert res[1][0][2] == res[1][1][2]
    # The counts, from the wire format: metadata (9-int header + 2 splits), Push (rank 1:
    # block 0 to server 0, one int32 index + 8 fp32 rows), server sizes (one int), Pull
    # (server 0 holds blocks 0 and 2: 8-aligned indices + 2 blocks, the larger server).
    meta, block, sizes = (9 + 2) * 8, 4 + 8 * 4, 8
    pull = 8 + 2 * 8 * 4
    assert res[0][0][2] == meta + sizes + pull
    assert res[1][0][2] == meta + block + sizes + pull


def test_block_elems_must_be_positive():
    with pytest.raises(ValueError, match="block_elems must be None or a positive int, got 0"):
        build_reducer("omnireduce", None, ByteCounter(), block_elems=0)
