"""GEMINI replica placement and its recovery probability (Wang et al., SOSP '23, §4).

Each of N nodes keeps its own in-memory checkpoint and sends replicas to other nodes, so
every checkpoint has m copies in CPU memory. A failure of k nodes at once is recoverable
from memory when no node has lost *all* holders of its checkpoint.

* **Group placement** (m divides N): nodes ``[g*m, g*m+m)`` form group g and every member
  stores the checkpoints of all members. This is optimal when m | N.
* **Mixed placement** (m does not divide N): ``N//m - 1`` ordinary groups, then one *ring
  group* of the last ``m + N % m`` nodes, inside which each node sends its checkpoint to
  the next ``m - 1`` nodes around the ring. Every node still sends m - 1 replicas and
  stores m - 1, and the recovery probability stays within ``(2m-3)/C(N,m)`` of optimal.
* Fewer nodes than m: every node stores everyone's checkpoint (N copies, the most there
  can be); ``m = 1`` means no replicas at all.

The probability functions assume the k failed nodes are a uniformly random k-subset.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from functools import cached_property
from math import comb


@dataclass(frozen=True)
class Placement:
    """Where each node's checkpoint lives, for ``nodes`` nodes and ``m`` copies."""

    nodes: int
    m: int = 2

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.m < 1:
            raise ValueError(f"placement needs nodes >= 1 and m >= 1, got nodes={self.nodes}, "
                             f"m={self.m}")

    @cached_property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        """Ordinary groups first; with m not dividing N the last one is the ring group."""
        n, m = self.nodes, self.m
        if n <= m:
            return (tuple(range(n)),)
        full = n // m
        if n % m == 0:
            return tuple(tuple(range(g * m, g * m + m)) for g in range(full))
        ordinary = tuple(tuple(range(g * m, g * m + m)) for g in range(full - 1))
        return ordinary + (tuple(range((full - 1) * m, n)),)

    @cached_property
    def _replicas(self) -> tuple[tuple[int, ...], ...]:
        out: list[tuple[int, ...]] = [()] * self.nodes
        copies = min(self.m, self.nodes)
        for group in self.groups:
            size = len(group)
            for pos, node in enumerate(group):
                # In a group of exactly `copies` nodes "the next copies-1 in the ring" is
                # everyone else, so one rule covers both ordinary and ring groups.
                out[node] = tuple(group[(pos + j) % size] for j in range(1, copies))
        return tuple(out)

    def _check(self, node: int) -> None:
        if not 0 <= node < self.nodes:
            raise ValueError(f"node {node} out of range for {self.nodes} nodes")

    def replicas_of(self, node: int) -> list[int]:
        """The other nodes that store a replica of ``node``'s checkpoint (m - 1 of them)."""
        self._check(node)
        return list(self._replicas[node])

    def holders_of(self, node: int) -> list[int]:
        """Every node holding ``node``'s checkpoint, in the order recovery should try them:
        the node itself first, then its replicas."""
        return [node, *self.replicas_of(node)]

    def stored_by(self, node: int) -> list[int]:
        """The other nodes whose replicas ``node`` keeps (the inverse of ``replicas_of``)."""
        self._check(node)
        return [o for o in range(self.nodes) if node in self._replicas[o]]

    def recoverable(self, failed: set[int] | frozenset[int]) -> bool:
        """True if every node's checkpoint survives on some node not in ``failed``."""
        return all(not failed.issuperset(self.holders_of(n)) for n in range(self.nodes))


def recovery_probability(p: Placement, k: int) -> float:
    """Exact probability that k simultaneous random node failures are recoverable from
    memory, by enumerating every k-subset (fine for the N <= ~20 that tests use)."""
    if not 0 <= k <= p.nodes:
        raise ValueError(f"k must be in [0, {p.nodes}], got {k}")
    if comb(p.nodes, k) > 2_000_000:
        raise ValueError(f"C({p.nodes},{k}) subsets is too many to enumerate; "
                         "use simulate_recovery_probability")
    ok = sum(p.recoverable(frozenset(f)) for f in itertools.combinations(range(p.nodes), k))
    return ok / comb(p.nodes, k)


def group_recovery_probability(nodes: int, m: int, k: int) -> float:
    """Closed form for group placement (m | N): inclusion-exclusion over the N/m groups
    that could fail completely."""
    if nodes % m:
        raise ValueError(f"group placement needs m | N, got N={nodes}, m={m}")
    groups = nodes // m
    bad = sum((-1) ** (j + 1) * comb(groups, j) * comb(nodes - j * m, k - j * m)
              for j in range(1, groups + 1) if j * m <= k)
    return 1.0 - bad / comb(nodes, k)


def gemini_bound(nodes: int, m: int, k: int) -> float:
    """GEMINI's Corollary (m | N): Pr = 1 if k < m, else at least
    ``max(0, 1 - N * C(N-m, k-m) / (m * C(N, k)))`` (the first inclusion-exclusion term,
    so exact whenever at most one group can fail, e.g. k < 2m)."""
    if k < m:
        return 1.0
    return max(0.0, 1.0 - nodes * comb(nodes - m, k - m) / (m * comb(nodes, k)))


def simulate_recovery_probability(p: Placement, k: int, trials: int = 10_000,
                                  seed: int = 0) -> float:
    """Monte-Carlo estimate: kill k random nodes ``trials`` times, count recoveries."""
    rng = random.Random(seed)
    nodes = range(p.nodes)
    return sum(p.recoverable(frozenset(rng.sample(nodes, k))) for _ in range(trials)) / trials
