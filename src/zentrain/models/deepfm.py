"""DeepFM click-through-rate model (Guo et al., 2017), as used in the ZEN paper's evaluation.

All categorical fields share ONE embedding table of ``num_fields * rows_per_field`` rows.
This is how the ZEN paper's DeepFM holds its embeddings (one large tensor whose gradient is
~3% dense, ZEN §2 Table 1), so the sync layer sees one big row-sparse gradient rather than
26 small ones. Which row field ``f``'s id ``i`` uses is set by ``model.field_rows`` and
``model.id_layout`` (``zentrain.models.ctr_layout``): by default Criteo-like field sizes and
frequency-ranked ids interleaved by rank, so the hot ids of every field share the first
rows; ``id_layout = "hashed"`` puts field ``f`` in a contiguous block at
``sum(field_rows[:f])``. The first-order weights are a second ``(total_rows, 1)`` table with
the same rows.

The 13 dense features enter three ways: a Linear for the first-order term, and a
projection to one more ``embed_dim`` vector that joins the field embeddings in both the FM
interaction (so dense features interact with categories) and the deep MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zentrain.config import ModelConfig
from zentrain.models.ctr_layout import build_ctr_layout


class DeepFM(nn.Module):
    """``forward(dense, cats, labels=None) -> (logits, loss)``.

    ``dense``: FloatTensor [B, num_dense]; ``cats``: LongTensor [B, num_fields] of per-field
    ids, field ``f``'s in ``[0, field_rows[f])`` (``build_ctr_layout(cfg)``); ``labels``: FloatTensor [B] of 0/1. Logits are [B]; the
    loss is the mean binary cross-entropy with logits. Batches from ``zentrain.data`` have
    exactly these keys, so ``model(**batch)`` works.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = build_ctr_layout(cfg)
        total_rows = self.layout.total_rows
        self.interleaved = self.layout.ids == "frequency"
        # Small buffers (they move with .to(); DDP's per-step buffer broadcast stays tiny,
        # which is why the row map is computed rather than stored as a total_rows table).
        sizes = torch.tensor(self.layout.field_rows, dtype=torch.long)
        self.register_buffer("offsets", torch.from_numpy(self.layout.offsets),
                             persistent=False)
        self.register_buffer("field_rows", sizes, persistent=False)
        self.register_buffer("before", torch.ones(cfg.num_fields, cfg.num_fields,
                                                  dtype=torch.bool).tril(-1), persistent=False)
        self.embedding = nn.Embedding(total_rows, cfg.embed_dim, sparse=cfg.sparse_embedding)
        self.first_order = nn.Embedding(total_rows, 1, sparse=cfg.sparse_embedding)
        self.dense_linear = nn.Linear(cfg.num_dense, 1)  # its bias is the global bias
        self.dense_proj = nn.Linear(cfg.num_dense, cfg.embed_dim)
        layers: list[nn.Module] = []
        width = (cfg.num_fields + 1) * cfg.embed_dim
        for h in cfg.mlp_dims:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small random embeddings (the FM term sums ~350 pairwise products of them, so a
        large init would swamp the first steps); zero first-order weights, so the model
        starts near logit 0 (loss ln 2) instead of at the whims of unscaled dense inputs."""
        nn.init.normal_(self.embedding.weight, std=0.01)
        nn.init.zeros_(self.first_order.weight)
        nn.init.zeros_(self.dense_linear.weight)
        nn.init.zeros_(self.dense_linear.bias)

    def rows_of(self, cats: Tensor) -> Tensor:
        """Table rows of per-field ids [B, F] (``CTRLayout.rows_of`` in torch)."""
        if not self.interleaved:
            return cats + self.offsets
        k = cats.unsqueeze(-1)  # [B, F, 1] vs the F field sizes: B*F*F, small for F=26
        return (torch.minimum(self.field_rows, k).sum(-1)
                + ((self.field_rows > k) & self.before).sum(-1))

    def forward(self, dense: Tensor, cats: Tensor,
                labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        rows = self.rows_of(cats)  # [B, F] table rows
        first = self.first_order(rows).sum(dim=(1, 2)) + self.dense_linear(dense).squeeze(-1)
        vecs = torch.cat([self.embedding(rows), self.dense_proj(dense).unsqueeze(1)], dim=1)
        # FM second order: sum_{i<j} <v_i, v_j> = 0.5 * (|sum v|^2 - sum |v|^2)
        fm = 0.5 * (vecs.sum(dim=1).pow(2) - vecs.pow(2).sum(dim=1)).sum(dim=-1)
        deep = self.mlp(vecs.flatten(1)).squeeze(-1)
        logits = first + fm + deep
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return logits, loss
