"""The CUDA paths, where a GPU is present.

On a machine without CUDA every test here is skipped: the rest of the suite runs the same
code on CPU tensors, which is the fallback these paths must match. On a GPU machine:
``PYTHONPATH=src python -m pytest -q tests/test_cuda.py`` (docs/design.md records what ran
where). With one GPU, NCCL cannot hold two ranks (it refuses a duplicated device), so the
multi-rank checks run gloo over CUDA tensors, and NCCL runs at one rank.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "sync"))  # the reducer cases live beside their test


# -- ZEN pieces: the same partition and bitmap on CUDA as on CPU ----------------------------------
def test_hierarchical_hash_and_bitmap_match_the_cpu():
    from zentrain.sync.bitmap import HashUniverse
    from zentrain.sync.hashing import HashSeeds, hierarchical_hash

    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 200_000, (50_000,), generator=g).unique()
    seeds = HashSeeds.draw(3, seed=11)
    for n in (2, 3, 8):
        cpu = hierarchical_hash(idx, n, seeds)
        gpu = hierarchical_hash(idx.cuda(), n, seeds)
        assert gpu.order.is_cuda
        # The same servers get the same index sets (slot order may differ by device).
        for s in range(n):
            a = idx[cpu.order[sum(cpu.splits[:s]):sum(cpu.splits[:s + 1])]]
            b = idx.cuda()[gpu.order[sum(gpu.splits[:s]):sum(gpu.splits[:s + 1])]].cpu()
            assert torch.equal(a.sort().values, b.sort().values), (n, s)
        uni_c = HashUniverse(200_000, n, 5, "cpu")
        uni_g = HashUniverse(200_000, n, 5, "cuda")
        for s in range(n):
            members = uni_c.universe(s)[::7]
            packed_c = uni_c.encode(s, members)
            packed_g = uni_g.encode(s, members.cuda())
            assert torch.equal(packed_c, packed_g.cpu())
            assert torch.equal(uni_g.decode(s, packed_g).cpu(), members)


# -- every sparse reducer on CUDA gradients, 2 and 3 ranks over gloo -----------------------------
@pytest.mark.parametrize("world", [2, 3])
def test_reducers_on_cuda_gradients_match_the_reference(world):
    import test_sparse_reducers as t

    from zentrain.testing import run_ranks

    cases = t.make_cases(world, seed=200 + world)
    results = run_ranks(t._run_cases, world, cases, device="cuda", timeout=300)
    t._check(world, cases, results)


# -- compressors on CUDA tensors ----------------------------------------------------------------
def test_compressors_on_cuda():
    from zentrain.compress import CompressConfig
    from zentrain.compress.powersgd import PowerSGD
    from zentrain.compress.quant import QSGD, Sign, pack_bits, unpack_bits
    from zentrain.compress.topk import TopK

    codes = torch.randint(0, 8, (1001,), dtype=torch.uint8)
    assert torch.equal(pack_bits(codes.cuda(), 3).cpu(), pack_bits(codes, 3))
    assert torch.equal(unpack_bits(pack_bits(codes.cuda(), 3), 3, 1001).cpu(), codes)

    g = torch.randn(64, 48, device="cuda")
    top = TopK(CompressConfig(method="topk", ratio=0.05))
    payload = top.compress("w", g)
    sent = payload.to_dense().reshape(-1)
    assert sent.is_cuda and torch.equal(sent + top.residuals["w"], g.reshape(-1))
    for c in (QSGD(CompressConfig(method="qsgd", bits=4, bucket_size=100)),
              Sign(CompressConfig(method="sign", bucket_size=100))):
        p = c.compress("w", g)
        assert torch.equal(c.residuals["w"], g.reshape(-1) - c.decompress(p).reshape(-1))
    m = torch.randn(120, 3, device="cuda") @ torch.randn(3, 80, device="cuda")
    out = PowerSGD(CompressConfig(method="powersgd", rank=3)).sync("w", m)
    torch.testing.assert_close(out, m, rtol=1e-3, atol=1e-3)


# -- zentrain run on the GPU ----------------------------------------------------------------------
SMALL_GPT = ["--set", "data.max_bytes=1500000", "--set", "model.vocab_size=1024",
             "--set", "model.n_layer=2", "--set", "model.d_model=64", "--set", "model.n_head=2",
             "--set", "model.seq_len=64", "--set", "train.batch_size=8",
             "--set", "train.eval_batches=2"]


def _run(tmp_path, *args, timeout=600):
    env = dict(os.environ, CI="1")
    env.pop("CUBLAS_WORKSPACE_CONFIG", None)  # the trainer must set it for deterministic mode
    cmd = [sys.executable, "-m", "zentrain.cli", "run", *args,
           "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("extra", [
    ["--set", "sync.scheme=zen"],
    ["--set", "sync.scheme=ddp"],
    ["--set", "sync.scheme=zen", "--set", "model.sparse_embedding=true"],
    ["--set", "sync.scheme=zen", "--set", "train.deterministic=true"],
], ids=["zen", "ddp", "zen-sparse-grads", "deterministic"])
def test_gpt_trains_on_one_gpu_with_nccl(tmp_path, extra):
    r = _run(tmp_path, str(ROOT / "configs" / "debug.toml"), "--nproc", "1",
             "--set", "train.steps=6", "--set", "checkpoint.every=3", *SMALL_GPT, *extra,
             "--run-dir", "out")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [x for x in _rows(tmp_path / "out") if "loss" in x]
    assert [x["step"] for x in rows] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in rows)
    assert rows[-1]["peak_mem_bytes"] > 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == 6


def test_deepfm_trains_and_resumes_on_one_gpu(tmp_path):
    args = [str(ROOT / "configs" / "deepfm.toml"), "--nproc", "1", "--set",
            "model.rows_per_field=2000", "--set", "train.deterministic=true",
            "--run-dir", "out"]
    r = _run(tmp_path, *args, "--set", "train.steps=8")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = {x["step"]: x["loss"] for x in _rows(tmp_path / "out") if "loss" in x}
    (tmp_path / "out").rename(tmp_path / "ref")
    r = _run(tmp_path, *args, "--set", "train.steps=4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _run(tmp_path, *args, "--set", "train.steps=8", "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = {x["step"]: x["loss"] for x in _rows(tmp_path / "out") if "loss" in x}
    assert {s: got[s] for s in range(5, 9)} == {s: ref[s] for s in range(5, 9)}


@pytest.mark.skipif(torch.cuda.device_count() != 1, reason="checks the one-GPU case")
def test_more_ranks_than_gpus_is_a_one_line_error(tmp_path):
    r = _run(tmp_path, str(ROOT / "configs" / "debug.toml"), "--nproc", "2",
             "--set", "train.steps=2", *SMALL_GPT, "--run-dir", "out", timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "GPU" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
