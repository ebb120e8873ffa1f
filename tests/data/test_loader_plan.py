"""The global order, without processes: permutations, mixing, world sizes, resume."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zentrain.config import Config, ConfigError, SourceConfig
from zentrain.data import build_loader
from zentrain.data.plan import (
    LoaderState,
    MixSchedule,
    Planner,
    allocate,
    batch_digest,
    feistel_permute,
)


@given(n=st.integers(1, 5000), key=st.integers(0, 2**64 - 1))
@settings(max_examples=60, deadline=None)
def test_feistel_is_a_permutation(n, key):
    y = feistel_permute(np.arange(n), n, key)
    assert sorted(y.tolist()) == list(range(n))


def test_feistel_depends_on_key_and_looks_shuffled():
    a, b = feistel_permute(np.arange(1000), 1000, 1), feistel_permute(np.arange(1000), 1000, 2)
    assert not np.array_equal(a, b)
    assert abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.1  # no visible trend


@given(total=st.integers(0, 300), w=st.lists(st.floats(0, 10), min_size=1, max_size=5),
       u=st.floats(0, 0.999999))
def test_allocate_sums_and_stays_within_one_of_expected(total, w, u):
    w = np.array(w)
    if w.sum() == 0:
        w[0] = 1.0
    c = allocate(total, w, u)
    assert c.sum() == total and (c >= 0).all()
    assert (np.abs(c - total * w / w.sum()) < 1 + 1e-9).all()
    assert (c[w == 0] == 0).all()


def planner(sizes, gbs, weights=None, seed=3, step=0, consumed=None):
    srcs = tuple(SourceConfig(weight=x) for x in (weights or [1.0] * len(sizes)))
    state = LoaderState(step, consumed or [0] * len(sizes), gbs)
    return Planner(sizes, MixSchedule(srcs), seed, state)


def test_every_sample_once_per_epoch_and_epochs_differ():
    p = planner([50], 10)
    ids = np.concatenate([p.global_ids(s)[:, 1] for s in range(10)])  # two epochs
    assert sorted(ids[:50].tolist()) == list(range(50)) == sorted(ids[50:].tolist())
    assert not np.array_equal(ids[:50], ids[50:])


def test_planner_random_access_equals_sequential():
    seq = planner([37, 101], 16, [1, 2])
    want = [seq.global_ids(s).copy() for s in range(700)]
    rnd = planner([37, 101], 16, [1, 2])
    for s in (650, 3, 299, 512, 0, 699):
        assert np.array_equal(rnd.global_ids(s), want[s])


# --- through the loader (synthetic CTR: no files, no caches) ------------------------------------

def ctr_cfg(**data):
    cfg = Config()
    cfg.model.name = "deepfm"
    cfg.model.rows_per_field = 100
    cfg.data.synthetic_samples = 1000
    cfg.data.num_workers = 0
    cfg.train.batch_size = 8
    cfg.train.eval_batches = 2
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def two_sources(**kw):
    return [SourceConfig(format="synthetic", name="a", weight=0.75, **kw),
            SourceConfig(format="synthetic", name="b", weight=0.25)]


def global_batches(world, steps, start=None, accum=1, **data):
    """The concatenation of every rank's micro-batches, per step."""
    loaders = []
    for r in range(world):
        cfg = ctr_cfg(**data)
        cfg.train.grad_accum = accum
        loaders.append(build_loader(cfg, r, world, is_builder=True))
        if start is not None:
            loaders[-1].load_state_dict(start)
    first = loaders[0].next_step
    out = []
    for s in range(first, first + steps):
        parts = [ld.train_batch(s, m)["cats"] for ld in loaders for m in range(accum)]
        out.append(torch.cat(parts))
        assert len({ld.batch_digest(s) for ld in loaders}) == 1
    return out, loaders


@pytest.mark.parametrize("world,accum", [(2, 1), (4, 1), (2, 2), (1, 4)])
def test_order_is_the_same_for_any_world_size(world, accum):
    ref, _ = global_batches(1, 12, global_batch_size=16, sources=two_sources())
    got, _ = global_batches(world, 12, accum=accum, global_batch_size=16,
                            sources=two_sources())
    for s, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), f"step {s}"


@pytest.mark.parametrize("world_before,world_after", [(4, 2), (2, 4), (1, 2), (4, 1)])
def test_resume_at_another_world_size_continues_exactly(world_before, world_after):
    ref, _ = global_batches(1, 10, global_batch_size=16, sources=two_sources())
    _, before = global_batches(world_before, 6, global_batch_size=16, sources=two_sources())
    saved = before[1 % world_before].state_dict()
    assert all(torch.equal(saved["consumed"], ld.state_dict()["consumed"]) for ld in before)
    assert int(saved["step"]) == 6 and int(saved["global_batch_size"]) == 16
    # The resumed run does not set data.global_batch_size: the state carries it.
    after, loaders = global_batches(world_after, 4, start=saved, sources=two_sources())
    assert loaders[0].global_batch_size == 16
    for s, (a, b) in enumerate(zip(ref[6:], after), start=6):
        assert torch.equal(a, b), f"step {s}"


def test_state_counts_consumed_samples_and_digests_identify_batches():
    _, (ld,) = global_batches(1, 5, global_batch_size=16, sources=two_sources())
    sd = ld.state_dict()
    mixes = [ld.mixture(s) for s in range(5)]
    assert sd["consumed"].tolist() == [sum(m["a"] for m in mixes), sum(m["b"] for m in mixes)]
    assert all(sum(m.values()) == 16 for m in mixes)
    digests = [ld.batch_digest(s) for s in range(5)]
    assert len(set(digests)) == 5
    assert digests[2] == batch_digest(ld.sample_ids(2))
    # A different seed is a different order.
    assert build_loader(_seeded(0), 0, 1, True).batch_digest(2) != digests[2]


def _seeded(seed):
    cfg = ctr_cfg(global_batch_size=16, sources=two_sources())
    cfg.train.seed = seed
    return cfg


def test_mixture_within_binomial_tolerance():
    cfg = ctr_cfg(global_batch_size=32, sources=two_sources())
    ld = build_loader(cfg, 0, 1, True)
    steps, gbs, p = 400, 32, 0.75
    a = sum(ld.mixture(s)["a"] for s in range(steps))
    n = steps * gbs
    assert abs(a - n * p) <= 4 * math.sqrt(n * p * (1 - p))
    # Stratified: every step is within one sample of its expected share.
    assert all(abs(ld.mixture(s)["a"] - gbs * p) < 1 for s in range(50))


def test_linear_ramp_changes_the_mixture():
    srcs = [SourceConfig(format="synthetic", name="a", weight=1.0, weight_end=0.0,
                         ramp_steps=100),
            SourceConfig(format="synthetic", name="b", weight=0.0, weight_end=1.0,
                         ramp_steps=100)]
    ld = build_loader(ctr_cfg(global_batch_size=20, sources=srcs), 0, 1, True)
    assert ld.mixture(0) == {"a": 20, "b": 0}
    assert ld.mixture(100) == {"a": 0, "b": 20} == ld.mixture(500)
    mid = sum(ld.mixture(s)["a"] for s in range(45, 55)) / 200
    assert abs(mid - 0.5) < 0.06


def test_a_ramp_can_start_later():
    srcs = [SourceConfig(format="synthetic", name="a", weight=3.0, weight_end=0.0,
                         ramp_steps=100, ramp_start=300),
            SourceConfig(format="synthetic", name="b", weight=1.0)]
    ld = build_loader(ctr_cfg(global_batch_size=20, sources=srcs), 0, 1, True)
    assert all(ld.mixture(s) == {"a": 15, "b": 5} for s in (0, 150, 300))
    assert ld.mixture(400) == {"a": 0, "b": 20} == ld.mixture(900)
    # Halfway (step 350): a weighs 1.5 against 1, so 12 of 20 samples on average.
    mid = sum(ld.mixture(s)["a"] for s in range(348, 353)) / 5
    assert abs(mid - 12) <= 1
    assert "3->0 over 100 steps from step 300" in ld.describe


def test_global_batch_must_split_over_ranks_and_micro_batches():
    with pytest.raises(ConfigError, match=r"data.global_batch_size = 10 samples cannot be "
                                          r"split evenly over 4 ranks"):
        build_loader(ctr_cfg(global_batch_size=10), 0, 4, True)
    ld = build_loader(ctr_cfg(global_batch_size=12), 0, 3, True)
    sd = ld.state_dict()
    with pytest.raises(ConfigError, match="the checkpoint's global batch size = 12"):
        build_loader(ctr_cfg(), 0, 8, True).load_state_dict(sd)


def test_global_batch_larger_than_the_data_is_an_error():
    from zentrain.data.corpus import DataError

    with pytest.raises(DataError, match=r"--nproc 8 larger than the data allows: a global "
                                        r"batch of 64 samples .* only 50 training samples"):
        build_loader(ctr_cfg(synthetic_samples=50), 0, 8, True)


def test_earlier_step_than_the_state_is_an_error():
    ld = build_loader(ctr_cfg(), 0, 1, True)
    ld.train_batch(3, 0)
    ld.load_state_dict(ld.state_dict())  # at step 4
    with pytest.raises(ValueError, match="before the loader state's step 4"):
        ld.train_batch(2, 0)


def test_default_global_batch_and_shapes():
    ld = build_loader(ctr_cfg(), 1, 2, True)
    assert ld.global_batch_size == 16 and ld.items_per_batch == 8 and ld.unit == "samples"
    b = ld.train_batch(0, 0)
    assert b["dense"].shape == (8, 13) and b["cats"].shape == (8, 26) and b["labels"].shape == (8,)
    assert b["cats"].dtype == torch.long and b["dense"].dtype == torch.float32
    ev = ld.eval_batches()
    assert len(ev) == 2 and ev[0]["cats"].shape == (8, 26)
    # Eval samples come from past the training ids, the same on every rank.
    ev0 = build_loader(ctr_cfg(), 0, 2, True).eval_batches()
    assert all(torch.equal(x["cats"], y["cats"]) for x, y in zip(ev, ev0))
