"""serialize: exact round trips of real state dicts, corruption always detected, no pickle."""

import json
import math
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from zentrain.ckpt import serialize
from zentrain.ckpt.serialize import CorruptCheckpoint


def same(a, b):
    """Bitwise equality of nested states (types, dtypes, shapes, bytes, float bits)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and a.contiguous().view(-1).view(torch.uint8).tolist()
                == b.contiguous().view(-1).view(torch.uint8).tolist())
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float):
        return type(b) is float and struct.pack("<d", a) == struct.pack("<d", b)
    return type(a) is type(b) and a == b


def model_and_optim_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.LayerNorm(16),
                          nn.Linear(16, 50))
    model[3].weight = model[0].weight  # tied weights: stored once, restored as one tensor
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
    for _ in range(2):
        model(torch.randint(0, 50, (4, 3))).sum().backward()
        opt.step()
    return {"model": dict(model.state_dict()), "optim": opt.state_dict(),
            "rng": torch.get_rng_state(), "step": 2, "loader": {"epoch": 0, "offset": 8},
            "misc": (None, "name", -0.0, math.inf, 1e-300, True),
            "bf16": torch.randn(3, 5).bfloat16().t(),  # non-contiguous
            "scalar": torch.tensor(7, dtype=torch.int64), "empty": torch.empty(0, 4),
            "mask": torch.tensor([True, False, True])}


def test_round_trip_is_exact():
    state = model_and_optim_state()
    out = serialize.loads(serialize.dumps(state, chunk=4096))
    assert same(state, out)
    assert out["model"]["0.weight"] is out["model"]["3.weight"]
    assert out["optim"]["param_groups"][0]["betas"] == (0.9, 0.95)
    # Tensors own their storage: set_rng_state ignores storage offsets (it read garbage
    # or crashed when handed a view into the payload).
    assert all(t.storage_offset() == 0 for t in (out["rng"], out["bf16"], out["scalar"]))
    torch.set_rng_state(out["rng"])
    # The optimizer state loads back into a fresh optimizer.
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16), nn.LayerNorm(16),
                          nn.Linear(16, 50))
    model[3].weight = model[0].weight
    model.load_state_dict(out["model"])
    torch.optim.AdamW(model.parameters()).load_state_dict(out["optim"])


def test_any_flipped_payload_byte_is_detected():
    blob = serialize.dumps(model_and_optim_state(), chunk=1024)
    (hlen,) = struct.unpack("<Q", blob[4:12])
    start = -(-(12 + hlen) // serialize.ALIGN) * serialize.ALIGN
    for pos in range(start, len(blob), max(1, (len(blob) - start) // 37)):
        bad = bytearray(blob)
        bad[pos] ^= 0x10
        with pytest.raises(CorruptCheckpoint, match="chunk .* checksum"):
            serialize.loads(bad)


def test_tampered_header_is_rejected():
    blob = serialize.dumps({"lr": 0.5, "w": torch.ones(3)})
    (hlen,) = struct.unpack("<Q", blob[4:12])
    h = json.loads(blob[12:12 + hlen])
    head = json.dumps(h).replace("0.5", "0.7").encode()  # same length: only the value changes
    tampered = blob[:4] + struct.pack("<Q", len(head)) + head + blob[12 + hlen:]
    with pytest.raises(CorruptCheckpoint, match="header checksum"):
        serialize.loads(tampered)
    with pytest.raises(CorruptCheckpoint):
        serialize.loads(blob[: len(blob) - 1])  # truncated payload
    with pytest.raises(CorruptCheckpoint):
        serialize.loads(b"PK\x03\x04" + blob[4:])  # not ours (e.g. a torch.save zip)


def test_header_cannot_name_arbitrary_types():
    flat = serialize.flatten({"w": torch.ones(2)})
    h = serialize.make_header(flat, serialize.chunk_crcs(b"", 8), 8)
    h["tensors"][0]["dtype"] = "os.system"
    h["nbytes"] = 0
    h["crcs"] = []
    h["header_crc"] = serialize._header_crc(h)
    with pytest.raises(CorruptCheckpoint, match="bad tensor spec|payload size"):
        serialize.check_header(h)


def test_loading_never_unpickles(monkeypatch):
    blob = serialize.dumps(model_and_optim_state())

    def boom(*a, **k):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    serialize.loads(blob)


def test_unsupported_leaves_name_their_path():
    with pytest.raises(TypeError, match=r"state\.opt\.fn is a function"):
        serialize.flatten({"opt": {"fn": lambda: 0}})
    with pytest.raises(TypeError, match="sparse"):
        serialize.flatten({"e": torch.eye(3).to_sparse()})


_dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16,
                           torch.int64, torch.int8, torch.uint8, torch.bool])


@st.composite
def _tensors(draw):
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    raw = torch.randint(0, 256, (math.prod(shape) * 8,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    dtype = draw(_dtypes)
    if dtype == torch.bool:  # only 0/1 bytes are valid bools
        return (raw[: math.prod(shape)] % 2).bool().view(shape)
    size = torch.empty(0, dtype=dtype).element_size()
    return raw[: math.prod(shape) * size].view(dtype).view(shape)


_leaves = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=5)
           | st.floats(allow_nan=False) | _tensors())
_trees = st.recursive(_leaves, lambda c: (
    st.lists(c, max_size=3) | st.lists(c, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=4) | st.integers(-5, 5), c, max_size=3)), max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_trees, st.sampled_from([1, 7, 64, 4096]))
def test_round_trip_property(tree, chunk):
    assert same(tree, serialize.loads(serialize.dumps(tree, chunk=chunk)))
