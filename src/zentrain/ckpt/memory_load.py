"""Loading side of in-memory checkpoints: which step every rank can restore, and its bytes.

A mixin of ``MemoryCheckpointer`` (it reads the checkpointer's ``cfg``, ``placement``,
``rank`` and local agent directory ``_dir``). Order of sources (GEMINI §4): this node's
agent, then the holders of this node's replicas, then any other agent; every copy is
checked against its CRCs and decoded without pickle.
"""

from __future__ import annotations

import mmap
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zentrain.ckpt import serialize
from zentrain.ckpt.wire import ProtocolError, connect, recv_exact, recv_msg, request, send_msg


class MemoryLoader:
    cfg: Any
    placement: Any
    rank: int
    _dir: Path | None
    last_load_source: int | None

    def _order(self) -> list[int]:
        """This node's agent, then the replica holders, then everyone else."""
        first = self.placement.holders_of(self.cfg.node)
        return first + [n for n in range(len(self.cfg.agents)) if n not in first]

    def committed_steps(self) -> list[int]:
        """Steps some reachable agent knows to be committed on all ranks, newest first."""
        steps: set[int] = set()
        for node in self._order():
            try:
                steps.update(request(self.cfg.agents[node], {"op": "latest", "job": self.cfg.job},
                                     min(self.cfg.timeout_s, 5.0))["committed"])
            except (OSError, ProtocolError):
                continue
        return sorted(steps, reverse=True)

    def fetch(self, step: int) -> Any | None:
        """This rank's verified state at ``step`` from the first agent that has a good copy."""
        for node in self._order():
            try:
                state = self._get(self.cfg.agents[node], step)
            except (OSError, ProtocolError, ValueError):  # CorruptCheckpoint is a ValueError
                continue
            self.last_load_source = node
            return state
        return None

    def _get(self, addr: str, step: int) -> Any:
        local = self._dir is not None and addr == self.cfg.agents[self.cfg.node]
        with connect(addr, self.cfg.timeout_s) as s:
            send_msg(s, {"op": "get", "job": self.cfg.job, "rank": self.rank, "step": step,
                         "local": local})
            reply = recv_msg(s)
            if not reply.get("ok"):
                raise ProtocolError(reply.get("error", "no such checkpoint"))
            h = reply["header"]
            serialize.check_header(h)
            if local:  # read the agent's file in place: one CRC pass, one copy out
                path = Path(reply["path"])
                if path.parent != self._dir:
                    raise ProtocolError(f"agent answered with a file outside {self._dir}")
                with open(path, "rb") as f:
                    if os.fstat(f.fileno()).st_size != h["nbytes"]:
                        raise serialize.CorruptCheckpoint("stored shard has the wrong size")
                    if not h["nbytes"]:
                        return serialize.unflatten(h, serialize.new_buffer(0))
                    mm = mmap.mmap(f.fileno(), h["nbytes"], prot=mmap.PROT_READ)
                # Checked again here (the agent checked it too), then copied out: the
                # result owns its tensors and the mapping goes when ``mm`` does.
                serialize.verify(h, mm)
                with warnings.catch_warnings():  # read-only: we only copy out of it
                    warnings.simplefilter("ignore", UserWarning)
                    buf = torch.frombuffer(mm, dtype=torch.uint8)
                return serialize.unflatten(h, buf)
            buf = torch.empty(h["nbytes"], dtype=torch.uint8)
            recv_exact(s, memoryview(buf.numpy()))
        serialize.verify(h, buf.numpy())
        return serialize.unflatten(h, buf)

    def load_latest(self, collective: bool | None = None,
                    group: dist.ProcessGroup | None = None) -> tuple[int, Any] | None:
        """The newest ``(step, state)`` committed on every rank, or None.

        With ``collective`` (default: when a process group of more than one rank is up)
        every rank must call it: ranks agree on one step (the newest any agent knows to be
        committed), and if any rank cannot fetch it they agree on the next older one, so
        all return the same step — or all return None and fall back together.
        """
        if collective is None:
            collective = dist.is_initialized() and dist.get_world_size(group) > 1
        cands = self.committed_steps()
        if not collective:
            for step in cands:
                state = self.fetch(step)
                if state is not None:
                    return step, state
            return None
        below = None
        while True:
            mine = max((s for s in cands if below is None or s < below), default=-1)
            step = int(self._all_reduce(mine, dist.ReduceOp.MAX, group))
            if step < 0:
                return None
            state = self.fetch(step)
            if self._all_reduce(int(state is not None), dist.ReduceOp.MIN, group):
                return step, state
            below = step

    @staticmethod
    def _all_reduce(value: int, op: Any, group: dist.ProcessGroup | None) -> int:
        dev = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.int64, device=dev)
        dist.all_reduce(t, op=op, group=group)
        return int(t.item())

    def reset_agents(self) -> None:
        """Make every reachable agent forget this job's versions (after falling back to an
        older persistent checkpoint, so the abandoned timeline can't be restored later)."""
        for addr in self.cfg.agents:
            try:
                request(addr, {"op": "reset", "job": self.cfg.job}, min(self.cfg.timeout_s, 5.0))
            except (OSError, ProtocolError):
                continue
