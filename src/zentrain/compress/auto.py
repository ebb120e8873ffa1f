"""``compress.method = "auto"``: choose top-k or PowerSGD per matrix from the model's shapes.

Measured on the GPT debug config under AdamW (docs/compression.md, "Error feedback per
matrix"): no single method came within 3% of the uncompressed loss at 1% of the bytes,
but top-k + error feedback on the output layer with PowerSGD + error feedback on every
other matrix did (rank 8: 1.005x). The two kinds of matrix differ in their gradients:

* a matrix indexed by the vocabulary (the output layer, ``vocab x hidden``) gets a
  gradient row per token, large for the tokens in the batch and small for the rest: few
  large entries, which top-k keeps, and a high rank, which a rank-r factorization loses;
* the blocks' matrices have gradients close to low rank, which PowerSGD captures.

``resolve_auto`` turns ``auto`` into those per-name rules for one model (``method =
"powersgd"``, ``method_for = "<vocab matrices>=topk"``), so the rest of the package only
ever sees ordinary methods. The vocabulary is the row count of the model's largest
embedding table when it has more rows than columns; a model without one gets PowerSGD
on every matrix. The tables themselves stay with the wrapped sparse scheme, as for any
method, unless a ``method_for`` entry names them (the user's entries come first and win),
with one exception: a table *tied* to an output layer (GPT-2, most Hugging Face LMs) is
that output layer. Its gradient is dense, the head's rows for every token, so the sparse
scheme has nothing to skip and would send it whole, often the model's largest tensor;
``auto`` gives it top-k like an untied head (``tied_tables``).
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from zentrain.compress import CompressConfig
from zentrain.sync.sparse import embedding_params, tied_tables

__all__ = ["resolve_auto", "tied_tables", "vocab_matrices"]


def vocab_matrices(model: nn.Module) -> list[str]:
    """Trainable float matrices (not embedding tables) with a dimension equal to the
    vocabulary: the output layer, and any other vocabulary-indexed projection. The
    vocabulary is the row count of the largest table, if that table is taller than wide
    (otherwise it is no vocabulary, and its row count could equal a hidden size)."""
    tables = embedding_params(model)
    rows, cols = max((tuple(p.shape[:2]) for p in tables), default=(0, 0))
    if rows <= cols:
        return []
    ids = {id(p) for p in tables}
    return [n for n, p in model.named_parameters()
            if p.dim() == 2 and p.requires_grad and p.is_floating_point()
            and id(p) not in ids and rows in p.shape]


def resolve_auto(cfg: CompressConfig, model: nn.Module) -> CompressConfig:
    """``cfg`` with ``method="auto"`` replaced by its per-name rules for ``model``
    (unchanged for any other method)."""
    if cfg.method != "auto":
        return cfg
    names = [n for n in vocab_matrices(model) + tied_tables(model) if cfg.rule_method(n) is None]
    rules = [cfg.method_for.strip().rstrip(";")] + ([",".join(names) + "=topk"] if names else [])
    return replace(cfg, method="powersgd", method_for="; ".join(r for r in rules if r),
                   global_topk=cfg.global_topk and bool(names))
