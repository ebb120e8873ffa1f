"""A frequency vocabulary for Criteo categories: value -> its rank by count in its field.

The alternative to hashing (``ctr.hash_categories``) for ``model.id_layout = "frequency"``:
one count pass over the rows, then per field the values seen at least ``min_count`` times,
most frequent first (ties: smaller value first), get ids ``0, 1, ...``, at most
``field_rows[f] - 1`` of them; every other value (rare, or unseen at count time) shares the
field's last id, its out-of-vocabulary row. An empty category is a value like any other
(Criteo's "missing"), so it gets its own id when it is frequent. This is the frequency-
ordered preprocessing of CTR pipelines (a threshold, rare values pooled), and it puts a
field's hot values at its first ids, which ``ctr_layout`` turns into the table's first rows.

Counting keeps, per field, the distinct values and their counts (numpy arrays, merged in
batches), so memory grows with the number of distinct values, not with the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

_U64 = np.uint64


class ValueCounts:
    """Per-field counts of raw uint64 category values, fed chunk by chunk."""

    def __init__(self, num_fields: int) -> None:
        self.num_fields = num_fields
        self.keys = [np.empty(0, _U64) for _ in range(num_fields)]
        self.counts = [np.empty(0, np.int64) for _ in range(num_fields)]
        self._pending: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in
                                                                   range(num_fields)]
        self._pending_len = [0] * num_fields

    def add(self, raw: np.ndarray) -> None:
        """Count the values of ``raw`` [N, num_fields] (uint64)."""
        if raw.ndim != 2 or raw.shape[1] != self.num_fields:
            raise ValueError(f"raw categories of shape {raw.shape}, expected [N, "
                             f"{self.num_fields}]")
        for f in range(self.num_fields):
            k, c = np.unique(raw[:, f], return_counts=True)
            self._pending[f].append((k, c.astype(np.int64)))
            self._pending_len[f] += len(k)
            # Merge when the pending part outgrows the merged one: each merge sorts, so
            # merging every chunk would cost O(distinct) per chunk.
            if self._pending_len[f] > max(len(self.keys[f]), 1 << 20):
                self._merge(f)

    def _merge(self, f: int) -> None:
        parts = [(self.keys[f], self.counts[f]), *self._pending[f]]
        k, inv = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
        w = np.concatenate([p[1] for p in parts]).astype(np.float64)  # exact below 2**53
        c = np.bincount(inv.ravel(), weights=w, minlength=len(k)).astype(np.int64)
        self.keys[f], self.counts[f] = k, c
        self._pending[f], self._pending_len[f] = [], 0

    def finish(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per field: sorted distinct values and their counts."""
        for f in range(self.num_fields):
            if self._pending[f]:
                self._merge(f)
        return self.keys, self.counts


def count_values(chunks: list[np.ndarray]) -> ValueCounts:
    """``ValueCounts`` of in-memory raw category arrays."""
    counts = ValueCounts(chunks[0].shape[1])
    for raw in chunks:
        counts.add(raw)
    return counts


@dataclass(frozen=True)
class CriteoVocab:
    """Per field, sorted raw values and their ids; everything else is the last id."""

    keys: np.ndarray
    """uint64: each field's vocabulary values, sorted, fields one after another."""
    ids: np.ndarray
    """int64: the id of each entry of ``keys`` (its rank by count in its field)."""
    bounds: np.ndarray
    """int64 [num_fields + 1]: field ``f``'s entries are ``keys[bounds[f]:bounds[f+1]]``."""
    field_rows: tuple[int, ...]
    """Ids per field; ``field_rows[f] - 1`` is field ``f``'s out-of-vocabulary id."""

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Ids of raw values [N, num_fields] (uint64) -> int64 [N, num_fields]."""
        out = np.empty(raw.shape, np.int64)
        for f, rows in enumerate(self.field_rows):
            k = self.keys[self.bounds[f]:self.bounds[f + 1]]
            col = raw[:, f]
            if len(k) == 0:
                out[:, f] = rows - 1
                continue
            pos = np.minimum(np.searchsorted(k, col), len(k) - 1)
            hit = k[pos] == col
            out[:, f] = np.where(hit, self.ids[self.bounds[f] + pos], rows - 1)
        return out

    def save(self, directory: Path) -> None:
        for name in ("keys", "ids", "bounds"):
            np.save(directory / f"{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, directory: Path, field_rows: tuple[int, ...]) -> CriteoVocab:
        """Memory-mapped: every reader of one cache shares the pages."""
        k, i, b = (np.load(directory / f"{n}.npy", mmap_mode="r")
                   for n in ("keys", "ids", "bounds"))
        if len(b) != len(field_rows) + 1:
            raise ValueError(f"vocabulary {directory} has {len(b) - 1} fields, expected "
                             f"{len(field_rows)}")
        return cls(k, i, np.asarray(b), tuple(field_rows))


def vocab_from_counts(counts: ValueCounts, field_rows: tuple[int, ...],
                      min_count: int) -> CriteoVocab:
    """Per field, the values seen >= ``min_count`` times, most frequent first, at most
    ``field_rows[f] - 1`` of them (the last id is the out-of-vocabulary row)."""
    if min_count < 1:
        raise ValueError(f"data.vocab_min_count={min_count}; must be >= 1")
    keys, cnts = counts.finish()
    if len(keys) != len(field_rows):
        raise ValueError(f"counts of {len(keys)} fields for {len(field_rows)} fields")
    out_k, out_i, bounds = [], [], [0]
    for k, c, rows in zip(keys, cnts, field_rows):
        keep = c >= min_count
        k, c = k[keep], c[keep]
        order = np.lexsort((k, -c))[:max(rows - 1, 0)]  # by count desc, then value
        chosen = k[order]
        by_key = np.argsort(chosen, kind="stable")
        out_k.append(chosen[by_key])
        out_i.append(by_key.astype(np.int64))  # chosen[j] has id j
        bounds.append(bounds[-1] + len(chosen))
    return CriteoVocab(np.concatenate(out_k).astype(_U64), np.concatenate(out_i),
                       np.asarray(bounds, np.int64), tuple(field_rows))
