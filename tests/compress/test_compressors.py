"""Compressors in one process: error feedback, bit packing, QSGD bias, PowerSGD, policy."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from zentrain.compress import CompressConfig, build_compressor, select_params
from zentrain.compress.powersgd import PowerSGD
from zentrain.compress.quant import QSGD, Sign, pack_bits, packed_size, unpack_bits
from zentrain.compress.topk import RandomK, TopK


def _cfg(method, **kw):
    return CompressConfig(method=method, **kw)


def _topk(method, **kw):
    cls = TopK if method == "topk" else RandomK
    return cls(_cfg(method, **kw))  # one rank: the ZEN reducer only merges locally


def _grads(steps, shape=(64, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * (1 + s) for s in range(steps)]


# -- bit packing --------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), n=st.integers(0, 300), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trips(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_is_little_endian_stream():
    # 3-bit codes 5, 3, 7 -> byte 0 = 5 | 3 << 3 | (7 & 3) << 6 = 221, byte 1 = 7 >> 2 = 1
    assert pack_bits(torch.tensor([5, 3, 7], dtype=torch.uint8), 3).tolist() == [221, 1]
    assert pack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 4).tolist() == [0x21, 0x03]
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.uint8),
                     1).tolist() == [0b1101, 1]


def test_unpack_rejects_wrong_length():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 10)


# -- error feedback -----------------------------------------------------------------------


@pytest.mark.parametrize("method,kw", [
    ("topk", {}), ("randomk", {}), ("topk", {"momentum_correction": True}),
])
def test_sparsifier_error_feedback_is_exact(method, kw):
    c = _topk(method, ratio=0.05, **kw)
    residual = torch.zeros(64 * 48)
    momentum = torch.zeros(64 * 48)
    for g in _grads(4):
        if kw:
            momentum = momentum * 0.9 + g.reshape(-1)
            acc = residual + momentum
        else:
            acc = residual + g.reshape(-1)
        payload = c.compress("w", g)
        sent = payload.to_dense().reshape(-1)
        residual = c.residuals["w"]
        assert torch.equal(sent + residual, acc)  # exact, bit for bit
        assert payload.indices.numel() <= c.k(g.numel())
        assert torch.all(residual[payload.indices] == 0)
        if kw:  # momentum factor masking
            momentum = momentum.clone()
            momentum[payload.indices] = 0
            assert torch.equal(c.momenta["w"], momentum)
        c.communicate("w", payload).wait()
        c.step += 1


@pytest.mark.parametrize("method", ["topk", "qsgd", "powersgd"])
def test_error_feedback_only_for_matching_names(method):
    c = build_compressor(method, error_feedback_params="head.*, *.fc1.*", ratio=0.05)
    for name in ("head.weight", "blocks.0.fc1.weight", "blocks.0.fc2.weight"):
        g = _grads(1, seed=3)[0]
        out = c.sync(name, g)
        kept = name in c.residuals
        assert kept == (name != "blocks.0.fc2.weight")
        if kept:  # what was dropped waits in the residual, exactly (one rank)
            assert torch.allclose(out.reshape(-1) + c.residuals[name], g.reshape(-1), atol=1e-5)
        else:
            assert not torch.equal(out, g)  # lossy, and nothing kept for later


def test_topk_keeps_the_largest_entries():
    c = _topk("topk", ratio=0.1)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    payload = c.compress("w", g)
    assert payload.indices.numel() == 100
    threshold = g.abs().sort(descending=True).values[99]
    assert torch.all(g.abs()[payload.indices] >= threshold)
    expect = torch.zeros_like(g)
    expect[payload.indices] = g[payload.indices]
    assert torch.equal(c.sync("v", g), expect)  # one rank: the mean is what was sent


def test_topk_reduces_queued_matrices_together_in_any_wait_order():
    shapes = {"a": (30, 20), "b": (7,), "c": (16, 16)}
    g = torch.Generator().manual_seed(3)
    grads = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    alone = {n: _topk("topk", ratio=0.1).sync(n, x) for n, x in grads.items()}
    c = _topk("topk", ratio=0.1)
    pending = {n: c.communicate(n, c.compress(n, x)) for n, x in grads.items()}
    assert not any(p.done for p in pending.values())  # queued, nothing reduced yet
    for n in ("c", "a", "b"):  # the first wait reduces all three in one call
        assert torch.equal(pending[n].wait(), alone[n]), n
    assert list(c.reducers) == ["fused"] and not c._queue and not c._results
    c.communicate("a", c.compress("a", grads["a"]))
    with pytest.raises(RuntimeError, match="'a' was queued twice"):
        c.communicate("a", c.compress("a", grads["a"]))


def test_randomk_indices_shared_by_ranks_and_vary_by_step():
    a, b = _topk("randomk", ratio=0.1), _topk("randomk", ratio=0.1)
    b.rank = 1  # a different rank must draw the same indices
    g = torch.randn(500)
    i0 = a.compress("w", g).indices
    assert torch.equal(i0, b.compress("w", g).indices)
    a.step += 1
    assert not torch.equal(i0, a.compress("w", g).indices)


@pytest.mark.parametrize("cls,kw", [(QSGD, {"bits": 4}), (QSGD, {"bits": 2}), (Sign, {})])
def test_quantizer_error_feedback(cls, kw):
    method = "qsgd" if cls is QSGD else "sign"
    c = cls(_cfg(method, bucket_size=100, **kw))
    residual = torch.zeros(64 * 48)
    for g in _grads(4):
        acc = residual + g.reshape(-1)
        payload = c.compress("w", g)
        sent = c.decompress(payload).reshape(-1)
        residual = c.residuals["w"]
        # residual is acc - sent exactly; adding back is exact up to one rounding.
        assert torch.equal(residual, acc - sent)
        torch.testing.assert_close(sent + residual, acc, rtol=0, atol=1e-6 * acc.abs().max())
        assert payload.packed.numel() == packed_size(g.numel(), c.bits)
        c.step += 1


def test_sign_sends_scaled_signs():
    c = Sign(_cfg("sign", bucket_size=4, error_feedback=False))
    x = torch.tensor([1.0, -3.0, 0.0, 2.0, -1.0, 5.0])  # buckets [1,-3,0,2] and [-1,5]
    got = c.decompress(c.compress("w", x))
    assert got.tolist() == [1.5, -1.5, 1.5, 1.5, -3.0, 3.0]


# -- QSGD is unbiased ---------------------------------------------------------------------


def _z_scores(rounding, trials=400, bits=3, n=2000):
    """Standardized error of the mean of ``trials`` quantizations of a fixed vector."""
    c = QSGD(_cfg("qsgd", bits=bits, bucket_size=n, error_feedback=False, seed=7))
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    if rounding == "nearest":  # a biased quantizer the test must reject
        c.encode = _nearest_encode(c)
    total = torch.zeros(n, dtype=torch.float64)
    for t in range(trials):
        c.step = t
        total += c.decompress(c.compress("w", x)).double()
    mean = total / trials
    s = c.levels
    unit = x.abs().max().double() / s
    frac = (x.abs().double() / unit) % 1.0  # Bernoulli p of rounding up
    sd = unit * torch.sqrt(frac * (1 - frac) / trials)
    ok = frac > 1e-6
    return ((mean - x.double())[ok] / sd[ok])


def _nearest_encode(c):
    orig = c.encode

    def enc(name, x):
        codes, scales = orig(name, x)
        y = x.abs() / scales[0] * c.levels
        level = torch.round(y)
        return (torch.where(x < 0, -level, level) + c.levels).to(torch.uint8), scales
    return enc


def test_qsgd_is_unbiased_in_expectation():
    z = _z_scores("stochastic")
    # Unbiased: z ~ N(0, 1) per entry. 2000 entries: |mean z| < 0.1 (4.5 sigma), E[z^2] = 1.
    assert abs(z.mean().item()) < 0.1, z.mean()
    assert 0.85 < (z * z).mean().item() < 1.15, (z * z).mean()
    assert z.abs().max().item() < 5.5
    # The same statistic rejects round-to-nearest, so the test has teeth.
    zb = _z_scores("nearest")
    assert (zb * zb).mean().item() > 10


# -- PowerSGD -----------------------------------------------------------------------------


def test_powersgd_reproduces_a_low_rank_gradient():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(120, 3, generator=g) @ torch.randn(3, 80, generator=g)
    c = PowerSGD(_cfg("powersgd", rank=3))
    out = c.sync("w", m)
    torch.testing.assert_close(out, m, rtol=1e-4, atol=1e-4)
    assert c.residuals["w"].abs().max() < 1e-4 * m.abs().max()
    low = PowerSGD(_cfg("powersgd", rank=1))  # rank too low: a real approximation error
    assert (low.sync("w", m) - m).abs().max() > 1e-2


@pytest.mark.parametrize("wire", ["float32", "bfloat16"])
def test_powersgd_error_feedback_and_warm_start(wire):
    c = PowerSGD(_cfg("powersgd", rank=2, wire_dtype=wire))
    residual = torch.zeros(64 * 48)
    for g in _grads(3):
        acc = residual + g.reshape(-1)
        out = c.sync("w", g)
        residual = c.residuals["w"]
        # bfloat16: the residual is taken against the sent (rounded) Q_w, so it still
        # accounts for everything not delivered.
        torch.testing.assert_close(out.reshape(-1) + residual, acc, rtol=0, atol=1e-5)
        assert c.qs["w"].shape == (48, 2)
        c.step += 1
    if wire == "bfloat16":  # really rounded
        g = _grads(1)[0]
        assert not torch.equal(PowerSGD(_cfg("powersgd", rank=2)).sync("w", g),
                               PowerSGD(_cfg("powersgd", rank=2, wire_dtype=wire)).sync("w", g))


def test_powersgd_survives_a_zero_gradient():
    c = PowerSGD(_cfg("powersgd", rank=2))
    out = c.sync("w", torch.zeros(40, 30))
    assert torch.equal(out, torch.zeros(40, 30))
    assert torch.isfinite(c.sync("w", torch.randn(40, 30))).all()


def test_powersgd_only_accepts_worthwhile_matrices():
    c = PowerSGD(_cfg("powersgd", rank=4))
    assert c.accepts((256, 256)) and c.accepts((64, 3, 3, 3))
    assert not c.accepts((256,)) and not c.accepts((8, 8)) and not c.accepts((2, 1000))


# -- policy and config --------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1000, 64)
        self.fc1 = nn.Linear(64, 128)
        self.norm = nn.LayerNorm(128)
        self.fc2 = nn.Linear(128, 64)
        self.small = nn.Linear(8, 8)
        self.head = nn.Linear(64, 1000, bias=False)
        self.head.weight = self.emb.weight  # tied to the table: not compressed


def test_policy_skips_embeddings_norms_biases_and_small():
    chosen = select_params(Net(), _cfg("topk", min_numel=1000))
    assert [n for n, _ in chosen] == ["fc2.weight", "fc1.weight"]


def test_policy_raises_when_nothing_qualifies():
    with pytest.raises(ValueError, match="matched no parameter.*min_numel=100000"):
        select_params(Net(), _cfg("qsgd", min_numel=100_000))


def test_error_feedback_pattern_must_match_a_compressed_parameter():
    cfg = _cfg("topk", min_numel=1000, error_feedback_params="fc2.weight,fc3.*")
    with pytest.raises(ValueError, match=r"'fc3.\*' matches no compressed parameter "
                                         r"\(compressed: fc1.weight, fc2.weight\)"):
        select_params(Net(), cfg)
    cfg.error_feedback = False  # patterns are moot without error feedback
    assert len(select_params(Net(), cfg)) == 2
    with pytest.raises(ValueError, match="compress.error_feedback_params=' , '"):
        _cfg("topk", error_feedback_params=" , ")
    with pytest.raises(ValueError, match="momentum_correction needs error feedback on every"):
        _cfg("topk", momentum_correction=True, error_feedback_params="head.*")


def test_config_names_bad_fields():
    with pytest.raises(ValueError, match=r"compress.method='zip'.*topk"):
        CompressConfig(method="zip")
    with pytest.raises(ValueError, match="compress.bits=9"):
        CompressConfig(method="qsgd", bits=9)
    with pytest.raises(ValueError, match="unknown compress option.*'ration'"):
        CompressConfig.coerce({"method": "topk", "ration": 0.1})
    assert CompressConfig.coerce("sign").method == "sign"
    for m in ("topk", "randomk", "powersgd", "qsgd", "sign", "fp16", "bf16"):
        assert build_compressor(m).name == m


def test_state_dict_round_trip_gives_same_next_step():
    for method in ("topk", "qsgd", "powersgd"):
        a = build_compressor(method, min_numel=1)
        if method == "topk":
            a = _topk("topk")
        gs = _grads(3)
        a.sync("w", gs[0])
        a.step += 1
        b = build_compressor(method) if method != "topk" else _topk("topk")
        b.load_state_dict(a.state_dict())
        assert torch.equal(a.sync("w", gs[1]), b.sync("w", gs[1])), method
        assert math.isclose(a.residuals["w"].sum().item(), b.residuals["w"].sum().item())


def test_chunked_topk_is_exact():
    from zentrain.compress import topk as topk_mod

    x = torch.randn(50_000, generator=torch.Generator().manual_seed(5))
    old = topk_mod._CHUNK
    topk_mod._CHUNK = 4096  # force the chunked path on a small tensor
    try:
        got = topk_mod.topk_abs(x, 300)
    finally:
        topk_mod._CHUNK = old
    want = torch.topk(x.abs(), 300).indices
    assert torch.equal(got.sort().values, want.sort().values)


# -- per-parameter methods (compress.method_for) -----------------------------------------


def test_method_for_parses_and_picks_the_first_matching_entry():
    cfg = _cfg("topk", method_for="fc2.*, head.* = powersgd; fc* = none")
    assert cfg.method_rules == [(["fc2.*", "head.*"], "powersgd"), (["fc*"], "none")]
    assert cfg.method_of("fc2.weight") == "powersgd"
    assert cfg.method_of("fc1.weight") == "none"
    assert cfg.method_of("out.weight") == "topk"
    assert cfg.methods_used == ["topk", "powersgd"]
    for bad in ("fc2.weight", "fc2.weight=zip", "=powersgd", "fc1=topk;;x=", " , =topk"):
        with pytest.raises(ValueError, match="compress.method_for entry .* is invalid"):
            _cfg("topk", method_for=bad)
    with pytest.raises(ValueError, match="method_for='fc1=topk' needs compress.method"):
        _cfg("none", method_for="fc1=topk")
    with pytest.raises(ValueError, match="momentum_correction works with one method"):
        _cfg("topk", momentum_correction=True, method_for="fc1.*=powersgd")
    _cfg("topk", momentum_correction=True, method_for="fc1.*=none")  # allowed


def test_policy_applies_method_for():
    cfg = _cfg("topk", min_numel=1000, rank=4, method_for="fc1.weight=none")
    assert [n for n, _ in select_params(Net(), cfg)] == ["fc2.weight"]
    # Only PowerSGD's matrices go through its shape check: a refused shape stays uncompressed.
    cfg = _cfg("topk", min_numel=1000, rank=40, method_for="fc2.weight=powersgd")
    c = build_compressor(cfg)
    assert c.name == "topk+powersgd"
    assert [n for n, _ in select_params(Net(), cfg, c.accepts_param)] == ["fc1.weight"]
    cfg.rank = 4
    c = build_compressor(cfg)
    assert [n for n, _ in select_params(Net(), cfg, c.accepts_param)] == ["fc2.weight",
                                                                          "fc1.weight"]
    with pytest.raises(ValueError, match=r"method_for pattern 'fc3.\*' \(=powersgd\) matches no "
                                         r"weight matrix \(candidates: fc1.weight, fc2.weight"):
        select_params(Net(), _cfg("topk", method_for="fc3.*=powersgd"))
    with pytest.raises(ValueError, match="matched no parameter.*method other than none"):
        select_params(Net(), _cfg("topk", min_numel=1000, method_for="fc*=none"))


def test_mixed_compressor_routes_and_round_trips_its_state():
    cfg = _cfg("topk", ratio=0.1, rank=2, min_numel=1, method_for="b=powersgd")
    gs = _grads(4)
    a = build_compressor(cfg)
    alone = {"a": _topk("topk", ratio=0.1), "b": PowerSGD(_cfg("powersgd", rank=2))}
    for g in gs[:2]:  # the same results as each method alone, step after step
        for name in ("a", "b"):
            assert torch.equal(a.sync(name, g), alone[name].sync(name, g)), name
        a.step += 1
        alone["a"].step += 1
        alone["b"].step += 1
    assert set(a.residuals) == {"a", "b"} and a.parts["powersgd"].qs.keys() == {"b"}
    b = build_compressor(cfg)
    b.load_state_dict(a.state_dict())
    assert b.step == 2 and b.parts["topk"].step == 2
    for name in ("a", "b"):
        assert torch.equal(a.sync(name, gs[2]), b.sync(name, gs[2])), name
    with pytest.raises(ValueError, match="state is for 'topk', this run compresses with "
                                         "'topk\\+powersgd'"):
        b.load_state_dict(alone["a"].state_dict())


# -- bfloat16 on the wire, global top-k, embedding tables -----------------------------------


def test_bfloat16_wire_keeps_error_feedback_exact():
    c = _topk("topk", ratio=0.05, wire_dtype="bfloat16")
    residual = torch.zeros(64 * 48)
    for g in _grads(3):
        acc = residual + g.reshape(-1)
        payload = c.compress("w", g)
        assert payload.values.dtype == torch.bfloat16
        residual = c.residuals["w"]
        # The rounding error stays behind, exactly: sent (as float32) + residual == acc.
        assert torch.equal(payload.to_dense().reshape(-1) + residual, acc)
        assert residual[payload.indices].abs().max() > 0  # really rounded
        c.communicate("w", payload).wait()


def _keep_reference(idx, vals, starts, budgets):
    keep = []
    for i, v in zip(idx.tolist(), vals.abs().tolist()):
        s = max(j for j in range(len(starts) - 1) if starts[j] <= i)
        rivals = [(-abs(w), k) for k, w in zip(idx.tolist(), vals.tolist())
                  if starts[s] <= k < starts[s + 1]]
        keep.append(sorted(rivals).index((-v, i)) < budgets[s])
    return keep


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(0, 60), cut=st.integers(1, 99),
       b0=st.integers(0, 8), b1=st.integers(0, 8))
def test_keep_largest_keeps_each_segments_largest(seed, n, cut, b0, b1):
    from zentrain.compress.topk import keep_largest
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(100, generator=g)[:n].sort().values
    vals = torch.randint(-4, 5, (n, 1), generator=g).float()  # many ties: lower index wins
    starts, budgets = [0, cut, 100], [b0, b1]
    got = keep_largest(idx, vals, torch.tensor(starts), torch.tensor(budgets))
    assert got.tolist() == _keep_reference(idx, vals.reshape(-1), starts, budgets)


def test_policy_compresses_embedding_tables_only_when_named():
    assert "emb.weight" not in [n for n, _ in select_params(Net(), _cfg("topk", min_numel=1000))]
    cfg = _cfg("topk", min_numel=1000, method_for="emb.weight=topk")
    assert [n for n, _ in select_params(Net(), cfg)] == ["fc2.weight", "fc1.weight",
                                                         "emb.weight"]
    cfg = _cfg("topk", min_numel=1000, method_for="emb.weight=none")  # named, left alone
    assert [n for n, _ in select_params(Net(), cfg)] == ["fc2.weight", "fc1.weight"]


def test_wire_and_global_topk_options_are_checked():
    with pytest.raises(ValueError, match=r"compress.wire_dtype='float16' is invalid.*bfloat16"):
        _cfg("topk", wire_dtype="float16")
    with pytest.raises(ValueError, match="global_topk applies to method topk.*powersgd"):
        _cfg("powersgd", global_topk=True)
    with pytest.raises(ValueError, match="global_topk does not combine with momentum_corr"):
        _cfg("topk", global_topk=True, momentum_correction=True)
    with pytest.raises(ValueError, match=r"compress.global_topk_factor=0.5 is invalid"):
        _cfg("topk", global_topk=True, global_topk_factor=0.5)
    assert _cfg("powersgd", global_topk=True, method_for="head.*=topk").global_topk


def test_options_name_what_changes_the_payload():
    assert CompressConfig().options == [] and _cfg("topk").options == []
    assert _cfg("topk", global_topk=True, global_topk_factor=2, wire_dtype="bfloat16",
                error_feedback_params="head.*").options == \
        ["global top-k 2x", "bf16 wire", "EF on head.*"]
    assert _cfg("powersgd", error_feedback=False, warmup_steps=5).options == \
        ["no EF", "5 dense steps"]
    # the label names state (checked on load), so options stay out of it
    assert _cfg("topk", global_topk=True).label == "topk"


def _gtopk_digest(rank, world):
    from zentrain.sync import comm
    c = build_compressor(CompressConfig(method="topk", ratio=0.02, global_topk=True))
    c.bind(torch.distributed.group.WORLD, comm.ByteCounter())
    g = torch.Generator().manual_seed(rank)
    grads = {f"w{i}": torch.randn(96, 64, generator=g) for i in range(3)}
    pend = [c.communicate(n, c.compress(n, x)) for n, x in grads.items()]
    return [p.wait().nonzero().flatten().tolist() for p in pend]


def test_global_topk_keeps_the_same_entries_in_every_run():
    # Each ZEN server keeps the largest sums of its own partition, so the hash seeds decide
    # which entries survive: they must come from compress.seed, not from the OS.
    from zentrain.testing import run_ranks
    first, second = run_ranks(_gtopk_digest, 3), run_ranks(_gtopk_digest, 3)
    assert first[0] == first[2] and first == second
