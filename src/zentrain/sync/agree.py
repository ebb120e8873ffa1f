"""Every rank holds the same model: checked once, before any payload collective.

The payload collectives assume identical parameters on every rank: the dense buckets are
cut from the parameter list, ``_broadcast_state`` copies rank 0's tensors into the
others', DDP sizes its buckets the same way. A model that differs between ranks (an
embedding table sized from a rank-local vocabulary, a layer built in another dtype, an
extra module) makes those collectives disagree on sizes: gloo aborts one rank on its
size check and leaves the other waiting forever, or a broadcast "succeeds" into a
differently sized table. ``check_same_model`` turns that into one clear ``ValueError``
raised on every rank.

Cost: one all-gather of a fixed-size fingerprint (a digest of every parameter's and
buffer's name, shape, dtype and ``requires_grad``, in registration order, plus their
count): 24 bytes per rank, whatever the model. Only when the fingerprints differ do the
ranks exchange their full descriptions (padded to the longest), so that every rank can
name the first difference in the same words.
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist
from torch import nn

from zentrain.sync import comm


def describe_model(module: nn.Module) -> list[list[str]]:
    """``[kind, name, spec]`` per parameter and buffer, in registration order."""
    out = []
    for name, p in module.named_parameters():
        spec = _spec(p) + ("" if p.requires_grad else " (frozen)")
        out.append(["parameter", name, spec])
    for name, b in module.named_buffers():
        out.append(["buffer", name, _spec(b)])
    return out


def _spec(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def _fingerprint(entries: list[list[str]]) -> list[int]:
    digest = hashlib.sha256(json.dumps(entries).encode()).digest()
    return [int.from_bytes(digest[:8], "little", signed=True),
            int.from_bytes(digest[8:16], "little", signed=True), len(entries)]


def check_same_model(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless all ranks' models
    have the same parameters and buffers (names, order, shapes, dtypes, requires_grad).

    Collective: every rank of ``group`` must call it. Free with one rank. The traffic is
    setup, not gradient sync, so it is not counted in any ``ByteCounter``.
    """
    n = comm.world(group)
    if n == 1:
        return
    entries = describe_model(module)
    fps = comm.gather_ints(_fingerprint(entries), comm.ByteCounter(), group)
    if all(f == fps[0] for f in fps):
        return
    # Rare path: exchange the descriptions so every rank words the same error.
    blob = json.dumps(entries).encode()
    sizes = [s[0] for s in comm.gather_ints([len(blob)], comm.ByteCounter(), group)]
    dev = comm.comm_device(group)
    mine = torch.zeros(max(sizes), dtype=torch.uint8)
    mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    allb = torch.empty(n * max(sizes), dtype=torch.uint8, device=dev)
    comm.all_gather(allb, mine.to(dev), comm.ByteCounter(), group)
    rows = allb.view(n, -1).cpu()
    models = [json.loads(bytes(rows[r, : sizes[r]].tolist()).decode()) for r in range(n)]
    raise ValueError(f"the model differs across ranks: {first_difference(models)}; every "
                     "rank must build the same model (parameter and buffer names, order, "
                     "shapes, dtypes, requires_grad)")


def first_difference(models: list[list[list[str]]]) -> str:
    """The first difference between rank 0's description and another rank's, in words."""
    ref = models[0]
    for r, other in enumerate(models[1:], start=1):
        if other == ref:
            continue
        mine = {(k, name): spec for k, name, spec in ref}
        theirs = {(k, name): spec for k, name, spec in other}
        for k, name, spec in ref:
            if (k, name) not in theirs:
                return f"{k} {name!r} ({spec}) exists on rank 0 but not on rank {r}"
            if theirs[(k, name)] != spec:
                return (f"{k} {name!r} is {spec} on rank 0 but {theirs[(k, name)]} "
                        f"on rank {r}")
        for k, name, spec in other:
            if (k, name) not in mine:
                return f"{k} {name!r} ({spec}) exists on rank {r} but not on rank 0"
        for pos, (a, b) in enumerate(zip(ref, other)):
            if a != b:
                return (f"the order differs: entry {pos} is {a[0]} {a[1]!r} on rank 0 but "
                        f"{b[0]} {b[1]!r} on rank {r}")
    return "the descriptions hash differently but read the same"  # pragma: no cover
