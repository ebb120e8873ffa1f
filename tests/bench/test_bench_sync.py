"""``zentrain bench sync``: inputs, the correctness check, and small end-to-end runs."""

from __future__ import annotations

import json

import pytest
import torch

from zentrain.bench import sync as bs
from zentrain.config import ConfigError
from zentrain.sync import profile as prof
from zentrain.sync.hashing import HashSeeds


def test_parse_numel():
    assert bs.parse_numel("16M") == 16 * 2**20
    assert bs.parse_numel("1.5k") == 1536
    assert bs.parse_numel("1e6") == 1_000_000 and bs.parse_numel("12345") == 12345
    with pytest.raises(ConfigError, match="--numel"):
        bs.parse_numel("lots")


def test_synthetic_rows_are_seeded_sized_and_shaped():
    a = bs.synthetic_rows(1, 50_000, 0.02, 1.0, 0.0, seed=3)
    assert torch.equal(a, bs.synthetic_rows(1, 50_000, 0.02, 1.0, 0.0, seed=3))
    assert a.numel() == 1000 and torch.equal(a, torch.unique(a))  # sorted, distinct
    assert not torch.equal(a, bs.synthetic_rows(2, 50_000, 0.02, 1.0, 0.0, seed=3))
    # overlap = 1: every rank has the same rows; 0.5: at least half shared.
    same = [bs.synthetic_rows(r, 50_000, 0.02, 0.0, 1.0, seed=0) for r in range(3)]
    assert all(torch.equal(same[0], s) for s in same)
    half = [bs.synthetic_rows(r, 50_000, 0.02, 0.0, 0.5, seed=0) for r in range(2)]
    assert int(torch.isin(half[0], half[1]).sum()) >= 500
    # skew puts the rows low (C3): contiguous partitions get unbalanced, hashed do not.
    flat = [bs.synthetic_rows(r, 200_000, 0.05, 0.0, 0.0, 0) for r in range(4)]
    hot = [bs.synthetic_rows(r, 200_000, 0.05, 1.2, 0.0, 0) for r in range(4)]
    cont = [prof.partition_imbalance(s, 200_000, 4, "contiguous")["push_imbalance"]
            for s in (flat, hot)]
    assert cont[0] < 1.1 < 2.0 < cont[1]
    assert prof.partition_imbalance(hot, 200_000, 4, "hashed", 5)["push_imbalance"] < 1.1


def test_matches_tolerates_reordering_but_not_errors():
    idx = torch.tensor([1, 4, 9])
    ref = (idx, torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]))
    assert bs.matches(ref, ref, world=2)
    near = (idx, ref[1] * (1 + 2.0**-23))
    assert bs.matches(near, ref, world=2)
    off = (idx, ref[1].clone())
    off[1][2, 1] += 1e-3
    assert not bs.matches(off, ref, world=2)
    extra_zero = (torch.tensor([1, 4, 7, 9]), torch.cat([ref[1][:2], torch.zeros(1, 2),
                                                         ref[1][2:]]))
    assert bs.matches(extra_zero, ref, world=2)  # the union may list rows that sum to 0
    missing = (idx[:2], ref[1][:2])
    assert not bs.matches(missing, ref, world=2)


def test_bad_arguments_are_one_line_errors(tmp_path):
    from zentrain.cli import main

    assert main(["bench", "sync", "--schemes", "dense,fast"]) == 2
    assert main(["bench", "sync", "--sweep-world", "1,2"]) == 2
    assert main(["bench", "sync", "--density", "0"]) == 2
    assert main(["bench", "sync", "--trace", str(tmp_path / "none.pt")]) == 2


@pytest.mark.slow
def test_synthetic_run_all_schemes(tmp_path):
    """3 ranks (odd: SparCML folds), skewed rows: every scheme correct, counts as modelled,
    ZEN's Push/Pull imbalance exactly what h0 predicts, OmniReduce's what ranges predict."""
    from zentrain.cli import main

    out = tmp_path / "s.json"
    rows, seed = 40_000, 11
    argv = ["bench", "sync", "--world", "3", "--numel", str(rows * 2), "--row-width", "2",
            "--density", "0.05", "--skew", "1.0", "--overlap", "0.2", "--repeat", "1",
            "--seed", str(seed), "--json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    run = res["runs"][0]
    sch = run["schemes"]
    assert list(sch) == list(bs.SCHEMES) and run["world"] == 3
    for name, r in sch.items():
        assert r["correct"] and r["identical_across_ranks"], name
        for key in ("bytes_sent_max", "bytes_recv_max", "time_s", "push_imbalance",
                    "pull_imbalance", "model_bytes", "hash_s"):
            assert key in r, (name, key)
        # Omnireduce's model uses one skew for Push and Pull; SparCML's interpolates γ at
        # n/p·2^i ranks when n is not a power of two.
        tol = {"omnireduce": 0.2, "sparcml": 0.1}.get(name, 0.05)
        assert r["recv_over_model"] == pytest.approx(1.0, abs=tol), name
    assert sch["dense"]["vs_dense_sent"] == 1.0 and sch["agsparse"]["vs_agsparse_recv"] == 1.0
    assert sch["zen"]["bytes_sent_max"] < 0.5 * sch["dense"]["bytes_sent_max"]
    assert sch["zen"]["hash_s"] > 0 and sch["agsparse"]["push_imbalance"] is None
    assert sch["zen"]["recv_over_eq1"] <= 1.1
    # Imbalance: recompute from the same inputs with the same partitions.
    sets = [bs.synthetic_rows(r, rows, 0.05, 1.0, 0.2, seed) for r in range(3)]
    zen_h0 = HashSeeds.draw(3, seed).level0
    hashed = prof.partition_imbalance(sets, rows, 3, "hashed", zen_h0)
    cont = prof.partition_imbalance(sets, rows, 3, "contiguous")
    for key in ("push_imbalance", "pull_imbalance"):
        assert sch["zen"][key] == pytest.approx(hashed[key])
        assert sch["omnireduce"][key] == pytest.approx(cont[key])
    assert cont["push_imbalance"] > 1.5 > 1.1 > hashed["push_imbalance"]
    assert run["workload"]["gamma"] == pytest.approx(prof.densification(sets)[3], rel=1e-6)


@pytest.mark.slow
def test_trace_replay_sweep(tmp_path):
    g = torch.Generator().manual_seed(0)
    world, steps = 3, 2
    rec = prof.TraceRecorder(world, [("emb", 5000, 8, "float32"), ("bias", 5000, 1, "float32")])
    for _ in range(steps):
        sets = [torch.unique((torch.rand(400, generator=g) ** 2 * 5000).long())
                for _ in range(world)]
        rec.add([sets, sets])
    prof.save_trace(tmp_path / "t.pt", rec.trace())
    from zentrain.cli import main

    out, png = tmp_path / "t.json", tmp_path / "t.png"
    assert main(["bench", "sync", "--trace", str(tmp_path / "t.pt"), "--sweep-world", "2,3",
                 "--schemes", "dense,agsparse,zen,auto", "--repeat", "1", "--warmup", "0",
                 "--json", str(out), "--plot", str(png)]) == 0
    res = json.loads(out.read_text())
    assert [r["world"] for r in res["runs"]] == [2, 3] and png.stat().st_size > 1000
    for run in res["runs"]:
        assert run["workload"]["unit"] == "step" and run["workload"]["calls_per_unit"] == 2
        for name, r in run["schemes"].items():
            assert r["correct"] and r["identical_across_ranks"], name
        assert "choice" in run["schemes"]["auto"]
    ag = [r["schemes"]["agsparse"]["bytes_recv_max"] for r in res["runs"]]
    assert ag[1] > ag[0]  # AGsparse grows with n
    assert main(["bench", "sync", "--trace", str(tmp_path / "t.pt"), "--world", "4"]) == 2
