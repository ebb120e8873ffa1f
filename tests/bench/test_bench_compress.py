"""``zentrain bench compress``: one tiny run on loopback, bad inputs, and the analysis.

The run trains a tiny GPT (1 layer, d=32, 300-token vocabulary) for a few steps on 2
loopback ranks with ``none`` (zen, uncompressed) and ``topk`` (mixed with PowerSGD by
``compress.method_for``); ratios, time-to-target and
the target checks are tested on synthetic curves without processes.
"""

import json
from pathlib import Path

import pytest

from zentrain import cli
from zentrain.bench import compress as bc
from zentrain.bench import compress_show as bc_show

TINY = ["--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
        "--set", "model.seq_len=32", "--set", "model.vocab_size=300",
        "--set", "data.max_bytes=300000", "--set", "train.batch_size=4",
        "--set", "train.eval_batches=1"]
REQUIRED = ("bytes_per_step", "step_time_s", "final_loss", "loss_ratio_vs_none",
            "bytes_ratio_vs_none")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.slow
def test_tiny_loopback_run(tmp_path, cache, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code = cli.main(["bench", "compress", "--world", "2", "--bandwidth", "none",
                     "--methods", "none,topk", "--steps", "4", *TINY,
                     "--set", "compress.method_for=blocks.*=powersgd",
                     "--set", f"data.cache_dir={cache}", "--bench-dir", str(tmp_path / "runs"),
                     "--json", str(out), "--plot", str(png)])
    text = capsys.readouterr().out
    assert code == 0, text
    res = json.loads(out.read_text())
    assert list(res["methods"]) == ["none", "topk"]
    for name, s in res["methods"].items():
        for key in REQUIRED:
            assert s.get(key) is not None, (name, key)
        assert len(s["curve"]["loss"]) == 4 and s["curve"]["wall_s"][0] == 0.0
    none, topk = res["methods"]["none"], res["methods"]["topk"]
    assert none["bytes_ratio_vs_none"] == 1.0 and none["loss_ratio_vs_none"] == 1.0
    assert 0 < topk["bytes_ratio_vs_none"] < 1
    assert topk["compressed_numel"] > 0 and none["compressed_numel"] == 0
    assert "sync.compress=topk" in topk["sets"] and "compress.ratio=0.01" in topk["sets"]
    # compress.method_for reaches the compressed run only: top-k for the output layer,
    # PowerSGD for the block's matrices, and `none` stays uncompressed.
    assert topk["compressors"] == "topk+powersgd" and none["compressors"] == ""
    assert bc_show.label("topk", topk) == "topk: topk+powersgd"
    assert bc_show.label("none", none) == "none"
    assert bc_show.label("topk", {"compressors": "topk, global top-k 2x, bf16 wire"}) == \
        "topk (global top-k 2x, bf16 wire)"
    summary = json.loads((Path(topk["run_dir"]) / "summary.json").read_text())
    assert summary["sync"] == "zen+topk+powersgd"
    assert json.loads((Path(none["run_dir"]) / "summary.json").read_text())["sync"] == "zen"
    assert res["target_loss"] == pytest.approx(none["final_loss"] * 1.03)
    assert res["config"]["command"].startswith("zentrain bench compress --workload gpt")
    assert {t["target"] for t in res["targets"]} == {t[0] for t in bc.TARGETS}
    assert png.stat().st_size > 0
    assert "bench compress: gpt, 2 ranks, loopback" in text


@pytest.mark.parametrize("args, message", [
    (["--methods", "none,zip"], "unknown method 'zip' in --methods"),
    (["--methods", "none,topk,topk"], "lists a method twice"),
    (["--methods", "topk,ddp"], "--methods must include none"),
    (["--world", "1"], "bad --world 1"),
    (["--steps", "2"], "bad --steps 2"),
    (["--set", "compress.ratio=0.1"], "use --ratio"),
    (["--set", "sync.scheme=dense"], "sync.scheme is set by the benchmark"),
    (["--ratio", "2"], "compress.ratio must be in (0, 1] (got 2.0)"),
    (["--bits", "1"], "compress.bits must be in [2, 8] (got 1)"),
    (["--set", "compress.min_numel=100000000"], "--methods topk: compress.method='topk' "
                                                "matched no parameter"),
    (["--set", "compress.method_for=blocks.*=zip"], "compress.method_for entry "
                                                     "'blocks.*=zip' is invalid"),
    (["--set", "compress.method_for=block.*=powersgd"], "--methods topk: compress.method_for "
                                                         "pattern 'block.*' (=powersgd) matches "
                                                         "no weight matrix"),
])
def test_bad_inputs_are_one_line_errors(args, message, capsys):
    code = cli.main(["bench", "compress", "--bandwidth", "none", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


# -- analysis, no processes ------------------------------------------------------------------

def _method(losses, step_time, nbytes):
    rows = [{"step": i + 1, "loss": v, "step_time_s": step_time} for i, v in enumerate(losses)]
    fig = {"sync_bytes_per_step_max": nbytes, "sync_bytes_per_step": nbytes,
           "step_time_s": step_time, "exposed_sync_s": 0.1 * step_time, "throughput": 1.0,
           "breakdown": {}, "steps_measured": len(rows), "run_dir": "x"}
    return bc.method_figures(fig, rows, window=2)


def test_smooth_is_a_trailing_mean():
    assert bc.smooth([4.0, 2.0, 6.0, 0.0], 2) == [4.0, 3.0, 4.0, 3.0]
    assert bc.smooth([1.0, 2.0], 1) == [1.0, 2.0]


def test_compare_ratios_and_time_to_target():
    methods = {"none": _method([5.0, 4.0, 3.0, 2.0, 2.0], 1.0, 1000),
               "topk": _method([5.0, 4.5, 3.5, 2.5, 2.0], 0.25, 50),
               "ddp": _method([5.0, 4.0, 3.0, 2.0, 2.0], 2.0, 1500),
               "sign": {"error": "rank 1 exited with code 1"}}
    out = bc.compare(methods)
    none, topk, ddp = methods["none"], methods["topk"], methods["ddp"]
    assert out["target_loss"] == pytest.approx(2.0 * 1.03)
    assert topk["bytes_ratio_vs_none"] == 0.05 and topk["loss_ratio_vs_none"] == 1.125
    # none's smoothed curve [5, 4.5, 3.5, 2.5, 2.0] reaches 2.06 at step 5; wall time
    # excludes step 1: 4 x 1 s. topk's [5, 4.75, 4, 3, 2.25] never does.
    assert none["steps_to_target"] == 5 and none["time_to_target_s"] == 4.0
    assert topk["time_to_target_s"] is None and topk["time_to_target_speedup_vs_ddp"] is None
    assert ddp["time_to_target_s"] == 8.0 and none["time_to_target_speedup_vs_ddp"] == 2.0
    assert out["best"] == "none" and out["best_time_to_target_speedup_vs_ddp"] == 2.0
    assert topk["step_speedup_vs_ddp"] == 8.0 and ddp["sync_time_estimated"]
    # A given target overrides none x 1.03.
    assert bc.compare(methods, target_loss=2.6)["best"] == "topk"
    assert topk["steps_to_target"] == 5 and topk["time_to_target_s"] == 1.0


def test_check_targets_names_the_differences_from_the_issue():
    methods = {"none": _method([3.0, 2.0], 1.0, 1000), "topk": _method([3.0, 2.0], 1.0, 40),
               "ddp": _method([3.0, 2.0], 1.0, 1000)}
    res = {"config": {"workload": "gpt", "world": 4, "bandwidth": "1gbit", "steps": 50},
           "methods": methods, **bc.compare(methods)}
    got = {t["target"]: t for t in bc.check_targets(res)}
    topk_bytes = got["top-k 1% + EF + zen: <= 1/20 of none's bytes"]
    assert topk_bytes["met"] and topk_bytes["measured"] == 0.04
    assert topk_bytes["setting"] == ["steps 50 (issue: 500)"]
    assert got["PowerSGD rank 4: final loss within 3% of none"]["met"] is None
    assert got["best method: time-to-target >= 2x better than ddp"]["met"] is False
    res["config"]["overrides"] = ["compress.error_feedback=false"]
    got = {t["target"]: t for t in bc.check_targets(res)}
    assert got["top-k 1% + EF + zen: <= 1/20 of none's bytes"]["setting"] == [
        "steps 50 (issue: 500)", "--set compress.error_feedback=false"]
    # the method's own option: a rank-8 run does not pass for the rank-4 target unnoticed
    res["config"].update(rank=8, ratio=0.01)
    got = {t["target"]: t for t in bc.check_targets(res)}
    assert got["PowerSGD rank 4: <= 1/20 of none's bytes"]["setting"][-1] == "rank 8 (issue: 4)"
    assert got["top-k 1% + EF + zen: <= 1/20 of none's bytes"]["setting"][-1].startswith("--set")


def test_json_keeps_curves_compact(tmp_path):
    m = _method([3.0, 2.0, 1.0], 1.0, 10)
    res = {"methods": {"none": m}, "x": 1}
    text = bc.dumps(res)
    assert json.loads(text)["methods"]["none"]["curve"]["loss"] == [3.0, 2.0, 1.0]
    assert len(text.splitlines()) < 40 and res["methods"]["none"]["curve"] is m["curve"]


def test_plot_from_result(tmp_path):
    pytest.importorskip("matplotlib")
    methods = {"none": _method([3.0, 2.0], 1.0, 1000), "topk": _method([3.0, 2.1], 0.5, 40)}
    res = {"config": {"workload": "gpt", "steps": 2, "smooth": 2}, "world": 2,
           "bandwidth": "none", "bandwidth_bits": None, "machine": {"cores": 2},
           "methods": methods, **bc.compare(methods)}
    assert bc.plot(res, tmp_path / "p.png") == f"plot: {tmp_path / 'p.png'}"
    assert (tmp_path / "p.png").stat().st_size > 0


def test_method_for_applies_to_the_compressed_methods_only():
    args = cli.build_parser().parse_args(
        ["bench", "compress", "--bandwidth", "none", "--methods", "none,topk,ddp",
         "--set", "compress.method_for=blocks.*,pos_emb=powersgd"])
    plan = bc.build_plan(args)
    assert plan.compressed_numel["none"] == plan.compressed_numel["ddp"] == 0
    alone = bc.build_plan(cli.build_parser().parse_args(
        ["bench", "compress", "--bandwidth", "none", "--methods", "none,topk"]))
    # Same matrices either way (rank 4 accepts every block matrix), other methods.
    assert plan.compressed_numel["topk"] == alone.compressed_numel["topk"] > 0


def test_method_sets(tmp_path):
    from zentrain.config import load_config

    # A --config that compresses (by either name) must not leak into the uncompressed
    # runs, nor clash with another method; those drop its compress.method_for too.
    files = ('[sync]\ncompress = "auto"\n[compress]\nmethod_for = "head.weight=topk"\n',
             '[compress]\nmethod = "auto"\nmethod_for = "head.weight=topk"\n')
    for i, text in enumerate(files):
        f = tmp_path / f"c{i}.toml"
        f.write_text(text)
        for method, want in (("ddp", "none"), ("none", "none"), ("topk", "topk"),
                             ("powersgd", "powersgd")):
            cfg = load_config(f, bc.method_sets(method, 0.01, 8, 4))
            assert (cfg.compress.method, cfg.sync.compress) == (want, want), (text, method)
            assert cfg.compress.method_for == ("" if want == "none" else "head.weight=topk")
            assert cfg.sync.scheme == ("ddp" if method == "ddp" else "zen")
    # A compressed run gets every option: a top-k run may hold PowerSGD matrices too.
    assert bc.method_sets("topk", 0.01, 8, 4)[-3:] == ["compress.ratio=0.01", "compress.rank=8",
                                                       "compress.bits=4"]
    assert "compress.bits=8" in bc.method_sets("qsgd", 0.01, 2, 8)
    assert Path(bc.__file__).name == "compress.py"
