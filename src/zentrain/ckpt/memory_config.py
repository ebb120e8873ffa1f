"""A worker's side of the in-memory checkpoints: how it reaches the agents
(``MemoryConfig``) and what each save cost (``SaveStats``). Apart from ``memory.py`` (the
checkpointer's save pipeline) so the records can be read without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from zentrain.ckpt import serialize


@dataclass
class MemoryConfig:
    """How a worker reaches the checkpoint agents."""

    job: str
    """Job id; must match the agents'."""
    agents: list[str]
    """``host:port`` of every node's agent, indexed by node."""
    node: int
    """This worker's node (its agent is ``agents[node]``)."""
    m: int = 2
    """Copies per checkpoint, as the agents were started with (orders recovery sources)."""
    chunk_bytes: int = serialize.DEFAULT_CHUNK
    """Unit of CRCs, pausing and throttling."""
    send_bytes_per_s: float = 0.0
    """Throttle for the worker→agent stream (0: unthrottled); read at every chunk."""
    timeout_s: float = 30.0
    """Timeout of every socket operation."""
    local: bool = True
    """When this node's agent directory is visible here (it always is on a node), snapshot
    straight into a file there and hand it over (``adopt``), and read it back in place on
    load: no bytes cross a socket on this node."""
    wait_commit: bool = True
    """With peer nodes: after handing a save to the local agent, wait (in the background
    thread) until that step is committed (every node's shards and replicas in place)
    before the next save may start, so a lost node costs at most one step. The training
    thread feels it only when that takes longer than a step, as the next save's
    ``blocked_s``."""


@dataclass
class SaveStats:
    """What one ``save_async`` cost. Training-thread time is blocked_s + snapshot_s."""

    step: int
    nbytes: int
    blocked_s: float
    """Training thread waited for the previous save to finish."""
    snapshot_s: float
    """Training thread flattened the state and copied it into the staging buffer (with
    ``defer``: flattened it only)."""
    copy_s: float = 0.0
    """Background thread copied the state (``defer``)."""
    barrier_s: float = 0.0
    """Training thread waited in ``wait_snapshot`` for the deferred copy."""
    copy_cpu_s: float = 0.0
    """CPU time of the background copy (wall time on a busy machine says little)."""
    cpu_s: float = 0.0
    """CPU time of the background thread for this save: copy, CRCs, handoff or stream."""
    background_s: float = 0.0
    """Background thread: CRCs and transfer, pauses included."""
    paused_s: float = 0.0
    commit_s: float = 0.0
    """Background thread waited for this step to be committed (``wait_commit``)."""
    committed: bool | None = None
    """The step was committed when the wait ended (None: not waited for)."""
    handoff: str = ""
    """How the bytes reached the local agent: ``adopt`` (a file in its directory) or
    ``stream`` (TCP)."""
    ok: bool = False
    error: str | None = None

    @property
    def bytes_per_s(self) -> float:
        busy = self.background_s - self.paused_s - self.commit_s
        return self.nbytes / busy if busy > 0 else 0.0
