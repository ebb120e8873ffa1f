"""The checkpoint agents' wire format, shared by the agent and the workers' client.

Each message is a 4-byte big-endian length and a JSON object; ``put`` and a successful
``get`` reply are followed by the raw payload. Every socket operation has a timeout (the
caller's), so a dead peer is an error, never a hang. Plain sockets, no torch: this is
checkpoint traffic between processes of one job, not gradient traffic, and the agent
process never imports torch.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from typing import Any

MAX_MSG = 256 << 20  # a header for a huge optimizer state is still far below this


class ProtocolError(RuntimeError):
    """A peer sent something malformed, closed mid-message, or replied with an error."""


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"bad agent address {addr!r}; expected HOST:PORT")
    return host, int(port)


def connect(addr: str, timeout: float) -> socket.socket:
    s = socket.create_connection(parse_addr(addr), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def send_msg(sock: socket.socket, msg: dict[str, Any]) -> None:
    body = json.dumps(msg).encode()
    sock.sendall(struct.pack(">I", len(body)) + body)


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ProtocolError("connection closed mid-message")
        got += n


def recv_msg(sock: socket.socket) -> dict[str, Any]:
    head = bytearray(4)
    recv_exact(sock, memoryview(head))
    (n,) = struct.unpack(">I", head)
    if n > MAX_MSG:
        raise ProtocolError(f"message of {n} bytes is over the {MAX_MSG} limit")
    body = bytearray(n)
    recv_exact(sock, memoryview(body))
    msg = json.loads(body)
    if not isinstance(msg, dict):
        raise ProtocolError("message is not a JSON object")
    return msg


def request(addr: str, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request/reply without payload; raises ProtocolError on an error reply."""
    with connect(addr, timeout) as s:
        send_msg(s, msg)
        reply = recv_msg(s)
    if not reply.get("ok"):
        raise ProtocolError(reply.get("error", "agent replied without ok"))
    return reply


class Throttle:
    """Keep a byte stream under ``rate`` bytes/s (0: no limit); shared across threads."""

    def __init__(self, rate: float, stop: threading.Event | None = None) -> None:
        self.rate, self.lock, self.next_t = rate, threading.Lock(), 0.0
        self.stop = stop or threading.Event()

    def __call__(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        with self.lock:
            now = time.monotonic()
            self.next_t = max(self.next_t, now) + nbytes / self.rate
            delay = self.next_t - now
        if delay > 0:
            self.stop.wait(delay)
