"""Several tables in one ZEN/OmniReduce pipeline (``reduce_tables``) equal one by one."""

import pytest
import torch

from zentrain.sync.comm import ByteCounter
from zentrain.sync.omnireduce import reduce_tables
from zentrain.sync.reducers import build_reducer
from zentrain.testing import run_ranks

# (rows, row shape, dtype): widths and dtypes differ, so sections have different sizes.
TABLES = [(5000, (8,), torch.float32), (700, (), torch.float16), (3000, (3, 2), torch.float64)]


def _inputs(rank: int, t: int):
    rows, shape, dtype = TABLES[t]
    g = torch.Generator().manual_seed(10 * rank + t)
    nnz = 0 if (rank, t) == (1, 1) else int(torch.randint(1, rows // 5, (1,), generator=g))
    idx = torch.randint(0, rows, (nnz,), generator=g)  # duplicates included
    vals = torch.randn((nnz, *shape), generator=g).to(dtype)
    return idx, vals, rows


def _run(rank: int, world: int, scheme: str):
    calls = [_inputs(rank, t) for t in range(len(TABLES))]
    c1, c2 = ByteCounter(), ByteCounter()
    one = [build_reducer(scheme, None, c1, **({"seed": 3} if scheme == "zen" else {}))
           for _ in TABLES]
    fused = [build_reducer(scheme, None, c2, **({"seed": 3} if scheme == "zen" else {}))
             for _ in TABLES]
    want = [r.reduce(*c) for r, c in zip(one, calls)]
    got = reduce_tables(fused, calls)
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(want, got))
    stats_same = all(a.last_stats["server_rows"] == b.last_stats["server_rows"]
                     and a.last_stats["push_imbalance"] == b.last_stats["push_imbalance"]
                     for a, b in zip(one, fused))
    return same, stats_same, c1.sent, c2.sent, fused[0].last_stats["fused_tables"]


@pytest.mark.parametrize("scheme", ["zen", "omnireduce"])
def test_fused_tables_equal_one_by_one(scheme):
    for same, stats_same, sent_one, sent_fused, k in run_ranks(_run, 3, scheme):
        assert same and stats_same and k == len(TABLES)
        # Fewer metadata collectives; payload bytes equal up to the 8-byte alignment.
        assert sent_fused <= sent_one + 8 * 3 * len(TABLES)
