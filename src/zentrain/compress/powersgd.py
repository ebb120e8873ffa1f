"""PowerSGD: rank-r power iteration with error feedback and warm start (``zen.md`` §2.5).

A gradient is viewed as a matrix ``M`` (rows = first dimension). With ``Q`` identical on
every rank (seeded, then carried over from the previous step: warm start):

    P = M Q;  all-reduce P;  P <- orthonormal basis of P (QR);  Q_w = M^T P
    residual = M - P Q_w^T            (this rank's own approximation, Vogels et al. Alg. 2)
    all-reduce Q_w, divide by n;  result = P Q^T  == mean over ranks of P Q_w^T

Every rank orthogonalizes the same all-reduced ``P`` with the same float32 QR, and all
multiply the same ``P`` and ``Q``, so the results are bit-identical. The second all-reduce
runs asynchronously while the caller moves on. This is our own implementation because
PyTorch's ``batched_powerSGD_hook`` fails on gloo in torch 2.13 (``shared/notes/
torch-cpu.md``); QR (rather than Gram-Schmidt) also stays finite when ``P`` is rank
deficient, e.g. an all-zero gradient.

With ``wire_dtype="bfloat16"`` both factors travel in bfloat16 (half the bytes; gloo and
NCCL all-reduce bfloat16 in torch 2.13). ``P`` is only a basis, orthogonalized after the
sum, so its rounding needs no correction; the residual is taken against the *rounded*
``Q_w`` that is actually sent, so error feedback also absorbs ``Q``'s rounding.

A tensor is compressed only when it saves at least half the bytes,
``(rows + cols) * rank * 2 <= rows * cols`` (PyTorch's ``min_compression_rate=2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zentrain.compress.base import Compressor, Pending, derive_seed, generator
from zentrain.sync import comm


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    return rows, cols


@dataclass
class LowRankPayload:
    m: torch.Tensor
    """[rows, cols] float32 gradient plus residual (becomes the new residual)."""
    p: torch.Tensor
    """[rows, rank] = m @ q, this rank's share before the all-reduce."""
    shape: torch.Size
    dtype: torch.dtype


class PowerSGD(Compressor):
    """Rank-``cfg.rank`` PowerSGD with error feedback and warm-started ``Q``."""

    name = "powersgd"

    def __init__(self, cfg, warm_start: bool = True) -> None:
        super().__init__(cfg)
        self.warm_start = warm_start
        self.qs: dict[str, torch.Tensor] = {}
        self.wire = getattr(torch, cfg.wire_dtype)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        if len(shape) < 2:
            return False
        rows, cols = matrix_shape(shape)
        r = self.cfg.rank
        return r <= min(rows, cols) and (rows + cols) * r * 2 <= rows * cols

    def _q(self, name: str, cols: int, device: torch.device) -> torch.Tensor:
        q = self.qs.get(name) if self.warm_start else None
        if q is None:
            # Same seed on every rank: P = M Q only adds up across ranks for a shared Q.
            step = 0 if self.warm_start else self.step
            g = generator(device, derive_seed(self.cfg.seed, "powersgd", step, name))
            q = torch.randn(cols, self.cfg.rank, generator=g, device=device)
        return q.to(device)

    def compress(self, name: str, grad: torch.Tensor) -> LowRankPayload:
        rows, cols = matrix_shape(tuple(grad.shape))
        m = self.accumulate(name, grad).view(rows, cols)
        p = m @ self._q(name, cols, m.device)
        return LowRankPayload(m, p, grad.shape, grad.dtype)

    def communicate(self, name: str, payload: LowRankPayload) -> Pending:
        m, p = payload.m, payload.p.to(self.wire)
        comm.all_reduce(p, self.counter, self.group)
        p = torch.linalg.qr(p.to(torch.float32), mode="reduced").Q
        q = (m.t() @ p).to(self.wire)
        if self.keeps_residual(name):
            # m is the residual buffer: residual = M - P Q_w^T, Q_w as sent (rounded)
            m.sub_(p @ q.to(torch.float32).t())
        work = comm.all_reduce(q, self.counter, self.group, async_op=True)

        def finish() -> torch.Tensor:
            nonlocal q
            q = q.to(torch.float32).div_(self.world_size)
            if self.warm_start:
                self.qs[name] = q
            return (p @ q.t()).view(payload.shape)

        return Pending(work=work, then=finish)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "qs": {k: v.clone() for k, v in self.qs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.qs = {k: v.clone() for k, v in state.get("qs", {}).items()}
