import math

import pytest
import torch
from torch import nn

from zentrain.config import ModelConfig
from zentrain.models import GPT, build_model


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=2, d_model=32, seq_len=16, vocab_size=64)
    base.update(kw)
    return ModelConfig(**base)


def make(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny(**kw))


def test_shapes_and_loss():
    m = make()
    idx = torch.randint(0, 64, (3, 16))
    logits, loss = m(idx)
    assert logits.shape == (3, 16, 64)
    assert loss is None
    logits, loss = m(idx[:, :10], idx[:, 1:11])
    assert logits.shape == (3, 10, 64)
    # Fresh init predicts ~uniformly: loss close to ln(vocab).
    assert loss.ndim == 0 and abs(loss.item() - math.log(64)) < 0.3


def test_too_long_sequence_is_refused():
    m = make()
    with pytest.raises(ValueError, match="seq_len=16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_causal():
    """Changing a later token must not change earlier positions' logits."""
    m = make().eval()
    idx = torch.randint(0, 64, (1, 16))
    idx2 = idx.clone()
    idx2[0, 10] = (idx[0, 10] + 1) % 64
    a, _ = m(idx)
    b, _ = m(idx2)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_overfits_a_fixed_batch():
    m = make()
    idx = torch.randint(0, 64, (4, 17))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(40):
        _, loss = m(idx[:, :-1], idx[:, 1:])
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_embedding_is_untied_and_the_only_table():
    m = make()
    assert m.tok_emb.weight is not m.head.weight
    assert m.head.bias is None
    # The sync layer treats every nn.Embedding as a sparse-gradient table; the positional
    # embedding (dense gradient) must not be one.
    tables = [name for name, mod in m.named_modules() if isinstance(mod, nn.Embedding)]
    assert tables == ["tok_emb"]


def test_tied_head_shares_the_table_and_makes_its_gradient_dense():
    m = make(tie_embeddings=True)
    assert m.head.weight is m.tok_emb.weight
    assert m.num_params() == make().num_params() - 64 * 32
    idx = torch.randint(0, 64, (2, 16))
    _, loss = m(idx, idx)
    loss.backward()
    assert m.tok_emb.weight.grad.abs().sum(1).gt(0).all()  # every row: the head's gradient


def test_tied_sparse_table_is_refused():
    from zentrain.config import Config, ConfigError, validate

    cfg = Config()
    cfg.model.tie_embeddings = cfg.model.sparse_embedding = True
    with pytest.raises(ConfigError, match="tie_embeddings = true needs model.sparse_embedding"):
        validate(cfg)


def test_embedding_grad_is_row_sparse():
    m = make()
    idx = torch.tensor([[1, 5, 5, 9, 1, 3, 3, 3, 7, 9, 1, 5, 5, 9, 1, 3]])
    targets = torch.randint(0, 64, (1, 16))
    _, loss = m(idx, targets)
    loss.backward()
    g = m.tok_emb.weight.grad
    nonzero_rows = set(torch.nonzero(g.abs().sum(1)).flatten().tolist())
    assert nonzero_rows == {1, 3, 5, 7, 9}
    assert m.head.weight.grad.abs().sum(1).gt(0).all()  # the untied head's grad is dense


def test_sparse_embedding_gives_coo_grad_equal_to_dense():
    idx = torch.randint(0, 64, (2, 16))
    grads = []
    for sparse in (False, True):
        m = make(seed=3, sparse_embedding=sparse)
        _, loss = m(idx, idx)
        loss.backward()
        grads.append(m.tok_emb.weight.grad)
    dense, coo = grads
    assert not dense.is_sparse
    assert coo.layout == torch.sparse_coo
    rows = set(coo.coalesce().indices()[0].tolist())
    assert rows == set(idx.flatten().tolist())
    torch.testing.assert_close(coo.to_dense(), dense)


def test_residual_projections_have_scaled_init():
    m = build_model(tiny(n_layer=8, d_model=64, vocab_size=256))
    assert isinstance(m, GPT)
    resid = m.blocks[0].mlp.proj.weight.std().item()
    other = m.blocks[0].mlp.fc.weight.std().item()
    assert resid == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert other == pytest.approx(0.02, rel=0.1)
