"""The cost model against hand computations (ZEN Eq. 1 and Eq. 2 and the baselines)."""

from __future__ import annotations

import math

import pytest

from zentrain.sync import cost
from zentrain.sync.cost import Workload


def W(**kw) -> Workload:  # noqa: N802 - reads like the paper's symbols
    base = dict(num_rows=1000, density=0.1, gamma=2.0, n=4)
    base.update(kw)
    return Workload(**base)


def test_dense_allreduce_is_ring():
    # 2(n-1)/n · M · 4 bytes = 1.5 · 1000 · 4
    assert cost.dense_allreduce(W()).recv_bytes == 6000
    assert cost.dense_allreduce(W(row_numel=8, elem_bytes=2)).recv_bytes == 1.5 * 1000 * 16
    assert cost.dense_allreduce(W(n=1)).recv_bytes == 0


def test_agsparse_grows_linearly_with_n():
    # (n-1) · nnz · (index + value) = 3 · 100 · 8
    assert cost.agsparse(W()).recv_bytes == 2400
    assert cost.agsparse(W(n=8)).recv_bytes == 7 * 800


def test_zen_equals_eq1_when_coo_is_cheaper():
    # R huge, few rows: the bitmap (R/8 bytes) loses, so Pull is COO and the cost is
    # Eq. 1: (n-1)/n · (1 + γ) · 2 · M·d words of 4 bytes.
    w = W(num_rows=1_000_000, density=1e-4)
    eq1 = 3 / 4 * (1 + 2.0) * 2 * 1_000_000 * 1e-4 * 4
    assert cost.zen(w).recv_bytes == pytest.approx(eq1)


def test_zen_uses_hash_bitmap_when_cheaper():
    # nnz = 100, pull rows = γ·nnz = 200: COO 200·8 = 1600 > bitmap 200·4 + 1000/8 = 925.
    assert cost.zen(W()).recv_bytes == pytest.approx(3 / 4 * (800 + 925))


def test_sparcml_eq2_power_of_two():
    # no overlap: γ_1 = 1, γ_2 = 2 -> (1 + 2) · nnz · 8
    assert cost.sparcml(W(gamma=4.0)).recv_bytes == pytest.approx(3 * 800)
    # full overlap: log2(4) stages of nnz·8
    assert cost.sparcml(W(gamma=1.0)).recv_bytes == pytest.approx(2 * 800)
    # 8 ranks, explicit γ_k: Σ γ_{1,2,4}
    w = W(n=8, gamma=5.0, gamma_fn=lambda k: {1: 1.0, 2: 1.5, 4: 3.0}[k])
    assert cost.sparcml(w).recv_bytes == pytest.approx((1 + 1.5 + 3) * 800)


def test_sparcml_switches_to_dense_and_folds_odd_n():
    # Dense cap: a stage never costs more than M·4 + R/8 bytes.
    w = W(density=0.9, gamma=1.1)
    assert cost.sparcml(w).recv_bytes == pytest.approx(2 * (4000 + 125))
    # n = 3, no overlap: fold (1) + one stage at k = 1.5 + return (3), all on the path;
    # the busiest rank receives fold + stage.
    c = cost.sparcml(W(n=3, gamma=3.0))
    assert c.path_bytes == pytest.approx((1 + 1.5 + 3) * 800)
    assert c.recv_bytes == pytest.approx(max(2.5, 3) * 800)
    assert c.time(1000.0) == pytest.approx(5.5 * 800 / 1000)


def test_omnireduce_pays_skew():
    # hottest server: (n-1) · s · nnz/n · 8 in Push, and as much times γ in Pull.
    assert cost.omnireduce(W(skew=2.0)).recv_bytes == pytest.approx(3 * 2 * 25 * 8 * 3)
    assert cost.omnireduce(W(skew=1.0, num_rows=10**7, density=1e-5)).recv_bytes == \
        pytest.approx(cost.zen(W(num_rows=10**7, density=1e-5)).recv_bytes)


def test_gamma_interpolation_is_exact_at_the_extremes():
    assert cost.gamma_at(2, 1.0, 16) == 1.0
    assert cost.gamma_at(4, 16.0, 16) == pytest.approx(4.0)
    vals = [cost.gamma_at(k, 5.0, 16) for k in (1, 2, 4, 8, 16)]
    assert vals == sorted(vals) and vals[0] == 1.0 and vals[-1] == pytest.approx(5.0)


def test_eq1_vs_eq2_crossover_from_the_paper():
    # ZEN §2.3: full overlap -> Eq.1 ≈ 2(n-1)/n < log n = Eq.2 (n = 16); no overlap ->
    # Eq.2 (n-1) < Eq.1 (n-1)(1 + 1/n), both in units of 2·M·d.
    big = dict(num_rows=10**9, density=1e-6, n=16)  # COO pull (bitmap too big)
    unit = 10**9 * 1e-6 * 8
    assert cost.zen(Workload(gamma=1.0, **big)).recv_bytes / unit == pytest.approx(2 * 15 / 16)
    assert cost.sparcml(Workload(gamma=1.0, **big)).recv_bytes / unit == pytest.approx(4)
    assert cost.zen(Workload(gamma=16.0, **big)).recv_bytes / unit == pytest.approx(15 * 17 / 16)
    assert cost.sparcml(Workload(gamma=16.0, **big)).recv_bytes / unit == pytest.approx(15)


def test_best_picks_by_time_and_breaks_ties_in_order():
    dense = W(density=1.0, gamma=1.0, row_numel=16)
    assert cost.best(dense)[0] == "allreduce"
    sparse_overlap = W(num_rows=100_000, density=0.01, gamma=1.0, row_numel=16)
    assert cost.best(sparse_overlap, ("zen", "sparcml", "agsparse", "allreduce"))[0] == "zen"
    disjoint = W(num_rows=100_000, density=0.005, gamma=4.0, row_numel=16)
    assert cost.best(disjoint, ("zen", "sparcml", "agsparse", "allreduce"))[0] == "sparcml"
    name, times = cost.best(W(n=1))
    assert name == "allreduce" and all(t == 0 for t in times.values())
    assert math.isclose(cost.Cost(100.0, 3).time(10.0, latency=1.0), 13.0)
