"""``CompressedSync``: lossy compression for the big dense parameters, any scheme for the rest.

    sync = CompressedSync(build_grad_sync("zen"), CompressConfig(method="topk", ratio=0.01))
    model = zentrain.DataParallel(model, sync=sync)

The policy (``zentrain.compress.select_params``) picks the weight matrices worth
compressing; the wrapped ``GradSync`` never sees them (they are hidden from its
``prepare``) and keeps syncing everything else — small tensors, biases, norms and embedding
tables — on its normal path, e.g. ZEN for the tables. A table named in
``compress.method_for`` is compressed instead (a sparse gradient is made dense first; the
result is written back dense). With ``compress.method_for`` the
compressor is a ``Mixed`` one: each parameter goes to the compressor of its own method.

Compressed parameters are launched from post-accumulate-grad hooks strictly in a fixed
order (reverse registration order, roughly backward's), a ready parameter waiting for its
predecessors, so every rank issues the same collectives in the same order; a parameter
that got no gradient on some rank is sent as zeros at ``finish``. They travel on a process
group of their own: the wrapped scheme launches its buckets from hooks too, and if backward
orders differed between ranks (an unused branch on one rank) the two launch sequences
could interleave differently and mismatch on a shared group. Compressors average and keep
results bit-identical on all ranks, so after ``finish`` every gradient is the rank mean
(up to compression) and the same everywhere.

The first ``warmup_steps`` synced steps send the chosen parameters uncompressed (float32
all-reduce). With one rank nothing is sent, so nothing is compressed either: gradients
stay exact, as with every scheme's one-rank path. ``state_dict`` carries the compressor's residuals, momenta, PowerSGD ``Q``
matrices and step: per-rank state, so a checkpoint must keep one copy per rank.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from zentrain.compress import CompressConfig, Compressor, Pending, build_compressor, select_params
from zentrain.sync import comm
from zentrain.sync.base import GradSync


class _Unit:
    def __init__(self, name: str, param: nn.Parameter) -> None:
        self.name = name
        self.param = param
        self.ready = False
        self.pending: Pending | None = None


@contextmanager
def _hidden(params: list[nn.Parameter]):
    """Make ``params`` look frozen while another scheme's ``prepare`` picks its parameters."""
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, s in zip(params, saved):
            p.requires_grad_(s)


class CompressedSync(GradSync):
    """Compress the policy's parameters; delegate the others to ``inner``."""

    def __init__(self, inner: GradSync, compress: CompressConfig | str | dict[str, Any],
                 compressor: Compressor | None = None) -> None:
        super().__init__(inner.group)
        if inner.name == "ddp":
            raise ValueError("compression wraps zentrain's own schemes (dense, zen, ...), not "
                             "ddp: DDP syncs every parameter itself (use its comm hooks)")
        self.cfg = CompressConfig.coerce(compress)
        if self.cfg.method == "none":
            raise ValueError("CompressedSync needs a compression method; use the inner scheme")
        self.inner = inner
        self.inner.counter = self.counter  # one byte count for the whole step
        self.compressor = compressor or build_compressor(self.cfg)
        self.name = f"{inner.name}+{self.compressor.name}"  # type: ignore[misc]
        self.compress_counter = comm.ByteCounter()
        self.units: list[_Unit] = []
        self._unit_of: dict[int, int] = {}
        self._next = 0
        self._compress_start = (0, 0)

    def prepare(self, model: nn.Module) -> nn.Module:
        super().prepare(model)
        chosen = select_params(model, self.cfg, self.compressor.accepts_param)
        with _hidden([p for _, p in chosen]):
            runner = self.inner.prepare(model)
        self.units = [_Unit(n, p) for n, p in chosen]
        self._unit_of = {id(u.param): i for i, u in enumerate(self.units)}
        if self.world_size == 1:
            return runner
        ranks = dist.get_process_group_ranks(self.group or dist.group.WORLD)
        cgroup = dist.new_group(ranks, backend=dist.get_backend(self.group),
                                use_local_synchronization=True)
        self.compressor.bind(cgroup, self.compress_counter)
        for u in self.units:
            u.param.register_post_accumulate_grad_hook(self.on_grad_ready)
        return runner

    @property
    def compressed_names(self) -> list[str]:
        """Names of the parameters this sync compresses, in launch order."""
        return [u.name for u in self.units]

    # -- per step ----------------------------------------------------------------
    def on_grad_ready(self, param: nn.Parameter) -> None:
        if not self._sync_enabled:
            return
        self.units[self._unit_of[id(param)]].ready = True
        while self._next < len(self.units) and self.units[self._next].ready:
            self._launch(self.units[self._next])
            self._next += 1

    def _launch(self, u: _Unit) -> None:
        p = u.param
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if grad.is_sparse:  # an embedding table named in compress.method_for
            grad = grad.coalesce().to_dense()
        if self.compressor.step < self.cfg.warmup_steps:
            flat = grad.detach().to(torch.float32, copy=True).div_(self.world_size)
            work = comm.all_reduce(flat, self.compress_counter, self.compressor.group,
                                   async_op=True)
            pending = Pending(flat, work=work, then=lambda: flat)
        else:
            c = self.compressor
            pending = c.communicate(u.name, c.compress(u.name, grad))
        if pending.done:  # write now: holding every result until finish costs memory
            self._write(p, pending.wait())
        else:
            u.pending = pending

    @staticmethod
    def _write(p: nn.Parameter, value: torch.Tensor) -> None:
        if p.grad is None or p.grad.is_sparse:
            p.grad = value.to(p.dtype).view_as(p)
        else:
            p.grad.copy_(value.view_as(p.grad))

    def _finish(self) -> dict[str, Any]:
        if self.world_size == 1:
            return self.inner._finish() or {}
        while self._next < len(self.units):
            self._launch(self.units[self._next])
            self._next += 1
        for u in self.units:
            if u.pending is not None:
                self._write(u.param, u.pending.wait())
            u.pending = None
            u.ready = False
        self._next = 0
        warm = self.compressor.step < self.cfg.warmup_steps
        self.compressor.step += 1
        extra = dict(self.inner._finish() or {})
        sent0, recv0 = self._compress_start
        c = self.compress_counter
        self.counter.add(c.sent - sent0, c.recv - recv0)
        self._compress_start = c.snapshot()
        extra.update({"compress.bytes_sent": c.sent - sent0, "compress.bytes_recv": c.recv - recv0,
                      "compress.params": len(self.units), "compress.warmup": warm})
        return extra

    @contextmanager
    def no_sync(self):
        with ExitStack() as stack:
            stack.enter_context(super().no_sync())
            stack.enter_context(self.inner.no_sync())
            yield

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "world_size": self.world_size, "rank": self.rank,
                "inner": self.inner.state_dict(), "compressor": self.compressor.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("world_size", self.world_size) != self.world_size:
            raise ValueError(
                f"compression state was saved with {state['world_size']} ranks, this run has "
                f"{self.world_size}: residuals are per rank and cannot be redistributed")
        super().load_state_dict(state)
        self.inner.load_state_dict(state.get("inner", {}))
        self.compressor.load_state_dict(state.get("compressor", {}))


def maybe_compress(sync: GradSync,
                   compress: CompressConfig | str | dict[str, Any] | None) -> GradSync:
    """``sync`` wrapped in a ``CompressedSync`` unless ``compress`` is None or method none."""
    cfg = CompressConfig.coerce(compress)
    return sync if cfg.method == "none" else CompressedSync(sync, cfg)
