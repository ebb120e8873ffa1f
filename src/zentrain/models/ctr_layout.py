"""Where DeepFM's categorical ids live in its one shared embedding table.

Two choices shape the sparsity the gradient sync sees (ZEN's C2 overlap and C3 skew), so
they are explicit here and shared by the model and the data:

- **Field sizes** (``model.field_rows``). ``uniform``: ``rows_per_field`` rows per field.
  ``criteo``: the 26 Kaggle Criteo cardinalities (``CRITEO_KAGGLE_CARDINALITIES``) scaled to
  the same total, ``num_fields x rows_per_field`` rows. Real Criteo fields range from 3 to
  10M distinct values; the tiny fields' ids are shared by almost every sample, so they
  overlap across ranks and keep the densification γ well below n.
- **Id layout** (``model.id_layout``). ``frequency``: a field's id is its value's frequency
  rank (0 = most frequent: the Zipf rank of the synthetic generator, a counted vocabulary
  for Criteo files), and the table interleaves the fields by rank: every field's rank 0,
  then every field's rank 1 (fields that have one), and so on. Hot ids of all fields share
  the first rows, as in a vocabulary sorted by count, so with 8 contiguous partitions most
  non-zeros fall in the first one (ZEN §2.1 C3). ``hashed``: ids are scattered (a random
  permutation per field, or Criteo values hashed) and fields are contiguous blocks.

The interleaved row of (field ``f``, rank ``k``) is ``sum_g min(s_g, k) + #{g < f : s_g >
k}`` for field sizes ``s``: rows taken by lower ranks of every field, then the fields
before ``f`` that still have a rank ``k``. A pure function of the sizes, so the model
needs no data to compute it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from zentrain.config import ConfigError

#: Distinct values of each categorical column (C1..C26) of the Kaggle Criteo Display
#: Advertising Challenge training set, as used for DLRM's Kaggle model (33,762,577 in all).
CRITEO_KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)
#: Fewest rows a scaled field gets (or its real cardinality, when smaller): proportional
#: scaling alone would leave C1's 1,460 values 45 rows and C6's 24 values none.
MIN_FIELD_ROWS = 16

ID_LAYOUTS = ("frequency", "hashed")
FIELD_ROWS = ("criteo", "uniform")


@dataclass(frozen=True)
class CTRLayout:
    """Per-field table sizes and how ids map to rows (picklable, hashable)."""

    field_rows: tuple[int, ...]
    """Rows of each field; field ``f``'s ids are ``[0, field_rows[f])``."""
    ids: str = "hashed"
    """``frequency`` (ids are frequency ranks, rows interleaved by rank) or ``hashed``
    (ids scattered, fields in contiguous blocks)."""

    @property
    def num_fields(self) -> int:
        return len(self.field_rows)

    @property
    def total_rows(self) -> int:
        return int(sum(self.field_rows))

    @property
    def offsets(self) -> np.ndarray:
        """First id of each field when fields are numbered one after another."""
        return np.concatenate([[0], np.cumsum(self.field_rows)[:-1]]).astype(np.int64)

    def rows_of(self, cats: np.ndarray) -> np.ndarray:
        """Table rows of per-field ids ``cats`` [..., num_fields] (numpy; the model has the
        same computation in torch)."""
        sizes = np.asarray(self.field_rows, dtype=np.int64)
        if self.ids != "frequency":
            return cats + self.offsets
        k = np.asarray(cats, dtype=np.int64)[..., None]
        lower = np.tril(np.ones((len(sizes), len(sizes)), dtype=bool), -1)
        return (np.minimum(sizes, k).sum(-1) + ((sizes > k) & lower).sum(-1)).astype(np.int64)


def scaled_criteo_rows(num_fields: int, total: int, min_rows: int = MIN_FIELD_ROWS
                       ) -> tuple[int, ...]:
    """The Kaggle Criteo cardinalities (cycled past 26 fields) scaled to ``total`` rows.

    Each field first gets ``min(cardinality, min_rows)`` (``min_rows`` capped at the mean,
    so the total always fits); the rest is shared in proportion to the cardinalities, by
    largest remainder, so the sizes sum to exactly ``total``.
    """
    if num_fields < 1 or total < num_fields:
        raise ValueError(f"cannot lay out {num_fields} fields in {total} rows "
                         "(at least one row per field)")
    card = np.array([CRITEO_KAGGLE_CARDINALITIES[f % len(CRITEO_KAGGLE_CARDINALITIES)]
                     for f in range(num_fields)], dtype=np.int64)
    base = np.minimum(card, min(min_rows, total // num_fields))
    share = (total - base.sum()) * card / card.sum()
    extra = np.floor(share).astype(np.int64)
    left = int(total - base.sum() - extra.sum())
    extra[np.argsort(-(share - extra), kind="stable")[:left]] += 1
    return tuple(int(x) for x in base + extra)


def build_ctr_layout(model_cfg: Any) -> CTRLayout:
    """The layout a DeepFM ``ModelConfig`` asks for (``field_rows``, ``id_layout``)."""
    field_rows = getattr(model_cfg, "field_rows", "uniform")
    ids = getattr(model_cfg, "id_layout", "hashed")
    f, r = model_cfg.num_fields, model_cfg.rows_per_field
    if f < 1 or r < 1:
        raise ConfigError(f"model.num_fields={f} and model.rows_per_field={r} must be >= 1")
    if field_rows not in FIELD_ROWS:
        raise ConfigError(f"model.field_rows={field_rows!r}; allowed: {', '.join(FIELD_ROWS)}")
    if ids not in ID_LAYOUTS:
        raise ConfigError(f"model.id_layout={ids!r}; allowed: {', '.join(ID_LAYOUTS)}")
    sizes = (scaled_criteo_rows(f, f * r) if field_rows == "criteo" else (r,) * f)
    return CTRLayout(sizes, ids)
