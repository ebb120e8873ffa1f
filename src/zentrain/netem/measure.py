"""Measure what an emulated link really carries: a TCP sender and receiver in two hosts."""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time

from zentrain.netem.cluster import EmulatedCluster

# Receiver: listen on the host's address (port chosen by the kernel, printed first), then time
# from accept to the last byte. Socket timeouts bound it even if the sender never shows up.
_RECEIVER = """
import json, socket, sys, time
addr, nbytes, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
srv = socket.create_server((addr, 0))
srv.settimeout(timeout)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(timeout)
t0 = time.perf_counter()
buf, got = bytearray(1 << 20), 0
while got < nbytes:
    n = conn.recv_into(buf)
    if not n:
        break
    got += n
print(json.dumps({"bytes": got, "seconds": time.perf_counter() - t0}), flush=True)
"""

_SENDER = """
import socket, sys
addr, port, nbytes, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sock = socket.create_connection((addr, port), timeout=timeout)
chunk = memoryview(bytes(1 << 20))
left = nbytes
while left > 0:
    n = min(left, len(chunk))
    sock.sendall(chunk[:n])
    left -= n
sock.close()
"""

MAX_BYTES = 1 << 32


def measure_throughput(cluster: EmulatedCluster, src: int, dst: int, nbytes: int,
                       timeout: float | None = None) -> float:
    """Send ``nbytes`` over TCP from host ``src`` to host ``dst``; return goodput in bit/s.

    Goodput counts payload only, so a shaped link shows ~95% of its rate (TCP/IP and Ethernet
    headers take the rest at MTU 1500). ``timeout`` (default: 3x the time the configured rate
    needs, plus 10 s) bounds the whole measurement; both processes are killed when it ends.
    """
    if src == dst:
        raise ValueError(f"src and dst must differ (both {src}): a host's own traffic stays on lo")
    if not 0 < nbytes <= MAX_BYTES:
        raise ValueError(f"nbytes must lie in 1..{MAX_BYTES}, got {nbytes}")
    if timeout is None:
        timeout = 10.0 + (3 * nbytes * 8 / cluster.rate if cluster.rate else 10.0)
    deadline = time.monotonic() + timeout
    addr = cluster.addr(dst)
    py = sys.executable
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                 text=True)
    receiver = cluster.popen(dst, [py, "-c", _RECEIVER, addr, str(nbytes), str(timeout)],
                             **pipes)
    sender = None
    try:
        port = _read_line(receiver, deadline)
        sender = cluster.popen(src, [py, "-c", _SENDER, addr, port, str(nbytes), str(timeout)],
                               **pipes)
        result = json.loads(_read_line(receiver, deadline))
        sender.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for proc in (receiver, sender):
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait()
                proc.stdout.close()
                proc.stderr.close()
    if result["bytes"] != nbytes:
        raise RuntimeError(f"receiver got {result['bytes']} of {nbytes} bytes")
    return result["bytes"] * 8 / result["seconds"]


def _read_line(proc: subprocess.Popen, deadline: float) -> str:
    """One line of ``proc``'s stdout, or a RuntimeError with its stderr at the deadline/exit."""
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        err = proc.stderr.read().strip().splitlines()
        raise RuntimeError("throughput probe " + ("failed: " + err[-1] if err else "timed out"))
    return line.strip()
