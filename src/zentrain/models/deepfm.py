"""DeepFM click-through-rate model (Guo et al., 2017), as used in the ZEN paper's evaluation.

All categorical fields share ONE concatenated embedding table of ``num_fields *
rows_per_field`` rows; field ``f``'s id ``i`` lives at row ``f * rows_per_field + i``. This
is how the ZEN paper's DeepFM holds its embeddings (one large tensor whose gradient is ~3%
dense, ZEN §2 Table 1), so the sync layer sees one big row-sparse gradient rather than 26
small ones. The first-order weights are a second ``(total_rows, 1)`` table with the same
offsets.

The 13 dense features enter three ways: a Linear for the first-order term, and a
projection to one more ``embed_dim`` vector that joins the field embeddings in both the FM
interaction (so dense features interact with categories) and the deep MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zentrain.config import ModelConfig


class DeepFM(nn.Module):
    """``forward(dense, cats, labels=None) -> (logits, loss)``.

    ``dense``: FloatTensor [B, num_dense]; ``cats``: LongTensor [B, num_fields] of per-field
    ids in ``[0, rows_per_field)``; ``labels``: FloatTensor [B] of 0/1. Logits are [B]; the
    loss is the mean binary cross-entropy with logits. Batches from ``zentrain.data`` have
    exactly these keys, so ``model(**batch)`` works.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        total_rows = cfg.num_fields * cfg.rows_per_field
        # Row offset of each field inside the shared tables (a buffer: moves with .to()).
        self.register_buffer(
            "offsets", torch.arange(cfg.num_fields, dtype=torch.long) * cfg.rows_per_field,
            persistent=False)
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

    def forward(self, dense: Tensor, cats: Tensor,
                labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        rows = cats + self.offsets  # [B, F] global row ids
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
