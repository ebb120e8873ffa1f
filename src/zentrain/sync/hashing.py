"""Hierarchical hashing: ZEN's lossless, balanced partitioner (ZEN §3.2, Algorithm 1).

Three pieces, all vectorized torch integer ops that run unchanged on CPU and CUDA:

* ``hash64(x, seed)``: a seeded 64-bit mixer (golden-ratio multiply + seed, then the
  MurmurHash3 ``fmix64`` finalizer; ZEN uses MurmurHash with per-function seeds, §4).
  torch has no unsigned 64-bit arithmetic, so it works on int64: multiplication wraps
  modulo 2^64 exactly like uint64, and the logical right shift is an arithmetic shift
  followed by a mask. ``tests/sync/test_hashing.py`` checks it against a pure-Python
  uint64 reference.
* ``h0``: index -> server in ``[0, n)``, the first hashing level. It is a fixed function
  of one seed, so every rank maps an index to the same server (complete aggregation) and
  each server's index universe is fixed (what makes the hash bitmap possible, §3.3).
* ``hierarchical_hash``: Algorithm 1. Memory ``x`` has ``n`` partitions, each with a
  parallel region of ``r1/n`` slots and a serial region. On a GPU every index is one
  thread that writes itself into slot ``h_i(idx)`` and reads back; a lost race means a
  rehash with the next function, and after ``k`` tries an ``atomicAdd`` on the
  partition's counter reserves a serial slot. Torch on CPU has no atomics, so we emulate
  the same outcome deterministically, one round per hash function, all indices at once:

    1. each still-homeless index computes its slot ``p*W + h_i(idx) % W``;
    2. indices whose slot is still empty write their position with
       ``scatter_reduce(amax)``: among several writers of one slot the highest position
       wins (the "last writer" of a sequential replay), whatever the thread schedule;
    3. each index reads its slot back; the winners are placed, the rest go on to round
       ``i+1`` (occupied slots are never overwritten, as in Algorithm 1);
    4. after ``k`` rounds the losers get serial slots by a per-partition cumulative count
       (the vectorized ``atomicAdd(c[p], 1)``), in input order.

  Extraction reads the table row by row (partition-major), which is the order
  ``all_to_all_single`` wants, and the per-partition counts are the split sizes. No index
  is ever dropped: the serial region grows to whatever the losers need (the paper sizes it
  ``r2 = r1/10``; we report how many went there, ``serial``). Results are bit-identical
  across runs, ranks and devices because every step is a pure function of the input.

Sizing follows §5.3: ``k = 3``, ``r1 = 2·|G|·d_G`` slots in total (``2·nnz``, i.e. a load
factor of 1/2 per partition), ``r2 = r1/10``. (Algorithm 1 writes the memory as
``n × (r1 + r2)``; we read ``r1`` as the total, split over the ``n`` partitions, since the
paper's "<150 MB of hash memory" only holds that way.)

``sort_partition`` gives the same lossless partition by a stable sort on ``h0`` (a
simpler baseline for benchmarks), and ``naive_single_hash`` is the lossy strawman of the
paper's Appendix A, kept only to measure its loss — never used to synchronize.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # as signed int64
_C1 = 0xFF51AFD7ED558CCD - (1 << 64)
_C2 = 0xC4CEB9FE1A85EC53 - (1 << 64)
_POS_MASK = (1 << 63) - 1


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def hash64(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Seeded 64-bit hash of int64 ``x`` (wrapping arithmetic; uint64 bits as int64)."""
    k = x.to(torch.int64) * _GOLDEN  # a new tensor: the in-place steps below are safe
    k += _to_signed(seed)
    for c in (_C1, _C2):
        k ^= _srl(k, 33)
        k *= c
    k ^= _srl(k, 33)
    return k


def _to_signed(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def bucket(x: torch.Tensor, seed: int, m: int) -> torch.Tensor:
    """``hash64(x, seed)`` reduced to ``[0, m)``.

    Multiply-shift range reduction of the top 32 bits (``(h >> 32) · m >> 32``) instead of
    ``%``: a multiply instead of an int64 division, and just as uniform for ``m < 2^31``.
    """
    h = hash64(x, seed)
    if m < 2**31:
        return (_srl(h, 32) * m) >> 32
    return (h & _POS_MASK) % m


@dataclass(frozen=True)
class HashSeeds:
    """Seeds of h0 (index -> server) and h1..hk (index -> slot); equal on all ranks."""

    level0: int
    level2: tuple[int, ...]

    @classmethod
    def draw(cls, k: int, seed: int | None = None) -> HashSeeds:
        """Draw ``k+1`` seeds, reproducibly from ``seed`` or from the OS when it is None."""
        if seed is None:
            vals = [secrets.randbits(63) for _ in range(k + 1)]
        else:
            g = torch.Generator().manual_seed(seed)
            vals = torch.randint(0, 2**62, (k + 1,), generator=g).tolist()
        return cls(int(vals[0]), tuple(int(v) for v in vals[1:]))

    def as_list(self) -> list[int]:
        return [self.level0, *self.level2]

    @classmethod
    def from_list(cls, vals: list[int]) -> HashSeeds:
        return cls(int(vals[0]), tuple(int(v) for v in vals[1:]))


def h0(indices: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """First level: the server of each index, in ``[0, n)``, identical on every rank."""
    return bucket(indices, seed, n)


@dataclass
class Partition:
    """Indices grouped by destination server, ready for ``all_to_all_single``."""

    order: torch.Tensor
    """Positions into the input (int64), partition 0's first, then partition 1's..."""
    splits: list[int]
    """How many indices go to each partition."""
    serial: int = 0
    """Indices that lost all ``k`` parallel rounds and took a serial slot."""
    serial_capacity: int = 0
    """The paper's serial region size ``r2`` over all partitions (0 when unused)."""


def hierarchical_hash(
    indices: torch.Tensor, n: int, seeds: HashSeeds,
    r1: int | None = None, r2: int | None = None,
) -> Partition:
    """Algorithm 1 on unique ``indices``; lossless, deterministic; see the module doc.

    ``r1`` (default ``2·len(indices)``) is the total parallel region, split evenly over
    the ``n`` partitions; ``r2`` (default ``r1 // 10``) the nominal serial region, which
    grows when more indices than that lose every round. ``k = len(seeds.level2)``.
    """
    nnz = indices.numel()
    dev = indices.device
    if nnz == 0:
        return Partition(torch.empty(0, dtype=torch.int64, device=dev), [0] * n)
    idx = indices.to(torch.int64)
    r1 = 2 * nnz if r1 is None else r1
    r2 = r1 // 10 if r2 is None else r2
    width = max(1, math.ceil(r1 / n))
    part = h0(idx, n, seeds.level0)
    x = torch.full((n * width,), -1, dtype=torch.int64, device=dev)
    homeless = torch.arange(nnz, device=dev)
    for r, s in enumerate(seeds.level2):
        if r == 0:  # everyone is homeless in round 1: skip the gathers
            slot = part * width + bucket(idx, s, width)
        else:
            slot = part[homeless] * width + bucket(idx[homeless], s, width)
        free = x[slot] < 0
        x.scatter_reduce_(0, slot[free], homeless[free], reduce="amax", include_self=True)
        homeless = homeless[x[slot] != homeless]
        if homeless.numel() == 0:
            break
    table = x.view(n, width)
    nser = homeless.numel()
    if nser:
        # Serial region: slot = running count of earlier losers of the same partition,
        # i.e. the vectorized atomicAdd(c[p], 1) of Algorithm 1, in input order.
        p = part[homeless]
        by_p = torch.argsort(p, stable=True)
        p_sorted = p[by_p]
        counts = torch.bincount(p_sorted, minlength=n)
        starts = torch.cumsum(counts, 0) - counts
        within = torch.arange(nser, device=dev) - starts[p_sorted]
        cap = max(math.ceil(r2 / n), int(counts.max()))
        serial = torch.full((n, cap), -1, dtype=torch.int64, device=dev)
        serial[p_sorted, within] = homeless[by_p]
        table = torch.cat([table, serial], dim=1)
    filled = table >= 0
    splits = filled.sum(1).tolist()
    return Partition(table[filled], splits, nser, r2)


def sort_partition(indices: torch.Tensor, n: int, seeds: HashSeeds) -> Partition:
    """The same lossless partition by a stable sort on ``h0`` (input order kept inside)."""
    part = h0(indices, n, seeds.level0)
    order = torch.argsort(part, stable=True)
    return Partition(order, torch.bincount(part, minlength=n).tolist())


def naive_single_hash(indices: torch.Tensor, memory: int, seed: int) -> tuple[torch.Tensor, int]:
    """Appendix A strawman: one hash, one slot per index, last writer wins. LOSSY.

    Returns the positions that survived and how many indices were lost to collisions.
    Only for the profiler and tests; a sync built on it would silently drop gradients.
    """
    nnz = indices.numel()
    x = torch.full((memory,), -1, dtype=torch.int64, device=indices.device)
    slot = bucket(indices, seed, memory)
    x.scatter_reduce_(0, slot, torch.arange(nnz, device=indices.device), reduce="amax")
    kept = x[x >= 0]
    return kept, nnz - kept.numel()


def expected_naive_loss(load: float) -> float:
    """Balls-into-bins loss of ``naive_single_hash`` at ``load = nnz / memory``."""
    if load <= 0:
        return 0.0
    return 1.0 - (1.0 - math.exp(-load)) / load


def imbalance_ratios(
    split_matrix: torch.Tensor, server_rows: torch.Tensor | list[int] | None = None
) -> dict[str, float]:
    """Load-imbalance ratios of a parallel scheme (ZEN Definition 8; 1.0 is perfect).

    ``split_matrix[i, j]`` = rows worker ``i`` pushes to server ``j``; ``server_rows[j]``
    = unique rows server ``j`` holds after aggregation (what it serves in Pull).

    * ``push_imbalance``: max over workers ``i`` with rows and servers ``j`` of
      ``n·S[i,j] / Σ_j S[i,j]`` (Def. 8's Push ratio);
    * ``push_load_imbalance``: max server receive load / mean (what bounds the time);
    * ``pull_imbalance``: ``max_j n·U_j / Σ_j U_j`` (Def. 8's Pull ratio).
    """
    s = split_matrix.to(torch.float64)
    n = s.shape[1]
    out: dict[str, float] = {}
    per_worker = s.sum(1)
    busy = per_worker > 0
    out["push_imbalance"] = (
        float((n * s[busy] / per_worker[busy, None]).max()) if bool(busy.any()) else 1.0)
    col = s.sum(0)
    out["push_load_imbalance"] = float(col.max() / col.mean()) if float(col.sum()) > 0 else 1.0
    if server_rows is not None:
        u = torch.as_tensor(server_rows, dtype=torch.float64)
        out["pull_imbalance"] = float(u.max() / u.mean()) if float(u.sum()) > 0 else 1.0
    return out
