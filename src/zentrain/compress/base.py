"""The ``Compressor`` contract shared by every method, and its small helpers.

A compressor works on one parameter's gradient at a time, keyed by the parameter's name:

1. ``compress(name, grad)`` is local: it adds the error-feedback residual, picks what to
   send and keeps the rest as the new residual; it returns a payload.
2. ``communicate(name, payload)`` moves the payload through ``zentrain.sync.comm`` (so bytes
   are counted) and returns a ``Pending`` whose ``wait()`` gives the gradient averaged over
   ranks, decompressed, bit-identical on every rank.
3. ``state_dict``/``load_state_dict`` carry residuals and method state (PowerSGD's Q, the
   step that seeds random choices), so a resumed run takes the same next step.

Communication must be issued in the same order on every rank; ``CompressedSync`` guarantees
that by launching parameters in a fixed order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist

from zentrain.sync.comm import ByteCounter, rank, world

if TYPE_CHECKING:
    from zentrain.compress import CompressConfig


class Pending:
    """A result that may still be in flight: ``wait()`` finishes it (once) and returns it."""

    def __init__(self, value: torch.Tensor | None = None, work: Any = None,
                 then: Callable[[], torch.Tensor] | None = None) -> None:
        self._value = value
        self._work = work
        self._then = then

    @property
    def done(self) -> bool:
        return self._then is None

    def wait(self) -> torch.Tensor:
        if self._then is not None:
            if self._work is not None:
                self._work.wait()
            self._value = self._then()
            self._work = self._then = None
        assert self._value is not None
        return self._value


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ints and strings, the same in every process (unlike ``hash``)."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def generator(device: torch.device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class Compressor:
    """Base class: error-feedback residuals, step counter, binding to a process group."""

    name: ClassVar[str] = "base"
    uses_error_feedback: ClassVar[bool] = True
    """False for methods whose error is negligible by design (half-precision casts)."""

    def __init__(self, cfg: CompressConfig) -> None:
        self.cfg = cfg
        self.step = 0
        """Synced steps done so far; seeds per-step randomness and decides warm-up."""
        self.residuals: dict[str, torch.Tensor] = {}
        self.bind(None, ByteCounter())

    def bind(self, group: dist.ProcessGroup | None, counter: ByteCounter) -> None:
        """Communicate over ``group``, counting bytes in ``counter``."""
        self.group = group
        self.counter = counter
        self.world_size = world(group)
        self.rank = rank(group)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether compressing a tensor of this shape is worthwhile (policy hook)."""
        return True

    def accepts_param(self, name: str, shape: tuple[int, ...]) -> bool:
        """``accepts`` for parameter ``name`` (the policy's hook; ``Mixed`` routes by name)."""
        return self.accepts(shape)

    def keeps_residual(self, name: str) -> bool:
        """Error feedback for parameter ``name`` (``error_feedback_params``)."""
        return self.uses_error_feedback and self.cfg.keeps_residual(name)

    def accumulate(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Flat float32 ``grad + residual``, a fresh buffer this call may keep and modify.

        With error feedback the buffer *is* the residual entry, so a compressor that zeroes
        what it sends (top-k) leaves exactly the unsent part behind, bit for bit.
        """
        g = grad.detach().reshape(-1)
        if not self.keeps_residual(name):
            return g.to(torch.float32, copy=True)
        r = self.residuals.get(name)
        if r is None:
            r = g.to(torch.float32, copy=True)
        else:
            r = r.to(g.device).add_(g)
        self.residuals[name] = r
        return r

    def compress(self, name: str, grad: torch.Tensor) -> Any:
        raise NotImplementedError

    def communicate(self, name: str, payload: Any) -> Pending:
        raise NotImplementedError

    def sync(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """Compress, communicate and wait: the averaged gradient, shaped like ``grad``."""
        return self.communicate(name, self.compress(name, grad)).wait()

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Copies (not views) of the per-rank state: residuals differ between ranks."""
        return {"method": self.name, "step": self.step,
                "residuals": {k: v.detach().clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method", self.name) != self.name:
            raise ValueError(f"compressor state is for {state['method']!r}, "
                             f"this run compresses with {self.name!r}")
        self.step = int(state.get("step", 0))
        self.residuals = {k: v.detach().clone() for k, v in state.get("residuals", {}).items()}
