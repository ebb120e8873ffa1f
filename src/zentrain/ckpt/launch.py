"""Starting checkpoint agents: as processes of their own, per node or all on this host.

An agent must outlive the workers whose checkpoints it holds, so it runs in its own process
(``python -m zentrain.ckpt.agent``, or ``start_agent`` here), started through a stub that
loads the launcher's own copy of the package, and told to exit with whoever started it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zentrain.ckpt.agent_config import AgentConfig
from zentrain.ckpt.wire import ProtocolError, request

# The agent handles only bytes and never imports torch (3+ s of CPU and ~300 MB per
# process; ``zentrain/__init__`` is lazy). The stub registers the package at this file's
# location, so the agent runs the launcher's copy of the code whatever sys.path says.
_BOOT = ("import sys, types; p = types.ModuleType('zentrain'); p.__path__ = [sys.argv.pop(1)]; "
         "sys.modules['zentrain'] = p; from zentrain.ckpt.agent import main; sys.exit(main())")


@dataclass
class AgentHandle:
    """A running agent process, as returned by ``start_agent``."""

    cfg: AgentConfig
    proc: subprocess.Popen[bytes]

    @property
    def addr(self) -> str:
        return self.cfg.peers[self.cfg.node]

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return request(self.addr, {"op": "ping"}, timeout=min(5.0, timeout))
            except (OSError, ProtocolError) as e:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"checkpoint agent {self.cfg.node} did not start "
                                       f"(exit code {self.proc.poll()}): {e}") from None
                time.sleep(0.05)

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        return request(self.addr, {"op": "status", "job": self.cfg.job}, timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code; removes the directory."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.cfg.dir, ignore_errors=True)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (a lost node); its tmpfs directory is removed like the node's RAM would be."""
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.cfg.dir, ignore_errors=True)


def agent_argv(cfg: AgentConfig, listen_fd: int | None = None) -> list[str]:
    """The command line that runs an agent for ``cfg`` (through the torch-free stub)."""
    pkg = str(Path(__file__).resolve().parents[1])
    args = [sys.executable, "-c", _BOOT, pkg, "--node", str(cfg.node), "--nodes",
            str(cfg.nodes), "--peers", ",".join(cfg.peers), "--local-world",
            str(cfg.local_world), "--m", str(cfg.m), "--job", cfg.job, "--shm-root",
            cfg.shm_root, "--keep-committed", str(cfg.keep_committed), "--max-inflight",
            str(cfg.max_inflight), "--forward-bytes-per-s", str(cfg.forward_bytes_per_s),
            "--timeout-s", str(cfg.timeout_s)]
    if not cfg.exit_with_parent:
        args.append("--no-exit-with-parent")
    if listen_fd is not None:
        args += ["--listen-fd", str(listen_fd)]
    return args


def start_agent(cfg: AgentConfig, listener: socket.socket | None = None) -> AgentHandle:
    """Start an agent process. With ``listener`` (a bound, listening socket) the child
    inherits it, so no port is ever released and re-bound (no free-port race)."""
    fd = listener.fileno() if listener is not None else None
    proc = subprocess.Popen(agent_argv(cfg, fd), pass_fds=() if fd is None else (fd,),
                            stdin=subprocess.DEVNULL,
                            preexec_fn=term_with_parent() if cfg.exit_with_parent else None)
    return AgentHandle(cfg, proc)


_LIBC: Any = None
try:  # resolved here, not in a forked child
    import ctypes

    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    pass


def term_with_parent() -> Any:
    """A ``preexec_fn``: the child gets SIGTERM (a clean shutdown, directory removed) when
    the process starting it dies — even if that happens before the child could look."""
    parent = os.getpid()

    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before the prctl
            os._exit(1)
    return preexec


def start_local_agents(nodes: int, local_world: int = 1, m: int = 2, job: str = "job",
                       host: str = "127.0.0.1", **kw: Any) -> list[AgentHandle]:
    """N agents on this host (one per emulated node) on ports chosen by the kernel."""
    listeners = [socket.create_server((host, 0)) for _ in range(nodes)]
    peers = [f"{host}:{s.getsockname()[1]}" for s in listeners]
    handles: list[AgentHandle] = []
    try:
        for i, ls in enumerate(listeners):
            cfg = AgentConfig(node=i, nodes=nodes, peers=peers, local_world=local_world, m=m,
                              job=job, **kw)
            handles.append(start_agent(cfg, ls))
        for h in handles:
            h.wait_ready()
    except BaseException:
        for h in handles:
            h.stop()
        raise
    finally:
        for ls in listeners:
            ls.close()
    return handles
