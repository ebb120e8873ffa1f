"""CompressedSync on 2 and 3 gloo ranks: identical gradients, true byte savings, resume.

One ``run_ranks`` call per world size runs every case (process start-up dominates the
cost); the tests below assert on its results.
"""

import hashlib
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

import zentrain
from zentrain.compress import CompressConfig
from zentrain.compress.powersgd import PowerSGD
from zentrain.compress.quant import packed_size
from zentrain.sync import build_grad_sync
from zentrain.sync.compressed import CompressedSync, maybe_compress
from zentrain.sync.dense import DenseSync
from zentrain.testing import run_ranks

# Top-k goes through the ZEN reducer (the default sparse_scheme) and, in "topk-ag",
# through AGsparse; "zen-inner" wraps the ZEN scheme, which then syncs the embedding table.
CASES = {
    "topk": {"method": "topk", "ratio": 0.1},
    "topk-ag": {"method": "topk", "ratio": 0.1, "sparse_scheme": "agsparse"},
    # No rank-dependent branch here: SparseSync syncs tables before launching dense buckets
    # that waited for an unused parameter, so ranks would disagree on collective order.
    "zen-inner": {"method": "qsgd", "bits": 8, "inner": "zen", "branch": False},
    "randomk": {"method": "randomk", "ratio": 0.1, "warmup_steps": 1},
    "dgc": {"method": "topk", "ratio": 0.1, "momentum_correction": True},
    "powersgd": {"method": "powersgd", "rank": 2, "warmup_steps": 1},
    "qsgd": {"method": "qsgd", "bits": 4, "bucket_size": 100},
    "sign": {"method": "sign", "bucket_size": 100},
    "fp16": {"method": "fp16"},
    "bf16": {"method": "bf16"},
    # compress.method_for: PowerSGD for fc2, top-k (the default method) for fc1, branch
    # uncompressed; "psgd-now" is PowerSGD alone without warm-up, to compare fc2 with.
    "mix": {"method": "topk", "ratio": 0.1, "rank": 2,
            "method_for": "fc2.weight=powersgd; branch.*=none"},
    "psgd-now": {"method": "powersgd", "rank": 2},
    # compress.global_topk: servers keep each matrix's k largest sums (ZEN), or every rank
    # keeps them from the full result (agsparse); the embedding table compressed through
    # method_for, from a sparse (COO) gradient; bfloat16 on the wire.
    "gtopk": {"method": "topk", "ratio": 0.1, "global_topk": True},
    "gtopk-ag": {"method": "topk", "ratio": 0.1, "global_topk": True, "sparse_scheme": "agsparse"},
    "emb-gtopk": {"method": "topk", "ratio": 0.1, "global_topk": True,
                  "method_for": "emb.weight=topk", "sparse_emb": True, "inner": "zen",
                  "branch": False},
    "gtopk2": {"method": "topk", "ratio": 0.1, "global_topk": True, "global_topk_factor": 2},
    "topk-bf16": {"method": "topk", "ratio": 0.1, "global_topk": True, "wire_dtype": "bfloat16"},
    "psgd-bf16": {"method": "powersgd", "rank": 2, "wire_dtype": "bfloat16"},
}
STEPS = 3


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 64)
        self.norm = nn.LayerNorm(64)
        self.fc2 = nn.Linear(64, 64)
        self.branch = nn.Linear(64, 64)  # used by rank 0 only at step 1
        self.out = nn.Linear(64, 1)

    def forward(self, ids, branch=False):
        h = self.norm(torch.relu(self.fc1(self.emb(ids).mean(1))))
        h = torch.relu(self.fc2(h))
        if branch:
            h = h + self.branch(h)
        return self.out(h).squeeze(-1)


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 + 10 * step + rank)
    return torch.randint(0, 50, (6, 5), generator=g), torch.randn(6, generator=g)


def _loss(model, step, rank, branch=True):
    ids, y = _batch(step, rank)
    return ((model(ids, branch=branch and step == 1 and rank == 0) - y) ** 2).mean()


def _make(cfg_opts, sd=None):
    torch.manual_seed(0)
    model = Model()
    if sd is not None:
        model.load_state_dict(sd)
    opts = dict(cfg_opts)
    opts.pop("branch", None)
    model.emb.sparse = opts.pop("sparse_emb", False)
    inner = build_grad_sync(opts.pop("inner", "dense"))
    sync = CompressedSync(inner, CompressConfig(min_numel=512, **opts))
    return model, zentrain.DataParallel(model, sync=sync), torch.optim.SGD(model.parameters(), lr=0.1)


def _digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _true_mean(model, step, rank, world, branch):
    ref = Model()
    ref.load_state_dict(model.state_dict())
    _loss(ref, step, rank, branch).backward()
    out = {}
    for n, p in ref.named_parameters():
        g = (p.grad if p.grad is not None else torch.zeros_like(p)).double()
        dist.all_reduce(g)  # reference only: not part of the measured sync
        out[n] = g / world
    return out


def _run_case(rank, world, opts):
    branch = opts.get("branch", True)
    model, dp, opt = _make(opts)
    compressed = set(dp.grad_sync.compressed_names)
    steps, saved = [], None
    cum_sync = {n: 0.0 for n in compressed}
    cum_true = {n: 0.0 for n in compressed}
    for s in range(STEPS):
        if s == STEPS - 1:
            saved = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                     "sync": dp.grad_sync.state_dict()}
        want = _true_mean(model, s, rank, world, branch)
        _loss(dp, s, rank, branch).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        st = dp.last_stats
        steps.append({
            "digest": _digest(grads[n] for n in sorted(grads)),
            "params": {n: _digest([grads[n]]) for n in compressed},
            "nnz": {n: int(torch.count_nonzero(grads[n])) for n in compressed},
            "err_plain": max((grads[n].double() - want[n]).abs().max().item()
                             for n in grads if n not in compressed),
            "err_comp": (torch.cat([(grads[n].double() - want[n]).reshape(-1)
                                    for n in compressed]).norm()
                         / torch.cat([want[n].reshape(-1) for n in compressed]).norm()).item(),
            "bytes": st.extra["compress.bytes_sent"], "total": st.bytes_sent,
            "warmup": st.extra["compress.warmup"],
        })
        for n in compressed:
            cum_sync[n] = cum_sync[n] + grads[n].double()
            cum_true[n] = cum_true[n] + want[n]
        opt.step()
        opt.zero_grad()
    final = _digest(p for p in model.parameters())
    # Error feedback loses nothing: what was synced so far plus the ranks' mean residual is
    # the mean of every gradient so far (up to float rounding).
    residuals = dp.grad_sync.compressor.residuals
    conservation = 0.0
    for n in compressed:
        r = residuals[n].double().view_as(cum_true[n]) if n in residuals else cum_true[n] * 0
        dist.all_reduce(r)
        gap = (cum_sync[n] + r / world - cum_true[n]).abs().max() / cum_true[n].abs().max()
        conservation = max(conservation, gap.item())
    # Resume from the state saved before the last step: the same last step, bit for bit.
    model2, dp2, opt2 = _make(opts, saved["model"])
    dp2.grad_sync.load_state_dict(saved["sync"])
    _loss(dp2, STEPS - 1, rank, branch).backward()
    opt2.step()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in compressed}
    return {"steps": steps, "conservation": conservation, "resumed_same": _digest(p for p in model2.parameters()) == final,
            "shapes": shapes, "order": dp.grad_sync.compressed_names,
            "reducer": next((r.name for r in getattr(dp.grad_sync.compressor, "reducers",
                                                     {}).values()), None),
            "reducer_keys": list(getattr(dp.grad_sync.compressor, "reducers", {})),
            "inner_tables": len(getattr(dp.grad_sync.inner, "tables", []))}


def _lowrank(rank, world):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(96, 2, generator=g)
    vs = [torch.randn(70, 2, generator=g) for _ in range(world)]
    c = PowerSGD(CompressConfig(method="powersgd", rank=2))
    c.bind(None, c.counter)
    out = c.sync("w", u @ vs[rank].t())
    want = sum(u @ v.t() for v in vs) / world
    return (out - want).abs().max().item(), _digest([out])


def _accumulate(rank, world):
    """Two micro-batches, the first under no_sync: one sync of the summed gradient."""
    model, dp, _ = _make({"method": "fp16"})
    with dp.no_sync():
        _loss(dp, 0, rank).backward()
    bytes_after_first = dp.grad_sync.counter.sent
    _loss(dp, 2, rank).backward()
    ref = Model()
    ref.load_state_dict(model.state_dict())
    (_loss(ref, 0, rank) + _loss(ref, 2, rank)).backward()
    got = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()])
    want = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).double().reshape(-1)
                      for q in ref.parameters()])
    dist.all_reduce(want)
    want /= world
    return bytes_after_first, ((got - want).norm() / want.norm()).item()


def _all(rank, world, names):
    res = {name: _run_case(rank, world, CASES[name]) for name in names}
    res["accumulate"] = _accumulate(rank, world)
    res["lowrank"] = _lowrank(rank, world)
    res["passthrough"] = type(maybe_compress(DenseSync(), "none")).__name__
    return res


@pytest.fixture(scope="module")
def three():
    return run_ranks(_all, 3, list(CASES))


@pytest.fixture(scope="module")
def two():
    return run_ranks(_all, 2, ["qsgd", "powersgd", "topk"])


def _worlds(two, three):
    return [(2, two), (3, three)]


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_hold_bit_identical_gradients(three, name):
    for s in range(STEPS):
        assert len({r[name]["steps"][s]["digest"] for r in three}) == 1, f"step {s} differs"


def test_two_ranks_bit_identical(two):
    for name in ("qsgd", "powersgd", "topk"):
        for s in range(STEPS):
            assert len({r[name]["steps"][s]["digest"] for r in two}) == 1, (name, s)


@pytest.mark.parametrize("name", list(CASES))
def test_uncompressed_parameters_are_the_exact_mean(three, name):
    # Biases, the norm, the embedding table and small tensors stay on the dense path.
    for s in range(STEPS):
        assert three[0][name]["steps"][s]["err_plain"] < 1e-6


@pytest.mark.parametrize("name,tol", [("fp16", 2e-3), ("bf16", 2e-2), ("randomk", 0),
                                      ("powersgd", 0)])
def test_casts_and_warmup_steps_approximate_the_mean(three, name, tol):
    steps = three[0][name]["steps"]
    for s, st in enumerate(steps):
        if st["warmup"] or name in ("fp16", "bf16"):
            assert st["err_comp"] < (1e-6 if st["warmup"] else tol), (s, st["err_comp"])
    assert steps[0]["warmup"] == (CASES[name].get("warmup_steps", 0) > 0)


@pytest.mark.parametrize("name,tol", [
    (n, 1e-5) for n in ("topk", "randomk", "powersgd", "qsgd", "sign", "mix", "gtopk",
                        "gtopk-ag", "gtopk2", "emb-gtopk")] + [
    # bfloat16 on the wire: a rank's own rounding is fed back, the rounding of the summed
    # result (2^-9 relative, the same on every rank) is not.
    ("topk-bf16", 1e-2), ("psgd-bf16", 1e-2)])
def test_error_feedback_conserves_the_gradient_sum(three, name, tol):
    # Synced gradients drift from each step's mean (relative error ~0.3-1 here) but no
    # gradient is lost: sum of synced + mean residual == sum of true means.
    assert all(r[name]["conservation"] < tol for r in three), [r[name]["conservation"]
                                                                 for r in three]
    assert max(st["err_comp"] for st in three[0][name]["steps"]) > 1e-3  # really lossy


def _dense_bytes(shapes, world):
    return sum(2 * (world - 1) * 4 * torch.Size(s).numel() / world for s in shapes.values())


def test_bytes_are_the_true_compressed_sizes(two, three):
    for world, res in _worlds(two, three):
        r = res[0]
        for name in ("qsgd", "powersgd") + (("sign", "fp16", "bf16", "psgd-bf16")
                                            if world == 3 else ()):
            shapes = r[name]["shapes"]
            if name in ("qsgd", "sign"):
                bits = 4 if name == "qsgd" else 1
                want = sum((world - 1) * (packed_size(torch.Size(s).numel(), bits)
                                          + 4 * -(-torch.Size(s).numel() // 100))
                           for s in shapes.values())
            elif name in ("powersgd", "psgd-bf16"):
                width = 2 if name == "psgd-bf16" else 4  # bytes per factor entry
                want = sum(2 * (world - 1) * width * (s[0] + torch.Size(s[1:]).numel()) * 2
                           / world for s in shapes.values())
            else:
                want = _dense_bytes(shapes, world) / 2
            for s, st in enumerate(r[name]["steps"]):
                # Warm-up steps all-reduce float32; the counter truncates < 1 byte per call
                # (PowerSGD makes two calls per tensor).
                expect = _dense_bytes(shapes, world) if st["warmup"] else want
                assert abs(st["bytes"] - expect) < 2 * len(shapes), (world, name, s, st["bytes"])
                assert st["total"] > st["bytes"]  # the dense remainder is counted too


def test_sparsifiers_send_less_than_dense(three):
    r = three[0]
    for name in ("topk", "dgc", "randomk"):
        dense = _dense_bytes(r[name]["shapes"], 3)
        for st in r[name]["steps"]:
            if not st["warmup"]:
                assert st["bytes"] < dense, (name, st["bytes"], dense)


@pytest.mark.parametrize("name", list(CASES))
def test_resume_gives_the_same_next_step(three, name):
    assert all(r[name]["resumed_same"] for r in three)


def test_global_topk_pulls_about_k_entries_per_matrix(three):
    r = three[0]
    k = {n: math.ceil(0.1 * math.prod(s)) for n, s in r["topk"]["shapes"].items()}
    # Plain top-k returns the union of the ranks' choices: more than k somewhere...
    assert any(st["nnz"][n] > k[n] for st in r["topk"]["steps"] for n in k)
    for name, per_server, f in (("gtopk", True, 1), ("gtopk-ag", False, 1),
                                ("topk-bf16", True, 1), ("gtopk2", True, 2)):
        for st in r[name]["steps"]:
            for n, kn in k.items():  # ...gTop-k: each ZEN server ceil(f k/3), agsparse f k
                fk = math.ceil(f * kn)
                assert st["nnz"][n] <= (3 * math.ceil(fk / 3) if per_server else fk), (name, n)
    assert any(st["nnz"][n] > 3 * math.ceil(k[n] / 3) for st in r["gtopk2"]["steps"] for n in k)
    # Same first-step selection as plain top-k, fewer bytes: the Pull is ~k, not the union.
    for s in range(STEPS):
        assert r["gtopk"]["steps"][s]["bytes"] < r["gtopk2"]["steps"][s]["bytes"] \
            < r["topk"]["steps"][s]["bytes"]
        assert r["topk-bf16"]["steps"][s]["bytes"] < r["gtopk"]["steps"][s]["bytes"]


def test_embedding_table_named_in_method_for_is_compressed(three):
    r = three[0]["emb-gtopk"]
    assert "emb.weight" in r["order"] and "emb.weight" not in three[0]["gtopk"]["order"]
    assert r["inner_tables"] == 0  # not also synced by the wrapped scheme
    assert r["steps"][0]["nnz"]["emb.weight"] <= 3 * math.ceil(0.1 * 800 / 3)


def test_compressed_parameters_follow_the_policy(three):
    assert three[0]["topk"]["order"] == ["branch.weight", "fc2.weight", "fc1.weight"]


def test_method_for_routes_each_parameter_to_its_method(three):
    # Same model and batches at step 0, so each matrix of the mix must get exactly what its
    # method alone gives it; "branch" is left to the exact dense path.
    mix = three[0]["mix"]
    assert mix["order"] == ["fc2.weight", "fc1.weight"]
    first = mix["steps"][0]["params"]
    assert first["fc1.weight"] == three[0]["topk"]["steps"][0]["params"]["fc1.weight"]
    assert first["fc2.weight"] == three[0]["psgd-now"]["steps"][0]["params"]["fc2.weight"]
    assert first["fc2.weight"] != three[0]["topk"]["steps"][0]["params"]["fc2.weight"]


def test_powersgd_recovers_a_shared_low_rank_gradient(two, three):
    for _, res in _worlds(two, three):
        assert all(r["lowrank"][0] < 1e-4 for r in res)
        assert len({r["lowrank"][1] for r in res}) == 1
    assert three[0]["passthrough"] == "DenseSync"


def test_topk_goes_through_the_chosen_sparse_reducer(three):
    # Same selection, different reducers: both lossless, so the same gradients...
    for s in range(STEPS):
        assert three[0]["topk"]["steps"][s]["digest"] == three[0]["topk-ag"]["steps"][s]["digest"]
    # ...for different bytes (ZEN's balanced push/pull vs AGsparse's all-gather).
    assert three[0]["topk"]["steps"][0]["bytes"] != three[0]["topk-ag"]["steps"][0]["bytes"]
    assert three[0]["topk"]["reducer"] == "zen" and three[0]["topk-ag"]["reducer"] == "agsparse"
    # One reduce per step for all compressed matrices (fused), not one per matrix.
    assert three[0]["topk"]["reducer_keys"] == ["fused"]


def test_wrapped_zen_scheme_keeps_the_embedding_table(three):
    assert three[0]["zen-inner"]["inner_tables"] == 1


def test_no_sync_accumulates_then_syncs_once(three):
    for sent_during_no_sync, err in (r["accumulate"] for r in three):
        assert sent_during_no_sync == 0
        assert err < 2e-3
