"""One benchmark rank: ``python -m zentrain.bench.worker TRAIN_ARGS...`` = ``zentrain.train``.

The benchmark runs every system through the real trainer. The one difference: right before
gradient clipping and the optimizer step, any torch sparse (COO) gradient is made dense.
``ddp-sparse`` (plain DDP with ``nn.Embedding(sparse=True)``) needs this because DDP leaves
the COO gradient gloo's sparse all-reduce produced, and both ``clip_grad_norm_``
(no ``linalg_vector_norm`` for sparse tensors) and ``torch.optim.AdamW`` refuse it;
densifying is what the sparse schemes already do (``SparseSync``), so every system runs
the same optimizer on the same values. Where gradients are dense this does nothing.

It must happen at the optimizer, not in a sync callback: DDP replaces the averaged COO
gradient in its own ``finalize_backward`` callback, which autograd runs *after* the one
``zentrain.DataParallel`` queues at the first gradient hook, so a gradient densified there
would be this rank's un-averaged one.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn


def _densify_sparse_grads(params: list[nn.Parameter]) -> None:
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()


def _patch(train: Any) -> None:
    clip = nn.utils.clip_grad_norm_

    def clip_grad_norm_(parameters: Any, *args: Any, **kwargs: Any) -> Any:
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        _densify_sparse_grads(params)
        return clip(params, *args, **kwargs)

    nn.utils.clip_grad_norm_ = clip_grad_norm_
    build = train.build_optimizer

    def build_optimizer(cfg: Any, model: nn.Module) -> Any:
        opt = build(cfg, model)
        params = [p for g in opt.param_groups for p in g["params"]]
        step = opt.step

        def step_dense(*args: Any, **kwargs: Any) -> Any:
            _densify_sparse_grads(params)
            return step(*args, **kwargs)

        opt.step = step_dense
        return opt

    train.build_optimizer = build_optimizer


def main(argv: list[str] | None = None) -> int:
    from zentrain import train

    _patch(train)
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
