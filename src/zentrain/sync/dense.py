"""``dense``: zentrain's bucketed all-reduce, launched from post-accumulate-grad hooks.

Parameters are packed into ~``bucket_mb`` buckets in reverse registration order, which is
roughly the order backward produces their gradients (the same heuristic DDP uses). When
every gradient of a bucket is ready, the bucket is flattened, pre-divided by the world size
and all-reduced asynchronously while backward continues (the overlap picotron's
``data_parallel/bucket.py`` illustrates). Buckets are launched strictly in index order —
a ready bucket waits for its predecessors — so every rank issues the same collectives in
the same order even when backward orders differ, and a parameter that got no gradient on
some rank (unused branch) is filled with zeros at ``finish`` instead of deadlocking.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zentrain.sync import comm
from zentrain.sync.base import GradSync


class _Bucket:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.numel = sum(p.numel() for p in params)
        self.ready: set[int] = set()
        self.work: Any = None
        self.flat: torch.Tensor | None = None
        self.buf: torch.Tensor | None = None
        """Kept across steps (like DDP's buckets): a fresh multi-MB tensor per step costs
        page faults and zero-fills on every step."""


class DenseSync(GradSync):
    """Bucketed, overlapped all-reduce of every (non-excluded) parameter's gradient."""

    name = "dense"

    def __init__(self, group: dist.ProcessGroup | None = None, bucket_mb: float = 25.0,
                 exclude: set[nn.Parameter] | None = None,
                 counter: comm.ByteCounter | None = None) -> None:
        super().__init__(group)
        if counter is not None:
            self.counter = counter
        self.bucket_bytes = int(bucket_mb * 2**20)
        self._exclude = {id(p) for p in (exclude or set())}
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[int, int] = {}
        self._next = 0

    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        params = [p for p in model.parameters()
                  if p.requires_grad and id(p) not in self._exclude]
        current: list[nn.Parameter] = []
        size = 0
        for p in reversed(params):
            nb = p.numel() * p.element_size()
            if current and (size + nb > self.bucket_bytes or p.dtype != current[0].dtype
                            or p.device != current[0].device):
                self.buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += nb
        if current:
            self.buckets.append(_Bucket(current))
        for i, b in enumerate(self.buckets):
            for p in b.params:
                self._bucket_of[id(p)] = i
                if self.world_size > 1:
                    p.register_post_accumulate_grad_hook(self.on_grad_ready)
        return model

    def on_grad_ready(self, param: nn.Parameter) -> None:
        if not self._sync_enabled:
            return
        b = self.buckets[self._bucket_of[id(param)]]
        b.ready.add(id(param))
        while self._next < len(self.buckets):
            nxt = self.buckets[self._next]
            if len(nxt.ready) < len(nxt.params):
                break
            self._launch(nxt)
            self._next += 1

    def _launch(self, b: _Bucket) -> None:
        grads = []
        for p in b.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p.grad.is_sparse:
                p.grad = p.grad.to_dense()
            grads.append(p.grad.reshape(-1))
        like = grads[0]
        if b.buf is None or b.buf.dtype != like.dtype or b.buf.device != like.device:
            b.buf = torch.empty(b.numel, dtype=like.dtype, device=like.device)
        b.flat = torch.cat(grads, out=b.buf).div_(self.world_size)
        b.work = comm.all_reduce(b.flat, self.counter, self.group, async_op=True)

    def launch_remaining(self) -> None:
        """Launch, in index order, the buckets backward did not complete (unused params).

        Callers that issue other collectives after backward (the sparse tables) must call
        this first, so every rank issues the same collective sequence.
        """
        while self._next < len(self.buckets):
            self._launch(self.buckets[self._next])
            self._next += 1

    def _finish(self) -> dict[str, Any]:
        if self.world_size == 1:
            return {}
        self.launch_remaining()
        for b in self.buckets:
            b.work.wait()
            offset = 0
            for p in b.params:
                n = p.numel()
                p.grad.copy_(b.flat[offset:offset + n].view_as(p.grad))
                offset += n
            b.ready.clear()
            b.work = b.flat = None
        self._next = 0
        return {}
