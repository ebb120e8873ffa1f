"""``zentrain chaos``: kill training processes with SIGKILL and measure the recovery.

    zentrain chaos [CONFIG] --kill worker|node|agent [--at-step K] --trials T [--json OUT]

Every trial runs the real ``zentrain run`` in a subprocess, waits until step K is done
(random in ``[4, steps - 2]`` unless given; rank 0's ``metrics.jsonl`` rows carry wall-clock
times), and SIGKILLs the victim. Rank 0 holds step K + 1 at the start of its backward until
the kill is done (``ENV_CHAOS_HOLD``), so the kill lands right after step K however short
the steps; a trial whose kill landed elsewhere anyway says so (``kill_late_by``, ``note``).
The victims:

* ``worker``: one worker (a random rank, or ``--rank``) — torch's elastic agent restarts
  the node's workers, which load the newest in-memory checkpoint from the local agent;
* ``node``: one emulated node (``--nodes`` >= 2): its elastic agent, its workers and its
  checkpoint agent (if any: the disk-comparison run has none) at once; the launcher replaces the node (memory wiped) and every rank
  loads from the replicas (``checkpoint.replicas`` m = 2);
* ``agent``: only a checkpoint agent; training must go on untouched, and the launcher
  restarts the agent.

Per trial, the same kill is repeated with in-memory checkpoints off and persistent (DCP)
checkpoints on, for comparison. That run saves every ``max(1, K - 2)`` steps, so the
restarted workers really load a persistent checkpoint (restart + DCP load + the
recomputation of ``steps_lost_disk_measured`` steps are measured:
``recovery_s_disk_measured``). A checkpoint every ``--disk-every`` steps (default 100) loses
``disk_every / 2`` steps on average, not the 1-2 of that run, so ``recovery_s_disk`` is the
measured time plus ``disk_every / 2 - steps_lost_disk_measured`` steps at the run's median
step time (recomputation is not re-run for 50 steps; it is charged at the measured rate).

Reported per trial: ``bit_identical`` (final parameter digest and every step's loss equal
to an uninterrupted reference run's), ``steps_lost`` (steps done before the kill minus the
step restored), ``recovery_s`` (SIGKILL → the first step not done before the kill is
done: restart + load + recomputation), its breakdown (detect, stop, rendezvous, spawn,
init, load, steps) from the elastic agent's event log and the workers' timestamps, and the
same for the persistent-checkpoint run. With ``--kill agent``, ``recovery_s`` is the time
until the restarted agent holds a complete checkpoint again.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from zentrain.chaos_analysis import (
    CHAOS_RELEASE,
    ENV_CHAOS_HOLD,
    JsonlTail,
    Run,
    agents_state,
    analyse,
    cost_summary,
    median_or_none,
    read_jsonl,
    summarize,
    victim_pids,
    wall_step_times,
)
from zentrain.config import ConfigError, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="SIGKILL workers / nodes / agents mid-run; measure recovery",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="TOML config (default: the debug GPT config)")
    p.add_argument("--kill", choices=["worker", "node", "agent"], default="worker")
    p.add_argument("--at-step", type=int, default=None,
                   help="kill once this step is done (default: random per trial)")
    p.add_argument("--rank", type=int, default=None, help="--kill worker: this rank (default: "
                   "random)")
    p.add_argument("--node", type=int, default=None, help="--kill node/agent: this node "
                   "(default: random)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="train.steps of every run")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--nproc-per-node", "--nproc", dest="nproc", type=int, default=None)
    p.add_argument("--loopback", action="store_true", help="--nodes on loopback only")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="config override for every run (repeatable)")
    p.add_argument("--disk-every", type=int, default=100,
                   help="persistent checkpoint interval of the comparison run (default 100)")
    p.add_argument("--no-disk", action="store_true", help="skip the comparison runs")
    p.add_argument("--cost-pairs", type=int, default=1,
                   help="uninterrupted runs with in-memory checkpoints off (each paired with "
                        "one with them on, the first being the reference) to measure their "
                        "step-time cost (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill steps and victims")
    p.add_argument("--chaos-dir", default=None, help="where the runs go (default: "
                   "runs/chaos-<time>)")
    p.add_argument("--json", default=None, metavar="OUT", help="write {'trials': [...]} here")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    p.set_defaults(func=cmd_chaos)


# -- running ------------------------------------------------------------------------------------

class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        base = list(args.overrides)
        if args.steps is not None:
            base.append(f"train.steps={args.steps}")
        # Deterministic mode (the bit-identity condition), a metrics row per step
        # (the kill trigger and clock), no progress bars, no final save (not measured).
        base += ["train.deterministic=true", "metrics.log_every=1", "metrics.progress=false",
                 "checkpoint.at_end=false"]
        if args.nproc is not None:
            base.append(f"parallel.nproc={args.nproc}")
        self.base = base
        self.cfg = load_config(args.config, base)
        self.steps = self.cfg.train.steps
        self.world = args.nodes * self.cfg.parallel.nproc
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.dir = Path(args.chaos_dir or f"runs/chaos-{stamp}")

    def command(self, run_dir: Path, extra: list[str]) -> list[str]:
        cmd = [sys.executable, "-m", "zentrain.cli", "run"]
        if self.args.config:
            cmd.append(self.args.config)
        for o in self.base + extra:
            cmd += ["--set", o]
        cmd += ["--run-dir", str(run_dir)]
        if self.args.nodes > 1:
            cmd += ["--nodes", str(self.args.nodes)]
            if self.args.loopback:
                cmd.append("--loopback")
        return cmd

    def run(self, name: str, extra: list[str], kill_at: int | None = None,
            victim: tuple[str, int] | None = None) -> Run:
        run_dir = self.dir / name
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        res = Run(run_dir)
        with open(self.dir / f"{name}.log", "w") as log:
            env = dict(os.environ, CI="1")
            if kill_at is not None:
                # Rank 0 holds step kill_at + 1 until the kill is done (manager.py), so the
                # kill lands right after step kill_at however short the steps are.
                env[ENV_CHAOS_HOLD] = str(kill_at)
                res.kill_at = kill_at
            proc = subprocess.Popen(self.command(run_dir, extra), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env)
            deadline = time.monotonic() + self.args.timeout
            try:
                if kill_at is not None and victim is not None:
                    self._kill_when(res, proc, kill_at, victim, deadline)
                while proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.2)
                    if victim and victim[0] == "agent" and res.protected_s is None:
                        self._check_protected(res, victim[1])
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        res.rc = proc.returncode
        return res.load()

    def _kill_when(self, res: Run, proc: subprocess.Popen, step: int,
                   victim: tuple[str, int], deadline: float) -> None:
        tail = JsonlTail(res.run_dir / "metrics.jsonl")
        while proc.poll() is None and time.monotonic() < deadline:
            if any("loss" in r and r["step"] >= step for r in tail.new_rows()):
                break
            time.sleep(0.005)
        else:
            return
        kind, index = victim
        try:
            pids, what = victim_pids(res.run_dir, kind, index)
            res.t_kill = time.time()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            res.victim = what
        finally:
            (res.run_dir / CHAOS_RELEASE).touch()  # rank 0 may go on (into the failure)

    def _check_protected(self, res: Run, node: int) -> None:
        """--kill agent: has the restarted agent stored every local rank's shard of some step
        after the kill?"""
        if res.t_kill is None:
            return
        d = Path(agents_state(res.run_dir)["agents"][node]["dir"])
        done_before = max((r["step"] for r in read_jsonl(res.run_dir / "metrics.jsonl")
                           if "loss" in r and r.get("time", 0) <= res.t_kill), default=0)
        per_step: dict[int, int] = {}
        for f in d.glob("own-r*-s*"):
            if not f.name.endswith(".part"):
                s = int(f.name.rsplit("-s", 1)[1])
                per_step[s] = per_step.get(s, 0) + 1
        if any(s > done_before and n >= self.cfg.parallel.nproc for s, n in per_step.items()):
            res.protected_s = time.time() - res.t_kill


def cmd_chaos(args: argparse.Namespace) -> int:
    if args.trials < 0:
        raise ConfigError(f"bad --trials {args.trials} (allowed: >= 0; 0 measures only the "
                          "step-time cost)")
    if args.kill == "node" and args.nodes < 2:
        raise ConfigError("--kill node needs --nodes >= 2 (a peer must hold the replicas)")
    ch = Chaos(args)
    if ch.cfg.checkpoint.memory_every <= 0:
        raise ConfigError("chaos measures in-memory recovery: checkpoint.memory_every must "
                          "be > 0")
    if ch.cfg.checkpoint.max_restarts < 1 and args.kill != "agent":
        raise ConfigError("checkpoint.max_restarts must be >= 1 to recover from a kill")
    if ch.steps < 4:
        raise ConfigError(f"train.steps = {ch.steps} is too short to kill mid-run (>= 4)")
    if args.at_step is not None and not 1 <= args.at_step < ch.steps:
        raise ConfigError(f"--at-step must be in [1, {ch.steps - 1}]")
    ch.dir.mkdir(parents=True, exist_ok=True)
    say = _printer()
    say(f"chaos: --kill {args.kill}, {args.trials} trial(s) of {ch.steps} steps on "
        f"{args.nodes} node(s) x {ch.cfg.parallel.nproc} worker(s); runs in {ch.dir}")
    say("reference run (uninterrupted)...")
    ref = ch.run("ref", [])
    if ref.rc != 0 or not ref.summary:
        say(f"the reference run failed (exit {ref.rc}); see {ch.dir}/ref.log")
        return 1
    on_runs, off_runs, on_rows = [wall_step_times(ref.rows)], [], list(ref.rows[2:])
    for k in range(args.cost_pairs):  # on, off, on, off, ...: the load drifts between runs
        say(f"step-time cost: run {k + 1}/{args.cost_pairs} without in-memory checkpoints...")
        off_runs.append(wall_step_times(ch.run(f"cost{k}-off",
                                               ["checkpoint.memory_every=0"]).rows))
        if k + 1 < args.cost_pairs:
            on = ch.run(f"cost{k}-on", [])
            on_runs.append(wall_step_times(on.rows))
            on_rows += on.rows[2:]
    pairs = [(median_or_none(a), median_or_none(b)) for a, b in zip(on_runs, off_runs)]
    on_steps = [x for r in on_runs for x in r]
    off_steps = [x for r in off_runs for x in r]
    trials: list[dict[str, Any]] = []
    for i in range(args.trials):
        at = args.at_step or ch.rng.randint(min(4, ch.steps - 2), ch.steps - 2)
        index = _pick(ch, args)
        victim = (args.kill, index)
        say(f"trial {i + 1}/{args.trials}: kill {args.kill} {index} after step {at}...")
        res = ch.run(f"t{i}-memory", [], at, victim)
        t = {"trial": i, "kill": args.kill, "at_step": at, **analyse(res, ref)}
        if not args.no_disk and args.kill != "agent":
            # The same kill with memory checkpoints off and a persistent checkpoint two
            # steps before it, so the restart really loads one (see the module docstring).
            every = max(1, at - 2)
            disk = ch.run(f"t{i}-disk", ["checkpoint.memory_every=0",
                                         f"checkpoint.every={every}"], at, victim)
            d = analyse(disk, ref)
            step_s = statistics.median(wall_step_times(disk.rows) or [0.0])
            t.update(recovery_s_disk_measured=d.get("recovery_s"),
                     steps_lost_disk_measured=d.get("steps_lost"),
                     bit_identical_disk=d.get("bit_identical"), breakdown_disk=d.get("breakdown"),
                     source_disk=d.get("source"), disk_every=args.disk_every,
                     step_time_s=step_s)
            if d.get("recovery_s") is not None and d.get("steps_lost") is not None:
                # A checkpoint every disk_every steps loses disk_every / 2 on average.
                t["steps_lost_disk"] = args.disk_every / 2
                t["recovery_s_disk"] = d["recovery_s"] + step_s * (
                    args.disk_every / 2 - d["steps_lost"])
        trials.append(t)
        say("  " + _line(t))
    cost = cost_summary(on_steps, off_steps, on_rows, pairs)
    summary = summarize(trials, cost)
    out = {"command": "zentrain chaos " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["chaos"]
           else None, "kill": args.kill, "nodes": args.nodes, "world_size": ch.world,
           "steps": ch.steps, "config": args.config, "overrides": ch.base,
           "machine": _machine(), "trials": trials, "summary": summary}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    (ch.dir / "chaos.json").write_text(json.dumps(out, indent=1))
    _table(out)
    ok = all(t.get("bit_identical") for t in trials) and all(
        t.get("rc") == 0 for t in trials)
    return 0 if ok else 1


def _pick(ch: Chaos, args: argparse.Namespace) -> int:
    if args.kill == "worker":
        return args.rank if args.rank is not None else ch.rng.randrange(ch.world)
    return args.node if args.node is not None else ch.rng.randrange(args.nodes)


def _machine() -> dict[str, Any]:
    import platform

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "loadavg_at_end": load}


def _printer():
    def say(text: str) -> None:
        print(text, flush=True)
    return say


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.2f}{unit}"
    return f"{v}{unit}"


def _line(t: dict[str, Any]) -> str:
    parts = [f"steps lost {_fmt(t.get('steps_lost'))}",
             f"recovered in {_fmt(t.get('recovery_s'), ' s')} from {t.get('source') or '—'}",
             f"bit-identical {_fmt(t.get('bit_identical'))}"]
    if "recovery_s_disk" in t:
        parts.append(f"disk (every {t['disk_every']}): {_fmt(t.get('recovery_s_disk'), ' s')}"
                     f" ({_fmt(t.get('recovery_s_disk_measured'), ' s')} measured with "
                     f"{_fmt(t.get('steps_lost_disk_measured'))} steps lost)")
    return ", ".join(parts)


def _table(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"zentrain chaos: --kill {out['kill']}, {out['nodes']} node(s), "
                    f"{out['world_size']} ranks, {out['steps']} steps")
    for col in ("trial", "kill at", "victim", "lost", "recovery s", "source",
                "identical", "disk s", "disk s meas."):
        t.add_column(col, justify="right")
    for tr in out["trials"]:
        t.add_row(str(tr["trial"]), str(tr["at_step"]), tr.get("victim", "").split(" (")[0],
                  _fmt(tr.get("steps_lost")), _fmt(tr.get("recovery_s")),
                  tr.get("source") or "—", _fmt(tr.get("bit_identical")),
                  _fmt(tr.get("recovery_s_disk")), _fmt(tr.get("recovery_s_disk_measured")))
    console = Console()
    console.print(t)
    s = out["summary"]
    lines = [f"bit-identical: {s['bit_identical']}/{s['trials']}",
             f"steps lost: max {_fmt(s['steps_lost_max'])}, mean {_fmt(s['steps_lost_mean'])}",
             f"recovery: mean {_fmt(s['recovery_s_mean'], ' s')}"]
    if s.get("recovery_s_disk_mean") is not None:
        lines.append(f"persistent-checkpoint recovery: mean {_fmt(s['recovery_s_disk_mean'], ' s')}"
                     f" with a checkpoint every {out['trials'][0].get('disk_every')} steps "
                     f"({_fmt(s.get('disk_over_memory'), 'x')} the in-memory recovery); "
                     f"measured {_fmt(s.get('recovery_s_disk_measured_mean'), ' s')} with "
                     f"{_fmt(s.get('steps_lost_disk_measured_mean'))} steps lost")
    if s.get("breakdown_mean"):
        lines.append("recovery breakdown (mean s): " + ", ".join(
            f"{k} {v:.2f}" for k, v in s["breakdown_mean"].items()))
    if s.get("memory_ckpt_overhead") is not None:
        lines.append(f"step time with / without in-memory checkpoints: "
                     f"{s['step_time_s_memory_on']:.3f} / {s['step_time_s_memory_off']:.3f} s "
                     f"({100 * s['memory_ckpt_overhead']:+.1f}%, wall clock)")
    if s.get("memory_ckpt_cpu_share") is not None:
        lines.append(f"checkpoint CPU per save {s['ckpt_cpu_s'] * 1e3:.0f} ms (copy "
                     f"{(s['ckpt_copy_cpu_s'] or 0) * 1e3:.0f} ms) vs training CPU per "
                     f"step {s['train_cpu_s'] * 1e3:.0f} ms: "
                     f"{100 * s['memory_ckpt_cpu_share']:.1f}%; training thread waits "
                     f"{100 * (s.get('training_thread_share') or 0):.1f}% of a step")
    for line in lines:
        console.print(line)
