"""The reasons ``bench report`` gives for missed targets must agree with the run's own data:
no "impossible" when a measured ratio beats the prediction or another system met the target,
the noise band named when the shortfall lies inside it; the checkpoint cost graded by CPU
time, never "met" on a negative wall clock; the hashing-time target graded per run."""

import json
from pathlib import Path

import pytest

from zentrain.bench import report
from zentrain.bench.chaos_report import check_chaos_targets
from zentrain.bench.sync_report import RATE_BYTES_PER_S, check_sync_targets

GPT_TARGET = "GPT debug, 4 ranks, 1 Gbit/s: zen >= 1.2x ddp"
DFM8_TARGET = "DeepFM, 8 ranks, 1 Gbit/s: zen >= 1.3x ddp-sparse"


def _sys(step, comp, psync=0.01, pred_ddp=None, pred_sparse=None, est=False, mib=1.0):
    return {"throughput": 1000 / step, "step_time_s": step, "compute_time_s": comp,
            "sync_time_s": step - comp, "sync_time_estimated": est,
            "predicted_sync_time_s": psync, "sync_bytes_per_step": mib * 2**20,
            "predicted_speedup_vs_ddp": pred_ddp, "predicted_speedup_vs_ddp_sparse": pred_sparse}


def _result(workload, world, systems, cref):
    return {"config": {"workload": workload},
            "points": [{"world": world, "bandwidth": "1gbit", "bandwidth_bits": 10**9,
                        "systems": systems, "compute_reference_s": cref}]}


def _checks(res):
    return {c["target"]: c for c in report.check_targets(res)}


def test_no_impossibility_when_the_run_beats_the_prediction_or_another_scheme_meets_it():
    """The audited GPT case: zen 1.11x above its 1.06x prediction, omnireduce 1.24x."""
    ddp = _sys(1.782, 1.449, psync=0.251, est=True)
    sy = {"ddp": ddp,
          "zen": _sys(1.607, 1.405, psync=0.150, pred_ddp=1.06),
          "omnireduce": _sys(1.434, 1.205, psync=0.155, pred_ddp=1.05),
          "agsparse": _sys(1.750, 1.494, psync=0.150, pred_ddp=1.06)}
    c = _checks(_result("gpt", 4, sy, 1.449))[GPT_TARGET]
    assert not c["met"] and c["measured"] == pytest.approx(1.782 / 1.607)
    r = c["reason"]
    assert "no sync scheme could" not in r
    assert "omnireduce (1.24x" in r and "not out of reach" in r
    assert "zen measured 1.11x, above the prediction" in r
    # compute of identical work ranged 1,205-1,494 ms (1.24x): the 1.08x gap is inside it.
    assert "not resolved by this run" in r and "1.24x, across their runs" in r


def test_impossible_only_when_predicted_below_and_nobody_reached_it():
    """The DeepFM 8-rank case: prediction 1.02x < 1.3x, a free sync gives 1.07x, no
    system reached 1.3x, and the 1.44x shortfall is outside the 1.07x noise band."""
    sy = {"ddp-sparse": _sys(0.378, 0.211, psync=0.014, est=True),
          "zen": _sys(0.418, 0.200, psync=0.010, pred_sparse=1.02),
          "sparcml": _sys(0.446, 0.186, psync=0.010, pred_sparse=1.02)}
    r = _checks(_result("deepfm", 8, sy, 0.211))[DFM8_TARGET]["reason"]
    assert "even a free sync would give 1.07x" in r and "no sync scheme could reach 1.3x" in r
    assert "not resolved" not in r
    # The measured budget is stated too: ddp-sparse's own sync was far from line rate.
    assert "91 ms left after its 200 ms of compute" in r and "~167 ms/step" in r
    # A cheaper line-rate baseline sync does not make the target impossible for every
    # scheme: then the reason only says what the model predicts for zen's bytes.
    sy["ddp-sparse"]["predicted_sync_time_s"] = 0.100  # free sync: (211+100)/211 = 1.47x
    r = _checks(_result("deepfm", 8, sy, 0.211))[DFM8_TARGET]["reason"]
    assert "no sync scheme could" not in r and "a free sync would give 1.47x" in r
    # Someone meeting it removes the verdict altogether.
    sy["sparcml"] = _sys(0.280, 0.186, psync=0.010, pred_sparse=1.02)
    r = _checks(_result("deepfm", 8, sy, 0.211))[DFM8_TARGET]["reason"]
    assert "no system reached" not in r and "sparcml (1.35x" in r


def test_noise_band_named_and_peer_scheme_that_met_it():
    """The DeepFM 4-rank case: zen 0.88x of ddp-sparse, agsparse 1.01x, compute 1.64x."""
    sy = {"ddp-sparse": _sys(0.128, 0.081, psync=0.007, est=True),
          "zen": _sys(0.146, 0.079, psync=0.006, pred_sparse=1.01),
          "agsparse": _sys(0.127, 0.066, psync=0.006, pred_sparse=1.01),
          "dense": _sys(0.596, 0.108, psync=0.45, pred_sparse=0.16)}
    c = _checks(_result("deepfm", 4, sy, 0.081))[
        "DeepFM, 4 ranks, 1 Gbit/s: zen no slower than ddp-sparse"]
    assert not c["met"]
    r = c["reason"]
    assert r.startswith("not resolved by this run: the 1.14x shortfall")
    assert "66-108 ms, 1.64x" in r and "agsparse (1.01x" in r
    assert "no sync scheme could" not in r
    # Outside the noise band, the lead is the measured budget instead.
    for s in sy.values():
        s["compute_time_s"] = 0.079
        s["sync_time_s"] = s["step_time_s"] - 0.079
    r = _checks(_result("deepfm", 4, sy, 0.081))[
        "DeepFM, 4 ranks, 1 Gbit/s: zen no slower than ddp-sparse"]["reason"]
    assert "not resolved" not in r and r.startswith("in the same run the 1x was met by agsparse")
    assert "zen's exposed sync is 67 ms/step" in r


# -- chaos: the per-step checkpoint cost --------------------------------------------------------

def _chaos(over=None, share=None, pairs=None):
    s = {"trials": 1, "bit_identical": 1, "steps_lost_max": 1, "memory_ckpt_overhead": over,
         "memory_ckpt_cpu_share": share, "ckpt_cpu_s": None if share is None else 0.05,
         "train_cpu_s": None if share is None else 0.05 / share,
         "training_thread_share": 0.004, "pairs_on_off_s": pairs}
    return {"kill": "worker", "trials": [{"disk_every": 100}], "summary": s}


def _cost(data):
    return [c for c in check_chaos_targets(Path("c.json"), data) if "checkpoints" in c["target"]]


def test_checkpoint_cost_graded_by_cpu_share_with_wall_clock_beside():
    (ok,) = _cost(_chaos(over=0.09, share=0.03))
    assert ok["met"] and ok["measured"] == "3.0% (wall clock +9.0%)"
    (neg,) = _cost(_chaos(over=-0.078, share=0.065, pairs=[[0.84, 0.84], [0.76, 0.97]]))
    assert not neg["met"] and neg["measured"] == "6.5% (wall clock -7.8%)"
    assert "negative cost can only be noise" in neg["reason"]
    assert "pairs ranged -21.6% to +0.0%" in neg["reason"]


def test_negative_wall_clock_without_cpu_figure_is_unresolved_not_met(tmp_path):
    (c,) = _cost(_chaos(over=-0.05))
    assert c["met"] is None and "not resolved" in c["reason"]
    (pos,) = _cost(_chaos(over=0.02))
    assert pos["met"] is True
    res = tmp_path / "chaos_x.json"
    data = _chaos(over=-0.05)
    data.update(command="zentrain chaos", nodes=1, world_size=2, steps=14,
                machine={"cpus": 2})
    res.write_text(json.dumps(data))
    md = tmp_path / "b.md"
    assert report.main([str(res), "--out", str(md)]) == 0
    text = md.read_text()
    assert "| **unresolved** |" in text and "Missed or unresolved, and why" in text


# -- sync: hashing time against the wire time it saves -----------------------------------------

def _sync(*runs):
    """Runs of (world, zen peak bytes, agsparse peak bytes, zen hash seconds); dense's peak
    is 2.25 MB + zen's, so zen saves 18 ms of wire time over dense at 1 Gbit/s."""
    def sc(peak, **kw):
        return {"bytes_sent_max": peak, "bytes_recv_max": peak, "time_s": 0.01,
                "correct": True, **kw}
    wl = {"nnz_mean": 10, "gamma": 4.0, "density": 0.01, "contiguous_skew": 1.0,
          "unit": "step"}
    return {"spec": {"trace": None}, "machine": {"cpus": 2, "loadavg": [3.0]},
            "runs": [{"world": n, "workload": wl, "schemes": {
                "dense": sc(zen + 2.25e6), "agsparse": sc(ag), "zen": sc(zen, hash_s=h)}}
                for n, zen, ag, h in runs]}


def _hash(data):
    (c,) = [c for c in check_sync_targets(Path("s.json"), data) if "hashing" in c["target"]]
    return c


def test_hashing_time_graded_against_wire_time_saved_over_dense():
    saved = 2.25e6 / RATE_BYTES_PER_S * 1e3  # ms
    ok = _hash(_sync((4, 1.0e6, 2.25e6, 0.004), (8, 1.0e6, 3.5e6, 0.015)))
    assert ok["met"] and ok["measured"] == "2/2 n" and ok["world"] == "4-8"
    assert "vs dense" in ok["target"]
    slow = _hash(_sync((4, 1.0e6, 2.25e6, 0.004), (8, 1.0e6, 2.25e6, 0.050)))
    assert not slow["met"] and slow["measured"] == "1/2 n"
    assert f"took 4.0 to 50.0 ms against {saved:.1f} ms of wire time saved over dense" \
        in slow["reason"]
    assert "2 CPUs (load 3.0)" in slow["reason"]
    # The saving over agsparse is said beside it: 1.25 MB = 10 ms, above 4 ms, below 50 ms.
    assert "over agsparse zen saves 10.0 ms (0.44x its peak bytes" in slow["reason"]
    assert "at 1 of 2 world sizes" in slow["reason"]
