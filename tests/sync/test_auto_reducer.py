"""``auto``: all ranks choose the same scheme, and the one the cost model says."""

from __future__ import annotations

import pytest
import torch

from zentrain.sync import cost
from zentrain.sync.auto import AutoReducer
from zentrain.sync.comm import ByteCounter
from zentrain.testing import run_ranks


def _data(kind: str, rank: int, world: int, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    g = torch.Generator().manual_seed(100 * step + rank)
    if kind == "dense":  # every row on every rank
        num_rows = 2_000
        idx = torch.arange(num_rows)
    elif kind == "disjoint":  # sparse, no overlap: Eq. 2 < Eq. 1 at n = 4
        num_rows = 100_000
        idx = torch.arange(rank, num_rows, world)[:500]
    else:  # "overlap": sparse, every rank the same rows: Eq. 1 < Eq. 2
        num_rows = 100_000
        idx = torch.randperm(num_rows, generator=torch.Generator().manual_seed(step))[:1000]
    return idx, torch.randn(idx.numel(), 16, generator=g), num_rows


def _choose(rank: int, world: int) -> dict:
    out = {}
    for kind in ("dense", "disjoint", "overlap"):
        red = AutoReducer(None, ByteCounter(), profile_steps=2, recheck_every=0)
        seen = []
        for step in range(4):
            i, v = red.reduce(*_data(kind, rank, world, step))
            st = red.last_stats
            seen.append((st["scheme"], st["profiling"], st["choice"]))
        w = red.workload()
        out[kind] = {"seen": seen, "expected": cost.best(w, red.candidates)[0],
                     "predicted": st["predicted"], "state": red.state_dict(),
                     "gamma": w.gamma, "density": w.density}
    # A re-check follows a change of sparsity: sparse first, then dense.
    red = AutoReducer(None, ByteCounter(), profile_steps=1, recheck_every=3)
    flags = []
    for step in range(7):
        red.reduce(*_data("overlap" if step < 3 else "dense", rank, world, step))
        flags.append((red.last_stats["profiling"], red.last_stats["choice"]))
    out["recheck"] = flags
    # Restored state keeps the choice and skips profiling.
    again = AutoReducer(None, ByteCounter(), profile_steps=2, recheck_every=0)
    again.load_state_dict(out["overlap"]["state"])
    again.reduce(*_data("overlap", rank, world, 9))
    out["restored"] = (again.last_stats["scheme"], again.last_stats["profiling"])
    return out


@pytest.mark.slow
def test_auto_choice_is_shared_and_follows_the_cost_model():
    res = run_ranks(_choose, 4, timeout=180)
    for kind in ("dense", "disjoint", "overlap"):
        first = res[0][kind]
        for r in res[1:]:  # every rank: same schemes, same choices, same predictions
            assert r[kind]["seen"] == first["seen"] and r[kind]["predicted"] == first["predicted"]
        schemes = [s for s, _, _ in first["seen"]]
        assert schemes[:2] == ["zen", "zen"] and [p for _, p, _ in first["seen"]] == [
            True, True, False, False]
        assert schemes[2] == schemes[3] == first["expected"] == first["seen"][-1][2]
    assert res[0]["dense"]["expected"] == "allreduce"
    assert res[0]["disjoint"]["expected"] == "sparcml"
    assert res[0]["overlap"]["expected"] == "zen"
    assert res[0]["disjoint"]["gamma"] == pytest.approx(4.0)
    assert res[0]["overlap"]["gamma"] == pytest.approx(1.0)
    assert res[0]["recheck"] == [(True, "zen"), (False, "zen"), (False, "zen"),
                                 (True, "allreduce"), (False, "allreduce"),
                                 (False, "allreduce"), (True, "allreduce")]
    assert res[0]["restored"] == ("zen", False)


def test_auto_one_rank_and_bad_options():
    red = AutoReducer(None, ByteCounter(), profile_steps=1, recheck_every=0)
    i, v = red.reduce(torch.tensor([3, 1, 3]), torch.ones(3, 2), 5)
    assert i.tolist() == [1, 3] and v.tolist() == [[1.0, 1.0], [2.0, 2.0]]
    assert red.last_stats["choice"] is not None and red.last_stats["bytes_recv"] == 0
    with pytest.raises(ValueError, match="candidates"):
        AutoReducer(None, ByteCounter(), candidates=("zen", "bogus"))
    with pytest.raises(ValueError, match="recheck_every"):
        AutoReducer(None, ByteCounter(), profile_steps=5, recheck_every=5)


# -- the log line of each choice -------------------------------------------------------------
def test_auto_logs_each_pick_and_change_once(caplog):
    # _decide communicates nothing: it reads the profile that reduce() accumulated from
    # collectives. Filling the profile by hand gives it the inputs of a 4-rank run.
    red = AutoReducer(None, ByteCounter(), profile_steps=1, recheck_every=0, tensor="emb.weight")
    red.world_size, red.rank = 4, 0
    overlap = {"calls": 1, "nnz_sum": 4 * 1000, "out_nnz": 1000, "num_rows": 100_000,
               "row_numel": 16}
    caplog.set_level("INFO", logger="zentrain.sync.auto")
    red.profile.update(overlap)
    red._decide()
    red._decide()  # same profile, same choice: no second line
    dense = dict(overlap, nnz_sum=4 * 100_000, out_nnz=100_000)
    red.profile.update(dense)
    red._decide()
    lines = [r.getMessage() for r in caplog.records if r.name == "zentrain.sync.auto"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("auto: emb.weight chose zen after 1 calls (d=0.01, gamma=1, n=4")
    assert lines[1].startswith("auto: emb.weight switched from zen to allreduce")
    for line in lines:
        for s in red.candidates:
            assert f"{s}=" in line, line
    want = cost.predict(red.workload(), red.candidates)["allreduce"].recv_bytes
    assert f"allreduce={want:.4g}" in lines[1]
    # Other ranks decide the same but stay quiet.
    caplog.clear()
    quiet = AutoReducer(None, ByteCounter(), profile_steps=1, recheck_every=0)
    quiet.world_size, quiet.rank = 4, 1
    quiet.profile.update(overlap)
    quiet._decide()
    assert quiet.choice == "zen" and not caplog.records



def _logged(rank: int, world: int) -> list[str]:
    import logging

    import zentrain

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    logger = logging.getLogger("zentrain.sync.auto")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("emb", torch.nn.Embedding(1000, 8))
    dp = zentrain.DataParallel(model, sync="auto", profile_steps=2, recheck_every=0)
    for step in range(4):
        ids = torch.randint(0, 1000, (20,), generator=torch.Generator().manual_seed(step + rank))
        dp(ids).sum().backward()
    return lines


@pytest.mark.slow
def test_auto_in_training_logs_the_choice_on_rank_zero():
    lines = run_ranks(_logged, 2, timeout=60)
    assert lines[1] == []
    assert len(lines[0]) == 1, lines[0]
    assert lines[0][0].startswith("auto: emb.weight chose ") and "after 2 calls" in lines[0][0]
