"""The host side of the emulator: running ``ip``/``tc``, probing, the registry, the sweep.

Every namespace we create is named ``zt<run id>-p<owner pid>-<role>`` (role ``sw``, ``h<i>``
or ``probe``), and every cluster writes a state file under :data:`STATE_DIR` *before* it
creates anything. A cluster whose owner died without cleaning up (SIGKILL, power loss of the
process) is therefore recognisable from either record, and :func:`sweep_stale` removes it:
only namespaces that match our pattern exactly and whose owner is provably gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STATE_DIR = Path(os.environ.get("ZENTRAIN_NETEM_STATE_DIR", "/run/zentrain-netem"))
ETC_NETNS = Path("/etc/netns")  # `ip netns exec NAME` bind-mounts /etc/netns/NAME/* over /etc
NS_PATTERN = re.compile(r"^zt([0-9a-f]{6})-p([0-9]+)-(sw|h[0-9]+|probe)$")
LOOPBACK_HINT = "; to run without emulation pass --bandwidth none (plain loopback)"


class NetemUnavailable(RuntimeError):
    """This machine cannot build an emulated network (not root, no iproute2, no netns)."""


class LatencyUnavailable(RuntimeError):
    """A latency was asked for but the kernel has no netem qdisc."""


class NetemError(RuntimeError):
    """An ``ip``/``tc`` command failed while building or removing a cluster."""


def new_run_id() -> str:
    return secrets.token_hex(3)


def ns_name(run_id: str, pid: int, role: str) -> str:
    return f"zt{run_id}-p{pid}-{role}"


def run_cmd(argv: list[str], check: bool = True, timeout: float = 20.0) -> str:
    """Run one ``ip``/``tc`` command; on failure raise ``NetemError`` with its last error line."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        if not check:
            return ""
        raise NetemError(f"`{' '.join(argv)}` failed: {exc}") from None
    if check and proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit {proc.returncode}"]
        raise NetemError(f"`{' '.join(argv)}` failed: {lines[-1]}")
    return proc.stdout


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list`` prints "name (id: 3)")."""
    out = run_cmd(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), None if it is gone.

    Comparing it with the recorded one tells a dead owner from a reused pid.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def pid_alive(pid: int, start: int | None = None) -> bool:
    now = process_start_time(pid)
    return now is not None and (start is None or now == start)


def delete_namespace(name: str) -> None:
    """Kill whatever still runs inside ``name``, then delete it (its veth ends go with it)."""
    for pid in run_cmd(["ip", "netns", "pids", name], check=False).split():
        if pid.isdigit() and int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    run_cmd(["ip", "netns", "delete", name], check=False)
    if NS_PATTERN.match(name):
        shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
        with contextlib.suppress(OSError):
            ETC_NETNS.rmdir()  # only if empty: we may have created it


def write_etc_hosts(name: str, text: str) -> None:
    """Give namespace ``name`` its own /etc/hosts (seen by processes run with ip netns exec)."""
    for attempt in range(3):  # a concurrent delete_namespace may rmdir ETC_NETNS meanwhile
        try:
            (ETC_NETNS / name).mkdir(parents=True, exist_ok=True)
            (ETC_NETNS / name / "hosts").write_text(text)
            return
        except FileNotFoundError:
            if attempt == 2:
                raise


@contextlib.contextmanager
def locked_registry() -> Iterator[None]:
    """Hold the registry lock: sweeping and allocating subnets never interleave."""
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(STATE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_states() -> list[dict[str, Any]]:
    states = []
    for path in sorted(STATE_DIR.glob("zt*.json")):
        try:
            states.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # half-written by a killed owner: its namespaces still carry the pid
    return states


def write_state(state: dict[str, Any]) -> None:
    path = STATE_DIR / f"zt{state['run_id']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def remove_state(run_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"zt{run_id}.json").unlink()


def sweep_stale_locked() -> list[str]:
    """:func:`sweep_stale` for a caller that already holds :func:`locked_registry`."""
    removed: list[str] = []
    live_ids = set()
    namespaces = list_namespaces()
    for state in read_states():
        if pid_alive(state["pid"], state.get("start")):
            live_ids.add(state["run_id"])
            continue
        for name in namespaces:
            m = NS_PATTERN.match(name)
            if m and m.group(1) == state["run_id"]:
                delete_namespace(name)
                removed.append(name)
        remove_state(state["run_id"])
    for name in namespaces:
        m = NS_PATTERN.match(name)
        if m and name not in removed and m.group(1) not in live_ids \
                and not pid_alive(int(m.group(2))):
            delete_namespace(name)
            removed.append(name)
    return removed


def sweep_stale() -> list[str]:
    """Remove clusters left by dead owners; return the namespace names removed.

    Only namespaces named like ours whose owner (state file pid + start time, else the pid in
    the name) no longer runs are touched, so clusters of live processes are never disturbed.
    """
    if not STATE_DIR.parent.exists() or os.geteuid() != 0:
        return []
    with locked_registry():
        return sweep_stale_locked()


def _probe(extra: list[list[str]]) -> str | None:
    """Build a throwaway namespace and run ``extra`` in it; the failure reason or None."""
    name = ns_name(new_run_id(), os.getpid(), "probe")
    try:
        run_cmd(["ip", "netns", "add", name])
        run_cmd(["ip", "-n", name, "link", "set", "lo", "up"])
        for argv in extra:
            run_cmd([argv[0], "-n", name, *argv[1:]])
    except NetemError as exc:
        return str(exc)
    finally:
        delete_namespace(name)
    return None


@functools.lru_cache(maxsize=1)
def check_available() -> str | None:
    """None if this machine can build an emulated cluster, else a one-line reason.

    Needs Linux, root, ``ip`` and ``tc`` (iproute2), and kernel support for network
    namespaces, veth pairs, bridges and the tbf qdisc — all tried on a throwaway namespace.
    The reason ends with how to run without emulation. Cached; ``check_available.cache_clear()``
    re-probes.
    """
    if not sys.platform.startswith("linux"):
        return f"network emulation needs Linux network namespaces ({sys.platform}){LOOPBACK_HINT}"
    if os.geteuid() != 0:
        return f"network emulation needs root (running as uid {os.geteuid()}){LOOPBACK_HINT}"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found (apt-get install iproute2){LOOPBACK_HINT}"
    reason = _probe([
        ["ip", "link", "add", "ztprobev0", "type", "veth", "peer", "name", "ztprobev1"],
        ["ip", "link", "add", "ztprobebr", "type", "bridge"],
        ["tc", "qdisc", "add", "dev", "ztprobev0", "root", "tbf", "rate", "1mbit",
         "burst", "32kb", "latency", "50ms"],
    ])
    return None if reason is None else f"cannot build an emulated network: {reason}{LOOPBACK_HINT}"


def require_available() -> None:
    """Raise :class:`NetemUnavailable` with :func:`check_available`'s reason, if any."""
    reason = check_available()
    if reason is not None:
        raise NetemUnavailable(reason)


@functools.lru_cache(maxsize=1)
def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (delay emulation); probed once."""
    return _probe([["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"]]) is None
