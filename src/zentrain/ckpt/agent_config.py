"""The checkpoint agent's configuration and its unit of storage, the ``Shard``.

Kept apart from ``agent.py`` (the agent's request handling, relay and commit protocol) so
launchers can build an ``AgentConfig`` without importing the agent itself.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AgentConfig:
    """One node's agent. Addresses are ``host:port``; ``peers[i]`` is node i's agent."""

    node: int
    nodes: int
    peers: list[str]
    local_world: int = 1
    """Shards (ranks) this node's workers put per step; a step is prepared with all of them."""
    m: int = 2
    """Copies of every checkpoint in CPU memory, the node's own included (GEMINI's m)."""
    job: str = "job"
    """Job id; requests for another job are refused so two runs never mix."""
    shm_root: str = "/dev/shm"
    """tmpfs directory under which the agent keeps its shards."""
    keep_committed: int = 1
    """Committed steps to keep (2 lets recovery fall back if the newest is damaged)."""
    max_inflight: int = 2
    """Uncommitted steps newer than the last commit to keep (more are dropped, oldest first)."""
    forward_bytes_per_s: float = 0.0
    """Throttle for replica traffic to peers (0: unthrottled)."""
    timeout_s: float = 30.0
    """Timeout of every socket operation (connect, each send/recv)."""
    exit_with_parent: bool = True
    """Shut down when the process that started the agent goes away."""

    def __post_init__(self) -> None:
        if not 0 <= self.node < self.nodes or len(self.peers) != self.nodes:
            raise ValueError(f"agent config: need 0 <= node < nodes and one peer address per "
                             f"node; got node={self.node}, nodes={self.nodes}, "
                             f"{len(self.peers)} peers")
        if self.local_world < 1 or self.keep_committed < 1 or self.max_inflight < 1:
            raise ValueError("agent config: local_world, keep_committed and max_inflight "
                             "must be >= 1")

    @property
    def dir(self) -> Path:
        return Path(self.shm_root) / f"zentrain-{self.job}-node{self.node}"


@dataclass(eq=False)
class Shard:
    """One rank's state at one step, as held by this agent (own or a peer's replica)."""

    rank: int
    step: int
    origin: int
    header: dict[str, Any]
    path: Path
    fd: int = -1
    received: int = 0
    done: bool = False
    failed: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def nbytes(self) -> int:
        return self.header["nbytes"]

    def progress(self, received: int | None = None, failed: bool = False) -> None:
        with self.cond:
            if received is not None:
                self.received = received
            self.failed = self.failed or failed
            self.cond.notify_all()

    def wait_for(self, end: int, timeout: float) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: self.received >= end or self.failed, timeout)
            return self.received >= end and not self.failed
