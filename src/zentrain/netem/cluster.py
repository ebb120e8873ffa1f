"""``EmulatedCluster``: N hosts on one machine, each in its own network namespace.

Topology (one switch, one full-duplex link per host)::

    host ns "zt<id>-p<pid>-h0"                     switch ns "zt<id>-p<pid>-sw"
      lo, zt<id>h0 10.213.X.1/24  <== veth ==>  zt<id>s0 --+
      tbf: host's send rate                    tbf: host's  |  bridge zt<id>br
                                               receive rate |
    host ns "...-h1" zt<id>h1 10.213.X.2/24  <== veth ==>  zt<id>s1 --+

A real full-duplex NIC caps each direction on its own, so every link is shaped twice: on the
host's veth egress (what the host sends) and on the switch port's egress toward the host (what
it receives). The switch itself is unshaped, like a non-blocking switch. The bridge lives in
its own namespace, so the root namespace never sees any of our interfaces or addresses, and
the third octet X is allocated per cluster so concurrent clusters never share a subnet.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

from zentrain.netem import system
from zentrain.netem.system import LatencyUnavailable, NetemError, run_cmd
from zentrain.netem.units import format_rate, parse_duration, parse_rate

# tbf needs a bucket of at least one packet; veth hands it GSO packets of up to 64 KiB, which
# tbf would otherwise re-segment. 1 ms of line rate above that keeps the timer cheap at 10gbit.
_MIN_BURST = 64 * 1024 + 4 * 1514
_QUEUE_LATENCY = "50ms"  # tbf queue bound: deep enough that TCP, not drops, sets the pace
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class EmulatedCluster:
    """A context manager that builds N emulated hosts and removes them on exit.

    Args:
        n_hosts: number of hosts (namespaces), 1..253.
        rate: each host's link rate per direction, e.g. "1gbit", "100mbit"; None or "none"
            leaves links unshaped (veth speed, several Gbit/s).
        latency: one-way delay added to each host's sends, e.g. "0.2ms" (RTT = 2x); needs the
            netem qdisc, and raises :class:`LatencyUnavailable` where the kernel lacks it.

    The cluster is removed on ``__exit__`` (also on exceptions), on SIGINT/SIGTERM/SIGHUP
    (handlers clean up, then hand the signal on to the previous handler or the default action)
    and at interpreter exit. Pieces left by a SIGKILLed owner are swept when the next cluster
    starts (or by :func:`zentrain.netem.sweep_stale`).
    """

    def __init__(self, n_hosts: int, rate: str | int | None = "1gbit",
                 latency: str | float | None = None) -> None:
        if not isinstance(n_hosts, int) or not 1 <= n_hosts <= 253:
            raise ValueError(f"n_hosts must be an int in 1..253, got {n_hosts!r}")
        self.n_hosts = n_hosts
        self.rate = parse_rate(rate)
        self.latency = parse_duration(latency)
        self.run_id = system.new_run_id()
        self.owner_pid = os.getpid()
        self.octet: int | None = None
        self._state = "new"  # new -> open -> closed

    # -- names and addresses -------------------------------------------------------------
    @property
    def switch_ns(self) -> str:
        return system.ns_name(self.run_id, self.owner_pid, "sw")

    def host_ns(self, i: int) -> str:
        return system.ns_name(self.run_id, self.owner_pid, f"h{self._host(i)}")

    def ifname(self, i: int) -> str:
        """Host i's interface name inside its namespace (<= 15 chars, the Linux limit)."""
        return f"zt{self.run_id}h{self._host(i)}"

    def addr(self, i: int) -> str:
        """Host i's IPv4 address, 10.213.X.(i+1)."""
        if self.octet is None:
            raise RuntimeError("the cluster is not open: use `with EmulatedCluster(...)`")
        return f"10.213.{self.octet}.{self._host(i) + 1}"

    def env_for(self, i: int) -> dict[str, str]:
        """Variables a process on host i needs: gloo's interface and the rendezvous address."""
        return {"GLOO_SOCKET_IFNAME": self.ifname(i), "TP_SOCKET_IFNAME": self.ifname(i),
                "MASTER_ADDR": self.addr(0)}

    def _host(self, i: int) -> int:
        if not isinstance(i, int) or not 0 <= i < self.n_hosts:
            raise IndexError(f"host index {i!r} out of range for {self.n_hosts} hosts")
        return i

    def __repr__(self) -> str:
        return (f"EmulatedCluster(n_hosts={self.n_hosts}, rate={format_rate(self.rate)!r}, "
                f"run_id={self.run_id!r}, state={self._state!r})")

    # -- running commands inside hosts ---------------------------------------------------
    def wrap_argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs inside host i's namespace."""
        return ["ip", "netns", "exec", self.host_ns(i), *argv]

    def popen(self, i: int, argv: Sequence[str], env: Mapping[str, str] | None = None, *,
              die_with_parent: bool = True, **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` on host i; ``env`` is added to os.environ and :meth:`env_for`.

        With ``die_with_parent`` the process gets SIGKILL when the calling thread exits, so a
        killed controller never leaves workers behind. Other kwargs go to ``Popen``.
        """
        if self._state != "open":
            raise RuntimeError(f"{self!r} is not open")
        full_env = {**os.environ, **self.env_for(i), **(env or {})}
        if die_with_parent and "preexec_fn" not in kwargs:
            kwargs["preexec_fn"] = _die_with_parent
        return subprocess.Popen(self.wrap_argv(i, argv), env=full_env, **kwargs)

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> EmulatedCluster:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> EmulatedCluster:
        """Sweep stale clusters, then build this one; on any failure remove what was built."""
        if self._state != "new":
            raise RuntimeError(f"{self!r} can be opened once")
        system.require_available()
        if self.latency is not None and not system.netem_available():
            raise LatencyUnavailable(
                f"latency={self.latency * 1e3:g}ms needs the netem qdisc, which is not available "
                f"in this kernel; only rate limiting works here (pass latency=None)")
        with system.locked_registry():
            system.sweep_stale_locked()
            used = {s.get("octet") for s in system.read_states()}
            free = [x for x in range(1, 255) if x not in used]
            if not free:
                raise NetemError("all 254 subnets 10.213.X.0/24 are held by live clusters")
            self.octet = free[0]
            system.write_state({
                "run_id": self.run_id, "pid": self.owner_pid, "octet": self.octet,
                "start": system.process_start_time(self.owner_pid),
                "namespaces": [self.switch_ns] + [self.host_ns(i) for i in range(self.n_hosts)],
            })
        self._state = "open"
        _register(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        sw, bridge = self.switch_ns, f"zt{self.run_id}br"
        run_cmd(["ip", "netns", "add", sw])
        run_cmd(["ip", "-n", sw, "link", "set", "lo", "up"])
        run_cmd(["ip", "-n", sw, "link", "add", bridge, "type", "bridge"])
        run_cmd(["ip", "-n", sw, "link", "set", bridge, "up"])
        for i in range(self.n_hosts):
            ns, dev, port = self.host_ns(i), self.ifname(i), f"zt{self.run_id}s{i}"
            run_cmd(["ip", "netns", "add", ns])
            system.write_etc_hosts(ns, self._hosts_file(i))
            run_cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            # Created directly inside the two namespaces: the root namespace never holds them.
            run_cmd(["ip", "link", "add", dev, "netns", ns, "type", "veth",
                     "peer", "name", port, "netns", sw])
            run_cmd(["ip", "-n", sw, "link", "set", port, "master", bridge])
            run_cmd(["ip", "-n", sw, "link", "set", port, "up"])
            run_cmd(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", dev])
            run_cmd(["ip", "-n", ns, "link", "set", dev, "up"])
            self._shape(ns, dev, delay=True)
            self._shape(sw, port, delay=False)

    def _hosts_file(self, i: int) -> str:
        """Host i's /etc/hosts: every host by interface name, and this machine's hostname as
        host i itself, so reverse lookups (c10d logs one per connection) answer at once."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost",
                 f"{self.addr(i)} {socket.gethostname()}"]
        for j in range(self.n_hosts):  # the v4-mapped form is what a dual-stack server sees
            lines += [f"{self.addr(j)} {self.ifname(j)}", f"::ffff:{self.addr(j)} {self.ifname(j)}"]
        return "\n".join(lines) + "\n"

    def _shape(self, ns: str, dev: str, delay: bool) -> None:
        parent = ["root"]
        if delay and self.latency is not None:
            # netem at the root, the rate limiter as its child (the usual netem + tbf stack).
            in_flight = int((self.rate or 10**10) * self.latency / (8 * 1500)) * 2
            run_cmd(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:",
                     "netem", "delay", f"{self.latency * 1e6:.0f}us",
                     "limit", str(max(1000, in_flight))])
            parent = ["parent", "1:1", "handle", "10:"]
        if self.rate is not None:
            burst = max(_MIN_BURST, self.rate // 8 // 1000)
            run_cmd(["tc", "-n", ns, "qdisc", "add", "dev", dev, *parent, "tbf",
                     "rate", f"{self.rate}bit", "burst", str(burst), "latency", _QUEUE_LATENCY])

    def close(self) -> None:
        """Remove every namespace (killing what still runs in them) and the state file.

        Idempotent; does nothing in a forked child, which does not own the cluster.
        """
        if self._state != "open" or os.getpid() != self.owner_pid:
            return
        self._state = "closed"
        main = threading.current_thread() is threading.main_thread()
        if main:  # a second Ctrl-C must not cut the cleanup short
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED_SIGNALS)
        try:
            for name in [self.host_ns(i) for i in range(self.n_hosts)] + [self.switch_ns]:
                system.delete_namespace(name)
            system.remove_state(self.run_id)
        finally:
            _unregister(self)
            if main:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


# -- process-wide cleanup: signals and atexit -------------------------------------------------
_LIVE: list[EmulatedCluster] = []
_PREVIOUS: dict[int, Any] = {}
_LOCK = threading.RLock()
_ATEXIT_REGISTERED = False


def _close_all() -> None:
    for cluster in list(_LIVE):
        cluster.close()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    previous = _PREVIOUS.get(signum, signal.SIG_DFL)
    _close_all()  # also restores the previous handlers
    if callable(previous):
        previous(signum, frame)  # e.g. default_int_handler raises KeyboardInterrupt
    else:  # SIG_DFL, or None for a handler installed outside Python: die by the signal
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _register(cluster: EmulatedCluster) -> None:
    global _ATEXIT_REGISTERED
    with _LOCK:
        if not _ATEXIT_REGISTERED:
            atexit.register(_close_all)
            _ATEXIT_REGISTERED = True
        if not _LIVE and threading.current_thread() is threading.main_thread():
            for sig in _HANDLED_SIGNALS:
                if signal.getsignal(sig) != signal.SIG_IGN:  # nohup'd: keep ignoring it
                    _PREVIOUS[sig] = signal.signal(sig, _on_signal)
        _LIVE.append(cluster)


def _unregister(cluster: EmulatedCluster) -> None:
    with _LOCK:
        if cluster in _LIVE:
            _LIVE.remove(cluster)
        if not _LIVE and _PREVIOUS and threading.current_thread() is threading.main_thread():
            for sig, previous in _PREVIOUS.items():
                if signal.getsignal(sig) is _on_signal:
                    signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            _PREVIOUS.clear()


_PR_SET_PDEATHSIG = 1
_LIBC: Any = None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: ask for SIGKILL when the parent dies."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


try:  # resolved here, not in the forked child
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - no libc symbols (not Linux)
    _LIBC = None
