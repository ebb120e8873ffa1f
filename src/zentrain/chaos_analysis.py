"""What a ``zentrain chaos`` trial's run directories say: steps lost, recovery time and its
breakdown, bit-identity against the reference run, and the cost of per-step checkpoints."""

from __future__ import annotations

import glob
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_CHAOS_HOLD = "ZENTRAIN_CHAOS_HOLD_AFTER"
"""Set by ``zentrain chaos`` to step K in a kill run: rank 0 waits at the start of step
K + 1's backward (``CheckpointManager.sync_window``) until ``RUN_DIR/CHAOS_RELEASE``
exists, which the controller creates right after the SIGKILL. So the kill lands right
after step K even when steps are shorter than the controller's reaction time."""
CHAOS_RELEASE = "chaos-release"


@dataclass
class Run:
    """One ``zentrain run`` of a trial, as read back from its run directory."""

    run_dir: Path
    rc: int | None = None
    t_kill: float | None = None
    kill_at: int | None = None  # the step after which the kill was requested
    victim: str = ""
    protected_s: float | None = None  # --kill agent: kill → complete checkpoint again
    rows: list[dict[str, Any]] = field(default_factory=list)
    recovery: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Run:
        self.rows = [r for r in read_jsonl(self.run_dir / "metrics.jsonl") if "loss" in r]
        self.recovery = read_jsonl(self.run_dir / "recovery.jsonl")
        self.events = sorted((e for p in self.run_dir.glob("elastic-node*.jsonl")
                              for e in read_jsonl(p)), key=lambda e: e["t"])
        f = self.run_dir / "summary.json"
        self.summary = json.loads(f.read_text()) if f.is_file() else {}
        return self


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return out



def median_or_none(v: list[float]) -> float | None:
    return statistics.median(v) if v else None


def agents_state(run_dir: Path) -> dict[str, Any]:
    """The launcher's ``agents.json``: job id and each node's checkpoint agent."""
    return json.loads((run_dir / "agents.json").read_text())


class JsonlTail:
    """New complete lines of a growing JSONL file, read incrementally (polled every few
    ms, so re-reading the whole file each time would cost more than the steps)."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.buf = path, 0, b""

    def new_rows(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        self.pos += len(data)
        *lines, self.buf = (self.buf + data).split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def victim_pids(run_dir: Path, kind: str, index: int) -> tuple[list[int], str]:
    """The pids to SIGKILL for ``--kill kind`` of rank / node ``index``, and a description.

    A node is its elastic agent (``nodes.json``), its workers (``pids/rank*.json`` name
    their node) and its checkpoint agent when there is one: the disk-comparison run turns
    in-memory checkpoints off, so it has no ``agents.json``."""
    ranks = [json.loads(Path(f).read_text()) for f in glob.glob(str(run_dir / "pids" /
                                                                    "rank*.json"))]
    if kind == "worker":
        r = next((r for r in ranks if r["rank"] == index), None)
        if r is None:
            raise RuntimeError(f"--kill worker: rank {index} wrote no pid file in "
                               f"{run_dir}/pids (ranks found: {sorted(x['rank'] for x in ranks)})")
        return [r["pid"]], f"rank {index} (pid {r['pid']})"
    agents = agents_state(run_dir)["agents"] if (run_dir / "agents.json").is_file() else []
    agent = next((a for a in agents if a["node"] == index and a.get("pid")), None)
    if kind == "agent":
        if agent is None:
            raise RuntimeError(f"--kill agent: node {index} has no checkpoint agent "
                               f"({run_dir}/agents.json)")
        return [agent["pid"]], f"checkpoint agent of node {index} (pid {agent['pid']})"
    node = json.loads((run_dir / "nodes.json").read_text())["nodes"][index]
    workers = [r["pid"] for r in ranks if r["node"] == index]
    what = f"node {index} (elastic agent {node['pid']}, "
    what += f"checkpoint agent {agent['pid']}, " if agent else "no checkpoint agent, "
    return [node["pid"], *([agent["pid"]] if agent else []), *workers], \
        what + f"workers {workers})"


# -- analysis -----------------------------------------------------------------------------------

def wall_step_times(rows: list[dict[str, Any]], skip: int = 2) -> list[float]:
    """Wall-clock time between consecutive steps (checkpoint work included), leaving out
    each incarnation's first ``skip`` steps and any restart gap."""
    out, run = [], 0
    for a, b in zip(rows, rows[1:]):
        if b["step"] != a["step"] + 1 or b["time"] - a["time"] > 60 + 10 * b["step_time_s"]:
            run = 0
            continue
        run += 1
        if run > skip:
            out.append(b["time"] - a["time"])
    return out


def analyse(res: Run, ref: Run) -> dict[str, Any]:
    out: dict[str, Any] = {"run_dir": str(res.run_dir), "rc": res.rc, "victim": res.victim}
    ref_loss = {r["step"]: r["loss"] for r in ref.rows}
    same_losses = bool(res.rows) and all(ref_loss.get(r["step"]) == r["loss"] for r in res.rows)
    steps = {r["step"] for r in res.rows}
    digest = ref.summary.get("param_digest")
    out["bit_identical"] = bool(res.rc == 0 and same_losses and steps == set(ref_loss)
                                and digest is not None
                                and res.summary.get("param_digest") == digest)
    if res.t_kill is None:
        return out
    before = [r for r in res.rows if r["time"] <= res.t_kill]
    last = max((r["step"] for r in before), default=0)
    out["last_done"] = last
    if res.kill_at is not None and last != res.kill_at:
        # The hold (ENV_CHAOS_HOLD) makes this rare; say so rather than mislabel the trial.
        out["kill_late_by"] = last - res.kill_at
        out["note"] = (f"kill requested after step {res.kill_at} landed after step {last}")
    after = [r for r in res.rows if r["time"] > res.t_kill and r["step"] > last]
    first_new = after[0] if after else None
    starts = [r for r in res.recovery if r.get("t_restored", 0) > res.t_kill]
    start = next((r for r in starts if r.get("rank", 0) == 0), None)
    if start is None:  # no restart (an agent kill): nothing lost
        out.update(steps_lost=0, restored_step=None, source=None)
        out["recovery_s"] = res.protected_s
        return out
    sources = {r.get("rank", 0): r["source"] for r in starts}
    peer = sorted({s for s in sources.values() if s.startswith("memory-peer")})
    out.update(restored_step=start["step"], source=peer[0] if peer else start["source"],
               sources=sources, steps_lost=last - start["step"])
    out["recovery_s"] = first_new["time"] - res.t_kill if first_new else None
    if first_new is None:
        out["recovery_s_missing"] = (
            f"no step after {last} completed after the kill (the run exited {res.rc} with "
            f"{max((r['step'] for r in res.rows), default=0)} steps done)")
    out["breakdown"] = breakdown(res, start, first_new)
    return out


def breakdown(res: Run, start: dict[str, Any], first_new: dict[str, Any] | None
              ) -> dict[str, float | None]:
    """Split kill → first new step into the phases of a restart."""
    t_kill = res.t_kill or 0.0
    ev = [e for e in res.events if e["t"] >= t_kill - 1]

    def first(name: str) -> float | None:
        return next((e["t"] for e in ev if e["event"] == name), None)

    failed, rdzv, done = first("failed"), first("rendezvous"), first("rendezvous_done")
    proc = start["t_proc_start"]
    imported = max(start["t_imported"], proc)  # forked from the zygote: imported already

    def span(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else max(0.0, b - a)

    return {"detect": span(t_kill, failed), "stop": span(failed, rdzv),
            "rendezvous": span(rdzv, done), "spawn": span(done, proc),
            "import": span(proc, imported), "init": span(imported, start["t_init"]),
            "load": span(start["t_init"], start["t_restored"]),
            "steps": span(start["t_restored"], first_new["time"] if first_new else None)}


def cost_summary(on_steps: list[float], off_steps: list[float], on_rows: list[dict[str, Any]],
                 pairs: list[tuple[float | None, float | None]]) -> dict[str, Any]:
    """The step-time cost of per-step in-memory checkpoints, three ways: wall-clock step
    time with / without (noisy on a shared machine), the training thread's own share
    (snapshot, waits), and the background CPU time per save against the training
    process's CPU time per step, every thread but the checkpoint's (independent of the
    load)."""
    def col(key: str) -> list[float]:
        return [r[key] for r in on_rows if isinstance(r.get(key), int | float)]

    cost: dict[str, Any] = {
        "step_time_s_memory_on": median_or_none(on_steps), "step_time_s_memory_off": median_or_none(off_steps),
        "cost_steps_measured": [len(on_steps), len(off_steps)],
        "ckpt_training_thread_s": median_or_none([r.get("ckpt_blocked_s", 0) + r.get("ckpt_snapshot_s", 0)
                                           + r.get("ckpt_barrier_s", 0) for r in on_rows
                                           if "ckpt_snapshot_s" in r]),
        "ckpt_cpu_s": median_or_none(col("ckpt_cpu_s")), "ckpt_copy_cpu_s": median_or_none(col("ckpt_copy_cpu_s")),
        "train_cpu_s": median_or_none(col("train_cpu_s")),
        "pairs_on_off_s": [list(p) for p in pairs]}
    if cost["step_time_s_memory_on"] and cost["step_time_s_memory_off"]:
        cost["memory_ckpt_overhead"] = (cost["step_time_s_memory_on"]
                                        / cost["step_time_s_memory_off"] - 1)
    if cost["ckpt_cpu_s"] is not None and cost["train_cpu_s"]:
        cost["memory_ckpt_cpu_share"] = cost["ckpt_cpu_s"] / cost["train_cpu_s"]
    if cost["ckpt_training_thread_s"] is not None and cost["step_time_s_memory_on"]:
        cost["training_thread_share"] = (cost["ckpt_training_thread_s"]
                                         / cost["step_time_s_memory_on"])
    return cost


def summarize(trials: list[dict[str, Any]], cost: dict[str, Any]) -> dict[str, Any]:
    def vals(key: str) -> list[float]:
        return [t[key] for t in trials if isinstance(t.get(key), int | float)]

    def mean(key: str) -> float | None:
        v = vals(key)
        return sum(v) / len(v) if v else None

    out: dict[str, Any] = {
        "trials": len(trials),
        "bit_identical": sum(bool(t.get("bit_identical")) for t in trials),
        "steps_lost_max": max(vals("steps_lost"), default=None),
        "steps_lost_mean": mean("steps_lost"),
        "recovery_s_mean": mean("recovery_s"),
        "recovery_s_median": statistics.median(vals("recovery_s")) if vals("recovery_s")
        else None,
        "recovery_s_disk_mean": mean("recovery_s_disk"),
        "recovery_s_disk_measured_mean": mean("recovery_s_disk_measured"),
        "steps_lost_disk_measured_mean": mean("steps_lost_disk_measured"),
        **cost}
    if out["recovery_s_mean"] and out["recovery_s_disk_mean"]:
        out["disk_over_memory"] = out["recovery_s_disk_mean"] / out["recovery_s_mean"]
    parts = [t["breakdown"] for t in trials if t.get("breakdown")]
    if parts:
        out["breakdown_mean"] = {k: statistics.fmean(p[k] for p in parts if p[k] is not None)
                                 for k in parts[0] if any(p[k] is not None for p in parts)}
    return out


# -- the command --------------------------------------------------------------------------------
