"""``zentrain bench e2e`` / ``bench report`` / ``run --emulate-bandwidth``.

The end-to-end runs use a tiny DeepFM (a few steps, 2 ranks): one bench over loopback with
every system, one over an emulated 200mbit network (skipped, with the reason, where netem
is unavailable). The analysis (averages, predictions, loss check, targets) is tested
without processes.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from zentrain import cli
from zentrain.bench import e2e_analysis as an
from zentrain.bench import report
from zentrain.netem import check_available

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "model.rows_per_field=500", "--set", "model.embed_dim=4",
        "--set", "model.mlp_dims=[16]", "--set", "train.batch_size=32",
        "--set", "train.eval_batches=1", "--set", "data.synthetic_samples=4000"]


def bench(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "r.json"
    code = cli.main(["bench", "e2e", "--workload", "deepfm",
                     "--config", str(ROOT / "configs" / "deepfm.toml"), "--world", "2",
                     "--steps", "3", *TINY, "--bench-dir", str(tmp_path / "runs"),
                     "--json", str(out), *args])
    return code, json.loads(out.read_text()) if out.is_file() else {}


@pytest.mark.slow
def test_loopback_all_systems_equal_losses(tmp_path, capsys):
    # 2 ranks sum in the same order everywhere: lossless systems agree to rounding.
    code, res = bench(tmp_path, "--bandwidth", "none", "--plot", str(tmp_path / "r.png"),
                      "--loss-rtol", "1e-5")
    text = capsys.readouterr().out
    assert code == 0, text
    assert set(res) >= {"config", "machine", "systems"}
    assert list(res["systems"]) == list(an.SYSTEMS)
    for name, s in res["systems"].items():
        for key in ("throughput", "step_time_s", "sync_time_s", "sync_bytes_per_step",
                    "final_loss", "speedup_vs_ddp", "speedup_vs_ddp_sparse"):
            assert s.get(key) is not None, (name, key)
        assert s["throughput"] > 0 and s["loss_matches"], name
    assert res["systems"]["ddp"]["speedup_vs_ddp"] == 1.0
    assert res["loss_check"]["ok"] and res["loss_check"]["max_rel_deviation"] <= 1e-5
    # Sparse schemes move fewer bytes than a dense all-reduce of the ~50k-row tables.
    assert res["systems"]["zen"]["sync_bytes_per_step"] < res["systems"]["ddp"][
        "sync_bytes_per_step"]
    assert res["machine"]["cores"] == os.cpu_count() and res["machine"]["torch"]
    assert res["config"]["command"].startswith("zentrain bench e2e --workload deepfm")
    assert (tmp_path / "r.png").stat().st_size > 0
    assert "bench e2e: deepfm, 2 ranks, loopback" in text
    md = tmp_path / "bench.md"
    assert report.main([str(tmp_path / "r.json"), "--out", str(md)]) == 0
    page = md.read_text()
    assert "loopback: zen within 3% of ddp" in page and "zentrain bench e2e" in page


@pytest.mark.slow
def test_emulated_network(tmp_path, capsys):
    reason = check_available()
    if reason is not None:
        pytest.skip(f"netem unavailable: {reason}")
    code, res = bench(tmp_path, "--bandwidth", "200mbit", "--systems", "ddp,zen", "--no-plot")
    assert code == 0, capsys.readouterr().out
    assert res["bandwidth_bits"] == 200_000_000 and set(res["systems"]) == {"ddp", "zen"}
    assert res["loss_check"]["ok"]
    z = res["systems"]["zen"]
    assert z["predicted_sync_time_s"] > 0 and z["predicted_speedup_vs_ddp"] is not None
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"-p{os.getpid()}-" not in ns  # our cluster is gone


@pytest.mark.parametrize("args, message", [
    (["--systems", "ddp,fast"], "unknown system 'fast' in --systems"),
    (["--systems", "zen,zen"], "lists a system twice"),
    (["--bandwidth", "1gbps"], "ambiguous rate '1gbps'"),
    (["--bandwidth", "fast"], "bad rate 'fast'"),
    (["--world", "1"], "bad --world '1'"),
    (["--world", "two"], "bad --world 'two'"),
    (["--steps", "2"], "bad --steps 2"),
    (["--set", "sync.scheme=zen"], "sync.scheme is set by the benchmark"),
    (["--bandwidth", "none", "--latency", "1ms"], "--latency needs an emulated network"),
])
def test_bad_inputs_are_one_line_errors(args, message, capsys):
    code = cli.main(["bench", "e2e", "--bandwidth", "none", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_unavailable_netem_says_how_to_run_on_loopback(monkeypatch, capsys):
    hint = "network emulation needs root (running as uid 1000); to run without emulation " \
           "pass --bandwidth none (plain loopback)"
    monkeypatch.setattr("zentrain.bench.cluster.check_available", lambda: hint)
    assert cli.main(["bench", "e2e", "--bandwidth", "1gbit"]) == 2
    err = capsys.readouterr().err
    assert "pass --bandwidth none" in err and err.count("\n") == 1
    assert cli.main(["run", "--emulate-bandwidth", "1gbit"]) == 2
    err = capsys.readouterr().err
    assert "omit --emulate-bandwidth" in err and err.count("\n") == 1
    assert cli.main(["run", "--emulate-bandwidth", "lots"]) == 2
    assert "bad rate 'lots'" in capsys.readouterr().err


# -- analysis, no processes ------------------------------------------------------------------

def _rows(times, sync, loss=0.5, unit="samples", stats=None):
    return [{"step": i + 1, "loss": loss, "step_time_s": t, "sync_s": sync,
             f"{unit}_per_s": 100 / t, "sync_bytes_sent": 10, "sync_bytes_sent_max": 12,
             **({"sync_stats": stats} if stats else {})} for i, t in enumerate(times)]


def test_steady_figures_drop_warmup():
    fig = an.steady_figures(_rows([9.0, 9.0, 1.0, 3.0], 0.5), warmup=2, unit="samples")
    assert fig["step_time_s"] == 2.0 and fig["throughput"] == 50.0
    assert fig["exposed_sync_s"] == 0.5 and fig["steps_measured"] == 2
    assert an.warmup_steps(30) == 6 and an.warmup_steps(4) == 2


def _point(ddp_step=2.0, zen_step=1.0, zen_sync=0.2, density=0.01, gamma=1.5):
    stats = {"table0.path": "zen", "table0.density": density, "table0.gamma": gamma}
    systems = {"ddp": an.steady_figures(_rows([ddp_step] * 4, 0.0), 2, "samples"),
               "ddp-sparse": an.steady_figures(_rows([1.2] * 4, 0.0), 2, "samples"),
               "zen": an.steady_figures(_rows([zen_step] * 4, zen_sync, stats=stats), 2,
                                        "samples")}
    layout = an.Layout(tables=((100_000, 16),), other_bytes=400_000)
    notes = an.finish(systems, layout, 4, 10**9, 0.5, 1e-3)
    return {"world": 4, "bandwidth": "1gbit", "bandwidth_bits": 10**9, "unit": "samples",
            "systems": systems, **notes}


def test_finish_fills_speedups_predictions_and_estimates_ddp_sync():
    p = _point()
    z, d = p["systems"]["zen"], p["systems"]["ddp"]
    assert z["speedup_vs_ddp"] == pytest.approx(2.0)
    assert d["sync_time_estimated"] and d["sync_time_s"] == pytest.approx(2.0 - 0.8)
    assert z["compute_time_s"] == pytest.approx(0.8) and not z["sync_time_estimated"]
    # The cost model: ZEN sends far fewer bytes than a dense all-reduce of the table.
    assert z["predicted_sync_bytes_per_step"] < 0.1 * d["predicted_sync_bytes_per_step"]
    assert z["predicted_speedup_vs_ddp"] > 1.0
    assert p["loss_check"]["ok"]


def test_auto_prediction_is_the_cheapest_candidate():
    layout = an.Layout(tables=((100_000, 16),), other_bytes=0)
    sp = [{"table": "table0", "density": 0.01, "gamma": 2.0, "skew": 1.0, "dense_path": False}]
    costs = {s: an.predict_sync(s, layout, sp, 8, 10**9)[0]
             for s in ("auto", "zen", "sparcml", "agsparse", "dense")}
    assert costs["auto"] == min(costs.values())


def test_loss_mismatch_is_reported():
    systems = {"ddp": {"final_loss": 1.0}, "zen": {"final_loss": 1.01}}
    lc = an.loss_check(systems, 1e-3)
    assert not lc["ok"] and lc["max_rel_deviation"] == pytest.approx(0.01)
    assert systems["zen"]["loss_matches"] is False


def test_targets_and_compute_bound_reason():
    p = _point(ddp_step=2.0, zen_step=1.0)
    res = {"config": {"workload": "deepfm"}, **p}
    checks = {c["target"]: c for c in report.check_targets(res)}
    c = checks["DeepFM, 4 ranks, 1 Gbit/s: zen >= 3x ddp"]
    assert not c["met"] and c["measured"] == pytest.approx(2.0)
    assert "compute-bound" in c["reason"]  # 2.0 s / 0.8 s of compute caps it at 2.5x
    assert checks["DeepFM, 4 ranks, 1 Gbit/s: zen no slower than ddp-sparse"]["met"]


def test_worker_densifies_sparse_grads_before_clip_and_step(monkeypatch):
    import types

    import torch
    from torch import nn

    from zentrain.bench import worker

    monkeypatch.setattr(nn.utils, "clip_grad_norm_", nn.utils.clip_grad_norm_)  # restored
    fake = types.SimpleNamespace(
        build_optimizer=lambda cfg, m: torch.optim.AdamW(m.parameters(), lr=0.1))
    worker._patch(fake)
    emb = nn.Embedding(10, 3, sparse=True)
    for use_clip in (False, True):
        emb.zero_grad(set_to_none=True)
        emb(torch.tensor([1, 2, 2])).sum().backward()
        assert emb.weight.grad.is_sparse
        if use_clip:  # torch's own clip_grad_norm_ has no sparse kernel
            nn.utils.clip_grad_norm_(emb.parameters(), 1.0)
        fake.build_optimizer(None, emb).step()  # AdamW alone refuses sparse grads
        assert not emb.weight.grad.is_sparse
        g = emb.weight.grad
        assert g[2].tolist() == ([2.0] * 3 if not use_clip else [g[2, 0].item()] * 3)
        assert g[0].abs().sum() == 0 and g[2, 0] == 2 * g[1, 0]


def test_sweep_result_plots_and_reports_every_point(tmp_path):
    """A --world/--bandwidth sweep: one plot of throughput vs bandwidth and world size, and
    a table per point (figures from synthetic points; no processes)."""
    pts = []
    for world, bw, bits in ((2, "100mbit", 10**8), (4, "1gbit", 10**9), (4, "100mbit", 10**8)):
        p = _point(zen_step=1.0 if bits == 10**9 else 1.5)
        p.update(world=world, bandwidth=bw, bandwidth_bits=bits)
        pts.append(p)
    res = {"config": {"workload": "deepfm", "world": [2, 4], "bandwidth": ["100mbit", "1gbit"],
                      "command": "zentrain bench e2e ...", "steps": 30, "warmup_steps": 6,
                      "systems": ["ddp", "ddp-sparse", "zen"],
                      "repeat": 1, "batch_size": 256, "date": "now", "wall_time_s": 60.0},
           "machine": {"cores": 2, "cpu_model": "x", "load_avg_start": [0.0],
                       "load_avg_end": [0.0]},
           "points": pts}
    png = tmp_path / "sweep.png"
    report.plot(res, png)
    assert png.stat().st_size > 1000
    md = tmp_path / "b.md"
    (tmp_path / "sweep.json").write_text(json.dumps(res))
    assert report.main([str(tmp_path / "sweep.json"), "--out", str(md)]) == 0
    text = md.read_text()
    assert text.count("##### ") == 3 and "4 ranks, bandwidth 100mbit" in text
    # The 4-rank 1 Gbit/s point measures the DeepFM targets; the others do not.
    assert "DeepFM, 4 ranks, 1 Gbit/s: zen >= 3x ddp" in text
