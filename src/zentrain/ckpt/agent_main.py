"""The agent process: ``python -m zentrain.ckpt.agent`` (whose ``main`` is this one), or
``run_agent`` in a process of one's own; SIGTERM/SIGINT stop it cleanly."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from typing import Any

from zentrain.ckpt.agent import Agent, AgentConfig
from zentrain.ckpt.wire import parse_addr


def run_agent(cfg: AgentConfig, listen_fd: int | None = None) -> None:
    """Run an agent in this process until SIGTERM/SIGINT (or its parent exits)."""
    if listen_fd is not None:
        listener = socket.socket(fileno=listen_fd)
    else:
        listener = socket.create_server(parse_addr(cfg.peers[cfg.node]))
    agent = Agent(cfg, listener)
    parent = os.getppid()

    def stop(*_: Any) -> None:
        agent.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if cfg.exit_with_parent:
        def watch() -> None:
            while not agent.stopping.wait(0.5):
                if os.getppid() != parent:
                    agent.stopping.set()
                    agent.log("parent exited; shutting down")
        threading.Thread(target=watch, daemon=True).start()
    agent.serve()


def parse_args(argv: list[str] | None = None) -> tuple[AgentConfig, int | None]:
    p = argparse.ArgumentParser(prog="python -m zentrain.ckpt.agent",
                                description="Per-node in-memory checkpoint agent.")
    p.add_argument("--node", type=int, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--peers", required=True, help="HOST:PORT of every node's agent, by node")
    p.add_argument("--local-world", type=int, default=1)
    p.add_argument("--m", type=int, default=2)
    p.add_argument("--job", default="job")
    p.add_argument("--shm-root", default="/dev/shm")
    p.add_argument("--keep-committed", type=int, default=1)
    p.add_argument("--max-inflight", type=int, default=2)
    p.add_argument("--forward-bytes-per-s", type=float, default=0.0)
    p.add_argument("--timeout-s", type=float, default=30.0)
    p.add_argument("--listen-fd", type=int, default=None,
                   help="an inherited listening socket (instead of binding peers[node])")
    p.add_argument("--no-exit-with-parent", action="store_true")
    a = p.parse_args(argv)
    cfg = AgentConfig(node=a.node, nodes=a.nodes, peers=a.peers.split(","),
                      local_world=a.local_world, m=a.m, job=a.job, shm_root=a.shm_root,
                      keep_committed=a.keep_committed, max_inflight=a.max_inflight,
                      forward_bytes_per_s=a.forward_bytes_per_s, timeout_s=a.timeout_s,
                      exit_with_parent=not a.no_exit_with_parent)
    return cfg, a.listen_fd


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, fd = parse_args(argv)
        run_agent(cfg, fd)
    except (ValueError, OSError) as e:
        print(f"zentrain ckpt-agent: error: {e}", file=sys.stderr)
        return 2
    return 0
