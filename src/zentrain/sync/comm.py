"""Byte-counted wrappers around torch.distributed collectives.

Every gradient-sync scheme talks to the network only through these functions, so each
scheme's byte counter measures the same thing: the bytes this rank puts on the wire
(``sent``) and takes off it (``recv``) for the algorithm torch runs underneath.

Accounting model (per rank, payload bytes only, no headers):
- all_reduce: ring reduce-scatter + all-gather, 2(n-1)/n of the buffer each way;
- all_gather: ring, (n-1) times the local input each way;
- all_to_all_single: what leaves for / arrives from other ranks (self-chunk is free);
- broadcast: the root sends the buffer to each of n-1 peers (flat), others receive once.
These are the standard cost models of the algorithms gloo and NCCL use (see
``../shared/papers/systems.md`` §7); the benchmark prints them beside measured time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ByteCounter:
    """Bytes this rank sent and received for gradient sync, cumulative and per step."""

    sent: int = 0
    recv: int = 0

    def add(self, sent: int | float, recv: int | float) -> None:
        self.sent += int(sent)
        self.recv += int(recv)

    def snapshot(self) -> tuple[int, int]:
        return self.sent, self.recv


# torch 2.13 renamed all_gather_into_tensor to all_gather_single and warns on the old name;
# older torch (2.11 on the GPU machine, docs/gpu.md) has only the old one.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def world(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def all_reduce(
    t: torch.Tensor,
    counter: ByteCounter,
    group: dist.ProcessGroup | None = None,
    async_op: bool = False,
):
    """SUM all-reduce in place; counted as a ring all-reduce."""
    n = world(group)
    if n == 1:
        return None
    share = 2 * (n - 1) * nbytes(t) / n
    counter.add(share, share)
    return dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=async_op)


def all_gather(
    out: torch.Tensor, inp: torch.Tensor, counter: ByteCounter,
    group: dist.ProcessGroup | None = None,
) -> None:
    """``out`` is n stacked copies of ``inp``'s shape, rank order."""
    n = world(group)
    if n == 1:
        out.copy_(inp.reshape(out.shape))
        return
    b = nbytes(inp) * (n - 1)
    counter.add(b, b)
    all_gather_single(out, inp.contiguous(), group=group)


def all_to_all(
    out: torch.Tensor,
    inp: torch.Tensor,
    out_splits: list[int],
    in_splits: list[int],
    counter: ByteCounter,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Uneven all-to-all along dim 0 (gloo and NCCL both support uneven splits here)."""
    n = world(group)
    me = rank(group)
    if n == 1:
        out.copy_(inp)
        return
    row = math.prod(inp.shape[1:]) * inp.element_size()  # safe for an empty input
    counter.add(
        row * (sum(in_splits) - in_splits[me]), row * (sum(out_splits) - out_splits[me])
    )
    dist.all_to_all_single(
        out, inp.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits,
        group=group,
    )


def broadcast(
    t: torch.Tensor, src: int, counter: ByteCounter, group: dist.ProcessGroup | None = None
) -> None:
    """Broadcast from group rank ``src``."""
    n = world(group)
    if n == 1:
        return
    if rank(group) == src:
        counter.add(nbytes(t) * (n - 1), 0)
    else:
        counter.add(0, nbytes(t))
    dist.broadcast(t, src=dist.get_global_rank(group, src) if group else src, group=group)


def _staged(t: torch.Tensor, group: dist.ProcessGroup | None) -> bool:
    """Whether ``t`` must go through host memory for point-to-point on ``group``.

    gloo's send/recv hand ``t.data_ptr()`` to the transport as a host address (unlike its
    collectives, it has no CUDA path), so a CUDA tensor would be read or written at a
    device address. NCCL moves device memory itself; CPU tensors need nothing.
    """
    return t.device.type != "cpu" and dist.get_backend(group) == "gloo"


def _peer(group: dist.ProcessGroup | None, r: int) -> int:
    return dist.get_global_rank(group, r) if group else r


def send(t: torch.Tensor, dst: int, counter: ByteCounter,
         group: dist.ProcessGroup | None = None) -> None:
    counter.add(nbytes(t), 0)
    wire = t.cpu() if _staged(t, group) else t.contiguous()
    dist.send(wire, dst=_peer(group, dst), group=group)


def recv(t: torch.Tensor, src: int, counter: ByteCounter,
         group: dist.ProcessGroup | None = None) -> None:
    counter.add(0, nbytes(t))
    if _staged(t, group):
        host = torch.empty(t.shape, dtype=t.dtype)
        dist.recv(host, src=_peer(group, src), group=group)
        t.copy_(host)
    else:
        dist.recv(t, src=_peer(group, src), group=group)


def exchange(
    send_t: torch.Tensor, recv_t: torch.Tensor, peer: int, counter: ByteCounter,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Simultaneous send/recv with one peer (pairwise exchange, deadlock-free)."""
    counter.add(nbytes(send_t), nbytes(recv_t))
    g = _peer(group, peer)
    staged = _staged(recv_t, group) or _staged(send_t, group)
    out = send_t.cpu() if staged else send_t.contiguous()
    into = torch.empty(recv_t.shape, dtype=recv_t.dtype) if staged else recv_t
    ops = [dist.P2POp(dist.isend, out, g, group), dist.P2POp(dist.irecv, into, g, group)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    if staged:
        recv_t.copy_(into)


def comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where small control tensors must live for ``group``'s backend (NCCL: the current
    CUDA device, it moves nothing else; gloo: host memory)."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


DTYPE_CODES = {
    torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3,
    torch.int64: 4, torch.int32: 5,
}


def gather_ints(values: list[int], counter: ByteCounter,
                group: dist.ProcessGroup | None = None) -> list[list[int]]:
    """All-gather a short list of ints from every rank (control data: sizes, counts)."""
    n = world(group)
    if n == 1:
        return [list(values)]
    dev = comm_device(group)
    mine = torch.tensor(values, dtype=torch.int64, device=dev)
    allv = torch.empty(n * len(values), dtype=torch.int64, device=dev)
    all_gather(allv, mine, counter, group)
    return allv.view(n, len(values)).tolist()
