"""Wire formats: bit packing, the hash bitmap, COO byte rows, ordered sums."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from zentrain.sync.bitmap import (
    HashUniverse,
    hash_universe,
    index_dtype,
    pack_bits,
    pack_coo,
    sum_rows_ordered,
    unpack_bits,
    unpack_coo,
)
from zentrain.sync.hashing import h0


@given(st.lists(st.booleans(), max_size=200))
def test_pack_bits_round_trip(bits):
    mask = torch.tensor(bits, dtype=torch.bool)
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (len(bits) + 7) // 8
    assert unpack_bits(packed, len(bits)).tolist() == bits


def test_pack_bits_layout():
    # bit j of byte b is element 8b + j (little-endian within a byte)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[0, 3, 9]] = True
    assert pack_bits(mask).tolist() == [0b1001, 0b10]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 16), st.integers(0, 2**40), st.floats(0, 1))
def test_hash_bitmap_round_trip(num_rows, n, seed, density):
    uni = HashUniverse(num_rows, n, seed, "cpu")
    rows = torch.arange(num_rows)
    server = h0(rows, n, seed)
    # The universes partition [0, num_rows), each sorted and consistent with h0.
    assert sorted(torch.cat([uni.universe(i) for i in range(n)]).tolist()) == rows.tolist()
    g = torch.Generator().manual_seed(seed % 1000)
    present = torch.rand(num_rows, generator=g) < density
    for i in range(n):
        u = uni.universe(i).long()
        assert bool((server[u] == i).all()) and bool((u[1:] > u[:-1]).all())
        mine = rows[present & (server == i)]
        code = uni.encode(i, mine)
        assert code.numel() == uni.bitmap_bytes(i)
        assert uni.decode(i, code).tolist() == mine.tolist()


@pytest.mark.parametrize("num_rows", [1000, 123_457])
def test_hash_bitmap_total_size_is_rows_over_8_for_any_n(num_rows):
    for n in (1, 2, 4, 8, 16, 64):
        uni = hash_universe(num_rows, n, 7, "cpu")
        total = sum(uni.bitmap_bytes(i) for i in range(n))
        # ceil per server adds < 1 byte each; a plain bitmap per server would be n x this.
        assert num_rows / 8 <= total < num_rows / 8 + n
    assert hash_universe(num_rows, 4, 7, "cpu") is hash_universe(num_rows, 4, 7, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("row", [(), (3,), (2, 2)])
@pytest.mark.parametrize("num_rows", [100, 2**31])
def test_coo_byte_rows_round_trip(dtype, row, num_rows):
    idx = torch.tensor([0, 5, num_rows - 1])
    vals = torch.randn((3, *row)).to(dtype)
    idt = index_dtype(num_rows)
    buf = pack_coo(idx, vals, idt)
    assert buf.shape == (3, idt.itemsize + vals[0].numel() * vals.element_size())
    for rows in (buf, buf[1:], buf[2:]):  # odd offsets/strides too
        i, v = unpack_coo(rows, idt, dtype, row)
        k = 3 - rows.shape[0]
        assert i.tolist() == idx[k:].tolist() and torch.equal(v, vals[k:])
    e_i, e_v = unpack_coo(pack_coo(idx[:0], vals[:0], idt), idt, dtype, row)
    assert e_i.numel() == 0 and e_v.shape == (0, *row)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 10_000))
def test_sum_rows_ordered_is_block_order_sum(blocks, rows, seed):
    g = torch.Generator().manual_seed(seed)
    parts_i, parts_v = [], []
    for _ in range(blocks):
        k = int(torch.randint(0, rows + 1, (1,), generator=g))
        parts_i.append(torch.randperm(rows, generator=g)[:k])
        # Wide magnitudes so the order of additions changes the rounded result.
        parts_v.append(torch.randn(k, 2, generator=g) * 10.0 ** torch.randint(-6, 7, (k, 1),
                                                                             generator=g))
    idx, vals = torch.cat(parts_i), torch.cat(parts_v)
    out_i, out_v = sum_rows_ordered(idx, vals)
    want: dict[int, torch.Tensor] = {}
    for i, v in zip(idx.tolist(), vals):  # sequential, input order
        want[i] = want[i] + v if i in want else v.clone()
    assert out_i.tolist() == sorted(want)
    for j, i in enumerate(out_i.tolist()):
        assert torch.equal(out_v[j], want[i]), (i, out_v[j], want[i])


def test_sum_rows_ordered_order_matters_and_half_accumulates_in_fp32():
    idx = torch.tensor([4, 4, 4])
    vals = torch.tensor([1e8, 1.0, -1e8])
    assert sum_rows_ordered(idx, vals)[1].tolist() == [0.0]  # (1e8 + 1) - 1e8 in fp32
    vals = torch.tensor([2048.0, 1.0, 1.0], dtype=torch.float16)
    # fp16 step by step: 2048 + 1 = 2048 twice; fp32 accumulation keeps 2050.
    assert sum_rows_ordered(idx, vals)[1].tolist() == [2050.0]
