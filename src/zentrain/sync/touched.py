"""Which rows of an embedding table a step touched, without scanning its gradient.

An ``nn.Embedding``'s gradient is non-zero only in the rows its inputs looked up (ZEN §2.1:
that is where the sparsity comes from). Finding those rows in a *dense* gradient means
reading the whole table every step: on DeepFM's 1M x 8 table that scan (``ne``, ``any``,
``nonzero``) cost ~25 ms of a ~75 ms CPU step, more than the sparse sync itself. A forward
pre-hook that records the looked-up ids costs a ``unique`` over the batch's ids instead.

The shortcut holds only if the table is used by nothing but embedding lookups. A weight
registered in another module too (tied input/output embeddings) is never tracked; one used
functionally (``x @ emb.weight.T``, ``F.embedding(i, emb.weight)``) cannot be seen from the
module tree, so the first ``verify_steps`` syncs also scan the gradient and check that its
non-zero rows are a subset of the recorded ones. On a mismatch the table falls back to
scanning for good, with a warning. Rows recorded but with a zero gradient (``padding_idx``,
a masked loss) are sent as zero rows: adding 0.0 changes no sum, so the sync stays exact.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

_LOOKUPS = (nn.Embedding, nn.EmbeddingBag)


def _lookup_modules(model: nn.Module, p: nn.Parameter) -> list[nn.Module] | None:
    """The embedding modules that own ``p``; None if another kind of module holds it too."""
    owners = [m for m in model.modules()
              if any(q is p for q in m.parameters(recurse=False))]
    if not owners or not all(isinstance(m, _LOOKUPS) for m in owners):
        return None
    return owners


class TouchedRows:
    """Records the ids each tracked table is looked up with, between two syncs."""

    def __init__(self, model: nn.Module, tables: list[nn.Parameter],
                 verify_steps: int = 2) -> None:
        self.verify_steps = verify_steps
        self.ids: dict[int, list[torch.Tensor]] = {}
        self.tracked: dict[int, bool] = {}
        self.checked: dict[int, int] = {}
        self._handles = []
        for p in tables:
            mods = _lookup_modules(model, p)
            self.tracked[id(p)] = mods is not None
            self.ids[id(p)] = []
            self.checked[id(p)] = 0
            for m in mods or []:
                self._handles.append(m.register_forward_pre_hook(self._hook(id(p))))

    def _hook(self, key: int):
        def record(module: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled() and module.weight.requires_grad and args:
                self.ids[key].append(args[0].detach().reshape(-1))
        return record

    def rows(self, p: nn.Parameter, grad: torch.Tensor, num_rows: int) -> torch.Tensor | None:
        """Sorted unique candidate rows of dense ``grad``; None: scan it instead."""
        key = id(p)
        if not self.tracked.get(key) or not self.ids[key]:
            return None
        ids = self.ids[key]
        rows = torch.unique(torch.cat(ids) if len(ids) > 1 else ids[0]).to(torch.int64)
        if self.checked[key] < self.verify_steps:
            self.checked[key] += 1
            nz = grad.reshape(num_rows, -1).ne(0).any(dim=1).nonzero().squeeze(1)
            if not bool(torch.isin(nz, rows).all()):
                self.tracked[key] = False
                log.warning("embedding table %s gets gradient outside the rows its lookups "
                            "touched (used outside nn.Embedding?); scanning its gradient from "
                            "now on", tuple(p.shape))
                return None
        return rows

    def clear(self) -> None:
        for v in self.ids.values():
            v.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
