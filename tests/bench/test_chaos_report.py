"""``bench report`` on ``zentrain chaos`` results: the recovery issue's targets."""

import json
from pathlib import Path

from zentrain.bench import report
from zentrain.bench.chaos_report import check_chaos_targets


def _result(lost=1, identical=10, disk=95.0, mem=9.5, on=1.03, off=1.0, share=0.02):
    bd = {"detect": 0.3, "stop": 0.0, "rendezvous": 0.6, "spawn": 0.2, "import": 0.0,
          "init": 3.0, "load": 0.5, "steps": 4.0}
    return {"command": "zentrain chaos --kill worker", "kill": "worker", "nodes": 1,
            "world_size": 2, "steps": 14, "machine": {"cpus": 2, "python": "3.11"},
            "trials": [{"disk_every": 100}] * 10,
            "summary": {"trials": 10, "bit_identical": identical, "steps_lost_max": lost,
                        "steps_lost_mean": 1.0, "recovery_s_mean": mem,
                        "recovery_s_median": mem, "recovery_s_disk_mean": disk,
                        "disk_over_memory": disk / mem, "step_time_s_memory_on": on,
                        "step_time_s_memory_off": off, "memory_ckpt_overhead": on / off - 1,
                        "memory_ckpt_cpu_share": share, "ckpt_cpu_s": 0.5 * share,
                        "train_cpu_s": 0.5, "breakdown_mean": bd}}


def test_targets_met_and_missed():
    ok = check_chaos_targets(Path("a.json"), _result())
    assert len(ok) == 4 and all(c["met"] for c in ok)
    bad = {c["target"]: c for c in check_chaos_targets(
        Path("b.json"), _result(lost=2, identical=9, disk=20.0, on=1.2, share=0.08))}
    assert not any(c["met"] for c in bad.values())
    cost = bad["worker kill: step-time cost of per-step in-memory checkpoints (checkpoint CPU "
               "per save / training CPU per step)"]
    assert cost["measured"] == "8.0% (wall clock +20.0%)"
    assert "is 8.0% of the training process's 0.500 s" in cost["reason"]


def test_report_page_has_the_recovery_section(tmp_path):
    res = tmp_path / "chaos_worker.json"
    res.write_text(json.dumps(_result(identical=9)))
    md = tmp_path / "b.md"
    assert report.main([str(res), "--out", str(md)]) == 0
    text = md.read_text()
    assert "## Failure recovery" in text and "9/10" in text and "**no**" in text
    assert "| detect | stop |" in text


def test_steps_lost_reason_names_the_trials_and_their_source():
    from pathlib import Path

    from zentrain.bench.chaos_report import check_chaos_targets

    trials = [{"trial": 0, "steps_lost": 1, "last_done": 6, "restored_step": 5,
               "source": "memory-peer1"},
              {"trial": 1, "steps_lost": 2, "last_done": 11, "restored_step": 9,
               "source": "memory-peer0"}]
    data = {"kill": "node", "trials": trials,
            "summary": {"trials": 2, "steps_lost_max": 2, "bit_identical": 2}}
    (lost,) = [c for c in check_chaos_targets(Path("n.json"), data) if "lost" in c["target"]]
    assert lost["met"] is False
    assert "1 of 2 trials" in lost["reason"] and "trial 1: killed after step 11, restored 9" \
        in lost["reason"] and "peer's replicas" in lost["reason"]
    trials[1].update(steps_lost=1, restored_step=10)
    data["summary"]["steps_lost_max"] = 1
    (lost,) = [c for c in check_chaos_targets(Path("n.json"), data) if "lost" in c["target"]]
    assert lost["met"] and lost["reason"] is None
