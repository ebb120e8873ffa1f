"""Sparsity profile of row-sparse gradients (ZEN §2.1, characteristics C1-C3) and traces.

Everything here is a pure function of *index sets*: ``sets[r]`` is the sorted, unique
int64 tensor of the non-zero rows of one table's gradient on rank ``r`` (what a sparse
reducer would send before aggregation). ``zentrain analyze`` computes them by emulating
``n`` data-parallel ranks in one process; ``zentrain bench sync --trace`` replays them.

Definitions (``n`` ranks, ``R`` rows, ``I_r`` = ``sets[r]``):

* **density** ``d = mean_r |I_r| / R``; after aggregation ``d^n = |∪ I_r| / R``.
* **densification** (C2) ``γ_k = |∪_{r∈S} I_r| / mean_{r∈S} |I_r|`` for a group ``S`` of
  ``k`` ranks, averaged over the ``n`` cyclic windows ``S = {s, s+1, ..., s+k-1 mod n}``
  (every rank weighs the same). ``γ_1 = 1``; ``1 ≤ γ_k ≤ k`` (full / no overlap). This is
  the reducers' ``gamma`` (``out_nnz·n/nnz_sum``) at ``k = n``.
* **overlap** (C1) of a pair: ``|I_a ∩ I_b| / |I_a ∪ I_b|`` (Jaccard), averaged over
  pairs; ``overlap_min`` is the paper's ``|I_a ∩ I_b| / min(|I_a|, |I_b|)``.
* **imbalance** (C3, Definition 8) of a partition of the rows over ``n`` servers, either
  **contiguous** (server ``j`` owns ``[jR/n, (j+1)R/n)``, OmniReduce) or **hashed** (ZEN's
  h0): with ``S[i, j] = |{x ∈ I_i : part(x) = j}|`` and ``U_j = |{x ∈ ∪I : part(x) = j}|``,
  Push = ``max_{i,j} n·S[i,j]/|I_i|`` (the paper's skewness ratio, worst rank) and Pull =
  ``max_j n·U_j / |∪I|`` (``hashing.imbalance_ratios``).

Trace format (``save_trace``/``load_trace``): one ``torch.save`` of plain containers and
int tensors, loadable with ``weights_only=True``. Per table, all index sets are
concatenated step-major, rank-minor into one int32 (int64 past 2^31 rows) tensor, with an
int64 ``offsets`` tensor of ``steps·world + 1`` entries.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zentrain.sync.hashing import h0, imbalance_ratios

TRACE_FORMAT = "zentrain-sparse-trace"
TRACE_VERSION = 1


# -- C1-C3 ------------------------------------------------------------------------------------
def _union(sets: list[torch.Tensor]) -> torch.Tensor:
    return torch.unique(torch.cat(sets)) if sets else torch.empty(0, dtype=torch.int64)


def densification(sets: list[torch.Tensor]) -> dict[int, float]:
    """``{k: γ_k}`` for ``k = 1..n`` (module doc), averaged over cyclic windows."""
    n = len(sets)
    sizes = [s.numel() for s in sets]
    acc = {k: 0.0 for k in range(1, n + 1)}
    for start in range(n):
        union = torch.empty(0, dtype=torch.int64)
        for k in range(1, n + 1):
            r = (start + k - 1) % n
            union = torch.unique(torch.cat([union, sets[r]]))
            mean = sum(sizes[(start + i) % n] for i in range(k)) / k
            acc[k] += union.numel() / mean if mean else 1.0
    return {k: v / n for k, v in acc.items()}


def pair_overlaps(sets: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per pair ``(a < b)``: Jaccard ``|∩|/|∪|`` and the paper's ``|∩|/min``."""
    jac, mins = [], []
    for a, b in itertools.combinations(sets, 2):
        inter = int(torch.isin(a, b).sum())
        union = a.numel() + b.numel() - inter
        jac.append(inter / union if union else 1.0)
        low = min(a.numel(), b.numel())
        mins.append(inter / low if low else 1.0)
    return jac, mins


def contiguous_servers(idx: torch.Tensor, num_rows: int, n: int) -> torch.Tensor:
    """OmniReduce's owner of each row: server ``j`` holds ``[jR/n, (j+1)R/n)``."""
    bounds = torch.tensor([(i * num_rows) // n for i in range(1, n)], dtype=torch.int64)
    return torch.bucketize(idx, bounds, right=True)


def partition_imbalance(sets: list[torch.Tensor], num_rows: int, n: int,
                        scheme: str, seed: int = 0) -> dict[str, float]:
    """Definition 8 ratios of the ``contiguous`` or ``hashed`` (h0 with ``seed``) partition
    of ``sets`` over ``n`` servers; also ``skew``, the hottest server's share of the union
    over the mean (what OmniReduce's padded Pull pays, and ``cost.Workload.skew``)."""
    if scheme == "contiguous":
        part = [contiguous_servers(s, num_rows, n) for s in sets]
        upart = contiguous_servers(_union(sets), num_rows, n)
    elif scheme == "hashed":
        part = [h0(s, n, seed) for s in sets]
        upart = h0(_union(sets), n, seed)
    else:
        raise ValueError(f"partition scheme must be 'contiguous' or 'hashed', got {scheme!r}")
    split = torch.stack([torch.bincount(p, minlength=n) for p in part])
    server_rows = torch.bincount(upart, minlength=n)
    out = imbalance_ratios(split, server_rows)
    out["skew"] = out["pull_imbalance"]
    return out


def profile_step(sets: list[torch.Tensor], num_rows: int, partitions: int | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """Every figure of one table at one step (``partitions`` defaults to ``len(sets)``)."""
    n = len(sets)
    parts = partitions or n
    nnz = [s.numel() for s in sets]
    union = _union(sets).numel()
    gam = densification(sets)
    jac, mins = pair_overlaps(sets)
    mean_nnz = sum(nnz) / n
    return {
        "nnz": nnz, "union": union,
        "density": mean_nnz / num_rows if num_rows else 0.0,
        "density_agg": union / num_rows if num_rows else 0.0,
        "gamma": {str(k): v for k, v in gam.items()},
        "overlap": sum(jac) / len(jac) if jac else 1.0,
        "overlap_min": sum(mins) / len(mins) if mins else 1.0,
        "overlap_pairs": jac,
        "contiguous": partition_imbalance(sets, num_rows, parts, "contiguous"),
        "hashed": partition_imbalance(sets, num_rows, parts, "hashed", seed),
    }


def summarize(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Means (and maxima of the imbalance ratios) over a table's profiled steps."""
    if not steps:
        return {}

    def mean(vals: list[float]) -> float:
        return sum(vals) / len(vals)

    ks = steps[0]["gamma"].keys()
    out: dict[str, Any] = {
        "nnz_mean": mean([mean(s["nnz"]) for s in steps]),
        "density": mean([s["density"] for s in steps]),
        "density_agg": mean([s["density_agg"] for s in steps]),
        "gamma": {k: mean([s["gamma"][k] for s in steps]) for k in ks},
        "overlap": mean([s["overlap"] for s in steps]),
        "overlap_min": mean([s["overlap_min"] for s in steps]),
    }
    for part in ("contiguous", "hashed"):
        out[part] = {}
        for key in ("push_imbalance", "pull_imbalance", "push_load_imbalance", "skew"):
            vals = [s[part][key] for s in steps]
            out[part][key] = mean(vals)
            out[part][key + "_max"] = max(vals)
    return out


# -- traces -------------------------------------------------------------------------------
@dataclass
class TraceTable:
    """One sparse table's index sets over steps and ranks."""

    name: str
    num_rows: int
    row_numel: int
    dtype: str = "float32"
    indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int32))
    """All sets, step-major then rank order, concatenated."""
    offsets: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.int64))
    """``steps·world + 1`` start positions into ``indices``."""


@dataclass
class Trace:
    """Gradient index traces of ``world`` ranks over ``steps`` steps (see module doc)."""

    world: int
    steps: int
    tables: list[TraceTable]
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON-able description (model, config, command)."""

    def rows(self, table: int, step: int, rank: int) -> torch.Tensor:
        """Sorted unique non-zero rows (int64) of ``table`` on ``rank`` at ``step``."""
        t = self.tables[table]
        i = step * self.world + rank
        lo, hi = int(t.offsets[i]), int(t.offsets[i + 1])
        return t.indices[lo:hi].to(torch.int64)


class TraceRecorder:
    """Collects ``add(step_sets)`` calls into a ``Trace``."""

    def __init__(self, world: int, tables: list[tuple[str, int, int, str]],
                 meta: dict[str, Any] | None = None) -> None:
        self.world = world
        self.specs = tables
        self.meta = meta or {}
        self._chunks: list[list[torch.Tensor]] = [[] for _ in tables]
        self.steps = 0

    def add(self, step_sets: list[list[torch.Tensor]]) -> None:
        """``step_sets[table][rank]``: that step's sorted unique rows."""
        if len(step_sets) != len(self.specs) or any(len(s) != self.world for s in step_sets):
            raise ValueError("trace: need one index set per table and rank")
        for chunks, sets in zip(self._chunks, step_sets):
            chunks.extend(sets)
        self.steps += 1

    def trace(self) -> Trace:
        tables = []
        for (name, rows, width, dtype), chunks in zip(self.specs, self._chunks):
            idt = torch.int32 if rows <= 2**31 - 1 else torch.int64
            sizes = torch.tensor([0] + [c.numel() for c in chunks], dtype=torch.int64)
            flat = torch.cat(chunks).to(idt) if chunks else torch.empty(0, dtype=idt)
            tables.append(TraceTable(name, rows, width, dtype, flat, torch.cumsum(sizes, 0)))
        return Trace(self.world, self.steps, tables, dict(self.meta))


def save_trace(path: str | Path, trace: Trace) -> None:
    obj = {"format": TRACE_FORMAT, "version": TRACE_VERSION, "world": trace.world,
           "steps": trace.steps, "meta": trace.meta,
           "tables": [{"name": t.name, "num_rows": t.num_rows, "row_numel": t.row_numel,
                       "dtype": t.dtype, "indices": t.indices, "offsets": t.offsets}
                      for t in trace.tables]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def load_trace(path: str | Path) -> Trace:
    """Load and validate a trace (``weights_only=True``: no code runs on load)."""
    try:
        obj = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"trace file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{path}: not a readable trace ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or obj.get("format") != TRACE_FORMAT:
        raise ValueError(f"{path}: not a {TRACE_FORMAT} file")
    if obj.get("version") != TRACE_VERSION:
        raise ValueError(f"{path}: trace version {obj.get('version')} (this zentrain reads "
                         f"{TRACE_VERSION})")
    world, steps = int(obj["world"]), int(obj["steps"])
    tables = []
    for t in obj["tables"]:
        tt = TraceTable(str(t["name"]), int(t["num_rows"]), int(t["row_numel"]),
                        str(t["dtype"]), t["indices"], t["offsets"])
        off = tt.offsets
        ok = (off.numel() == steps * world + 1 and int(off[0]) == 0
              and int(off[-1]) == tt.indices.numel() and bool((off[1:] >= off[:-1]).all()))
        if not ok:
            raise ValueError(f"{path}: table {tt.name!r} has inconsistent offsets")
        if tt.indices.numel() and (int(tt.indices.min()) < 0
                                   or int(tt.indices.max()) >= tt.num_rows):
            raise ValueError(f"{path}: table {tt.name!r} has indices outside "
                             f"[0, {tt.num_rows})")
        tables.append(tt)
    return Trace(world, steps, tables, dict(obj.get("meta", {})))


def eq1_bytes(n: int, nnz: float, gamma: float, row_numel: int, elem_bytes: int = 4,
              index_bytes: int = 4) -> float:
    """ZEN Eq. 1 as bytes received per rank: ``(n-1)/n·(1+γ)·nnz·coo`` (balanced, COO)."""
    if n < 2:
        return 0.0
    return (n - 1) / n * (1 + gamma) * nnz * (index_bytes + row_numel * elem_bytes)


def theorem2_bound(n: int, nnz: float) -> float:
    """The ``1 + sqrt(n·ln n / nnz)`` load-balance term of ZEN Theorem 2 (constant 1)."""
    return 1.0 + math.sqrt(n * math.log(n) / nnz) if nnz > 0 and n > 1 else 1.0
