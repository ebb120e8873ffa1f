"""Sparse sync of dense embedding gradients from the rows the lookups touched.

Every case checks the synced gradients bit for bit against the single-process reference
``((g_0 + g_1) + g_2) / n`` (ranks' gradients summed in rank order), after more steps than
the verification window, so the unscanned path is the one that produced them.
"""

import logging

import torch
from torch import nn

import zentrain
from zentrain.sync.touched import TouchedRows
from zentrain.testing import run_ranks

ROWS = 60


class Model(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(ROWS, 4, padding_idx=0)
        self.head = nn.Linear(4, ROWS, bias=False)
        if kind == "tied":
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).mean(1)
        if self.kind == "functional":  # rows 50..54 get gradient without a lookup
            h = h + self.emb.weight[50:55].sum(0)
        return self.head(h)


def _batch(step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    # ids < 50, so the functional rows are never looked up; 0 is the padding row.
    return torch.randint(0, 50, (3, 5), generator=g), torch.randint(0, ROWS, (3,), generator=g)


def _grads(model: nn.Module, step: int, rank: int, accum: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    for m in range(accum):
        ids, y = _batch(step, rank, m)
        nn.functional.cross_entropy(model(ids), y).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def _run(rank: int, world: int, kind: str, accum: int, steps: int):
    torch.manual_seed(0)
    model, ref = Model(kind), Model(kind)
    ref.load_state_dict(model.state_dict())
    dp = zentrain.DataParallel(model, sync="zen")
    exact = []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        for m in range(accum):
            ids, y = _batch(step, rank, m)
            ctx = dp.no_sync() if m < accum - 1 else _Null()
            with ctx:
                nn.functional.cross_entropy(dp(ids), y).backward()
        dp.finish_sync()
        per_rank = [_grads(ref, step, r, accum) for r in range(world)]
        for name, p in model.named_parameters():
            want = per_rank[0][name]
            for g in per_rank[1:]:
                want = want + g[name]
            if name.startswith("emb"):  # the sparse table; dense params are all-reduced
                exact.append(torch.equal(p.grad, want / world))
    sync = dp.grad_sync
    tracked = sync.touched.tracked[id(model.emb.weight)]
    return all(exact), tracked


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_lookups_only_table_is_tracked_and_exact():
    for ok, tracked in run_ranks(_run, 3, "plain", 1, 4):
        assert ok and tracked


def test_micro_batches_accumulate_touched_rows():
    for ok, tracked in run_ranks(_run, 2, "plain", 3, 4):
        assert ok and tracked


def test_functional_use_is_caught_by_verification_and_stays_exact():
    for ok, tracked in run_ranks(_run, 2, "functional", 1, 4):
        assert ok and not tracked


def test_tied_weight_is_never_tracked(caplog):
    model = Model("tied")
    touched = TouchedRows(model, [model.emb.weight])
    assert touched.tracked == {id(model.emb.weight): False}
    for ok, tracked in run_ranks(_run, 2, "tied", 1, 3):
        assert ok and not tracked


def test_mismatch_warns_and_falls_back(caplog):
    model = Model("functional")
    touched = TouchedRows(model, [model.emb.weight])
    ids, y = _batch(0, 0, 0)
    nn.functional.cross_entropy(model(ids), y).backward()
    with caplog.at_level(logging.WARNING):
        assert touched.rows(model.emb.weight, model.emb.weight.grad, ROWS) is None
    assert "outside the rows its lookups touched" in caplog.text
    assert touched.tracked[id(model.emb.weight)] is False
    # Under no_grad (evaluation) nothing is recorded.
    plain = Model("plain")
    t2 = TouchedRows(plain, [plain.emb.weight])
    with torch.no_grad():
        plain(ids)
    assert t2.ids[id(plain.emb.weight)] == []
