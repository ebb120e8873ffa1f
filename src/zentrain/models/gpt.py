"""A small pre-norm GPT language model (plain ``nn.Module``, no process groups inside).

The input embedding is deliberately **untied** from the output head: with tied weights the
head's dense gradient would land on the embedding table and hide its natural sparsity.
Untied, ``tok_emb.weight.grad`` is non-zero only on the rows of tokens that occur in the
batch, the row-sparse gradient that ZEN-style sync exploits (ZEN paper, §2 "natural
sparsity"). ``ModelConfig.tie_embeddings`` ties them as GPT-2 (and most Hugging Face
LMs) do, to measure that case. With ``ModelConfig.sparse_embedding`` the table emits a
torch sparse COO gradient instead of a mostly-zero dense one.

The positional embedding is a plain ``nn.Parameter``, not an ``nn.Embedding``: every
position is used by every batch, so its gradient is dense, and the sync layer treats every
``nn.Embedding`` module as a sparse-gradient table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zentrain.config import ModelConfig


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        # [B, T, 3D] -> three [B, H, T, D/H]
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward block: D -> 4D -> GELU -> D."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer LM; ``forward(idx, targets=None) -> (logits, loss)``.

    Batches from ``zentrain.data`` have keys ``idx`` and ``targets``, so ``model(**batch)``
    works.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.seq_len = cfg.seq_len
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, sparse=cfg.sparse_embedding)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.seq_len, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nanoGPT init: N(0, 0.02) everywhere, residual output projections scaled down by
        sqrt(2 * n_layer) so the residual stream's variance does not grow with depth (GPT-2
        paper, §2.3)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.proj.weight, std=resid_std)
            nn.init.normal_(blk.mlp.proj.weight, std=resid_std)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``idx``: LongTensor [B, T] with T <= seq_len. Returns logits [B, T, vocab] and
        the mean cross-entropy against ``targets`` (None without targets)."""
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than model.seq_len={self.seq_len}")
        x = self.drop(self.tok_emb(idx) + self.pos_emb[:t])
        for blk in self.blocks:
            x = blk(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                   targets.reshape(-1))
        return logits, loss

    def num_params(self) -> int:
        """Number of parameters (embedding tables included)."""
        return sum(p.numel() for p in self.parameters())
