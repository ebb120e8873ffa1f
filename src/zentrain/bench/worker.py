"""One benchmark rank: ``python -m zentrain.bench.worker TRAIN_ARGS...`` = ``zentrain.train``.

The benchmark runs every system through the real trainer. The one difference: after
gradient sync, any torch sparse (COO) gradient left on a parameter is made dense before
the optimizer runs. ``ddp-sparse`` (plain DDP with ``nn.Embedding(sparse=True)``) needs
this because DDP hands the optimizer the COO gradient gloo's sparse all-reduce produced,
and ``torch.optim.AdamW`` refuses sparse gradients; densifying is what the sparse schemes
already do (``SparseSync``), so every system runs the same optimizer on the same values.
Where the trainer already leaves dense gradients this does nothing.
"""

from __future__ import annotations

import sys
from typing import Any

from zentrain.sync.base import GradSync


def _densify_after_sync() -> None:
    original = GradSync.finish

    def finish(self: GradSync) -> Any:
        stats = original(self)
        model = getattr(self, "model", None)
        if model is not None:
            for p in model.parameters():
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.to_dense()
        return stats

    GradSync.finish = finish  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    from zentrain import train

    _densify_after_sync()
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
