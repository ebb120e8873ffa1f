"""Gradient synchronization schemes behind one interface (``GradSync``)."""

from __future__ import annotations

import torch.distributed as dist

from zentrain.sync.base import GradSync, SparseReducer, SyncStats
from zentrain.sync.comm import ByteCounter

SCHEMES = ("ddp", "dense", "agsparse", "sparcml", "omnireduce", "zen", "auto")


def build_grad_sync(scheme: str, group: dist.ProcessGroup | None = None,
                    bucket_mb: float = 25.0, dense_threshold: float = 0.5,
                    **reducer_opts) -> GradSync:
    """Make the ``GradSync`` for ``scheme`` (one of ``SCHEMES``).

    ``reducer_opts`` go to the sparse reducers, or to DDP's constructor for ``ddp``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown sync scheme {scheme!r} (allowed: {', '.join(SCHEMES)})")
    if scheme == "ddp":
        from zentrain.sync.ddp import DDPSync
        return DDPSync(group, bucket_mb, **reducer_opts)
    if scheme == "dense":
        from zentrain.sync.dense import DenseSync
        return DenseSync(group, bucket_mb)
    from zentrain.sync.sparse import SparseSync
    return SparseSync(scheme, group, bucket_mb, dense_threshold, reducer_opts)


__all__ = ["SCHEMES", "ByteCounter", "GradSync", "SparseReducer", "SyncStats",
           "build_grad_sync"]
