import itertools

import pytest
import torch
from torch import nn

from zentrain.config import ModelConfig
from zentrain.models import DeepFM, build_model
from zentrain.models.ctr_layout import build_ctr_layout, scaled_criteo_rows

LAYOUTS = [("uniform", "hashed"), ("criteo", "hashed"), ("criteo", "frequency"),
           ("uniform", "frequency")]


def tiny(**kw) -> ModelConfig:
    base = dict(name="deepfm", num_fields=5, num_dense=3, rows_per_field=20, embed_dim=4,
                mlp_dims=[8, 6], field_rows="uniform", id_layout="hashed")
    base.update(kw)
    return ModelConfig(**base)


def batch(cfg: ModelConfig, b: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(b, cfg.num_dense, generator=g) * 3
    sizes = torch.tensor(build_ctr_layout(cfg).field_rows)
    cats = (torch.rand(b, cfg.num_fields, generator=g) * sizes).long()
    labels = torch.randint(0, 2, (b,), generator=g).float()
    return dense, cats, labels


def reference_rows(cfg: ModelConfig) -> dict[tuple[int, int], int]:
    """(field, id) -> table row, by enumeration: field blocks for hashed ids; for frequency
    ids every field's id 0 first (in field order), then every id 1, ..."""
    sizes = build_ctr_layout(cfg).field_rows
    pairs = [(f, i) for f, s in enumerate(sizes) for i in range(s)]
    if cfg.id_layout == "frequency":
        pairs.sort(key=lambda p: (p[1], p[0]))
    return {p: row for row, p in enumerate(pairs)}


@pytest.mark.parametrize("field_rows,id_layout", LAYOUTS)
def test_row_map_matches_enumeration(field_rows, id_layout):
    cfg = tiny(field_rows=field_rows, id_layout=id_layout, num_fields=7, rows_per_field=30)
    ref = reference_rows(cfg)
    m = DeepFM(cfg)
    sizes = build_ctr_layout(cfg).field_rows
    assert sum(sizes) == 7 * 30 == m.embedding.weight.shape[0]
    cats = torch.tensor([[min(i, s - 1) for s in sizes] for i in range(max(sizes))])
    rows = m.rows_of(cats)
    want = [[ref[(f, int(c))] for f, c in enumerate(r)] for r in cats]
    assert rows.tolist() == want
    # The numpy twin the data side uses agrees.
    assert build_ctr_layout(cfg).rows_of(cats.numpy()).tolist() == want


def test_criteo_sizes_follow_the_kaggle_cardinalities():
    sizes = scaled_criteo_rows(26, 26 * 40000)
    assert sum(sizes) == 26 * 40000
    # C3 (10.1M values) is the largest field, C9 (3 values) keeps its 3, C6 (24) gets the
    # minimum 16 (+ its ~1 row share), and the order of magnitude between fields survives.
    assert max(sizes) == sizes[2] and sizes[8] == 3 and 16 <= sizes[5] <= 17
    assert sizes[2] > 4 * sizes[3] > 4 * sizes[9]
    assert scaled_criteo_rows(3, 30) == (10, 10, 10)  # the minimum is capped at the mean
    with pytest.raises(ValueError, match="3 fields in 2 rows"):
        scaled_criteo_rows(3, 2)


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


@pytest.mark.parametrize("field_rows,id_layout", LAYOUTS)
def test_matches_brute_force_fm(field_rows, id_layout):
    """Logit = first order + pairwise <v_i, v_j> over fields and the dense vector + MLP."""
    cfg = tiny(field_rows=field_rows, id_layout=id_layout)
    ref = reference_rows(cfg)
    torch.manual_seed(1)
    m = DeepFM(cfg)
    for p in m.parameters():  # move off the zero init so every term contributes
        nn.init.normal_(p, std=0.3)
    dense, cats, _ = batch(cfg, b=3)
    logits, _ = m(dense, cats)
    for b in range(3):
        rows = [ref[(f, int(cats[b, f]))] for f in range(cfg.num_fields)]
        first = m.first_order.weight[rows].sum() + m.dense_linear(dense[b]).sum()
        vecs = [m.embedding.weight[r] for r in rows] + [m.dense_proj(dense[b])]
        fm = sum(torch.dot(vecs[i], vecs[j])
                 for i, j in itertools.combinations(range(len(vecs)), 2))
        deep = m.mlp(torch.cat(vecs)).sum()
        torch.testing.assert_close(logits[b], first + fm + deep, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("id_layout,want", [("hashed", [f * 20 + 4 for f in range(5)]),
                                             ("frequency", [20 + f for f in range(5)])])
def test_field_offsets_separate_fields(id_layout, want):
    """The same id in two fields must use two different rows: field blocks when hashed;
    interleaved by rank for frequency ids (id 4 of 5 fields: rows 20..24)."""
    cfg = tiny(id_layout=id_layout)
    m = DeepFM(cfg)
    dense, cats, labels = batch(cfg, b=1)
    cats[:] = 4
    _, loss = m(dense, cats, labels)
    loss.backward()
    rows = torch.nonzero(m.embedding.weight.grad.abs().sum(1)).flatten().tolist()
    assert rows == want


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
