"""Parity of the GradSync schemes against a single-process reference (2-3 gloo ranks)."""

import hashlib

import pytest
import torch
from torch import nn

import zentrain
from zentrain.testing import run_ranks


class Tiny(nn.Module):
    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8, sparse=sparse)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 1)
        self.unused = nn.Linear(4, 4)  # unused, or used by some ranks only: must not hang
        self.branch = False

    def forward(self, ids):
        h = torch.relu(self.fc1(self.emb(ids).mean(1)))
        if self.branch and int(ids[0, 0]) % 2:  # a branch only some ranks take some steps
            h = h + self.unused(h[:, :4]).sum() * 0
        return self.fc2(h).squeeze(-1)


def _data(step: int, world: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 50, (4 * world, 3), generator=g)
    y = torch.randn(4 * world, generator=g)
    return ids, y


def _train(model, steps, world, rank, accum=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(steps):
        ids, y = _data(s, world)
        ids, y = ids[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]
        chunks = list(zip(ids.chunk(accum), y.chunk(accum)))
        for i, (xi, yi) in enumerate(chunks):
            ctx = model.no_sync() if (accum > 1 and i < accum - 1) else _null()
            with ctx:
                loss = ((model(xi) - yi) ** 2).mean() / accum
                loss.backward()
        if hasattr(model, "finish_sync"):
            model.finish_sync()
        for p in model.parameters():
            if p.grad is not None and p.grad.is_sparse:
                p.grad = p.grad.to_dense()
        opt.step()
        opt.zero_grad()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _digest(params):
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(params[k].numpy().tobytes())
    return h.hexdigest()


def _parity(rank, world, scheme, sparse, accum):
    torch.manual_seed(0)
    ref = Tiny(sparse)
    torch.manual_seed(rank)  # ranks start different: DataParallel must broadcast rank 0's
    model = Tiny(sparse)
    if rank == 0:
        model.load_state_dict(ref.state_dict())
    opts = {"find_unused_parameters": True} if scheme == "ddp" else {}
    dp = zentrain.DataParallel(model, sync=scheme, **opts)
    _train(dp, 3, world, rank, accum)
    # Reference: one process, the concatenated batch.
    _train(ref, 3, 1, 0, 1) if world == 1 else _train_ref(ref, 3, world)
    got = _params(model)
    want = _params(ref)
    maxdiff = max((got[k] - want[k]).abs().max().item() for k in want)
    return maxdiff, _digest(got), dp.last_stats.bytes_sent


def _train_ref(model, steps, world):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for s in range(steps):
        ids, y = _data(s, world)
        loss = ((model(ids) - y) ** 2).mean()
        loss.backward()
        for p in model.parameters():
            if p.grad is not None and p.grad.is_sparse:
                p.grad = p.grad.to_dense()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("scheme,sparse,world,accum", [
    ("dense", False, 2, 1),
    ("dense", True, 3, 2),
    ("ddp", False, 2, 1),
    ("ddp", True, 2, 2),
    ("zen", False, 3, 1),
    ("zen", True, 2, 2),
    ("agsparse", False, 2, 1),
    ("sparcml", True, 3, 1),
    ("omnireduce", False, 2, 2),
    ("auto", False, 2, 1),
])
def test_parity_with_single_process(scheme, sparse, world, accum):
    out = run_ranks(_parity, world, scheme, sparse, accum)
    for maxdiff, _, sent in out:
        assert maxdiff < 1e-5, maxdiff
        assert sent > 0
    assert len({d for _, d, _ in out}) == 1, "ranks ended with different parameters"


def test_one_rank_needs_no_process_group():
    torch.manual_seed(0)
    model = Tiny()
    dp = zentrain.DataParallel(model, sync="dense")
    ids, y = _data(0, 1)
    ((dp(ids) - y) ** 2).mean().backward()
    stats = dp.finish_sync()
    assert stats.bytes_sent == 0
    assert model.fc1.weight.grad is not None


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sync scheme 'nope'"):
        zentrain.DataParallel(Tiny(), sync="nope")


def _compressed(rank, world):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 1))
    dp = zentrain.DataParallel(model, sync="dense",
                               compress={"method": "topk", "ratio": 0.05, "min_numel": 1000})
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(rank))
    dp(x).pow(2).mean().backward()
    return dp.grad_sync.name, dp.last_stats.bytes_sent, _digest(
        {n: p.grad for n, p in model.named_parameters()})


def test_dataparallel_compress_option_syncs_identically():
    out = run_ranks(_compressed, 2)
    assert out[0][0] == "dense+topk"
    assert out[0][2] == out[1][2]  # bit-identical gradients
    dense_bytes = 2 * (64 * 128 + 128 * 1) * 4 / 2  # what dense would send for the matrices
    assert out[0][1] < dense_bytes


def _branchy(rank, world, scheme):
    torch.manual_seed(0)
    model = Tiny()
    model.branch = True
    dp = zentrain.DataParallel(model, sync=scheme)
    for s in range(4):
        ids = torch.randint(0, 50, (4, 3), generator=torch.Generator().manual_seed(10 * s + rank))
        dp(ids).pow(2).mean().backward()
    return _digest({n: p.grad for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("scheme", ["dense", "zen"])
def test_rank_dependent_unused_params_do_not_hang(scheme):
    out = run_ranks(_branchy, 2, scheme, timeout=120)
    assert out[0] == out[1]
