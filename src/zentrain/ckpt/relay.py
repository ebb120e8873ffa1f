"""Relay of one agent's replicas and "prepared" notices to one peer agent, in order.

A ``PeerLink`` thread per peer (GEMINI §5: replicas go to the m-1 holders of the node's
placement group). Each replica is sent chunk by chunk with ``sendfile`` as soon as the
chunk is stored locally (a pipeline behind a streamed shard), never while a local worker
is in its gradient-sync window, and under the agent's throttle. The peer acks a replica
once it has checked every chunk's CRC; the ack is what lets this node prepare the step.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

from zentrain.ckpt.wire import ProtocolError, connect, recv_msg, request, send_msg

if TYPE_CHECKING:
    from zentrain.ckpt.agent import Agent
    from zentrain.ckpt.agent_config import Shard


class PeerLink(threading.Thread):
    """Sends this agent's replicas and "prepared" notices to one peer, in order."""

    def __init__(self, agent: Agent, peer: int) -> None:
        super().__init__(daemon=True, name=f"peer-{peer}")
        self.agent, self.peer = agent, peer
        self.addr = agent.cfg.peers[peer]
        self.cv = threading.Condition()
        self.tasks: list[tuple[str, Any]] = []
        self.down_since: float | None = None
        self.last_fail = 0.0

    def submit(self, task: tuple[str, Any]) -> None:
        with self.cv:
            self.tasks.append(task)
            self.cv.notify()

    def run(self) -> None:
        a = self.agent
        while not a.stopping.is_set():
            with self.cv:
                self.cv.wait_for(lambda: self.tasks, timeout=0.2)
                if not self.tasks:
                    continue
                kind, arg = self.tasks.pop(0)
            if self.down_since is not None and time.monotonic() - self.last_fail < 1.0:
                continue  # peer down: drop work for a second instead of queueing timeouts
            try:
                if kind == "replicate":
                    self._replicate(arg)
                else:
                    request(self.addr, {"op": "prepared", "job": a.cfg.job,
                                        "node": a.cfg.node, "step": arg}, a.cfg.timeout_s)
                if self.down_since is not None:
                    a.log(f"peer {self.peer} is back")
                    self.down_since = None
            except (OSError, ProtocolError) as e:
                if self.down_since is None:
                    a.log(f"peer {self.peer} at {self.addr}: {type(e).__name__}: {e}")
                    self.down_since = time.monotonic()
                self.last_fail = time.monotonic()

    def _replicate(self, sh: Shard) -> None:
        a = self.agent
        with a.lock:
            if sh.failed or sh.fd < 0:
                return
            fd = os.dup(sh.fd)
        # socket.sendfile (not os.sendfile): it honours the socket's timeout.
        with open(fd, "rb", buffering=0) as f, connect(self.addr, a.cfg.timeout_s) as s:
            send_msg(s, {"op": "put", "job": a.cfg.job, "rank": sh.rank, "step": sh.step,
                         "origin": a.cfg.node, "header": sh.header})
            chunk = sh.header["chunk"]
            for off in range(0, sh.nbytes, chunk):
                n = min(chunk, sh.nbytes - off)
                if not sh.wait_for(off + n, a.cfg.timeout_s):
                    return  # the source broke off: hanging up discards the peer's copy
                a.wait_window()
                a.throttle(n)
                if a.stopping.is_set():
                    return
                s.sendfile(f, off, n)
            reply = recv_msg(s)
        if not reply.get("ok"):
            raise ProtocolError(reply.get("error", "replica refused"))
        with a.lock:
            a._on_ack(self.peer, sh.rank, sh.step)
