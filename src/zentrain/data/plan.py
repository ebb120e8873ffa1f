"""The global sample order: which samples make step ``s``'s global batch, from (seed, s).

A sample is identified by ``(source, index)``: source ``i`` of the config, ``index`` in its
train range ``[0, n_i)``. The order is built in three deterministic pieces, none of which
depends on the number of ranks or loader workers:

1. **Mixture.** ``counts(s)``: how many of the ``G`` samples of step ``s`` come from each
   source. The weights at step ``s`` (constant or linearly ramped, ``config.source_weight``)
   give expected counts ``G p_i``; each source gets ``floor(G p_i)`` plus at most one of the
   remaining samples, placed by systematic sampling with a uniform offset drawn from
   (seed, s). The allocation is unbiased and never more than one sample away from
   ``G p_i`` (a multinomial draw can be many standard deviations off on small batches).
2. **Cursor.** Source ``i`` is read as an endless stream of epochs. Sample ``c`` of the stream
   (``c`` = samples of source ``i`` used before, plus its position in this step) is
   ``perm(seed, i, epoch=c // n_i)[c % n_i]``: a fresh permutation per epoch, so every sample
   is seen once per epoch. ``consumed(s) = sum over t < s of counts(t)``.
3. **Interleave.** The step's samples are shuffled across sources with a permutation drawn
   from (seed, s), so every rank's contiguous slice gets a mixture too.

Permutations are a 4-round Feistel network on the next power of four with cycle walking:
``perm(x)`` costs O(1) memory and time per sample, for any source size, so nothing is
materialized (a shuffle of a billion Criteo rows would be 8 GB per rank).

State (``LoaderState``) is global, not per rank: the next step, the samples consumed per
source, and the global batch size. Rank ``r`` of ``w`` takes the contiguous slice
``[r G/w, (r+1) G/w)`` of the step's global batch, so resuming at another world size
continues with exactly the next samples.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from zentrain.config import SourceConfig, source_weight

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_MIX_STREAM, _PERM_STREAM = 0x3A1C, 0x9E27
_MARK_EVERY = 256  # keep the cursor every this many steps for random access


_C1, _C2, _C3 = _U64(0x9E3779B97F4A7C15), _U64(0xBF58476D1CE4E5B9), _U64(0x94D049BB133111EB)
_S27, _S30, _S31 = _U64(27), _U64(30), _U64(31)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """``ctr.splitmix64`` on a uint64 array, in place on a copy (array arithmetic wraps
    silently, so no errstate is needed; numpy call overhead dominates at batch sizes)."""
    z = z + _C1
    z ^= z >> _S30
    z *= _C2
    z ^= z >> _S27
    z *= _C3
    z ^= z >> _S31
    return z


def mix_key(*values: int) -> int:
    """Hash integers into one 64-bit key (chained splitmix64 on Python ints, so scalars pay
    no numpy overhead; equals ``ctr.splitmix64`` step by step)."""
    h = 0
    for v in values:
        z = ((h ^ int(v)) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h


def uniform(*values: int) -> float:
    """A uniform float in [0, 1) from hashed integers."""
    return (mix_key(*values) >> 11) * 2.0**-53


# --- permutations -------------------------------------------------------------------------------

def feistel_permute(x: np.ndarray, n: int, key: int, rounds: int = 4) -> np.ndarray:
    """``perm(x)`` for a pseudo-random permutation of ``[0, n)`` chosen by ``key``.

    An (unbalanced) Feistel network on ``bits = bit_length(n - 1)`` bits: the value is split
    into a high and a low half, and each round XORs one half with a keyed hash of the other,
    which is a bijection on ``[0, 2^bits)`` whatever the widths. Values that land at or above
    ``n`` are re-encrypted until they come back into range ("cycle walking"), which keeps
    the map a bijection on ``[0, n)``; the domain is < 2n, so a value needs fewer than two
    passes on average.
    """
    if n <= 0:
        raise ValueError(f"cannot permute an empty range (n={n})")
    bits = max(2, (n - 1).bit_length())
    lo_bits = bits // 2
    lo_mask, hi_mask = _U64((1 << lo_bits) - 1), _U64((1 << (bits - lo_bits)) - 1)
    shift = _U64(lo_bits)
    keys = [_U64(mix_key(key, r)) for r in range(rounds)]

    def encrypt(v: np.ndarray) -> np.ndarray:
        hi, lo = v >> shift, v & lo_mask
        for r, k in enumerate(keys):
            if r % 2 == 0:
                lo ^= _splitmix(hi ^ k) & lo_mask
            else:
                hi ^= _splitmix(lo ^ k) & hi_mask
        return (hi << shift) | lo

    y = encrypt(np.asarray(x, dtype=_U64))
    out = np.flatnonzero(y >= _U64(n))
    while len(out):
        y[out] = encrypt(y[out])
        out = out[y[out] >= _U64(n)]
    return y.astype(np.int64)


def epoch_key(seed: int, source: int, epoch: int) -> int:
    """The permutation key of ``source``'s epoch ``epoch``."""
    return mix_key(_PERM_STREAM, seed, source, epoch)


# --- mixture ------------------------------------------------------------------------------------

def allocate(total: int, weights: np.ndarray, u: float) -> np.ndarray:
    """Split ``total`` samples over sources by ``weights`` (systematic sampling, offset ``u``).

    Source ``i`` gets ``floor(total p_i)`` or one more; ``E[count_i] = total p_i`` exactly
    when ``u`` is uniform on [0, 1).
    """
    p = np.asarray(weights, dtype=np.float64)
    p = p / p.sum()
    expected = total * p
    base = np.floor(expected).astype(np.int64)
    rest = total - int(base.sum())
    if rest > 0:
        frac = expected - base
        edges = np.concatenate([[0.0], np.cumsum(frac)])
        edges *= rest / edges[-1]  # the fractions sum to ``rest`` up to rounding
        points = u + np.arange(rest)
        owner = np.clip(np.searchsorted(edges, points, side="right") - 1, 0, len(p) - 1)
        base += np.bincount(owner, minlength=len(p))
    return base


@dataclass(frozen=True)
class MixSchedule:
    """Per-step source weights from the sources' configs (picklable, for the workers)."""

    sources: tuple[SourceConfig, ...]

    def __call__(self, step: int) -> np.ndarray:
        return np.array([source_weight(s, step) for s in self.sources], dtype=np.float64)


# --- state and plan -----------------------------------------------------------------------------

@dataclass
class LoaderState:
    """Everything the global order needs to continue (identical on every rank)."""

    step: int
    """The next step whose batch the trainer will ask for."""
    consumed: list[int]
    """Samples of each source used by steps before ``step`` (epoch = consumed // size)."""
    global_batch_size: int
    """Samples per optimizer step over all ranks."""
    sizes: list[int] = field(default_factory=list)
    """Train samples of each source when saved (a changed size breaks exactness)."""


class Planner:
    """Step -> global batch of ``(source, index)`` ids; a pure function of the state.

    ``sizes``: train samples per source; ``weights_at(step)`` gives the (unnormalized) source weights of a step. The planner
    answers any step at or after its state's step: it walks ``counts`` forward from the
    nearest remembered cursor (one every 256 steps, plus the latest), so sequential use is
    O(1) per step and random access O(256).
    """

    def __init__(self, sizes: list[int], weights_at: MixSchedule, seed: int,
                 state: LoaderState) -> None:
        if any(n <= 0 for n in sizes):
            raise ValueError(f"every source needs at least one train sample (sizes {sizes})")
        self.sizes, self.weights_at, self.seed = list(sizes), weights_at, seed
        self.reset(state)

    def reset(self, state: LoaderState) -> None:
        if len(state.consumed) != len(self.sizes):
            raise ValueError(f"state has {len(state.consumed)} sources, the plan "
                             f"{len(self.sizes)}")
        self.start = state.step
        self.global_batch_size = state.global_batch_size
        first = np.asarray(state.consumed, dtype=np.int64)
        self._marks: dict[int, np.ndarray] = {state.step: first}
        self._cursor = (state.step, first)
        self._ids: OrderedDict[int, np.ndarray] = OrderedDict()

    def state_at(self, step: int) -> LoaderState:
        return LoaderState(step, self.consumed_at(step).tolist(), self.global_batch_size,
                           list(self.sizes))

    def counts(self, step: int) -> np.ndarray:
        """Samples per source in ``step``'s global batch."""
        u = uniform(_MIX_STREAM, self.seed, step)
        return allocate(self.global_batch_size, self.weights_at(step), u)

    def consumed_at(self, step: int) -> np.ndarray:
        """Samples per source used by steps ``[0, step)`` (int64 array)."""
        if step < self.start:
            raise ValueError(f"step {step} is before the loader state's step {self.start}: "
                             "its samples are not known after a resume")
        at, c = self._cursor
        if at > step:
            at = max(k for k in self._marks if k <= step)
            c = self._marks[at]
        c = c.copy()
        while at < step:
            c += self.counts(at)
            at += 1
            if (at - self.start) % _MARK_EVERY == 0:
                self._marks[at] = c.copy()
        self._cursor = (at, c)
        return c.copy()

    def global_ids(self, step: int) -> np.ndarray:
        """``[G, 2]`` int64: (source, index) of every sample of ``step``, in batch order."""
        hit = self._ids.get(step)
        if hit is not None:
            self._ids.move_to_end(step)
            return hit
        counts = self.counts(step)
        start = self.consumed_at(step)
        source = np.repeat(np.arange(len(counts)), counts)
        if len(counts) > 1:  # interleave: position j holds the perm(j)-th label
            key = mix_key(_MIX_STREAM, self.seed, step, 1)
            source = source[feistel_permute(np.arange(len(source)), len(source), key)]
        index = np.empty(len(source), dtype=np.int64)
        for i in np.flatnonzero(counts):
            where = np.flatnonzero(source == i)
            pos = start[i] + np.arange(counts[i], dtype=np.int64)
            index[where] = self._lookup(i, pos)
        ids = np.stack([source.astype(np.int64), index], axis=1)
        ids.flags.writeable = False
        self._ids[step] = ids
        if len(self._ids) > 64:
            self._ids.popitem(last=False)
        return ids

    def _lookup(self, source: int, pos: np.ndarray) -> np.ndarray:
        n = self.sizes[source]
        epoch, off = np.divmod(pos, n)
        out = np.empty_like(pos)
        for e in np.unique(epoch):
            sel = epoch == e
            out[sel] = feistel_permute(off[sel], n, epoch_key(self.seed, source, int(e)))
        return out

    def rank_ids(self, step: int, rank: int, world: int) -> np.ndarray:
        """Rank ``rank``'s contiguous slice of ``step``'s global batch."""
        per = self.global_batch_size // world
        return self.global_ids(step)[rank * per:(rank + 1) * per]


def batch_digest(ids: np.ndarray) -> str:
    """A short hash of a batch's (source, index) ids in order (16 hex digits)."""
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype="<i8").tobytes(),
                           digest_size=8).hexdigest()
