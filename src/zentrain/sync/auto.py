"""ZEN's scheme selector (§3.1): profile sparsity, then pick the cheapest scheme.

One ``AutoReducer`` per sparse tensor. For the first ``profile_steps`` calls (and again
for ``profile_steps`` calls every ``recheck_every``) it synchronizes with ZEN, whose
metadata and Pull already tell every rank, exactly and identically, the non-zero rows of
each rank and of the sum. From those counts it takes the density ``d`` and the
densification ``γ_n`` (ratio of sums over the profiled calls), feeds them to the cost
model (``cost.py``: Eq. 1 for ZEN, Eq. 2 for SparCML, AGsparse, dense ring all-reduce)
and uses the cheapest scheme until the next re-check. Each pick, and each change at a
re-check, is logged once (rank 0, logger ``zentrain.sync.auto``, INFO) with the tensor,
``d``, ``γ`` and every candidate's predicted bytes.

All ranks make the same choice: the inputs are integers that every rank received in the
same collectives (no rank-local measurement such as timing enters), and the arithmetic
on them is the same everywhere. ``last_stats`` is the inner scheme's plus ``scheme``
(used this call), ``profiling``, ``choice`` (None until the first decision),
``predicted`` (seconds per candidate at ``bandwidth``) and ``predicted_bytes``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.distributed as dist

from zentrain.sync.agsparse import AGSparseReducer
from zentrain.sync.base import SparseReducer
from zentrain.sync.comm import ByteCounter
from zentrain.sync.cost import Workload, best, predict
from zentrain.sync.reducers import AllReduceReducer
from zentrain.sync.sparcml import SparCMLReducer
from zentrain.sync.zen import ZenReducer

CANDIDATES = ("zen", "sparcml", "agsparse", "allreduce")

log = logging.getLogger(__name__)


class AutoReducer(SparseReducer):
    """Picks a scheme per tensor by the cost model.

    Args:
        profile_steps: calls profiled (with ZEN) before choosing (and at each re-check).
        recheck_every: start a new profile every this many calls (0: never).
        candidates: schemes to choose from (subset of ``CANDIDATES``; ties go to the
            earliest).
        bandwidth: bytes/s used to turn predicted bytes into seconds.
        latency: seconds charged per message round (0: pure volume, as in the paper).
        zen_opts / sparcml_opts: constructor options of the inner reducers.
        tensor: the tensor's name in the log line of each choice (``SparseSync`` passes
            the parameter name); None: described by its shape.
    """

    name = "auto"

    def __init__(
        self, group: dist.ProcessGroup | None, counter: ByteCounter, *,
        profile_steps: int = 5, recheck_every: int = 200,
        candidates: tuple[str, ...] = CANDIDATES, bandwidth: float = 1.25e9,
        latency: float = 0.0, zen_opts: dict[str, Any] | None = None,
        sparcml_opts: dict[str, Any] | None = None, tensor: str | None = None,
    ) -> None:
        super().__init__(group, counter)
        bad = [c for c in candidates if c not in CANDIDATES]
        if bad or not candidates:
            raise ValueError(f"auto: candidates must be a non-empty subset of {CANDIDATES}, "
                             f"got {candidates}")
        if profile_steps < 1 or (recheck_every and recheck_every <= profile_steps):
            raise ValueError(f"auto: need profile_steps >= 1 and recheck_every = 0 or > "
                             f"profile_steps (got {profile_steps}, {recheck_every})")
        self.profile_steps, self.recheck_every = profile_steps, recheck_every
        self.candidates = tuple(candidates)
        self.bandwidth, self.latency = bandwidth, latency
        self.tensor = tensor
        self.reducers: dict[str, SparseReducer] = {
            "zen": ZenReducer(group, counter, **(zen_opts or {})),
            "sparcml": SparCMLReducer(group, counter, **(sparcml_opts or {})),
            "agsparse": AGSparseReducer(group, counter),
            "allreduce": AllReduceReducer(group, counter),
        }
        self.calls = 0
        self.choice: str | None = None
        self.predicted: dict[str, float] = {}
        self.predicted_bytes: dict[str, float] = {}
        self.profile = self._empty_profile()

    @staticmethod
    def _empty_profile() -> dict[str, int]:
        return {"calls": 0, "nnz_sum": 0, "out_nnz": 0, "num_rows": 0, "row_numel": 1,
                "elem_bytes": 4, "index_bytes": 4}

    def _profiling(self) -> bool:
        if self.choice is None:
            return True
        return bool(self.recheck_every) and self.calls % self.recheck_every < self.profile_steps

    def reduce(self, indices: torch.Tensor, values: torch.Tensor,
               num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        profiling = self._profiling()
        if profiling and self.recheck_every and self.calls % self.recheck_every == 0:
            self.profile = self._empty_profile()  # a re-check starts a fresh profile
        scheme = "zen" if profiling else self.choice
        red = self.reducers[scheme]
        try:
            out = red.reduce(indices, values, num_rows)
        except ValueError as e:
            raise ValueError(f"auto reducer (using {scheme}): {e}") from e
        st = red.last_stats
        if profiling:
            p = self.profile
            p["calls"] += 1
            p["nnz_sum"] += int(st.get("nnz_sum", 0))
            p["out_nnz"] += int(st.get("out_nnz", 0))
            p["num_rows"] = int(num_rows)
            p["row_numel"] = math.prod(values.shape[1:])
            p["elem_bytes"] = values.element_size()
            p["index_bytes"] = 4 if num_rows <= 2**31 - 1 else 8
            if p["calls"] >= self.profile_steps:
                self._decide()
        self.calls += 1
        self.last_stats = dict(st, scheme=scheme, profiling=profiling, choice=self.choice,
                               predicted=dict(self.predicted),
                               predicted_bytes=dict(self.predicted_bytes))
        return out

    def workload(self) -> Workload | None:
        """The profiled workload (None before any profiled call)."""
        p = self.profile
        if not p["calls"] or not p["num_rows"]:
            return None
        n = self.world_size
        mean_nnz = p["nnz_sum"] / (n * p["calls"])
        gamma = p["out_nnz"] / p["calls"] / mean_nnz if mean_nnz else 1.0
        return Workload(num_rows=p["num_rows"], density=mean_nnz / p["num_rows"],
                        gamma=gamma, n=n, row_numel=p["row_numel"],
                        elem_bytes=p["elem_bytes"], index_bytes=p["index_bytes"])

    def _decide(self) -> None:
        w = self.workload()
        if w is None:
            return
        before = self.choice
        self.choice, self.predicted = best(w, self.candidates, self.bandwidth, self.latency)
        self.predicted_bytes = {s: c.recv_bytes for s, c in predict(w, self.candidates).items()}
        # One line per pick or change, on rank 0 only (every rank decides the same); a
        # re-check that keeps the scheme stays quiet. With one rank nothing is sent, so
        # there is no choice worth reporting.
        if self.choice != before and self.rank == 0 and self.world_size > 1:
            name = self.tensor or f"tensor of {w.num_rows}x{w.row_numel}"
            how = "chose" if before is None else f"switched from {before} to"
            alts = ", ".join(f"{s}={b:.4g}" for s, b in self.predicted_bytes.items())
            log.info("auto: %s %s %s after %d calls (d=%.4g, gamma=%.4g, n=%d; predicted "
                     "bytes received per rank: %s)", name, how, self.choice, self.calls + 1,
                     w.density, w.gamma, w.n, alts)

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "choice": self.choice, "predicted": dict(self.predicted),
                "predicted_bytes": dict(self.predicted_bytes), "profile": dict(self.profile),
                "zen": self.reducers["zen"].state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))
        self.choice = state.get("choice")
        self.predicted = dict(state.get("predicted", {}))
        self.predicted_bytes = dict(state.get("predicted_bytes", {}))
        self.profile = dict(self._empty_profile(), **state.get("profile", {}))
        if "zen" in state:
            self.reducers["zen"].load_state_dict(state["zen"])
