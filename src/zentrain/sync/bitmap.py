"""Wire formats of the sparse schemes: COO rows, plain bitmaps, ZEN's hash bitmap.

COO here is ``(indices int64 [nnz], values [nnz, *row])``. On the wire an index takes
``index_dtype(num_rows)`` (int32 below 2^31 rows, else int64) and travels in the same byte
row as its values (``pack_coo``), so one collective moves both.

The **hash bitmap** (ZEN §3.3, Algorithm 2): h0 is fixed, so server ``i``'s universe
``𝕀_i = sorted {idx in [0, num_rows) : h0(idx) = i}`` is fixed too and is computed once per
``(num_rows, n, seed, device)`` (``hash_universe``, cached). Server ``i`` sends one bit per
member of ``𝕀_i``; a worker maps set bits back through ``𝕀_i``. Over all servers that is
``Σ|𝕀_i|/8 ≈ num_rows/8`` bytes whatever ``n`` is, where a plain bitmap per server would
cost ``n·num_rows/8``.

Also here: ``sum_rows_ordered``, the one place cross-rank sums are computed, in a fixed
(input-block) order, deterministic on CPU and CUDA.
"""

from __future__ import annotations

import functools
import math

import torch

from zentrain.sync.hashing import h0

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def index_dtype(num_rows: int) -> torch.dtype:
    """Wire dtype of indices: 4 bytes when they fit, else 8."""
    return torch.int32 if num_rows <= 2**31 - 1 else torch.int64


def pad8(nbytes: int) -> int:
    return (nbytes + 7) // 8 * 8


# -- bit packing ----------------------------------------------------------------------------
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``[L]`` -> uint8 ``[ceil(L/8)]``, bit ``j`` of byte ``b`` is ``mask[8b + j]``."""
    length = mask.numel()
    nbytes = (length + 7) // 8
    padded = torch.zeros(nbytes * 8, dtype=torch.uint8, device=mask.device)
    padded[:length] = mask.to(torch.uint8)
    w = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    # Each byte is a sum of distinct powers of two <= 255: no uint8 overflow.
    return (padded.view(nbytes, 8) * w).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: uint8 bytes -> bool ``[length]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.to(torch.uint8).unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:length].bool()


# -- hash bitmap ------------------------------------------------------------------------------
class HashUniverse:
    """Every server's fixed index universe ``𝕀_i`` under h0 (sorted), and its codec."""

    def __init__(self, num_rows: int, n: int, seed: int, device: torch.device | str) -> None:
        self.num_rows, self.n, self.seed = num_rows, n, seed
        self.device = torch.device(device)
        rows = torch.arange(num_rows, device=device)
        server = h0(rows, n, seed)
        # Stable sort: grouped by server, ascending index inside each group.
        order = torch.argsort(server, stable=True)
        self.members = order.to(index_dtype(num_rows))
        self.sizes: list[int] = torch.bincount(server, minlength=n).tolist()
        self.offsets = [0]
        for s in self.sizes:
            self.offsets.append(self.offsets[-1] + s)

    def universe(self, i: int) -> torch.Tensor:
        return self.members[self.offsets[i]:self.offsets[i + 1]]

    def bitmap_bytes(self, i: int) -> int:
        return (self.sizes[i] + 7) // 8

    def encode(self, i: int, sorted_indices: torch.Tensor) -> torch.Tensor:
        """Server ``i``'s bitmap of ``sorted_indices`` (all with h0 == i, ascending).

        Same bytes as ``pack_bits`` of the membership mask, but O(rows + bitmap bytes):
        each row adds its bit ``1 << (pos % 8)`` to byte ``pos // 8`` (distinct bits of a
        byte never carry, so the sum is their OR); no ``|𝕀_i|``-long mask is built.
        """
        uni = self.universe(i)
        pos = torch.searchsorted(uni, sorted_indices.to(uni.dtype)).to(torch.int64)
        out = torch.zeros(self.bitmap_bytes(i), dtype=torch.int32, device=uni.device)
        out.index_add_(0, pos >> 3, torch.ones_like(pos, dtype=torch.int32) << (pos & 7).int())
        return out.to(torch.uint8)

    def decode(self, i: int, packed: torch.Tensor) -> torch.Tensor:
        """Set bits of server ``i``'s bitmap -> indices (int64, ascending).

        When at most a quarter of the bytes are non-zero (the bitmap's low-density end),
        only those bytes are unpacked; otherwise unpacking every bit is cheaper.
        """
        uni = self.universe(i)
        packed = packed[: self.bitmap_bytes(i)].to(torch.uint8)
        nz = torch.nonzero(packed).reshape(-1)
        if 4 * nz.numel() > packed.numel():
            return uni[unpack_bits(packed, uni.numel())].to(torch.int64)
        shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
        bits = ((packed[nz].unsqueeze(1) >> shifts) & 1).bool()
        pos = (nz.unsqueeze(1) * 8 + shifts.to(torch.int64))[bits]  # row-major: ascending
        return uni[pos].to(torch.int64)


@functools.lru_cache(maxsize=16)
def _universe_cached(num_rows: int, n: int, seed: int, device: str) -> HashUniverse:
    return HashUniverse(num_rows, n, seed, device)


def hash_universe(num_rows: int, n: int, seed: int, device: torch.device | str) -> HashUniverse:
    """Cached ``HashUniverse``: h0 is fixed, so this is computed once (ZEN: "offline")."""
    return _universe_cached(num_rows, n, seed, str(torch.device(device)))


# -- COO rows on the wire -------------------------------------------------------------------
def row_nbytes(values: torch.Tensor) -> int:
    """Bytes of one row of ``values`` (``[nnz, *row]``), also when ``nnz == 0``."""
    return math.prod(values.shape[1:]) * values.element_size()


def values_to_bytes(values: torch.Tensor) -> torch.Tensor:
    """``[nnz, *row]`` of any dtype -> uint8 ``[nnz, row_bytes]`` (a copy, contiguous)."""
    nnz, numel = values.shape[0], math.prod(values.shape[1:])
    flat = values.detach().contiguous().reshape(nnz, numel)
    return flat.view(torch.uint8).reshape(nnz, numel * values.element_size())


def bytes_as(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret uint8 ``buf`` as a flat ``dtype`` tensor (copies only if misaligned)."""
    flat = buf.reshape(-1)  # a view when contiguous, else a fresh (aligned) copy
    if flat.storage_offset() % torch.empty(0, dtype=dtype).element_size():
        flat = flat.clone()
    return flat.view(dtype)


def values_from_bytes(
    buf: torch.Tensor, dtype: torch.dtype, row_shape: tuple[int, ...]
) -> torch.Tensor:
    """uint8 ``[nnz, row_bytes]`` -> ``[nnz, *row_shape]`` of ``dtype``."""
    return bytes_as(buf, dtype).reshape((buf.shape[0], *row_shape))


def pack_coo(indices: torch.Tensor, values: torch.Tensor, idx_dtype: torch.dtype) -> torch.Tensor:
    """COO -> uint8 rows ``[nnz, index_bytes + row_bytes]`` (index first)."""
    nnz = indices.numel()
    isz = torch.empty(0, dtype=idx_dtype).element_size()
    ib = indices.to(idx_dtype).contiguous().view(torch.uint8).reshape(nnz, isz)
    return torch.cat([ib, values_to_bytes(values)], dim=1)


def unpack_coo(
    buf: torch.Tensor, idx_dtype: torch.dtype, dtype: torch.dtype, row_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    isz = torch.empty(0, dtype=idx_dtype).element_size()
    idx = bytes_as(buf[:, :isz], idx_dtype).to(torch.int64)
    return idx, values_from_bytes(buf[:, isz:], dtype, row_shape)


# -- deterministic sums -----------------------------------------------------------------------
def sort_key(indices: torch.Tensor) -> torch.Tensor:
    """``indices`` as int32 when every value fits (the usual case): sorting 4-byte keys
    is ~1.7x faster on CPU than 8-byte ones, and gives the same order."""
    if indices.dtype == torch.int64 and indices.numel() and \
            -(2**31) <= int(indices.min()) and int(indices.max()) < 2**31:
        return indices.to(torch.int32)
    return indices


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are summed in fp32 and rounded once; others in their own type."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sum_rows_ordered(
    indices: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum rows with equal index, **in input order**; unique ascending indices out.

    The input is a concatenation of blocks (one per source rank, in rank order), each
    free of duplicates, so every index has at most one contribution per block and its
    sum is ``((c_0 + c_1) + c_2) + ...`` in block order, accumulated in
    ``accumulate_dtype``. Implemented as one ordered add per contribution depth (a loop
    over at most #blocks steps, never over elements); each step scatters to distinct rows,
    so it is deterministic on CUDA too, unlike ``index_add_``.
    """
    dev = values.device
    if indices.numel() == 0:
        return indices.to(torch.int64), values
    order = torch.argsort(sort_key(indices), stable=True)
    sidx = indices[order]
    svals = values[order]
    uniq, counts = torch.unique_consecutive(sidx, return_counts=True)
    if uniq.numel() == sidx.numel():
        return sidx.to(torch.int64), svals
    starts = torch.cumsum(counts, 0) - counts
    acc = accumulate_dtype(values.dtype)
    out = svals[starts].to(acc)
    # Groups sorted by count (descending, stable) so step j touches a prefix.
    by_count = torch.argsort(counts, descending=True, stable=True)
    sorted_counts = counts[by_count]
    max_count = int(sorted_counts[0])
    # live[j] = number of groups with more than j contributions.
    live = torch.searchsorted(-sorted_counts, -torch.arange(max_count, device=dev),
                              right=False).tolist()
    for j in range(1, max_count):
        grp = by_count[:live[j]]
        out[grp] += svals[starts[grp] + j].to(acc)
    return uniq.to(torch.int64), out.to(values.dtype)
