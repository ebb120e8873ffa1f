"""DeepFM data: a synthetic click log with a learnable hidden model, and a Criteo TSV reader.

Both are an indexable sample space (``take(indices)``) behind the same stateless sampler,
``CTRBatches``: the train index range is split into ``world`` contiguous shards, rank ``r``
draws a micro-batch from shard ``r`` with an RNG seeded by (seed, step, micro, rank,
world), so resuming at step k replays the same batches and nothing needs saving. Batches
are ``{"dense": [B, num_dense] float, "cats": [B, num_fields] long, "labels": [B] float}``.

Synthetic samples are counter-based: sample ``i`` is computed from (seed, i) alone with the
splitmix64 mixer, so any sample can be made without generating the ones before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from zentrain.data.corpus import DataError, log
from zentrain.data.criteo_vocab import count_values, vocab_from_counts
from zentrain.models.ctr_layout import CTRLayout

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_CATS_STREAM = 0xC475


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (a bijection: distinct in, distinct
    out). Deterministic across processes and platforms, unlike Python's ``hash``."""
    with np.errstate(over="ignore"):
        z = x.astype(_U64) + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def _uniform(z: np.ndarray) -> np.ndarray:
    """uint64 -> float64 uniform in (0, 1), from the top 53 bits."""
    return ((z >> _U64(11)).astype(np.float64) + 0.5) * 2.0**-53


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([k & _MASK64
                                                                       for k in key])))


def _batch(dense: np.ndarray, cats: np.ndarray, labels: np.ndarray) -> dict[str, Tensor]:
    return {"dense": torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)),
            "cats": torch.from_numpy(np.ascontiguousarray(cats, dtype=np.int64)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))}


# --- synthetic ----------------------------------------------------------------------------------

class SyntheticCTR:
    """Click samples whose label follows a hidden logistic model.

    ``layout`` (a ``CTRLayout``, or an int: that many rows per field, hashed ids) sets the
    fields' sizes and ids. Field ``f``'s value is a Zipf(``zipf_alpha``) rank over its
    ``field_rows[f]`` values; with ``frequency`` ids the id *is* the rank (hot ids first,
    like a vocabulary sorted by count), with ``hashed`` ids it goes through a fixed random
    permutation per field (hot ids scattered). The permutations are drawn either way, so
    one seed gives the same dense features and labels under both layouts: only the ids
    differ, by a per-field bijection. Dense feature ``d`` is ``log1p(floor(exp(mu_d +
    sigma_d * z_d)))`` with ``z_d`` standard normal: heavy-tailed counts after Criteo's
    usual log transform. The label is Bernoulli(sigmoid(bias + sum of hidden per-value
    weights on the first ``hidden_fields`` fields + hidden dense weights . z)), so the
    achievable AUC is well above 0.5 and a model that learns the hot values' weights and
    the dense weights gets there quickly.
    """

    def __init__(self, num_fields: int, num_dense: int, layout: CTRLayout | int,
                 zipf_alpha: float, seed: int, hidden_fields: int = 6) -> None:
        lay = as_layout(num_fields, layout)
        self.layout, self.num_fields, self.num_dense = lay, num_fields, num_dense
        self.sizes = np.asarray(lay.field_rows, dtype=np.int64)
        self.offsets = lay.offsets
        self.base = int(splitmix64(np.array([seed & _MASK64], dtype=_U64))[0])
        rng = _rng(0x5EED, seed)
        # One concatenated CDF, field f's shifted up by f, so a single searchsorted of
        # (u + f) finds every field's rank at once.
        self.cdf = np.concatenate([_zipf_cdf(int(s), zipf_alpha) + f
                                   for f, s in enumerate(self.sizes)])
        perm = np.concatenate([rng.permutation(int(s)) for s in self.sizes])
        self.perm = perm if lay.ids == "hashed" else None
        self.mu = rng.uniform(0.0, 3.0, num_dense)
        self.sigma = rng.uniform(0.5, 1.5, num_dense)
        self.hidden = np.arange(min(hidden_fields, num_fields))
        hsizes = self.sizes[self.hidden]
        self.hidden_offsets = np.concatenate([[0], np.cumsum(hsizes)[:-1]]).astype(np.int64)
        self.id_weight = rng.normal(0.0, 0.7, int(hsizes.sum()))  # per (hidden field, rank)
        self.dense_weight = rng.normal(0.0, 0.4, num_dense)
        self.bias = -1.0  # ~30% positives
        # Counter layout: per sample, one uint64 for each field, two per dense feature
        # (Box-Muller), one for the label.
        self.n_streams = num_fields + 2 * num_dense + 1

    def take(self, idx: np.ndarray) -> dict[str, Tensor]:
        """Samples ``idx`` (int array), each a function of (seed, index) only."""
        f, d = self.num_fields, self.num_dense
        with np.errstate(over="ignore"):
            ctr = (idx.astype(_U64)[:, None] * _U64(self.n_streams)
                   + np.arange(self.n_streams, dtype=_U64) + _U64(self.base))
        u = _uniform(splitmix64(ctr))  # [B, n_streams]
        pos = np.searchsorted(self.cdf, u[:, :f] + np.arange(f)) - self.offsets
        ranks = np.minimum(pos, self.sizes - 1)  # [B, F] 0 = the field's hottest value
        cats = ranks if self.perm is None else self.perm[self.offsets + ranks]
        u1, u2 = u[:, f:f + d], u[:, f + d:f + 2 * d]
        z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
        dense = np.log1p(np.floor(np.exp(self.mu + self.sigma * z)))
        hidden = self.id_weight[self.hidden_offsets + ranks[:, self.hidden]].sum(1)
        logit = self.bias + z @ self.dense_weight + hidden
        labels = (u[:, -1] < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
        return _batch(dense, cats, labels)


def _zipf_cdf(n: int, alpha: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    return np.cumsum(p) / p.sum()


def as_layout(num_fields: int, layout: CTRLayout | int) -> CTRLayout:
    """``layout`` itself (checked against ``num_fields``), or for an int the foundation's
    layout: that many rows per field, hashed ids."""
    if isinstance(layout, CTRLayout):
        if layout.num_fields != num_fields:
            raise ValueError(f"a layout of {layout.num_fields} fields for {num_fields} fields")
        return layout
    if int(layout) < 1:
        raise ValueError(f"rows_per_field={layout} must be >= 1")
    return CTRLayout((int(layout),) * num_fields, "hashed")


# --- Criteo TSV -------------------------------------------------------------------------------

@dataclass
class CTRArrays:
    """Samples held in memory (a streaming loader replaces this for full Criteo days)."""

    dense: np.ndarray
    """float32 [N, num_dense], already log(1+x)-transformed."""
    cats: np.ndarray
    """int64 [N, num_fields] of per-field ids, field ``f``'s in ``[0, field_rows[f])``."""
    labels: np.ndarray
    """float32 [N] of 0/1."""

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> dict[str, Tensor]:
        return _batch(self.dense[idx], self.cats[idx], self.labels[idx])


_MISSING = _MASK64  # raw value of an empty category (hashes to its own row per field)


def hash_categories(raw: np.ndarray, field_rows: int | tuple[int, ...]) -> np.ndarray:
    """Map raw uint64 category values [N, F] to per-field ids: ``mix(value ^ salt(field)) %
    rows`` (``field_rows``: one size for every field, or one per field).

    The per-field salt keeps a value shared by two fields from landing on the same row
    pattern in both; splitmix64 makes it stable across processes and runs.
    """
    salts = splitmix64(np.arange(raw.shape[1], dtype=_U64) + _U64(_CATS_STREAM))
    return (splitmix64(raw ^ salts) % np.asarray(field_rows, dtype=_U64)).astype(np.int64)


def _parse_line(line: str, num_dense: int, num_fields: int) -> tuple[float, list[int], list[int]]:
    cols = line.rstrip("\r\n").split("\t")
    if len(cols) != 1 + num_dense + num_fields:
        raise ValueError(f"{len(cols)} columns, expected {1 + num_dense + num_fields}")
    if cols[0] not in ("0", "1"):
        raise ValueError(f"label {cols[0]!r} is not 0 or 1")
    try:
        ints = [max(int(c), 0) if c else 0 for c in cols[1:1 + num_dense]]
    except ValueError:
        raise ValueError("a dense feature is not an integer") from None
    try:
        cats = [int(c, 16) & _MASK64 if c else _MISSING for c in cols[1 + num_dense:]]
    except ValueError:
        raise ValueError("a categorical feature is not hexadecimal") from None
    return float(cols[0]), ints, cats


def read_criteo(files: list[Path], num_dense: int, num_fields: int, layout: CTRLayout | int,
                on_error: str = "skip",
                report: Callable[[str], None] | None = log.warning,
                vocab_min_count: int = 2) -> CTRArrays:
    """Read Criteo-format TSV rows: ``label \\t num_dense ints \\t num_fields hex values``.

    Empty or negative ints become 0, the rest ``log(1 + x)``. Categories (an empty one is a
    value of its own, "missing") become per-field ids by ``layout`` (an int: that many rows
    per field, hashed): hashed, or with ``frequency`` ids through a vocabulary counted over
    these rows (``criteo_vocab``: values seen fewer than ``vocab_min_count`` times share the
    field's last row). A bad row is reported as ``file:line`` and skipped, or raises
    ``DataError`` when ``on_error == "fail"``.
    """
    labels: list[float] = []
    ints: list[list[int]] = []
    cats: list[list[int]] = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    y, x, c = _parse_line(line, num_dense, num_fields)
                except ValueError as e:
                    msg = f"{path}:{lineno}: bad Criteo row ({e})"
                    if on_error == "fail":
                        raise DataError(msg + "; set data.on_error='skip' to skip such rows") \
                            from None
                    if report is not None:
                        report(msg + ", skipped")
                    continue
                labels.append(y)
                ints.append(x)
                cats.append(c)
    if not labels:
        raise DataError(f"no valid Criteo rows in {', '.join(map(str, files))}")
    dense = np.log1p(np.asarray(ints, dtype=np.float64)).astype(np.float32)
    lay = as_layout(num_fields, layout)
    raw = np.asarray(cats, dtype=_U64)
    if lay.ids == "frequency":
        rows = vocab_from_counts(count_values([raw]), lay.field_rows,
                                 vocab_min_count).apply(raw)
    else:
        rows = hash_categories(raw, lay.field_rows)
    return CTRArrays(dense, rows, np.asarray(labels, dtype=np.float32))


# --- batches ------------------------------------------------------------------------------------

class CTRBatches:
    """Stateless per-rank batches over a sample space with a ``take(indices)`` method."""

    def __init__(self, source: SyntheticCTR | CTRArrays, train_range: tuple[int, int],
                 eval_range: tuple[int, int], batch_size: int, eval_batches: int, seed: int,
                 rank: int, world: int) -> None:
        self.source, self.batch_size, self.n_eval_batches = source, batch_size, eval_batches
        self.seed, self.rank, self.world = seed, rank, world
        lo, hi = train_range
        n = hi - lo
        if n // world < 1:
            raise DataError(f"--nproc {world} larger than the data allows: {n} training "
                            f"samples cannot be split into {world} shards")
        self.shard = (lo + rank * n // world, lo + (rank + 1) * n // world)
        self.eval_range = eval_range
        self._eval: list[dict[str, Tensor]] | None = None

    def train_batch(self, step: int, micro: int) -> dict[str, Tensor]:
        """Micro-batch ``micro`` of optimizer step ``step`` for this rank."""
        rng = _rng(0x7E47, self.seed, step, micro, self.rank, self.world)
        return self.source.take(rng.integers(*self.shard, size=self.batch_size))

    def eval_batches(self) -> list[dict[str, Tensor]]:
        """The first ``eval_batches * batch_size`` samples of the eval range (wrapping
        around when it is shorter), identical on every rank."""
        if self._eval is None:
            lo, hi = self.eval_range
            self._eval = []
            if hi > lo:
                idx = lo + np.arange(self.n_eval_batches * self.batch_size) % (hi - lo)
                self._eval = [self.source.take(b)
                              for b in idx.reshape(self.n_eval_batches, self.batch_size)]
        return self._eval
