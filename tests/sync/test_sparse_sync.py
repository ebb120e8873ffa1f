"""``SparseSync`` inside a step: the switch to a dense all-reduce for dense tables.

A table whose densest rank has more than ``dense_threshold`` of its rows non-zero is
all-reduced dense (sparse formats stop paying there, ZEN §2.2); the others keep their
sparse reducer. Three ranks (so summation order matters), two tables, both gradient
forms (dense with zero rows, and COO from ``sparse=True``).
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from zentrain.testing import run_ranks

HOT_ROWS, COLD_ROWS, DIM = 20, 300, 4


class TwoTables(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.hot = nn.Embedding(HOT_ROWS, DIM, sparse=sparse)
        self.cold = nn.Embedding(COLD_ROWS, DIM, sparse=sparse)
        self.fc = nn.Linear(DIM, 1)

    def forward(self, hot_ids, cold_ids):
        return self.fc(self.hot(hot_ids).mean(1) + self.cold(cold_ids).mean(1)).squeeze(-1)


def _batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    # Hot: 14-20 of the 20 rows (density >= 0.7 on every rank); cold: <= 12 of 300 rows.
    hot = torch.cat([torch.randperm(HOT_ROWS, generator=g)[:14],
                     torch.randint(0, HOT_ROWS, (2,), generator=g)]).view(4, 4)
    cold = torch.randint(0, COLD_ROWS, (4, 3), generator=g)
    return hot, cold


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).detach().clone()
            for n, p in model.named_parameters()}


def _step(rank: int, world: int, sparse: bool) -> dict:
    import zentrain

    torch.manual_seed(0)
    ref = TwoTables(sparse)
    torch.manual_seed(0)
    model = TwoTables(sparse)
    dp = zentrain.DataParallel(model, sync="zen", dense_threshold=0.5)
    hot, cold = _batch(rank)
    ref(hot, cold).square().mean().backward()  # this rank's unsynced gradient
    dp(hot, cold).square().mean().backward()
    got = _grads(model)
    digest = hashlib.sha256(b"".join(got[k].numpy().tobytes() for k in sorted(got)))
    return {"local": {k: v.numpy() for k, v in _grads(ref).items()},
            "synced": {k: v.numpy() for k, v in got.items()},
            "digest": digest.hexdigest(), "extra": dp.last_stats.extra,
            "sent": dp.last_stats.bytes_sent, "recv": dp.last_stats.bytes_recv}


def _both(rank: int, world: int) -> dict:
    return {sparse: _step(rank, world, sparse) for sparse in (False, True)}


@pytest.mark.slow
def test_table_above_dense_threshold_is_all_reduced_dense():
    world = 3
    res = run_ranks(_both, world, timeout=120)
    ring = 2 * (world - 1) / world
    for sparse in (False, True):
        out = [r[sparse] for r in res]
        assert len({o["digest"] for o in out}) == 1, f"sparse={sparse}: ranks differ"
        ex = out[0]["extra"]
        # Table order is module order: hot is table0, cold is table1.
        assert ex["table0.path"] == "dense" and ex["table0.density"] > 0.5, ex
        assert ex["table1.path"] == "zen" and ex["table1.density"] < 0.05, ex
        # The dense path costs exactly a ring all-reduce of the table.
        table_bytes = HOT_ROWS * DIM * 4
        assert ex["table0.bytes_sent"] == ex["table0.bytes_recv"] == int(ring * table_bytes)
        # The step's total: that, the cold table's reducer, the fc bucket, and the one
        # metadata all-gather (4 ints per table).
        fc_bytes = int(ring * (DIM + 1) * 4)
        meta = 2 * 4 * 8 * (world - 1)
        for o in out:
            assert o["sent"] == (o["extra"]["table0.bytes_sent"]
                                 + o["extra"]["table1.bytes_sent"] + fc_bytes + meta)
        # The result is the mean of the ranks' local gradients.
        for name in out[0]["synced"]:
            want = sum(torch.from_numpy(o["local"][name]).double() for o in out) / world
            got = torch.from_numpy(out[0]["synced"][name]).double()
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7,
                                       msg=f"sparse={sparse}: {name}")
        assert float(torch.from_numpy(out[0]["synced"]["hot.weight"]).abs().sum()) > 0


def _seeds(rank, world):
    from zentrain.sync import build_grad_sync

    out = {}
    for scheme in ("zen", "auto"):
        for tag, opts in (("a", {"seed": 7}), ("b", {"seed": 7}), ("c", {"seed": 8}),
                          ("random", {})):
            sync = build_grad_sync(scheme, **opts)
            sync.prepare(TwoTables(sparse=False))
            reds = [r.reducers["zen"] if scheme == "auto" else r for r in sync.reducers]
            out[scheme, tag] = [tuple(r.seeds.as_list()) for r in reds]
    return out


def test_zen_hash_seeds_follow_the_seed_option_one_per_table():
    res = run_ranks(_seeds, 2)
    assert res[0] == res[1]  # broadcast from rank 0
    for scheme in ("zen", "auto"):
        a, b, c = (res[0][scheme, t] for t in "abc")
        assert a == b and a != c  # the same seed: the same partition on a rerun
        assert a[0] != a[1]  # tables with the same skew must not all load one server
        assert res[0][scheme, "random"] not in (a, c)  # no seed: drawn at random


def _tied_warnings(rank, world, compress):
    import warnings

    import zentrain

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(64, 8)
            self.head = nn.Linear(8, 64, bias=False)
            self.head.weight = self.tok.weight

        def forward(self, ids):
            return self.head(self.tok(ids))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        zentrain.DataParallel(Tied(), sync="zen", compress=compress)
    return [str(w.message) for w in caught if "tied to the output layer" in str(w.message)]


def test_a_tied_table_left_to_zen_is_warned_about_once():
    plain = run_ranks(_tied_warnings, 2, None)
    assert len(plain[0]) == 1 and plain[1] == []  # rank 0 only
    assert plain[0][0].startswith("tok.weight is tied") and "'auto'" in plain[0][0]
    # compressed by auto: the table never reaches the sparse scheme, nothing to say
    assert run_ranks(_tied_warnings, 2, {"method": "auto", "min_numel": 64}) == [[], []]
