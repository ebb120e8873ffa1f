"""``Mixed``: one compressor per parameter, chosen by name (``compress.method_for``).

Different matrices want different compressors. Under AdamW the output layer of the GPT
debug model trains well with top-k 1% and error feedback, while the transformer blocks do
not (EF delivers their entries late, as spikes AdamW damps) but keep most of their
gradient's energy in a rank-8 PowerSGD approximation; the mix came within 0.1% of the
uncompressed loss at 500 steps in simulation, where either method alone stayed 4-6% above
(docs/compression.md, "Error feedback per matrix").

``Mixed`` routes every call to the part that owns the parameter's method. The parts share
one process group and byte counter; ``CompressedSync`` launches parameters in one fixed
order, so every rank still issues the same collectives in the same order even though the
parts' payloads travel differently (top-k queues its matrices for one fused sparse reduce,
PowerSGD all-reduces its factors as they come).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from zentrain.compress.base import Compressor, Pending
from zentrain.sync.comm import ByteCounter

if TYPE_CHECKING:
    from zentrain.compress import CompressConfig


class Mixed(Compressor):
    """Routes each parameter to ``parts[cfg.method_of(name)]``."""

    def __init__(self, cfg: CompressConfig, parts: dict[str, Compressor]) -> None:
        self.parts = parts
        self.name = cfg.label  # type: ignore[misc]  # e.g. "topk+powersgd"
        self._route: dict[str, Compressor] = {}  # name -> part: patterns matched once
        super().__init__(cfg)

    def part(self, name: str) -> Compressor:
        part = self._route.get(name)
        if part is None:
            method = self.cfg.method_of(name)
            if method not in self.parts:
                raise KeyError(f"parameter {name!r} has method {method!r}, which this "
                               f"compressor ({self.name}) does not hold")
            part = self._route[name] = self.parts[method]
        return part

    # The step and residuals live in the parts; these views keep ``Compressor``'s interface.
    @property  # type: ignore[override]
    def step(self) -> int:
        return next(iter(self.parts.values())).step

    @step.setter
    def step(self, value: int) -> None:
        for p in self.parts.values():
            p.step = value

    @property  # type: ignore[override]
    def residuals(self) -> dict[str, torch.Tensor]:
        return {k: v for p in self.parts.values() for k, v in p.residuals.items()}

    @residuals.setter
    def residuals(self, value: dict[str, torch.Tensor]) -> None:
        if value:
            raise ValueError("Mixed keeps residuals in its parts; load them with load_state_dict")

    def bind(self, group: dist.ProcessGroup | None, counter: ByteCounter) -> None:
        super().bind(group, counter)
        for p in self.parts.values():
            p.bind(group, counter)

    def accepts_param(self, name: str, shape: tuple[int, ...]) -> bool:
        return self.part(name).accepts(shape)

    def keeps_residual(self, name: str) -> bool:
        return self.part(name).keeps_residual(name)

    def compress(self, name: str, grad: torch.Tensor) -> tuple[Compressor, Any]:
        part = self.part(name)
        return part, part.compress(name, grad)

    def communicate(self, name: str, payload: tuple[Compressor, Any]) -> Pending:
        part, inner = payload
        return part.communicate(name, inner)

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "step": self.step,
                "parts": {m: p.state_dict() for m, p in self.parts.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method", self.name) != self.name:
            raise ValueError(f"compressor state is for {state['method']!r}, "
                             f"this run compresses with {self.name!r}")
        parts = state.get("parts", {})
        for m, p in self.parts.items():
            p.load_state_dict(parts.get(m, {"step": state.get("step", 0)}))
