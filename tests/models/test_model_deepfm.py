import itertools

import pytest
import torch
from torch import nn

from zentrain.config import ModelConfig
from zentrain.models import DeepFM, build_model


def tiny(**kw) -> ModelConfig:
    base = dict(name="deepfm", num_fields=5, num_dense=3, rows_per_field=20, embed_dim=4,
                mlp_dims=[8, 6])
    base.update(kw)
    return ModelConfig(**base)


def batch(cfg: ModelConfig, b: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(b, cfg.num_dense, generator=g) * 3
    cats = torch.randint(0, cfg.rows_per_field, (b, cfg.num_fields), generator=g)
    labels = torch.randint(0, 2, (b,), generator=g).float()
    return dense, cats, labels


def test_shapes_loss_and_single_table():
    cfg = tiny()
    m = build_model(cfg)
    assert isinstance(m, DeepFM)
    tables = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.Embedding)}
    assert set(tables) == {"embedding", "first_order"}
    assert m.embedding.weight.shape == (5 * 20, 4)
    assert m.first_order.weight.shape == (5 * 20, 1)
    dense, cats, labels = batch(cfg)
    logits, loss = m(dense, cats)
    assert logits.shape == (7,) and loss is None
    logits, loss = m(dense, cats, labels)
    expected = nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert torch.allclose(loss, expected)


def test_matches_brute_force_fm():
    """Logit = first order + pairwise <v_i, v_j> over fields and the dense vector + MLP."""
    cfg = tiny()
    torch.manual_seed(1)
    m = DeepFM(cfg)
    for p in m.parameters():  # move off the zero init so every term contributes
        nn.init.normal_(p, std=0.3)
    dense, cats, _ = batch(cfg, b=3)
    logits, _ = m(dense, cats)
    for b in range(3):
        rows = [f * cfg.rows_per_field + int(cats[b, f]) for f in range(cfg.num_fields)]
        first = m.first_order.weight[rows].sum() + m.dense_linear(dense[b]).sum()
        vecs = [m.embedding.weight[r] for r in rows] + [m.dense_proj(dense[b])]
        fm = sum(torch.dot(vecs[i], vecs[j])
                 for i, j in itertools.combinations(range(len(vecs)), 2))
        deep = m.mlp(torch.cat(vecs)).sum()
        torch.testing.assert_close(logits[b], first + fm + deep, rtol=1e-5, atol=1e-5)


def test_field_offsets_separate_fields():
    """The same id in two fields must use two different rows."""
    cfg = tiny()
    m = DeepFM(cfg)
    dense, cats, labels = batch(cfg, b=1)
    cats[:] = 4
    _, loss = m(dense, cats, labels)
    loss.backward()
    rows = torch.nonzero(m.embedding.weight.grad.abs().sum(1)).flatten().tolist()
    assert rows == [f * 20 + 4 for f in range(5)]


@pytest.mark.parametrize("sparse", [False, True])
def test_backward_grads_are_row_sparse(sparse):
    cfg = tiny(sparse_embedding=sparse)
    torch.manual_seed(0)
    m = DeepFM(cfg)
    dense, cats, labels = batch(cfg)
    _, loss = m(dense, cats, labels)
    loss.backward()
    touched = set((cats + torch.arange(5) * 20).flatten().tolist())
    for table in (m.embedding, m.first_order):
        g = table.weight.grad
        if sparse:
            assert g.layout == torch.sparse_coo
            assert set(g.coalesce().indices()[0].tolist()) == touched
        else:
            assert not g.is_sparse
            assert set(torch.nonzero(g.abs().sum(1)).flatten().tolist()) <= touched
    assert m.mlp[0].weight.grad.abs().sum() > 0


def test_sparse_and_dense_grads_agree():
    cfg = tiny()
    grads = []
    for sparse in (False, True):
        torch.manual_seed(5)
        m = DeepFM(tiny(sparse_embedding=sparse))
        _, loss = m(*batch(cfg))
        loss.backward()
        g = m.embedding.weight.grad
        grads.append(g.to_dense() if sparse else g)
    torch.testing.assert_close(grads[0], grads[1])


def test_unknown_model_name():
    cfg = tiny()
    cfg.name = "bert"
    with pytest.raises(ValueError, match="unknown model.name"):
        build_model(cfg)
