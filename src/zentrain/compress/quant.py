"""QSGD (k-bit stochastic quantization) and scaled sign (1 bit), as real bit-packed bytes.

Both cut the flat gradient into buckets of ``bucket_size`` entries that share one float32
scale (SparCML and QSGD use buckets for the same reason: one outlier only coarsens its own
bucket).

- ``qsgd`` (``zen.md`` §2.6): scale = max |x| in the bucket, ``s = 2**(bits-1) - 1``
  levels per sign; ``|x| / scale * s`` is rounded down or up at random with the
  probability that makes the result unbiased, E[decode(encode(x))] = x. The max norm
  (rather than QSGD's L2 norm) gives a lower variance for the same bits. The signed level
  is stored as ``level + s`` in ``bits`` bits.
- ``sign`` (EF-signSGD, the compressor inside 1-bit Adam, §2.7): one bit per entry and
  scale = mean |x| of the bucket; biased, so it needs the error feedback it always uses
  unless disabled.

Payloads are exchanged with one all-gather of ``[scales as bytes | packed codes]`` and every
rank decodes all ranks' payloads and sums them in rank order: the same bytes, the same
operations, bit-identical results, and the byte counter sees the packed size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from zentrain.compress.base import Compressor, Pending, derive_seed, generator
from zentrain.sync import comm

# -- bit packing -------------------------------------------------------------------


def packed_size(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits) into bytes, little-endian: code i occupies stream
    bits [i*bits, (i+1)*bits), and stream bit j is bit j % 8 of byte j // 8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    codes = codes.reshape(-1).to(torch.uint8)
    dev = codes.device
    if 8 % bits == 0:  # whole codes per byte: OR each slot's codes into place
        return _or_slots(codes, bits)
    # Codes straddle bytes: expand to a bit stream, then pack 8 stream bits per byte.
    planes = (codes.unsqueeze(1) >> torch.arange(bits, dtype=torch.uint8, device=dev)) & 1
    return _or_slots(planes.reshape(-1), 1)


def _or_slots(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Byte i = OR over slots j of codes[i * per + j] << (j * bits); a loop over the <= 8
    slots of a byte, each step one strided tensor op (several times faster on CPU than a
    shift-and-sum over a [-1, per] view)."""
    per = 8 // bits
    pad = (-codes.numel()) % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    slots = codes.view(-1, per)
    out = slots[:, 0].clone()
    for j in range(1, per):
        out |= slots[:, j] << (j * bits)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: ``numel`` uint8 codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.numel() != packed_size(numel, bits):
        raise ValueError(f"{packed.numel()} bytes cannot hold {numel} codes of {bits} bits")
    dev = packed.device
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=dev)
        return ((packed.unsqueeze(1) >> shifts) & mask).reshape(-1)[:numel]
    stream = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=dev)) & 1
    planes = stream.reshape(-1)[:numel * bits].view(numel, bits)
    shifts = torch.arange(bits, dtype=torch.uint8, device=dev)
    return (planes << shifts).sum(dim=1, dtype=torch.uint8)


# -- codecs ------------------------------------------------------------------------


@dataclass
class QuantPayload:
    packed: torch.Tensor
    """uint8, ``packed_size(numel, bits)`` bytes."""
    scales: torch.Tensor
    """float32, one per bucket."""
    shape: torch.Size
    dtype: torch.dtype


def _buckets(x: torch.Tensor, size: int) -> torch.Tensor:
    pad = (-x.numel()) % size
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, size)


class _Quantizer(Compressor):
    bits: ClassVar[int]

    def encode(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat float32 ``x`` -> (uint8 codes, one per entry; float32 scales, per bucket)."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
        """Flat float32 values from codes and scales (the same function on every rank)."""
        raise NotImplementedError

    def compress(self, name: str, grad: torch.Tensor) -> QuantPayload:
        acc = self.accumulate(name, grad)
        codes, scales = self.encode(name, acc)
        payload = QuantPayload(pack_bits(codes, self.bits), scales, grad.shape, grad.dtype)
        if self.keeps_residual(name):
            acc.sub_(self.decode(codes, scales, acc.numel()))  # residual = acc - sent
        return payload

    def decompress(self, payload: QuantPayload) -> torch.Tensor:
        """What this rank contributed, as a float32 tensor of the gradient's shape."""
        numel = payload.shape.numel()
        codes = unpack_bits(payload.packed, self.bits, numel)
        return self.decode(codes, payload.scales, numel).view(payload.shape)

    def communicate(self, name: str, payload: QuantPayload) -> Pending:
        nscale = payload.scales.numel() * 4
        mine = torch.cat([payload.scales.view(torch.uint8), payload.packed])
        flat = torch.empty(self.world_size * mine.numel(), dtype=torch.uint8, device=mine.device)
        comm.all_gather(flat, mine, self.counter, self.group)
        rows = flat.view(self.world_size, mine.numel())
        numel = payload.shape.numel()
        total: torch.Tensor | None = None
        for r in range(self.world_size):  # rank order: identical sums on every rank
            scales = rows[r, :nscale].clone().view(torch.float32)
            codes = unpack_bits(rows[r, nscale:], self.bits, numel)
            part = self.decode(codes, scales, numel)
            total = part if total is None else total.add_(part)
        assert total is not None
        return Pending(total.div_(self.world_size).view(payload.shape))


class QSGD(_Quantizer):
    """Unbiased ``bits``-bit stochastic quantization with a max-norm scale per bucket."""

    name = "qsgd"

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.bits = cfg.bits
        self.levels = 2 ** (cfg.bits - 1) - 1

    def encode(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = _buckets(x, self.cfg.bucket_size)
        y = b.abs()
        scales = y.amax(dim=1)
        inv = torch.where(scales > 0, self.levels / scales, torch.zeros_like(scales))
        y.mul_(inv.unsqueeze(1))  # |x| / scale * s, in [0, s]
        # Each rank rounds with its own noise (seeded by rank, step and name, so a resumed
        # run repeats it); shared noise would correlate the ranks' errors.
        g = generator(x.device, derive_seed(self.cfg.seed, "qsgd", self.rank, self.step, name))
        y.add_(torch.rand(y.shape, generator=g, device=x.device)).floor_()
        # y + u < s + 1 in exact arithmetic; float rounding can reach s + 1, hence the clamp.
        y.clamp_(max=self.levels).copysign_(b).add_(self.levels)  # signed level + s
        return y.to(torch.uint8).reshape(-1)[:x.numel()], scales

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
        step = (scales / self.levels).repeat_interleave(self.cfg.bucket_size)[:numel]
        return codes.to(torch.float32).sub_(self.levels).mul_(step)


class Sign(_Quantizer):
    """One bit per entry (>= 0 -> +scale, < 0 -> -scale), scale = mean |x| per bucket."""

    name = "sign"
    bits = 1

    def encode(self, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.cfg.bucket_size
        b = _buckets(x, size)
        counts = torch.full((b.shape[0],), float(size), device=x.device)
        counts[-1] = x.numel() - size * (b.shape[0] - 1)  # the last bucket may be short
        scales = b.abs().sum(dim=1) / counts
        return (x >= 0).to(torch.uint8), scales

    def decode(self, codes: torch.Tensor, scales: torch.Tensor, numel: int) -> torch.Tensor:
        mag = scales.repeat_interleave(self.cfg.bucket_size)[:numel]
        return codes.to(torch.float32).mul_(2).sub_(1).mul_(mag)  # code 1 -> +, 0 -> -
