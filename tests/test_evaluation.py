import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zentrain.config import ModelConfig
from zentrain.evaluation import auc, evaluate, log_loss
from zentrain.models import GPT, DeepFM


def brute_force_auc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=2, max_size=60))
def test_auc_matches_pairwise_count_with_ties(pairs):
    scores = [float(s) for s, _ in pairs]  # few distinct values: many ties
    labels = [y for _, y in pairs]
    got = auc(np.array(scores), np.array(labels, dtype=float))
    if all(labels) or not any(labels):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


def test_auc_extremes_and_tensor_input():
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert auc(torch.ones(4), y) == 0.5


def test_log_loss():
    p = np.array([0.9, 0.2, 0.5])
    y = np.array([1.0, 0.0, 1.0])
    want = -(math.log(0.9) + math.log(0.8) + math.log(0.5)) / 3
    assert log_loss(p, y) == pytest.approx(want)
    assert math.isfinite(log_loss([0.0, 1.0], [1.0, 0.0]))  # clipped, not inf


def test_evaluate_deepfm_restores_mode():
    cfg = ModelConfig(name="deepfm", num_fields=3, num_dense=2, rows_per_field=10,
                      embed_dim=4, mlp_dims=[8])
    torch.manual_seed(0)
    model = DeepFM(cfg).train()
    g = torch.Generator().manual_seed(0)
    batches = [{"dense": torch.rand(16, 2, generator=g),
                "cats": torch.randint(0, 10, (16, 3), generator=g),
                "labels": torch.randint(0, 2, (16,), generator=g).float()} for _ in range(3)]
    out = evaluate(model, batches, "deepfm")
    assert model.training
    assert set(out) == {"eval_loss", "auc", "log_loss"}
    with torch.no_grad():
        logits = torch.cat([model(b["dense"], b["cats"])[0] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert out["auc"] == pytest.approx(auc(logits, labels))
    assert out["log_loss"] == pytest.approx(log_loss(torch.sigmoid(logits), labels), rel=1e-5)
    assert out["eval_loss"] == pytest.approx(out["log_loss"], rel=1e-5)


def test_evaluate_gpt_in_eval_mode():
    cfg = ModelConfig(n_layer=1, n_head=2, d_model=16, seq_len=8, vocab_size=32, dropout=0.5)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    idx = torch.randint(0, 32, (4, 9))
    batches = [{"idx": idx[:, :-1], "targets": idx[:, 1:]}]
    a = evaluate(model, batches, "gpt")
    b = evaluate(model, batches, "gpt")
    assert set(a) == {"eval_loss"} and a == b  # dropout off: deterministic
    assert model.training
    with pytest.raises(ValueError, match="unknown evaluation kind"):
        evaluate(model, batches, "bert")
