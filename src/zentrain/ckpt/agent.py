"""The per-node checkpoint agent: in-memory checkpoint versions that outlive the workers.

One agent process runs on every node, outside the training workers, so a crashed worker's
last checkpoint is still there when torchrun restarts it (GEMINI, SOSP '23 §3). It keeps

* its own node's shards: each local worker writes its rank's state for a step into a file
  in the agent's directory and hands it over (``adopt``: no bytes cross a socket), or
  streams it over TCP (``put``);
* replicas of its peers' shards, per ``Placement`` (groups of m, a ring for the rest):
  the agent relays each own shard to the m-1 replica holders, chunk by chunk as a streamed
  shard arrives (a pipeline), and never while a local worker is in its gradient-sync window
  (a byte per rank in the shared file ``window``; a window open over 10 s is ignored).

**Two-phase commit.** A step is *prepared* on node n once all of n's ``local_world``
shards are stored and checksum-verified locally *and* every replica holder has acked its
verified copy; the agent then tells every other agent. A step is *committed* at an agent
when it has heard "prepared" from all N nodes — only then can every rank be restored.
Each agent keeps its newest ``keep_committed`` committed steps and at most
``max_inflight`` newer uncommitted ones, and deletes the rest. A torn shard (the sender
died or timed out mid-stream) or one whose CRC fails is deleted on the spot, never acked,
so its step can never commit; ``get`` re-checks CRCs before serving anything.

**Storage.** Each shard is a file in a tmpfs directory (``/dev/shm/zentrain-JOB-nodeN``),
not a ``multiprocessing.shared_memory`` segment: Python 3.11's segments are registered with
a resource tracker that unlinks (and warns about) them when a process exits, file names
say what they hold (``ls`` is a debugger), ``sendfile`` serves them without copies, and
one ``rmtree`` cleans up even after the agent was SIGKILLed (``AgentHandle.kill`` does).
A dropped own shard is renamed ``free-r{rank}-N`` (one per rank) instead of deleted, and the
worker's next snapshot goes into it (renamed ``fill-...`` while it is written), so steady
per-step checkpointing allocates no new pages.

**Wire protocol** (TCP; plain sockets since this is not gradient traffic): each message
is a 4-byte big-endian length and a JSON object; ``put`` and a successful ``get`` reply
are followed by the raw payload (a ``get`` with ``local`` gets the file's path instead).
Every socket operation has a timeout. Framing lives in ``wire.py``, shared with the workers.

Start one with ``python -m zentrain.ckpt.agent --node I --nodes N --peers H:P,H:P,...``,
or from Python with ``launch.start_agent`` / ``launch.start_local_agents`` (what tests and
a single-host launcher use). SIGTERM shuts it down cleanly and removes its directory.
"""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from zentrain.ckpt import serialize
from zentrain.ckpt.agent_config import AgentConfig, Shard
from zentrain.ckpt.placement import Placement
from zentrain.ckpt.relay import PeerLink
from zentrain.ckpt.shmdir import OWNER_FILE, owner_id, sweep_stale
from zentrain.ckpt.wire import (
    ProtocolError,
    Throttle,
    recv_exact,
    recv_msg,
    send_msg,
)

WINDOW_FILE = "window"
WINDOW_BYTES = 4096
MAX_WINDOW_WAIT_S = 10.0  # a worker that died inside its window must not stall relays forever


# -- the agent ----------------------------------------------------------------------------------

class Agent:
    def __init__(self, cfg: AgentConfig, listener: socket.socket) -> None:
        self.cfg, self.listener = cfg, listener
        self.placement = Placement(cfg.nodes, cfg.m)
        self.lock = threading.Lock()
        self.acked = threading.Condition(self.lock)      # notified on acks and commits
        self.shards: dict[tuple[int, int], Shard] = {}   # complete, verified
        self.receiving: set[Shard] = set()
        self.local_done: dict[int, set[int]] = {}        # step -> own ranks complete
        self.acks: dict[int, dict[int, set[int]]] = {}   # step -> replica node -> ranks
        self.prepared: dict[int, set[int]] = {}          # step -> nodes prepared
        self.sent_prepared: set[int] = set()
        self.committed: list[int] = []                   # ascending
        self.stopping = threading.Event()
        self.throttle = Throttle(cfg.forward_bytes_per_s, self.stopping)
        self.seq = 0
        self.links = {p: PeerLink(self, p) for p in range(cfg.nodes) if p != cfg.node}
        shutil.rmtree(cfg.dir, ignore_errors=True)  # a previous incarnation's leftovers
        sweep_stale(cfg.shm_root)
        cfg.dir.mkdir(parents=True)
        (cfg.dir / OWNER_FILE).write_text(owner_id(os.getpid()))
        # One byte per rank, set by local workers while they are in their gradient-sync
        # window (``MemoryCheckpointer.paused``): replica traffic waits meanwhile.
        wpath = cfg.dir / WINDOW_FILE
        wpath.write_bytes(bytes(WINDOW_BYTES))
        with open(wpath, "rb") as f:
            self.window = mmap.mmap(f.fileno(), WINDOW_BYTES, prot=mmap.PROT_READ)
        self.window_since: float | None = None

    def log(self, text: str) -> None:
        try:
            print(f"[ckpt-agent {self.cfg.node}] {text}", file=sys.stderr, flush=True)
        except OSError:  # stderr was a pipe to a launcher that is gone
            pass

    # -- serving ---------------------------------------------------------------------------
    def serve(self) -> None:
        for link in self.links.values():
            link.start()
        self.listener.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()
        self.close()

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        for link in self.links.values():
            link.join(timeout=2)
        # File descriptors stay open (threads may still use them); the process exits next.
        shutil.rmtree(self.cfg.dir, ignore_errors=True)

    def _conn(self, conn: socket.socket) -> None:
        conn.settimeout(self.cfg.timeout_s)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            try:
                while not self.stopping.is_set():
                    try:
                        msg = recv_msg(conn)
                    except ProtocolError:
                        return  # the client closed between requests
                    if msg.get("job", self.cfg.job) != self.cfg.job:
                        send_msg(conn, {"ok": False, "error": f"agent serves job "
                                        f"{self.cfg.job!r}, not {msg.get('job')!r}"})
                        continue
                    op = msg.get("op")
                    handler = getattr(self, f"_op_{op}", None)
                    if handler is None:
                        send_msg(conn, {"ok": False, "error": f"unknown op {op!r}"})
                        continue
                    if handler(conn, msg) is False:
                        return
            except (OSError, ProtocolError, ValueError, KeyError, TypeError) as e:
                if not self.stopping.is_set():
                    self.log(f"connection dropped: {type(e).__name__}: {e}")

    def _op_ping(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        send_msg(conn, {"ok": True, "node": self.cfg.node, "nodes": self.cfg.nodes,
                        "job": self.cfg.job, "pid": os.getpid(), "dir": str(self.cfg.dir)})

    def _op_latest(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        with self.lock:
            committed = sorted(self.committed, reverse=True)
        send_msg(conn, {"ok": True, "committed": committed})

    def _op_status(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        with self.lock:  # snapshot under the lock, reply outside it
            reply = {
                "ok": True, "committed": sorted(self.committed, reverse=True),
                "shards": sorted([s.rank, s.step, s.origin] for s in self.shards.values()),
                "receiving": sorted([s.rank, s.step, s.origin, s.received, s.nbytes]
                                    for s in self.receiving),
                "prepared": {str(k): sorted(v) for k, v in self.prepared.items()},
                "bytes": sum(s.nbytes for s in self.shards.values())}
        send_msg(conn, reply)

    def _op_await_commit(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        """Reply once ``step`` (or a newer one) is committed here, i.e. every node's shards
        and their replicas are in place; or at ``timeout`` s; or at once when that can no
        longer happen (this rank's shard was dropped, a peer's link is down). A worker asks
        before its next save, so at any moment only its newest step can be uncommitted:
        losing a node, whichever, then costs at most one step."""
        rank, step = int(msg["rank"]), int(msg["step"])
        deadline = time.monotonic() + min(float(msg.get("timeout", 10.0)),
                                          0.9 * self.cfg.timeout_s)
        with self.acked:
            while True:
                done = bool(self.committed) and self.committed[-1] >= step
                if (done or (rank, step) not in self.shards or self.stopping.is_set()
                        or any(link.down_since is not None for link in self.links.values())):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.acked.wait(min(remaining, 0.05))
        send_msg(conn, {"ok": True, "committed": done})

    def _op_prepared(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        with self.lock:
            self._on_prepared(int(msg["node"]), int(msg["step"]))
        send_msg(conn, {"ok": True})

    def _op_reset(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        """Forget every version (used after falling back to an older persistent checkpoint,
        so steps from the abandoned timeline can never be restored)."""
        with self.lock:
            for sh in self.shards.values():
                self._drop(sh)
            self.shards.clear()
            for book in (self.local_done, self.acks, self.prepared, self.sent_prepared):
                book.clear()
            self.committed = []
        send_msg(conn, {"ok": True})

    def _op_get(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        rank, step = int(msg["rank"]), int(msg["step"])
        with self.lock:
            sh = self.shards.get((rank, step))
            fd = os.dup(sh.fd) if sh is not None else -1
        if sh is None:
            send_msg(conn, {"ok": False, "error": f"no shard for rank {rank} step {step}"})
            return
        mm = None
        try:
            # Check the whole shard before answering, so a damaged copy is refused with a
            # clear error instead of being cut off mid-stream (read in place: no copy).
            if os.fstat(fd).st_size < sh.nbytes:
                raise serialize.CorruptCheckpoint("stored shard is truncated")
            if sh.nbytes:
                mm = mmap.mmap(fd, sh.nbytes, prot=mmap.PROT_READ)
                serialize.verify(sh.header, mm)
        except serialize.CorruptCheckpoint as e:
            self.log(f"rank {rank} step {step}: stored copy is damaged ({e}); dropping it")
            with self.lock:
                if self.shards.get((rank, step)) is sh:
                    self._drop(self.shards.pop((rank, step)), discard=True)
            send_msg(conn, {"ok": False, "error": f"rank {rank} step {step}: {e}"})
            return
        finally:
            os.close(fd)
        try:
            if msg.get("local"):  # a worker on this node maps the file itself
                send_msg(conn, {"ok": True, "header": sh.header, "origin": sh.origin,
                                "path": str(sh.path)})
                return
            send_msg(conn, {"ok": True, "header": sh.header, "origin": sh.origin})
            if mm is not None:
                conn.sendall(mm)
        finally:
            if mm is not None:
                mm.close()

    def _op_adopt(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        """A local worker wrote its shard into a file in this agent's directory (the
        zero-copy path of ``MemoryCheckpointer``): take it over as a stored shard. The
        worker computed the CRCs from the same memory; ``get`` and every replica holder
        check them."""
        rank, step = int(msg["rank"]), int(msg["step"])
        header = msg["header"]
        src = self.cfg.dir / str(msg["file"])
        try:
            serialize.check_header(header)
            if src.parent != self.cfg.dir or not src.name.startswith("fill-"):
                raise ProtocolError(f"adopt: {msg['file']!r} is not a fill file of this agent")
            fd = os.open(src, os.O_RDWR)
        except (serialize.CorruptCheckpoint, ProtocolError, OSError) as e:
            send_msg(conn, {"ok": False, "error": f"rank {rank} step {step}: {e}"})
            return
        if os.fstat(fd).st_size != header["nbytes"]:
            os.close(fd)
            send_msg(conn, {"ok": False, "error": f"rank {rank} step {step}: file size "
                            "differs from the header"})
            return
        with self.lock:
            sh = Shard(rank, step, self.cfg.node, header, self.cfg.dir / f"own-r{rank}-s{step}")
            sh.fd, sh.received, sh.done = fd, header["nbytes"], True
            old = self.shards.pop((rank, step), None)
            if old is not None:  # a restarted worker re-saving a step: the new copy wins
                self._drop(old)
            os.rename(src, sh.path)
            self.shards[(rank, step)] = sh
            for p in self.placement.replicas_of(self.cfg.node):
                self.links[p].submit(("replicate", sh))
            self.local_done.setdefault(step, set()).add(rank)
            self._maybe_prepare(step)
            self._gc()
        send_msg(conn, {"ok": True})

    def _op_put(self, conn: socket.socket, msg: dict[str, Any]) -> bool:
        rank, step = int(msg["rank"]), int(msg["step"])
        origin = int(msg.get("origin", self.cfg.node))
        header = msg["header"]
        try:
            serialize.check_header(header)
        except serialize.CorruptCheckpoint as e:
            # The payload size is untrusted, so the stream cannot be resynchronised: hang up.
            send_msg(conn, {"ok": False, "error": f"rank {rank} step {step}: {e}"})
            return False
        with self.lock:
            self.seq += 1
            tag = "own" if origin == self.cfg.node else f"from{origin}"
            path = self.cfg.dir / f"{tag}-r{rank}-s{step}"
            part = path.with_name(f"{path.name}.{self.seq}.part")
            sh = Shard(rank, step, origin, header, path)
            sh.fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            self.receiving.add(sh)
            if origin == self.cfg.node:  # relay to the replica holders as chunks arrive
                for p in self.placement.replicas_of(self.cfg.node):
                    self.links[p].submit(("replicate", sh))
        try:
            self._receive(conn, sh)
        except (OSError, ProtocolError, serialize.CorruptCheckpoint) as e:
            sh.progress(failed=True)
            with self.lock:
                self.receiving.discard(sh)
                self._drop(sh, part)
            self.log(f"discarded rank {rank} step {step} from node {origin}: "
                     f"{type(e).__name__}: {e}")
            if not isinstance(e, serialize.CorruptCheckpoint):
                return False  # torn: the sender is gone or stalled
            send_msg(conn, {"ok": False, "error": f"rank {rank} step {step}: {e}"})
            return True
        with self.lock:
            self.receiving.discard(sh)
            old = self.shards.pop((rank, step), None)
            if old is not None:  # a restarted worker re-saving a step: the new copy wins
                os.close(old.fd)
                old.fd = -1
            os.rename(part, path)
            sh.done = True
            self.shards[(rank, step)] = sh
            if origin == self.cfg.node:
                self.local_done.setdefault(step, set()).add(rank)
                self._maybe_prepare(step)
            self._gc()
        send_msg(conn, {"ok": True})
        return True

    def _receive(self, conn: socket.socket, sh: Shard) -> None:
        """Stream the payload into the shard's file, checking each chunk's CRC. After a bad
        chunk the rest is read and discarded, so the sender still gets a clear reply."""
        chunk, nbytes = sh.header["chunk"], sh.nbytes
        buf = memoryview(bytearray(min(chunk, nbytes)))
        bad: serialize.CorruptCheckpoint | None = None
        for i, off in enumerate(range(0, nbytes, chunk)):
            n = min(chunk, nbytes - off)
            recv_exact(conn, buf[:n])
            if bad is not None:
                continue
            try:
                serialize.verify_chunk(sh.header, i, buf[:n])
            except serialize.CorruptCheckpoint as e:
                bad = e
                sh.progress(failed=True)  # relays stop now
                continue
            if os.pwrite(sh.fd, buf[:n], off) != n:
                raise OSError(f"short write to {sh.path} (tmpfs full?)")
            sh.progress(off + n)
        if bad is not None:
            raise bad
        if self.stopping.is_set():
            raise ProtocolError("agent is shutting down")

    # -- commit bookkeeping (all under self.lock) ---------------------------------------------
    def _maybe_prepare(self, step: int) -> None:
        ranks = self.local_done.get(step, set())
        if step in self.sent_prepared or len(ranks) < self.cfg.local_world:
            return
        acks = self.acks.get(step, {})
        if any(not ranks <= acks.get(p, set())
               for p in self.placement.replicas_of(self.cfg.node)):
            return
        self.sent_prepared.add(step)
        for link in self.links.values():
            link.submit(("prepared", step))
        self._on_prepared(self.cfg.node, step)

    def _on_ack(self, peer: int, rank: int, step: int) -> None:
        self.acks.setdefault(step, {}).setdefault(peer, set()).add(rank)
        self.acked.notify_all()
        self._maybe_prepare(step)

    def _on_prepared(self, node: int, step: int) -> None:
        nodes = self.prepared.setdefault(step, set())
        nodes.add(node)
        newest = self.committed[-1] if self.committed else -1
        if len(nodes) == self.cfg.nodes and step > newest:
            self.committed = (self.committed + [step])[-self.cfg.keep_committed:]
            self.acked.notify_all()
            self._gc()

    def _gc(self) -> None:
        newest = self.committed[-1] if self.committed else -1
        floor = self.committed[0] if self.committed else -1
        inflight = sorted({s.step for s in self.shards.values() if s.step > newest})
        keep = set(self.committed) | set(inflight[-self.cfg.max_inflight:])
        for key, sh in list(self.shards.items()):
            if sh.step not in keep:
                self._drop(self.shards.pop(key))
        for book in (self.local_done, self.acks, self.prepared):
            for step in [s for s in book if s < floor]:
                del book[step]
        self.sent_prepared = {s for s in self.sent_prepared if s >= floor}

    def _drop(self, sh: Shard, path: Path | None = None, discard: bool = False) -> None:
        if sh.fd >= 0:
            os.close(sh.fd)
            sh.fd = -1
        target = path or sh.path
        try:
            if path is None and not discard and sh.done and sh.origin == self.cfg.node \
                    and not any(
                    self.cfg.dir.glob(f"free-r{sh.rank}-*")):
                # Keep one dropped own shard per rank as the worker's next fill file:
                # its pages are already allocated, so the next snapshot faults none.
                self.seq += 1
                os.rename(target, self.cfg.dir / f"free-r{sh.rank}-{self.seq}")
            else:
                os.unlink(target)
        except FileNotFoundError:
            pass

    def window_open(self) -> bool:
        """True while some local worker is in its gradient-sync window."""
        return self.window.find(b"\x01") >= 0

    def wait_window(self) -> None:
        """Wait while a local worker is in its sync window. A window open for longer than
        ``MAX_WINDOW_WAIT_S`` is ignored until it closes (its worker may have died inside)."""
        if not self.window_open():
            self.window_since = None
            return
        now = time.monotonic()
        if self.window_since is None:
            self.window_since = now
        while self.window_open() and not self.stopping.is_set():
            if time.monotonic() - self.window_since > MAX_WINDOW_WAIT_S:
                return
            time.sleep(0.002)
        self.window_since = None


def main(argv: list[str] | None = None) -> int:
    """``python -m zentrain.ckpt.agent``: see ``agent_main``."""
    from zentrain.ckpt.agent_main import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
