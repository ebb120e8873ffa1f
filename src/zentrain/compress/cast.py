"""fp16 / bf16 gradient all-reduce: half the bytes of float32, on gloo and NCCL.

The gradient is divided by the world size in its own precision first (as PyTorch's
``fp16_compress_hook`` does), so the sum of n halves cannot overflow where the mean fits,
then cast, all-reduced asynchronously in the half type and cast back. PyTorch's
``bf16_compress_hook`` requires NCCL, but a bf16 all-reduce itself works on gloo in torch
2.13 (``shared/notes/torch-cpu.md``, checked again when this was written), so the same code
serves both backends. Ring all-reduce hands every rank the same reduced chunks, so the
result is bit-identical across ranks. No error feedback: the rounding error is ~2^-11
(fp16) or ~2^-8 (bf16) of each entry, the regime where casts are used without it.
"""

from __future__ import annotations

import torch

from zentrain.compress.base import Compressor, Pending
from zentrain.sync import comm

CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Cast(Compressor):
    """All-reduce in float16 or bfloat16 (``cfg.method``)."""

    uses_error_feedback = False

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.name = cfg.method  # type: ignore[misc]
        self.dtype = CAST_DTYPES[cfg.method]

    def compress(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return (grad.detach() / self.world_size).to(self.dtype)

    def communicate(self, name: str, payload: torch.Tensor) -> Pending:
        work = comm.all_reduce(payload, self.counter, self.group, async_op=True)
        return Pending(work=work, then=lambda: payload.to(torch.float32))
