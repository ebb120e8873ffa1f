"""``ddp``: plain ``torch.nn.parallel.DistributedDataParallel`` — the peer baseline, kept as is.

DDP reduces inside backward on its own, so ``finish`` only does the accounting. Its sync
time is therefore **in backward**: DDP waits for its last all-reduce in its own autograd
callback, so the trainer's ``backward_s`` includes it and ``sync_s`` (``exposed_s``) is
~0 on CPU (measured 1.7e-5 s). Compare DDP with the other schemes by step time, or by
``backward_s + sync_s``. (On CUDA, ``finish`` synchronizes the device, so whatever of
DDP's all-reduce is still in flight when backward returns shows up in ``sync_s``.) Bytes are
counted from the same cost model as our schemes (comm.py): dense gradients as a ring
all-reduce of every parameter; sparse (COO) gradients as gloo's sparse all-reduce, which
all-gathers every rank's indices and values (PyTorch issue tracker: gloo-only, grows with
n). The local COO size is read by a tensor hook before DDP sees the gradient; the other
ranks' sizes are not known without extra traffic, so sparse bytes are an (n-1) x local
estimate, flagged in the stats.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from zentrain.sync.base import GradSync


class DDPSync(GradSync):
    name = "ddp"

    def __init__(self, group: dist.ProcessGroup | None = None, bucket_mb: float = 25.0,
                 **ddp_kwargs: Any) -> None:
        super().__init__(group)
        self.bucket_mb = bucket_mb
        self.ddp_kwargs = ddp_kwargs  # e.g. find_unused_parameters, passed to DDP as is
        self._sparse_bytes = 0
        self._dense_bytes = 0

    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        if self.world_size == 1:
            return model
        sparse = {id(m.weight) for m in model.modules()
                  if isinstance(m, nn.Embedding | nn.EmbeddingBag) and m.sparse}
        for p in model.parameters():
            if not p.requires_grad:
                continue
            if id(p) in sparse:
                p.register_hook(self._count_sparse)
            else:
                self._dense_bytes += p.numel() * p.element_size()
        device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
        self.ddp = DDP(model, process_group=self.group, bucket_cap_mb=self.bucket_mb,
                       device_ids=device_ids, **self.ddp_kwargs)
        return self.ddp

    def _count_sparse(self, grad: torch.Tensor) -> torch.Tensor:
        if self._sync_enabled and grad.is_sparse:
            g = grad.coalesce()
            self._sparse_bytes += (g.indices().numel() * g.indices().element_size()
                                   + g.values().numel() * g.values().element_size())
        return grad

    @contextmanager
    def no_sync(self):
        if self.world_size == 1:
            with super().no_sync():
                yield
            return
        with super().no_sync(), self.ddp.no_sync():
            yield

    def _finish(self) -> dict[str, Any]:
        n = self.world_size
        if n == 1:
            return {}
        dense = 2 * (n - 1) * self._dense_bytes / n
        sparse = (n - 1) * self._sparse_bytes
        self.counter.add(dense + sparse, dense + sparse)
        extra = {"sparse_bytes_estimated": sparse} if sparse else {}
        self._sparse_bytes = 0
        return extra


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
