"""Recovery end to end: SIGKILL a worker (or a whole emulated node) through the real CLI and
check the run finishes bit-identical to an uninterrupted one; persistent checkpoints load
without unpickling arbitrary objects and commit only complete saves."""

import glob
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from zentrain.chaos_analysis import Run, analyse, victim_pids, wall_step_times
from zentrain.ckpt import persistent

# A tiny GPT (1 layer, d=32, 300-token BPE on 300 kB of text): steps take tens of ms, so a
# run costs mostly its start-up.
TINY = ["--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
        "--set", "model.seq_len=32", "--set", "model.vocab_size=300",
        "--set", "data.max_bytes=300000", "--set", "train.batch_size=4",
        "--set", "train.eval_batches=1", "--set", "train.eval_every=0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def chaos(tmp_path, cache, *args, timeout=600, disk=False):
    out = tmp_path / "chaos.json"
    cmd = [sys.executable, "-m", "zentrain.cli", "chaos", *TINY, "--set",
           f"data.cache_dir={cache}", "--chaos-dir", str(tmp_path / "runs"), "--json", str(out),
           *([] if disk else ["--no-disk"]), "--cost-pairs", "0", *args]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, CI="1"))
    logs = "\n".join(f"== {p}\n" + Path(p).read_text()[-3000:]
                     for p in glob.glob(str(tmp_path / "runs" / "*.log")))
    assert out.is_file(), r.stdout + r.stderr + logs
    return json.loads(out.read_text()), r, logs


def assert_cleaned_up(run_dir: Path) -> None:
    """No agent directory in /dev/shm, no zygote socket directory, no live process."""
    agents = json.loads((run_dir / "agents.json").read_text())
    for a in agents["agents"]:
        assert not Path(a["dir"]).exists(), f"{a['dir']} left behind"
        assert a["pid"] is None or not Path(f"/proc/{a['pid']}").exists() or \
            Path(f"/proc/{a['pid']}/stat").read_text().split()[2] == "Z"
    assert not glob.glob(f"/tmp/zt-{agents['job']}*"), "zygote socket directory left behind"


@pytest.mark.slow
def test_worker_kill_resumes_bit_identical(tmp_path, cache):
    """2 ranks; rank 1 is SIGKILLed after step 4 of 8; the elastic agent restarts the workers,
    they load the newest committed in-memory checkpoint from the local agent and finish
    with every step's loss and the final parameters equal to an uninterrupted run."""
    out, r, logs = chaos(tmp_path, cache, "--steps", "8", "--at-step", "4", "--rank", "1",
                         "--trials", "1")
    (t,) = out["trials"]
    assert t["rc"] == 0, logs
    assert t["bit_identical"], (t, logs)
    # Steps take tens of ms here: without rank 0's hold the kill landed steps late.
    assert t["last_done"] == 4 and "kill_late_by" not in t, t
    assert t["steps_lost"] is not None and 0 <= t["steps_lost"] <= 1, t
    assert t["source"] == "memory" and t["restored_step"] >= 3, t
    assert t["recovery_s"] > 0 and set(t["breakdown"]) >= {"detect", "rendezvous", "load"}
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bit-identical: 1/1" in r.stdout
    for name in ("ref", "t0-memory"):
        assert_cleaned_up(tmp_path / "runs" / name)


@pytest.mark.slow
def test_node_kill_recovers_from_peer_replica(tmp_path, cache):
    """2 emulated nodes x 1 worker on loopback, m = 2: node 1 (its elastic agent, worker and
    checkpoint agent) is SIGKILLed; the replacement node's rank loads node 1's checkpoint
    from the replica on node 0, and the run ends bit-identical. The disk comparison (no
    checkpoint agents, so no agents.json) kills the same node and restores from DCP."""
    out, r, logs = chaos(tmp_path, cache, "--kill", "node", "--node", "1", "--nodes", "2",
                         "--nproc-per-node", "1", "--loopback", "--steps", "8", "--at-step",
                         "4", "--trials", "1", disk=True)
    (t,) = out["trials"]
    assert t["rc"] == 0, logs
    assert t["bit_identical"], (t, logs)
    assert t["last_done"] == 4 and "kill_late_by" not in t, t
    assert 0 <= t["steps_lost"] <= 1, t
    assert t["sources"] == {"0": "memory", "1": "memory-peer0"}, t
    assert t["bit_identical_disk"] and t["source_disk"] == "persistent", (t, logs)
    assert t["steps_lost_disk_measured"] in (1, 2) and t["recovery_s_disk"] > 0, t
    for name in ("ref", "t0-memory"):
        assert_cleaned_up(tmp_path / "runs" / name)


# -- persistent checkpoints ----------------------------------------------------------------------

@pytest.mark.slow
def test_async_persistent_checkpoint_resumes_at_another_world_size(tmp_path, cache):
    """DCP async_save every 2 steps on 2 ranks (committed by rename, marked with the job);
    --resume on 1 rank continues at step 5 from the step-4 checkpoint."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "zentrain.cli", "run", *TINY, "--set",
                               f"data.cache_dir={cache}", "--set", "metrics.progress=false",
                               "--run-dir", "out", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600, env=dict(os.environ, CI="1"))
    r = run("--set", "train.steps=4", "--set", "checkpoint.every=2")
    assert r.returncode == 0, r.stdout + r.stderr
    ckpts = tmp_path / "out" / "checkpoints"
    assert (ckpts / "latest").read_text() == "4"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000002", "step_000004"]
    marker = json.loads((ckpts / "step_000004" / "zentrain.json").read_text())
    assert marker["step"] == 4 and marker["world_size"] == 2
    r = run("--set", "train.steps=6", "--nproc", "1", "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows if "loss" in x] == [1, 2, 3, 4, 5, 6]
    rec = [json.loads(x) for x in (tmp_path / "out" / "recovery.jsonl").read_text().splitlines()]
    assert rec[-1]["step"] == 4 and rec[-1]["source"] == "persistent"


def _model_and_optim(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 8)).sum().backward()
    optim.step()
    return model, optim


def test_persistent_round_trip_uses_the_safe_reader(tmp_path):
    model, optim = _model_and_optim(0)
    persistent.save(tmp_path, 7, model, optim, {"step": torch.tensor(7)})
    other, other_optim = _model_and_optim(1)
    extra = {"step": torch.tensor(0)}
    assert persistent.load(tmp_path, other, other_optim, extra) == 7
    assert int(extra["step"]) == 7
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(optim.state_dict()["state"][0]["exp_avg"],
                       other_optim.state_dict()["state"][0]["exp_avg"])


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.target}",))


def test_persistent_load_refuses_code_in_metadata(tmp_path):
    """A checkpoint whose .metadata pickle would run a command is refused unexecuted."""
    model, optim = _model_and_optim(0)
    persistent.save(tmp_path, 3, model, optim, {"step": torch.tensor(3)})
    meta = tmp_path / "checkpoints" / "step_000003" / ".metadata"
    _Evil.target = str(tmp_path / "pwned")
    meta.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError, match=r"refers to (os|posix)\.system"):
        persistent.load(tmp_path, model, optim, {"step": torch.tensor(0)})
    assert not (tmp_path / "pwned").exists()


# -- the chaos analysis on synthetic runs -----------------------------------------------------

def _rows(times):
    return [{"step": s, "loss": float(s), "time": t, "step_time_s": 0.1} for s, t in times]


def test_analyse_counts_lost_steps_and_times_recovery(tmp_path):
    ref = Run(tmp_path / "ref", rc=0, rows=_rows([(s, s) for s in range(1, 9)]),
              summary={"param_digest": "abc"})
    # Killed at t=4.5 after step 4 was done; restored step 3, recomputed 4, step 5 at t=20.
    rows = _rows([(1, 1), (2, 2), (3, 3), (4, 4), (4, 19), (5, 20), (6, 21), (7, 22), (8, 23)])
    rec = [{"rank": 0, "restart": 0, "step": 0, "source": "none", "t_restored": 0.5},
           {"rank": 0, "restart": 1, "step": 3, "source": "memory", "t_proc_start": 10,
            "t_imported": 5, "t_init": 14, "t_restore_start": 14, "t_restored": 15},
           {"rank": 1, "restart": 1, "step": 3, "source": "memory-peer0", "t_restored": 15}]
    events = [{"t": 5.0, "event": "failed"}, {"t": 5.5, "event": "rendezvous"},
              {"t": 9.0, "event": "rendezvous_done"}]
    res = Run(tmp_path / "x", rc=0, t_kill=4.5, rows=rows, recovery=rec, events=events,
              summary={"param_digest": "abc"})
    t = analyse(res, ref)
    assert t["bit_identical"] and t["last_done"] == 4 and t["steps_lost"] == 1
    assert t["recovery_s"] == pytest.approx(20 - 4.5)
    assert t["source"] == "memory-peer0" and t["sources"] == {0: "memory", 1: "memory-peer0"}
    b = t["breakdown"]
    assert b["detect"] == pytest.approx(0.5) and b["stop"] == pytest.approx(0.5)
    assert b["rendezvous"] == pytest.approx(3.5) and b["spawn"] == pytest.approx(1.0)
    assert b["import"] == 0 and b["init"] == pytest.approx(4) and b["load"] == pytest.approx(1)
    assert b["steps"] == pytest.approx(5)
    res.summary = {"param_digest": "other"}
    assert not analyse(res, ref)["bit_identical"]


def test_wall_step_times_skip_warmup_and_restart_gaps():
    rows = _rows([(1, 0), (2, 1), (3, 2), (4, 3), (5, 4), (3, 100), (4, 101), (5, 102),
                  (6, 103), (7, 104)])
    assert wall_step_times(rows, skip=2) == [1, 1, 1, 1]


def test_node_victims_without_checkpoint_agents(tmp_path):
    """The disk-comparison run has no agents.json: a node is its elastic agent and the
    workers whose pid files name it (this raised FileNotFoundError before)."""
    (tmp_path / "pids").mkdir()
    (tmp_path / "nodes.json").write_text(json.dumps(
        {"job": "j", "nodes": [{"node": 0, "pid": 100}, {"node": 1, "pid": 101}]}))
    for rank, node, pid in [(0, 0, 200), (1, 0, 201), (2, 1, 202), (3, 1, 203)]:
        (tmp_path / "pids" / f"rank{rank}.json").write_text(
            json.dumps({"rank": rank, "pid": pid, "node": node}))
    pids, what = victim_pids(tmp_path, "node", 1)
    assert sorted(pids) == [101, 202, 203] and "no checkpoint agent" in what
    with pytest.raises(RuntimeError, match="node 1 has no checkpoint agent"):
        victim_pids(tmp_path, "agent", 1)
    (tmp_path / "agents.json").write_text(json.dumps(
        {"job": "j", "agents": [{"node": 0, "pid": 300}, {"node": 1, "pid": 301}]}))
    pids, what = victim_pids(tmp_path, "node", 1)
    assert sorted(pids) == [101, 202, 203, 301] and "checkpoint agent 301" in what
    assert victim_pids(tmp_path, "worker", 2)[0] == [202]
    with pytest.raises(RuntimeError, match="rank 9 wrote no pid file"):
        victim_pids(tmp_path, "worker", 9)


def test_a_late_kill_and_a_missing_recovery_are_explicit(tmp_path):
    ref = Run(tmp_path / "ref", rc=0, rows=_rows([(s, s) for s in range(1, 9)]),
              summary={"param_digest": "abc"})
    rows = _rows([(s, s) for s in range(1, 7)])  # killed at 6.5; nothing ran after
    rec = [{"rank": 0, "restart": 1, "step": 5, "source": "memory", "t_proc_start": 8,
            "t_imported": 8, "t_init": 9, "t_restore_start": 9, "t_restored": 10}]
    res = Run(tmp_path / "x", rc=1, t_kill=6.5, kill_at=4, rows=rows, recovery=rec)
    t = analyse(res, ref)
    assert t["last_done"] == 6 and t["kill_late_by"] == 2
    assert t["note"] == "kill requested after step 4 landed after step 6"
    assert t["recovery_s"] is None and "no step after 6 completed" in t["recovery_s_missing"]
    res.kill_at, res.t_kill = 6, 6.5
    assert "kill_late_by" not in analyse(res, ref)
