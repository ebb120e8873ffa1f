"""compress.method="auto": per-matrix methods from the model's shapes, and the same
gradients as the explicit mix it stands for, on 2 gloo ranks."""

import hashlib

import pytest
import torch
from torch import nn

import zentrain
from zentrain.compress import CompressConfig, build_compressor, select_params
from zentrain.compress.auto import resolve_auto, tied_tables, vocab_matrices
from zentrain.config import Config
from zentrain.models import build_model
from zentrain.testing import run_ranks

V = 96


class TinyLM(nn.Module):
    def __init__(self, tied=False):
        super().__init__()
        self.tok = nn.Embedding(V, 16)
        self.pos = nn.Embedding(8, 16)  # a smaller table: not the vocabulary
        self.fc = nn.Linear(16, 48)
        self.proj = nn.Linear(48, 16)
        self.head = nn.Linear(16, V, bias=False)
        if tied:
            self.head.weight = self.tok.weight

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.head(self.proj(torch.relu(self.fc(h))))


def test_gpt_output_layer_gets_topk_and_the_rest_powersgd():
    with torch.device("meta"):
        model = build_model(Config().model)
    cfg = resolve_auto(CompressConfig(method="auto", rank=8), model)
    assert (cfg.method, cfg.method_for, cfg.rank) == ("powersgd", "head.weight=topk", 8)
    assert cfg.label == "powersgd+topk"
    # the same matrices, each with the same method, as the mix measured in
    # docs/compression.md (top-k on the output layer, PowerSGD on blocks.* and pos_emb)
    mix = CompressConfig(method="topk", rank=8, method_for="blocks.*,pos_emb=powersgd")
    assert [(n, cfg.method_of(n)) for n, _ in select_params(model, cfg)] == \
        [(n, mix.method_of(n)) for n, _ in select_params(model, mix)]


def test_user_rules_come_first_and_other_methods_pass_through():
    model = TinyLM()
    cfg = resolve_auto(CompressConfig(method="auto", method_for="tok.weight=topk;"), model)
    assert cfg.method_for == "tok.weight=topk; head.weight=topk"
    own = resolve_auto(CompressConfig(method="auto", method_for="head.*=none"), model)
    assert own.method_for == "head.*=none"  # the user's entry already decides the head
    plain = CompressConfig(method="topk")
    assert resolve_auto(plain, model) is plain


def test_models_without_a_vocabulary_matrix_get_powersgd_everywhere():
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    assert vocab_matrices(mlp) == []
    assert vocab_matrices(TinyLM(tied=True)) == []  # the head is the table (next test)
    wide = nn.ModuleDict({"emb": nn.Embedding(16, 32), "out": nn.Linear(32, 16)})
    assert vocab_matrices(wide) == []  # 16 rows, 32 wide: not a vocabulary
    frozen = TinyLM()
    frozen.head.weight.requires_grad_(False)
    assert vocab_matrices(frozen) == []
    cfg = resolve_auto(CompressConfig(method="auto", global_topk=True), mlp)
    assert (cfg.method, cfg.method_for, cfg.global_topk) == ("powersgd", "", False)
    assert resolve_auto(CompressConfig(method="auto", global_topk=True), TinyLM()).global_topk


def test_a_table_tied_to_the_head_gets_topk():
    # its gradient is the head's, dense: the sparse scheme would send it whole
    tied = TinyLM(tied=True)
    assert tied_tables(tied) == ["tok.weight"] and tied_tables(TinyLM()) == []
    cfg = resolve_auto(CompressConfig(method="auto", min_numel=256), tied)
    assert cfg.method_for == "tok.weight=topk"
    assert {n: cfg.method_of(n) for n, _ in select_params(tied, cfg)} == \
        {"tok.weight": "topk", "fc.weight": "powersgd", "proj.weight": "powersgd"}
    own = resolve_auto(CompressConfig(method="auto", method_for="tok.*=none"), tied)
    assert own.method_for == "tok.*=none"  # the user's entry still decides
    frozen = TinyLM(tied=True)
    frozen.tok.weight.requires_grad_(False)
    assert tied_tables(frozen) == []


def test_auto_is_checked_and_must_be_resolved():
    with pytest.raises(ValueError, match=r"compress.method='zip' is invalid.*bf16, auto"):
        CompressConfig(method="zip")
    with pytest.raises(ValueError, match="momentum_correction works with one method"):
        CompressConfig(method="auto", momentum_correction=True)
    with pytest.raises(ValueError, match="resolve it first"):
        build_compressor(CompressConfig(method="auto"))


def _grads(rank, world, compress):
    torch.manual_seed(0)
    model = TinyLM()
    dp = zentrain.DataParallel(model, sync="dense", compress=compress)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        ids = torch.randint(0, V, (4, 8), generator=g)
        logits = dp(ids)
        nn.functional.cross_entropy(logits.reshape(-1, V), ids.roll(1).reshape(-1)).backward()
        h = hashlib.sha256()
        for _, p in sorted(model.named_parameters()):
            h.update(p.grad.contiguous().numpy().tobytes())
        out.append(h.hexdigest())
        opt.step()
        opt.zero_grad()
    names = dp.grad_sync.compressed_names
    return out, dp.grad_sync.name, names, {n: dp.grad_sync.compressor.cfg.method_of(n)
                                           for n in names}


def _both(rank, world):
    opts = {"rank": 2, "ratio": 0.1, "min_numel": 256}
    return (_grads(rank, world, {"method": "auto", **opts}),
            _grads(rank, world, {"method": "powersgd", "method_for": "head.weight=topk",
                                 **opts}))


def test_auto_syncs_what_the_explicit_mix_syncs_on_two_ranks():
    res = run_ranks(_both, 2)
    (auto, name, names, routes), (mix, mix_name, mix_names, _) = res[0]
    assert routes == {"head.weight": "topk", "fc.weight": "powersgd", "proj.weight": "powersgd"}
    assert name == mix_name == "dense+powersgd+topk"
    assert sorted(names) == sorted(mix_names) == ["fc.weight", "head.weight", "proj.weight"]
    assert auto == mix  # bit-identical gradients, step by step
    assert res[1][0][0] == auto  # and on every rank
