"""``zentrain bench data`` end to end on a tiny config (the numbers themselves are machine's)."""

import json

import pytest

from zentrain.cli import main

pytestmark = pytest.mark.slow


def test_bench_data_reports_every_worker_count(tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('[model]\nname = "deepfm"\nrows_per_field = 100\nembed_dim = 4\n'
                   'mlp_dims = [8]\n[data]\nsynthetic_samples = 1000\n'
                   '[train]\nbatch_size = 8\n[parallel]\nnproc = 2\n')
    out = tmp_path / "bench.json"
    code = main(["bench", "data", str(cfg), "--workers", "1,2", "--steps", "3", "--warmup", "1",
                 "--seconds", "0.1", "--json", str(out)])
    res = json.loads(out.read_text())
    (r,) = res["results"]
    assert code == (0 if r["targets_met"] else 1)
    assert r["model"] == "deepfm" and r["rank_samples_per_step"] == 8
    assert r["global_batch_size"] == 16 and r["consumption_samples_per_s"] > 0
    assert [w["workers"] for w in r["workers"]] == [1, 2]
    for w in r["workers"]:
        assert w["loader_samples_per_s"] > 0 and 0 <= w["stall_fraction"] < 1
        assert w["memory_bytes"] > 0
        assert w["ratio_to_consumption"] == pytest.approx(
            w["loader_samples_per_s"] / r["consumption_samples_per_s"])


def test_bad_worker_list_is_a_one_line_error(capsys):
    assert main(["bench", "data", "--workers", "0,x"]) == 2
    assert "bad --workers" in capsys.readouterr().err
