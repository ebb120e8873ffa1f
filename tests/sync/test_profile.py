"""Sparsity profile (ZEN C1-C3), index traces, and ``zentrain analyze`` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from zentrain.sync import profile as prof
from zentrain.sync.hashing import h0


def _t(xs) -> torch.Tensor:
    return torch.tensor(sorted(xs), dtype=torch.int64)


# -- C2 densification, C1 overlap -------------------------------------------------------------
def test_densification_bounds_and_a_worked_case():
    same = [_t(range(10))] * 4
    assert prof.densification(same) == {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0}
    disjoint = [_t(range(10 * r, 10 * r + 10)) for r in range(4)]
    assert prof.densification(disjoint) == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    # {0..9} and {5..14}: the union has 15 rows, one rank 10 -> γ_2 = 1.5.
    assert prof.densification([_t(range(10)), _t(range(5, 15))])[2] == pytest.approx(1.5)
    # Unequal sizes: union over the *mean* size of the group (the reducers' gamma).
    g = prof.densification([_t(range(4)), _t(range(10, 22))])
    assert g[2] == pytest.approx(16 / 8)


def test_overlap_jaccard_and_min_normalized():
    jac, mins = prof.pair_overlaps([_t(range(10)), _t(range(5, 15)), _t(range(100, 102))])
    assert jac == pytest.approx([5 / 15, 0.0, 0.0])
    assert mins == pytest.approx([5 / 10, 0.0, 0.0])
    assert prof.pair_overlaps([_t([1, 2]), _t([1, 2])]) == ([1.0], [1.0])


# -- C3 imbalance -------------------------------------------------------------------------------
def test_contiguous_imbalance_by_hand():
    # R = 8, n = 2: server 0 owns rows 0-3. Rank 0 pushes 4 rows to server 0, rank 1 two.
    out = prof.partition_imbalance([_t([0, 1, 2, 3]), _t([0, 5])], 8, 2, "contiguous")
    assert out["push_imbalance"] == pytest.approx(2.0)      # 2 * 4 / 4 (rank 0)
    assert out["pull_imbalance"] == pytest.approx(2 * 4 / 5)  # union 0,1,2,3,5
    assert out["skew"] == out["pull_imbalance"]


def test_hashed_partition_balances_skew_that_contiguous_does_not():
    g = torch.Generator().manual_seed(0)
    rows, n = 1_000_000, 8
    # C3: hot rows are the low ones (frequency-sorted vocabularies, Criteo fields).
    sets = [torch.unique((torch.rand(30_000, generator=g) ** 4 * rows).long()) for _ in range(n)]
    cont = prof.partition_imbalance(sets, rows, n, "contiguous")
    hashed = prof.partition_imbalance(sets, rows, n, "hashed", seed=123)
    assert cont["push_imbalance"] > 4 and cont["pull_imbalance"] > 2
    assert hashed["push_imbalance"] < 1.1 and hashed["pull_imbalance"] < 1.1
    # The hashed partition is exactly ZEN's h0 with that seed.
    counts = torch.bincount(h0(sets[0], n, 123), minlength=n)
    assert float(n * counts.max() / counts.sum()) <= hashed["push_imbalance"]


def test_profile_step_and_summary():
    sets = [_t(range(0, 100)), _t(range(50, 150))]
    st = prof.profile_step(sets, 1000, seed=1)
    assert st["nnz"] == [100, 100] and st["union"] == 150
    assert st["density"] == pytest.approx(0.1) and st["density_agg"] == pytest.approx(0.15)
    assert st["gamma"]["2"] == pytest.approx(1.5) and st["overlap"] == pytest.approx(50 / 150)
    summ = prof.summarize([st, st])
    assert summ["gamma"]["2"] == pytest.approx(1.5)
    assert summ["hashed"]["push_imbalance_max"] == st["hashed"]["push_imbalance"]
    json.dumps(st)  # JSON-able as is


def test_eq1_and_theorem2():
    # n = 4, 1000 rows per rank, γ = 3, 4-byte index + 4-byte value.
    assert prof.eq1_bytes(4, 1000, 3.0, 1) == pytest.approx(0.75 * 4 * 1000 * 8)
    assert prof.eq1_bytes(1, 1000, 3.0, 1) == 0
    assert 1.0 < prof.theorem2_bound(8, 1e5) < 1.02


# -- traces --------------------------------------------------------------------------------------
def _trace(world=2, steps=3) -> prof.Trace:
    rec = prof.TraceRecorder(world, [("a", 100, 4, "float32"), ("b", 7, 1, "float32")],
                             meta={"model": "toy"})
    for s in range(steps):
        rec.add([[_t(range(s, s + 5 + r)) for r in range(world)],
                 [_t([r]) if r else _t([]) for r in range(world)]])
    return rec.trace()


def test_trace_roundtrip(tmp_path):
    tr = _trace()
    prof.save_trace(tmp_path / "t.pt", tr)
    back = prof.load_trace(tmp_path / "t.pt")
    assert (back.world, back.steps, back.meta) == (2, 3, {"model": "toy"})
    assert [(t.name, t.num_rows, t.row_numel) for t in back.tables] == [("a", 100, 4),
                                                                        ("b", 7, 1)]
    assert back.tables[0].indices.dtype == torch.int32
    for s in range(3):
        for r in range(2):
            assert back.rows(0, s, r).tolist() == list(range(s, s + 5 + r))
            assert back.rows(1, s, r).tolist() == ([r] if r else [])
    # Loads with weights_only=True: plain containers and tensors only.
    torch.load(tmp_path / "t.pt", weights_only=True)


def test_trace_validation(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        prof.load_trace(tmp_path / "missing.pt")
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a zentrain-sparse-trace"):
        prof.load_trace(tmp_path / "x.pt")
    tr = _trace()
    tr.tables[0].offsets = tr.tables[0].offsets[:-1]
    prof.save_trace(tmp_path / "bad.pt", tr)
    with pytest.raises(ValueError, match="inconsistent offsets"):
        prof.load_trace(tmp_path / "bad.pt")
    tr = _trace()
    tr.tables[1].indices[0] = 7  # == num_rows
    prof.save_trace(tmp_path / "range.pt", tr)
    with pytest.raises(ValueError, match="outside"):
        prof.load_trace(tmp_path / "range.pt")
    with pytest.raises(ValueError, match="one index set per table"):
        prof.TraceRecorder(2, [("a", 10, 1, "float32")]).add([[_t([1])]])


# -- zentrain analyze -------------------------------------------------------------------------
_TINY_DEEPFM = ["model.name=deepfm", "model.num_fields=3", "model.rows_per_field=300",
                "model.embed_dim=4", "model.mlp_dims=[8]", "train.batch_size=16",
                "data.synthetic_samples=4000", "metrics.progress=false"]


def test_emulated_ranks_see_their_own_batches():
    """Each emulated rank's non-zero rows are exactly the rows its micro-batch touches."""
    from zentrain.analyze import emulate, table_names
    from zentrain.config import load_config
    from zentrain.data import build_data
    from zentrain.models import build_model

    cfg = load_config(None, _TINY_DEEPFM)
    world = 3
    model = build_model(cfg.model)
    assert table_names(model) == ["embedding", "first_order"]
    got = list(emulate(cfg, world, 2))
    for step, (loss, sets) in enumerate(got):
        assert 0 < loss < 5
        for r in range(world):
            batch = build_data(cfg, r, world, is_builder=False).train_batch(step, 0)
            want = torch.unique(model.rows_of(batch["cats"])).tolist()
            assert sets[0][r].tolist() == want  # embedding
            assert sets[1][r].tolist() == want  # first_order (the same rows)
    # The model trains on the averaged gradient: the second step's loss differs.
    assert got[0][0] != got[1][0]


@pytest.mark.slow
def test_analyze_cli_writes_analysis_plots_and_trace(tmp_path):
    from zentrain.cli import main

    out = tmp_path / "an"
    argv = ["analyze", "--world", "3", "--steps", "2", "--out", str(out), "--save-trace"]
    argv += [a for o in _TINY_DEEPFM for a in ("--set", o)]
    assert main(argv) == 0
    res = json.loads((out / "analysis.json").read_text())
    assert (res["model"], res["world"], res["steps"]) == ("deepfm", 3, 2)
    tab = res["tables"]["embedding"]
    assert (tab["num_rows"], tab["row_numel"]) == (900, 4)
    assert len(tab["per_step"]) == 2 and set(tab["summary"]["gamma"]) == {"1", "2", "3"}
    assert tab["tied_to_output"] is False and isinstance(res["advice"], list)
    for name in ("density", "gamma", "imbalance", "overlap"):
        assert (out / f"{name}.png").stat().st_size > 1000
    trace = prof.load_trace(out / "trace.pt")
    assert (trace.world, trace.steps, len(trace.tables)) == (3, 2, 2)
    for s, row in enumerate(tab["per_step"]):
        sets = [trace.rows(0, s, r) for r in range(3)]
        assert [x.numel() for x in sets] == row["nnz"]
        assert prof.profile_step(sets, 900, 3, res["hash_seed"])["hashed"] == row["hashed"]
    assert main(["analyze", "--world", "1", "--out", str(out)] +
                [a for o in _TINY_DEEPFM for a in ("--set", o)]) == 2


def test_analyze_advises_compression_for_tables_sparse_sync_sends_dense():
    from zentrain.analyze import advice

    def tab(d, tied):
        return {"summary": {"density": d}, "tied_to_output": tied}

    res = {"tables": {"tok": tab(1.0, True), "pos": tab(0.8, False), "item": tab(0.02, False)}}
    lines = advice(res, 0.5)
    assert len(lines) == 2  # "item" is sparse: ZEN's own case, nothing to advise
    assert lines[0].startswith("tok: 100% of rows") and "tied to the output layer" in lines[0]
    assert "sync.compress=auto" in lines[0]
    assert lines[1].startswith("pos: 80% of rows") and "method_for='pos.weight=topk'" in lines[1]
    high = advice(res, 0.9)  # the threshold is the sync's own
    assert len(high) == 1 and "tok: " in high[0] and "dense_threshold=0.9" in high[0]
