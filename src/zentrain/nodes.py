"""Emulated nodes on one machine, each with its checkpoint agent and its elastic agent.

``zentrain run --nodes N --nproc-per-node P`` runs the job the way N machines would:

* a **rendezvous store** (a ``TCPStore`` in a process of its own, standing in for the
  cluster's key-value store), so no node hosts it and any node can be lost;
* per node i, a **checkpoint agent** (``zentrain.ckpt.agent``) and an **elastic agent**
  (``python -m zentrain.nodes node``: torchrun's ``elastic_launch`` with a c10d rendezvous
  on the store, ``--max-restarts``), which starts node i's P workers and restarts them after
  a failure. Workers learn the agents' addresses, the job id and their node from
  ``ZENTRAIN_CKPT_AGENTS`` / ``_JOB`` / ``_NODE``.

**Addresses.** With the emulated cluster available (``zentrain.netem``: root, iproute2), node
i runs in network namespace i of an ``EmulatedCluster(N + 1)`` (the extra host holds the
store), so its traffic crosses a veth link (shaped with ``--emulate-bandwidth``). Otherwise,
or with ``--loopback``, everything runs on loopback and node i uses the address
127.0.0.(i+1). Either way each node has an address of its own, and torch's rendezvous orders
nodes by address, so node i's workers keep ranks ``[i*P, (i+1)*P)`` across restarts.

**Losing a node.** The supervisor (this module, in the ``zentrain run`` process) watches the
node processes. A node whose elastic agent died of a signal (``zentrain chaos --kill node``
SIGKILLs it with its workers and checkpoint agent) is replaced, up to
``checkpoint.max_restarts`` times: its agent's memory is wiped (the RAM of a lost machine),
a fresh agent and elastic agent start at the same address, the surviving nodes' workers
fail on their next collective and are restarted by their elastic agents, and all ranks meet
in a new rendezvous round and load from the replicas. A checkpoint agent that dies alone is
restarted in place (training never stops; its memory is empty until the next commit).

``RUN_DIR/nodes.json`` and ``agents.json`` list the live elastic and checkpoint agents (pids,
addresses), ``RUN_DIR/elastic-node{i}.jsonl`` the elastic agents' restart events with
timestamps.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zentrain.ckpt.agent_config import AgentConfig
from zentrain.ckpt.launch import AgentHandle, agent_argv, start_agent, term_with_parent
from zentrain.config import Config
from zentrain.zygote import Zygote, die_with_parent

AGENT_PORT = 29610   # in a namespace every node has its own address, so ports never clash
STORE_PORT = 29600
_ELASTIC_LOGGER = "torch.distributed.elastic.agent.server.api"
_EVENTS = (("attempts left", "failed"), ("Stopping worker group", "stopping"),
           ("Rendezvous'ing worker group", "rendezvous"),
           ("Rendezvous complete", "rendezvous_done"), ("Starting worker group", "starting"),
           ("new nodes", "new_nodes"), ("successfully finished", "finished"))


def new_job_id() -> str:
    return f"zentrain-{uuid.uuid4().hex[:8]}"


def log(text: str) -> None:
    print(f"[zentrain] {text}", file=sys.stderr, flush=True)


# -- elastic agent events ------------------------------------------------------------------------

class _EventLog(logging.Handler):
    """Appends the elastic agent's restart milestones, timestamped, to a JSONL file."""

    def __init__(self, path: Path, node: int) -> None:
        super().__init__(logging.INFO)
        self.path, self.node = path, node

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            for needle, event in _EVENTS:
                if needle in msg:
                    with open(self.path, "a") as f:
                        f.write(json.dumps({"t": record.created, "node": self.node,
                                            "event": event}) + "\n")
                    return
        except Exception:  # noqa: BLE001 - logging must never break the launcher
            pass


def record_elastic_events(path: Path, node: int = 0) -> None:
    """Log the elastic agent's restart milestones (failure detected, workers stopped,
    rendezvous, workers started) of this process to ``path``; warnings still go to stderr."""
    import torch.distributed.elastic.agent.server.api  # noqa: F401 - creates the logger

    logger = logging.getLogger(_ELASTIC_LOGGER)
    if any(isinstance(h, _EventLog) for h in logger.handlers):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(_EventLog(path, node))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    logger.addHandler(err)


# -- checkpoint agents --------------------------------------------------------------------------

class AgentSet:
    """The checkpoint agents of N nodes: started before the workers, restarted when one dies
    alone, replaced (memory wiped) with its node, stopped at the end."""

    def __init__(self, cfg: Config, job: str, nodes: int, local_world: int,
                 hosts: Sequence[str], cluster: Any = None, run_dir: Path | None = None) -> None:
        self.job, self.nodes, self.cluster, self.run_dir = job, nodes, cluster, run_dir
        self.local_world, self.ck = local_world, cfg.checkpoint
        self.listeners: list[socket.socket] = []
        if cluster is None:
            # Bound here and inherited by every incarnation of the agent: the address never
            # changes and no port is ever released and re-bound.
            self.listeners = [socket.create_server((h, 0)) for h in hosts]
            self.peers = [f"{h}:{s.getsockname()[1]}" for h, s in zip(hosts, self.listeners)]
        else:
            self.peers = [f"{h}:{AGENT_PORT}" for h in hosts]
        self.handles: list[AgentHandle | None] = [None] * nodes
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
        self._restarted: dict[int, float] = {}

    def env(self, node: int) -> dict[str, str]:
        return {"ZENTRAIN_CKPT_AGENTS": ",".join(self.peers), "ZENTRAIN_CKPT_JOB": self.job,
                "ZENTRAIN_CKPT_NODE": str(node)}

    def _config(self, node: int) -> AgentConfig:
        return AgentConfig(node=node, nodes=self.nodes, peers=self.peers,
                           local_world=self.local_world, m=self.ck.replicas, job=self.job,
                           forward_bytes_per_s=self.ck.memory_bytes_per_s, timeout_s=20.0)

    def _spawn(self, node: int) -> AgentHandle:
        cfg = self._config(node)
        if self.cluster is None:
            return start_agent(cfg, self.listeners[node])
        # The launcher cannot reach into the namespace; workers skip an agent not up yet.
        return AgentHandle(cfg, self.cluster.popen(node, agent_argv(cfg),
                                                   stdin=subprocess.DEVNULL,
                                                   preexec_fn=term_with_parent()))

    def start(self, node: int, dead: AgentHandle | None = None) -> AgentHandle | None:
        """Start node's agent, replacing (SIGKILL, memory wiped) the one running. With
        ``dead``, only if that handle is still the current one: the watchdog and a node
        replacement may both notice the same death, and one agent per address is the rule."""
        with self.lock:
            cur = self.handles[node]
            if dead is not None and cur is not dead:
                return None  # restarted by someone else meanwhile
            if cur is not None:
                cur.kill()  # waits for it to die; removes its directory
            h = self._spawn(node)
            self.handles[node] = h
            self._write()
        if self.cluster is None:
            h.wait_ready()
        return h

    def _write(self) -> None:
        """``RUN_DIR/agents.json``: the job id and every agent's pid, address and directory
        (what ``zentrain chaos`` reads to find an agent). Called under the lock."""
        if self.run_dir is None:
            return
        info = {"job": self.job, "agents": [
            {"node": i, "pid": h.proc.pid if h else None, "addr": self.peers[i],
             "dir": str(self._config(i).dir)} for i, h in enumerate(self.handles)]}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "agents.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.rename(self.run_dir / "agents.json")

    def start_all(self) -> None:
        for i in range(self.nodes):
            self.start(i)
        self._watch = threading.Thread(target=self._watchdog, daemon=True, name="agent-watch")
        self._watch.start()

    def replace(self, node: int) -> None:
        """A lost node's agent: kill it if it still runs, wipe its memory, start afresh."""
        self.start(node)

    def _watchdog(self) -> None:
        while not self._stop.wait(0.2):
            for i in range(self.nodes):
                with self.lock:
                    h = self.handles[i]
                if h is not None and h.proc.poll() is not None and not self._stop.is_set():
                    if time.monotonic() - self._restarted.get(i, -1e9) < 2.0:
                        continue  # it died right after a restart: back off
                    self._restarted[i] = time.monotonic()
                    log(f"checkpoint agent of node {i} exited ({h.proc.returncode}); "
                        "restarting it")
                    try:
                        self.start(i, dead=h)
                    except (RuntimeError, OSError) as e:
                        log(f"could not restart the checkpoint agent of node {i}: {e}")
                        self._stop.wait(2.0)  # don't spin on a persistent failure

    def pids(self) -> list[int | None]:
        with self.lock:
            return [h.proc.pid if h else None for h in self.handles]

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join(timeout=2)
        with self.lock:
            handles, self.handles = self.handles, [None] * self.nodes
        for h in handles:
            if h is not None:
                h.stop()
        for s in self.listeners:
            s.close()


def start_single_node_agents(cfg: Config, job: str, nproc: int,
                             run_dir: Path) -> AgentSet | None:
    """The one checkpoint agent of a plain ``zentrain run`` (None when memory checkpoints
    are off)."""
    if cfg.checkpoint.memory_every <= 0:
        return None
    agents = AgentSet(cfg, job, 1, nproc, ["127.0.0.1"], run_dir=run_dir)
    agents.start_all()
    return agents


# -- N nodes ------------------------------------------------------------------------------------

def run_nodes(train_args: Sequence[str], cfg: Config, run_dir: Path, nodes: int, nproc: int,
              *, loopback: bool = False, rate: str | None = None, timeout_s: float = 0) -> int:
    """Run the job on ``nodes`` emulated nodes of ``nproc`` workers each; exit code."""
    from zentrain.netem import EmulatedCluster, check_available

    reason = "--loopback given" if loopback else check_available()
    if reason is None:
        with EmulatedCluster(nodes + 1, rate) as cluster:
            hosts = [cluster.addr(i) for i in range(nodes + 1)]
            log(f"{nodes} nodes x {nproc} workers, each node in its own network namespace "
                f"({hosts[0]}..{hosts[nodes - 1]}; links {rate or 'unshaped'})")
            return _Supervisor(train_args, cfg, run_dir, nodes, nproc, hosts, cluster).run()
    if rate is not None:
        log(f"--emulate-bandwidth {rate} ignored: the emulated network is unavailable ({reason})")
    log(f"{nodes} nodes x {nproc} workers on loopback (127.0.0.1..{nodes}), no network "
        f"namespaces: {reason}")
    hosts = [f"127.0.0.{i + 1}" for i in range(nodes)] + ["127.0.0.1"]
    return _Supervisor(train_args, cfg, run_dir, nodes, nproc, hosts, None).run()


class _Supervisor:
    def __init__(self, train_args: Sequence[str], cfg: Config, run_dir: Path, nodes: int,
                 nproc: int, hosts: list[str], cluster: Any) -> None:
        self.train_args, self.cfg, self.run_dir = list(train_args), cfg, run_dir
        self.nodes, self.nproc, self.hosts, self.cluster = nodes, nproc, hosts, cluster
        self.job = new_job_id()
        self.agents = AgentSet(cfg, self.job, nodes, nproc, hosts[:nodes], cluster, run_dir) \
            if cfg.checkpoint.memory_every > 0 else None
        self.procs: list[subprocess.Popen | None] = [None] * nodes
        self.store: subprocess.Popen | None = None
        self.store_port = STORE_PORT if cluster is not None else _free_port()

    def _popen(self, host: int, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        if self.cluster is not None:
            return self.cluster.popen(host, argv, env=env, stdin=subprocess.DEVNULL,
                                      **({} if host == self.nodes
                                         else {"preexec_fn": term_with_parent()}))
        # Node processes get SIGTERM when the launcher dies (their elastic agents then stop
        # their workers); the store a SIGKILL.
        preexec = die_with_parent if host == self.nodes else term_with_parent()
        return subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                preexec_fn=preexec)

    def _start_node(self, i: int) -> None:
        threads = max(1, (os.cpu_count() or 1) // (self.nodes * self.nproc))
        env = {"ZENTRAIN_RUN_DIR": str(self.run_dir), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
               "PYTHONUNBUFFERED": "1",
               # The node index, also without agents: workers record it in pids/rank{R}.json,
               # where `zentrain chaos --kill node` finds a node's workers.
               "ZENTRAIN_CKPT_NODE": str(i), **(self.agents.env(i) if self.agents else {})}
        argv = [sys.executable, "-m", "zentrain.nodes", "node", "--node", str(i),
                "--nodes", str(self.nodes), "--nproc", str(self.nproc),
                "--endpoint", f"{self.hosts[self.nodes]}:{self.store_port}", "--job", self.job,
                "--max-restarts", str(self.cfg.checkpoint.max_restarts),
                "--local-addr", self.hosts[i], "--run-dir", str(self.run_dir),
                "--", *self.train_args]
        self.procs[i] = self._popen(i, argv, env)

    def _write_pids(self) -> None:
        info = {"job": self.job, "nodes": [{"node": i, "pid": p.pid if p else None,
                                            "addr": self.hosts[i]}
                                           for i, p in enumerate(self.procs)]}
        tmp = self.run_dir / "nodes.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        tmp.rename(self.run_dir / "nodes.json")

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.store = self._popen(self.nodes, [
                sys.executable, "-m", "zentrain.nodes", "store", "--host",
                self.hosts[self.nodes], "--port", str(self.store_port)], {})
            if self.agents is not None:
                self.agents.start_all()
            for i in range(self.nodes):
                self._start_node(i)
            self._write_pids()
            return self._supervise()
        finally:
            self._shutdown()

    def _supervise(self) -> int:
        replaced = 0
        while True:
            codes = [p.poll() if p else None for p in self.procs]
            if all(c == 0 for c in codes):
                return 0
            if self.store is not None and self.store.poll() is not None:
                log("the rendezvous store exited; stopping")
                return 1
            for i, c in enumerate(codes):
                if c is None or c == 0:
                    continue
                if c < 0 and replaced < self.cfg.checkpoint.max_restarts:
                    replaced += 1
                    log(f"node {i} lost ({signal.Signals(-c).name}); starting a replacement "
                        f"({replaced}/{self.cfg.checkpoint.max_restarts})")
                    if self.agents is not None:
                        self.agents.replace(i)
                    self._start_node(i)
                    self._write_pids()
                    continue
                log(f"node {i} failed with exit code {c}; stopping the other nodes")
                return c if c > 0 else 1
            time.sleep(0.1)

    def _shutdown(self) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 15
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.store is not None:
            self.store.kill()
            self.store.wait()
        if self.agents is not None:
            self.agents.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the processes this module runs -------------------------------------------------------------

def _node_main(a: argparse.Namespace) -> int:
    """One emulated node's elastic agent (torchrun's ``elastic_launch``)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from zentrain import launch

    record_elastic_events(Path(a.run_dir) / f"elastic-node{a.node}.jsonl", a.node)
    zygote = Zygote.start(f"{a.job}-node{a.node}")  # in this node's namespace
    worker_args = ["-u", "-m", "zentrain.train", *a.train_args]
    if zygote is not None and zygote.wait_ready():
        worker_args = zygote.worker_args(a.train_args)
    lc = LaunchConfig(
        min_nodes=a.nodes, max_nodes=a.nodes, nproc_per_node=a.nproc, run_id=a.job,
        rdzv_backend="c10d", rdzv_endpoint=a.endpoint, max_restarts=a.max_restarts,
        # The store lives in its own process: no node hosts it, so any node can be lost.
        rdzv_configs={"is_host": False, "timeout": 300, "keep_alive_interval": 1,
                      "keep_alive_max_attempt": 5},
        monitor_interval=0.1, start_method="spawn", local_addr=a.local_addr)
    try:
        with launch.no_restart_on_fatal():  # exit codes 2/3 (user error, non-finite loss)
            elastic_launch(lc, sys.executable)(*worker_args)
    except ChildFailedError as e:
        codes = {f.local_rank: f.exitcode for f in e.failures.values()}
        first = min(codes)
        log(f"node {a.node}: worker {first} failed with exit code {codes[first]}")
        return codes[first] if codes[first] > 0 else 1
    finally:
        if zygote is not None:
            zygote.stop()
    return 0


def _store_main(a: argparse.Namespace) -> int:
    """The rendezvous store: a TCPStore server until SIGTERM/SIGKILL or the parent exits."""
    from torch.distributed import TCPStore

    store = TCPStore(a.host, a.port, is_master=True, wait_for_workers=False)
    parent = os.getppid()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.wait(0.5) and os.getppid() == parent:
        pass
    del store
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zentrain.nodes",
                                description="Processes of an emulated multi-node run.")
    sub = p.add_subparsers(dest="what", required=True)
    n = sub.add_parser("node", help="one node's elastic agent")
    n.add_argument("--node", type=int, required=True)
    n.add_argument("--nodes", type=int, required=True)
    n.add_argument("--nproc", type=int, required=True)
    n.add_argument("--endpoint", required=True)
    n.add_argument("--job", required=True)
    n.add_argument("--max-restarts", type=int, default=3)
    n.add_argument("--local-addr", required=True)
    n.add_argument("--run-dir", required=True)
    n.add_argument("train_args", nargs=argparse.REMAINDER)
    s = sub.add_parser("store", help="the rendezvous store")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, required=True)
    a = p.parse_args(argv)
    if a.what == "store":
        return _store_main(a)
    if a.train_args and a.train_args[0] == "--":
        a.train_args = a.train_args[1:]
    return _node_main(a)


if __name__ == "__main__":
    sys.exit(main())
