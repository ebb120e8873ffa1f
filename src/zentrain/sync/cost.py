"""Cost model of the sync schemes: predicted bytes received per rank, and time.

Pure functions of a ``Workload`` (ZEN §2.3 assumptions: one rank per node, full
bisection, equal density on every rank, time = bytes / bandwidth), in bytes so indices,
value widths and bitmaps are counted exactly as the reducers count them:

* ``R`` rows of ``row_numel`` elements, ``M = R·row_numel``; a COO non-zero row costs
  ``index_bytes + row_numel·elem_bytes`` (with ``row_numel = 1`` and 4-byte indices and
  values this is the paper's "2 words per non-zero");
* ``d`` = fraction of rows that are non-zero on each rank, ``nnz = d·R``;
* ``γ_k`` = densification after summing ``k`` ranks (rows of the sum / rows per rank,
  ``1 ≤ γ_k ≤ min(k, 1/d)``); ``gamma`` is ``γ_n``, ``gamma_at`` interpolates the others.

Formulas (bytes received by the busiest rank; ``n ≥ 2``):

* dense ring all-reduce: ``2(n-1)/n · M·elem``
* AGsparse: ``(n-1) · nnz·coo`` (one-shot centralization)
* SparCML (Eq. 2): ``Σ_{i=1..log2 n} min(γ_{2^{i-1}}·nnz·coo, dense_i)``, where
  ``dense_i = M·elem + R/8`` once the sparse stream switches to dense. If ``n`` is not a
  power of two (``p < n``), the fold (``nnz·coo``) and the return of the result lie on
  the critical path too (``Cost.path_bytes``), and the stages use ``γ`` at
  ``2^{i-1}·n/p``.
* OmniReduce (sparse PS, App. B.1): push ``(n-1)·s·nnz/n·coo``, pull (all-gather padded
  to the hottest server) ``(n-1)·s·γ·nnz/n·coo``; ``s`` = skew.
* ZEN (Eq. 1 + hash bitmap): push ``(n-1)/n·nnz·coo``, pull ``(n-1)/n ·
  min(γ·nnz·coo, γ·nnz·row_bytes + R/8)``; with COO only this is Eq. 1,
  ``(n-1)/n·(1+γ)·nnz·coo``.

``Cost.messages`` counts sequential message rounds so ``time(b, latency)`` can charge a
per-round latency (0 by default, as in the paper).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

SCHEMES = ("allreduce", "agsparse", "sparcml", "omnireduce", "zen")


@dataclass(frozen=True)
class Workload:
    """One sparse tensor's sync problem; see the module doc for the symbols."""

    num_rows: int
    """R: rows of the tensor (embedding table rows; elements for a flat tensor)."""
    density: float
    """d: fraction of rows non-zero on each rank (before aggregation)."""
    gamma: float
    """γ_n: densification at n ranks (rows of the sum / rows per rank)."""
    n: int
    """Ranks."""
    row_numel: int = 1
    """Elements per row."""
    elem_bytes: int = 4
    """Bytes per value element (4 for fp32, 2 for fp16/bf16)."""
    index_bytes: int = 4
    """Bytes per index on the wire."""
    skew: float = 1.0
    """OmniReduce: hottest contiguous partition over the mean (ZEN C3)."""
    gamma_fn: Callable[[float], float] | None = None
    """γ at k ranks for Eq. 2; default ``gamma_at(k, gamma, n)``."""

    @property
    def nnz(self) -> float:
        return self.density * self.num_rows

    @property
    def row_bytes(self) -> int:
        return self.row_numel * self.elem_bytes

    @property
    def coo_bytes(self) -> int:
        return self.index_bytes + self.row_bytes

    @property
    def dense_bytes(self) -> int:
        return self.num_rows * self.row_bytes

    def gamma_k(self, k: float) -> float:
        return self.gamma_fn(k) if self.gamma_fn else gamma_at(k, self.gamma, self.n)


@dataclass(frozen=True)
class Cost:
    recv_bytes: float
    """Bytes received by the busiest rank."""
    messages: int
    """Sequential message rounds."""
    path_bytes: float | None = None
    """Bytes received one after another along the critical path, when that is more than
    ``recv_bytes`` (SparCML with n not a power of two: fold, stages, return)."""

    def time(self, bandwidth: float, latency: float = 0.0) -> float:
        """Seconds at ``bandwidth`` bytes/s plus ``latency`` s per round."""
        path = self.recv_bytes if self.path_bytes is None else self.path_bytes
        return path / bandwidth + self.messages * latency


def gamma_at(k: float, gamma_n: float, n: int) -> float:
    """γ at ``k`` ranks from γ at ``n``: ``γ_k = γ_n^(ln k / ln n)``.

    Exact at both ends of ZEN's C1 range: full overlap (γ_n = 1 gives 1 for every k) and
    no overlap (γ_n = n gives k); monotone in between.
    """
    if n <= 1 or k <= 1:
        return 1.0
    k = min(k, n)
    return max(gamma_n, 1.0) ** (math.log(k) / math.log(n))


def dense_allreduce(w: Workload) -> Cost:
    if w.n < 2:
        return Cost(0.0, 0)
    return Cost(2 * (w.n - 1) / w.n * w.dense_bytes, 2 * (w.n - 1))


def agsparse(w: Workload) -> Cost:
    if w.n < 2:
        return Cost(0.0, 0)
    return Cost((w.n - 1) * w.nnz * w.coo_bytes, w.n - 1)


def _sparcml_payload(w: Workload, k: float) -> float:
    dense = w.dense_bytes + w.num_rows / 8
    return min(w.gamma_k(k) * w.nnz * w.coo_bytes, dense)


def sparcml(w: Workload) -> Cost:
    if w.n < 2:
        return Cost(0.0, 0)
    p = 1 << (w.n.bit_length() - 1)
    scale = w.n / p
    stages = sum(_sparcml_payload(w, 2 ** (i - 1) * scale)
                 for i in range(1, int(math.log2(p)) + 1))
    rounds = 2 * int(math.log2(p))
    if p == w.n:
        return Cost(stages, rounds)
    fold, back = _sparcml_payload(w, 1), _sparcml_payload(w, w.n)
    # Folded ranks receive fold + stages; the extra ranks only the result, afterwards.
    return Cost(max(fold + stages, back), rounds + 4, path_bytes=fold + stages + back)


def omnireduce(w: Workload) -> Cost:
    if w.n < 2:
        return Cost(0.0, 0)
    share = w.skew * w.nnz / w.n * w.coo_bytes
    return Cost((w.n - 1) * share * (1 + w.gamma), 2 * (w.n - 1))


def zen(w: Workload) -> Cost:
    if w.n < 2:
        return Cost(0.0, 0)
    f = (w.n - 1) / w.n
    rows = w.gamma * w.nnz
    pull = min(rows * w.coo_bytes, rows * w.row_bytes + w.num_rows / 8)
    return Cost(f * (w.nnz * w.coo_bytes + pull), 2 * (w.n - 1))


COST_FNS: dict[str, Callable[[Workload], Cost]] = {
    "allreduce": dense_allreduce, "agsparse": agsparse, "sparcml": sparcml,
    "omnireduce": omnireduce, "zen": zen,
}


def predict(w: Workload, schemes: tuple[str, ...] = SCHEMES) -> dict[str, Cost]:
    """Predicted cost of each scheme in ``schemes``."""
    return {s: COST_FNS[s](w) for s in schemes}


def best(w: Workload, schemes: tuple[str, ...] = SCHEMES, bandwidth: float = 1.25e9,
         latency: float = 0.0) -> tuple[str, dict[str, float]]:
    """The fastest scheme (ties: earliest in ``schemes``) and every scheme's seconds."""
    times = {s: c.time(bandwidth, latency) for s, c in predict(w, schemes).items()}
    return min(schemes, key=lambda s: times[s]), times
