"""GEMINI placement: replicas on distinct other nodes, balanced load, and the recovery
probability (enumeration, closed form, the paper's bound, Monte-Carlo) agreeing."""

from math import comb, sqrt

import pytest

from zentrain.ckpt.placement import (
    Placement,
    gemini_bound,
    group_recovery_probability,
    recovery_probability,
    simulate_recovery_probability,
)

CASES = [(n, m) for n in range(1, 10) for m in range(1, 4)]


@pytest.mark.parametrize("n,m", CASES)
def test_replicas_on_distinct_other_nodes(n, m):
    p = Placement(n, m)
    copies = min(n, m)
    for node in range(n):
        reps = p.replicas_of(node)
        assert node not in reps
        assert len(set(reps)) == len(reps) == copies - 1
        assert all(0 <= r < n for r in reps)
        assert p.holders_of(node) == [node, *reps]
    # Balanced: every node also stores exactly copies-1 other checkpoints (GEMINI's
    # placement sends and receives the same amount everywhere).
    for node in range(n):
        assert len(p.stored_by(node)) == copies - 1
    # Every checkpoint has m copies when there are at least m nodes.
    if n >= m:
        assert all(len(p.holders_of(i)) == m for i in range(n))


@pytest.mark.parametrize("n,m", [(n, m) for n, m in CASES if n >= m])
def test_groups_follow_the_paper(n, m):
    p = Placement(n, m)
    sizes = [len(g) for g in p.groups]
    assert sorted(x for g in p.groups for x in g) == list(range(n))
    if n % m == 0:
        assert sizes == [m] * (n // m)
        for g in p.groups:  # group placement: members hold each other's checkpoints
            for node in g:
                assert set(p.holders_of(node)) == set(g)
    else:  # N//m - 1 ordinary groups plus one ring group of m + N % m
        assert sizes == [m] * (n // m - 1) + [m + n % m]
        ring = p.groups[-1]
        for i, node in enumerate(ring):
            assert p.replicas_of(node) == [ring[(i + j) % len(ring)] for j in range(1, m)]


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="m >= 1"):
        Placement(4, 0)
    with pytest.raises(ValueError, match="out of range"):
        Placement(4, 2).replicas_of(4)


@pytest.mark.parametrize("n,m", [(4, 2), (6, 2), (6, 3), (8, 2), (9, 3), (8, 4)])
def test_closed_form_and_bound_match_enumeration(n, m):
    p = Placement(n, m)
    for k in range(n + 1):
        exact = recovery_probability(p, k)
        assert exact == pytest.approx(group_recovery_probability(n, m, k), abs=1e-12)
        bound = gemini_bound(n, m, k)
        assert exact >= bound - 1e-12
        if k < 2 * m:  # at most one group can fail: the Corollary is exact
            assert exact == pytest.approx(bound, abs=1e-12)


@pytest.mark.parametrize("n,m", [(5, 2), (7, 2), (7, 3), (8, 3), (9, 2)])
def test_mixed_placement_is_near_optimal(n, m):
    """With m failures, recovery fails only when the failed set is some node's holder set.
    At least ceil(N/m) distinct holder sets exist in any placement; GEMINI's mixed
    placement stays within (2m-3)/C(N,m) of that optimum."""
    p = Placement(n, m)
    exact = recovery_probability(p, m)
    holder_sets = {frozenset(p.holders_of(i)) for i in range(n)}
    assert exact == pytest.approx(1 - len(holder_sets) / comb(n, m), abs=1e-12)
    optimum = 1 - (-(-n // m)) / comb(n, m)
    assert 0 <= optimum - exact <= (2 * m - 3) / comb(n, m) + 1e-12


@pytest.mark.parametrize("n,m", [(6, 2), (8, 2), (9, 3), (7, 2), (8, 3)])
def test_simulation_matches_formula(n, m):
    p = Placement(n, m)
    trials = 4000
    for k in range(n + 1):
        exact = recovery_probability(p, k)
        sim = simulate_recovery_probability(p, k, trials=trials, seed=k)
        tol = 5 * sqrt(max(exact * (1 - exact), 1e-4) / trials)
        assert abs(sim - exact) <= tol, (k, sim, exact)
        if n % m == 0:
            assert sim >= gemini_bound(n, m, k) - tol


def test_fewer_failures_than_copies_always_recover():
    for n in range(2, 10):
        for m in range(1, min(n, 4) + 1):
            p = Placement(n, m)
            for k in range(m):
                assert recovery_probability(p, k) == 1.0
