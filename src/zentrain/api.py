"""``zentrain.DataParallel``: a drop-in for ``DistributedDataParallel`` in users' own loops.

    model = zentrain.DataParallel(model, sync="zen")
    for batch in loader:
        loss = loss_fn(model(batch))
        loss.backward()          # gradients are synced (averaged) when backward returns
        optimizer.step(); optimizer.zero_grad()

Like DDP: construction checks that every rank built the same model (names, shapes and
dtypes of parameters and buffers; otherwise the same ``ValueError`` on every rank, see
``zentrain.sync.agree``), parameters and buffers are broadcast from rank 0, gradients are
averaged (mean over ranks), ``no_sync()`` skips communication for accumulation steps, and
with one process nothing is communicated. The sync is completed by a callback queued on
the autograd engine during backward (the mechanism DDP itself uses), so users need no
extra call; ``last_stats`` holds the bytes and time of the latest sync.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zentrain.sync import GradSync, SyncStats, build_grad_sync
from zentrain.sync.agree import check_same_model


class DataParallel(nn.Module):
    """Data parallelism with a pluggable gradient-sync scheme (see ``zentrain.sync``)."""

    def __init__(self, module: nn.Module, sync: str | GradSync = "dense",
                 group: dist.ProcessGroup | None = None, broadcast_from_rank0: bool = True,
                 compress: Any = None, **sync_opts: Any) -> None:
        """``sync``: a scheme name (``zentrain.sync.SCHEMES``) or a ``GradSync``;
        ``compress``: None, a method name (``"topk"``, ``"powersgd"``, ...), a dict of
        ``zentrain.compress.CompressConfig`` fields or a ``CompressConfig``; applied to the
        dense parameters the compression policy selects, the rest synced by ``sync``; e.g.
        ``{"method": "topk", "rank": 8, "method_for": "blocks.*=powersgd"}`` mixes methods,
        and ``{"method": "auto", "rank": 8}`` mixes them by shape (``zentrain.compress.auto``);
        ``sync_opts``: options of the scheme, e.g. ``dense_threshold`` or ``seed`` (ZEN's
        hash seeds, one per table, derive from it; default: drawn at random)."""
        from zentrain.compress import CompressConfig
        from zentrain.compress.auto import resolve_auto
        from zentrain.sync.compressed import maybe_compress

        super().__init__()
        self.module = module
        base = sync if isinstance(sync, GradSync) else build_grad_sync(sync, group, **sync_opts)
        compress = resolve_auto(CompressConfig.coerce(compress), module)  # "auto": per name
        self.grad_sync = maybe_compress(base, compress)
        if self.grad_sync.world_size > 1:
            # Before any payload collective (the broadcast below, the buckets, DDP's own
            # checks): a model that differs between ranks is one clear error everywhere.
            check_same_model(module, group)
        if broadcast_from_rank0 and self.grad_sync.world_size > 1 and self.grad_sync.name != "ddp":
            _broadcast_state(module, group)
        # DDP wraps the module; other schemes return it unchanged. Not registered as a
        # submodule, so state_dict() keys stay those of the user's model ("module." prefix
        # only, as with DDP).
        object.__setattr__(self, "_runner", self.grad_sync.prepare(module))
        self._queued = False
        self.last_stats = SyncStats()
        if self.grad_sync.world_size > 1:
            for p in module.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._on_grad)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._runner(*args, **kwargs)

    def _on_grad(self, _param: nn.Parameter) -> None:
        if not self._queued and self.grad_sync._sync_enabled:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)

    def _finalize(self) -> None:
        self._queued = False
        self.last_stats = self.grad_sync.finish()

    def finish_sync(self) -> SyncStats:
        """Complete the sync explicitly (only needed with one rank or custom autograd use)."""
        if self.grad_sync.world_size == 1:
            self.last_stats = self.grad_sync.finish()
        return self.last_stats

    @contextmanager
    def no_sync(self):
        """Accumulate gradients locally; the next backward outside syncs the sum."""
        with self.grad_sync.no_sync():
            yield


def _broadcast_state(module: nn.Module, group: dist.ProcessGroup | None) -> None:
    src = dist.get_global_rank(group, 0) if group is not None else 0
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src, group=group)
