"""The ``zentrain chaos`` part of docs/benchmarks.md: the recovery issue's targets.

Targets (checked on each chaos result): steps lost per failure <= 1, every trial bit-identical
to the uninterrupted run, recovery >= 3x faster than from a persistent checkpoint taken every
``disk_every`` steps, and per-step in-memory checkpoints costing <= 5% of the step time.
The step-time cost is graded by the load-independent figure, the checkpoint's CPU time
per save against the training process's CPU time per step (every thread but the
checkpoint's), with the wall-clock difference
(with vs without, noisy when ranks share cores with other work) shown beside it. A result
without the CPU figure is graded on wall clock, and a negative wall-clock cost, which can
only be noise, is "unresolved", never "met".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PHASES = ("detect", "stop", "rendezvous", "spawn", "import", "init", "load", "steps")


def is_chaos_result(data: dict[str, Any]) -> bool:
    return isinstance(data, dict) and "trials" in data and "summary" in data and "kill" in data


def check_chaos_targets(path: Path, data: dict[str, Any]) -> list[dict[str, Any]]:
    s, kill = data["summary"], data["kill"]
    out: list[dict[str, Any]] = []

    def add(text: str, measured: str, required: str, met: bool | None,
            reason: str = "") -> None:
        out.append({"target": f"{kill} kill: {text}", "source": path, "measured": measured,
                    "required": required, "met": met, "reason": None if met else reason})

    if kill == "agent" or not s.get("trials"):
        return out
    add("steps lost per failure", f"{s['steps_lost_max']} (max)", "<= 1",
        s["steps_lost_max"] is not None and s["steps_lost_max"] <= 1,
        _lost_why(data["trials"]))
    add("trials bit-identical to the uninterrupted run", f"{s['bit_identical']}/{s['trials']}",
        "all", s["bit_identical"] == s["trials"])
    ratio = s.get("disk_over_memory")
    if ratio is not None:
        add(f"recovery vs a persistent checkpoint every {data['trials'][0].get('disk_every')} "
            "steps", f"{ratio:.1f}x faster", ">= 3x", ratio >= 3)
    cost = _ckpt_cost(s)
    if cost is not None:
        add(*cost)
    return out


def _lost_why(trials: list[dict[str, Any]]) -> str:
    """Which trials lost more than one step, and where their restored step came from: the
    newest step complete on every rank; a step whose shards (or, after a node kill, whose
    peer replicas) were still on their way when the kill came does not count."""
    over = [t for t in trials if (t.get("steps_lost") or 0) > 1]
    if not over:
        return ""
    srcs = sorted({str(t.get("source")) for t in over})
    lost = ", ".join(f"trial {t.get('trial')}: killed after step {t.get('last_done')}, "
                     f"restored {t.get('restored_step')}" for t in over)
    why = (f"{len(over)} of {len(trials)} trials lost more than one step ({lost}; from "
           f"{', '.join(srcs)}): the newest step complete on every rank was older than the "
           "last one done")
    if all(src.startswith("memory-peer") for src in srcs):
        why += (": the dead node's shards survive only as its peer's replicas, and the "
                "replicas of the steps after the restored one were still on their way (the "
                "relay pauses during backward and runs on the cores that train)")
    return why


def _pair_spread(s: dict[str, Any]) -> str:
    ratios = [on / off for on, off in s.get("pairs_on_off_s") or [] if off]
    if len(ratios) < 2:
        return ""
    return (f" (its {len(ratios)} on/off pairs ranged {100 * (min(ratios) - 1):+.1f}% to "
            f"{100 * (max(ratios) - 1):+.1f}%)")


def _ckpt_cost(s: dict[str, Any]) -> tuple[str, str, str, bool | None, str] | None:
    """(target, measured, required, met, reason) of the per-step checkpoint cost."""
    over, share = s.get("memory_ckpt_overhead"), s.get("memory_ckpt_cpu_share")
    if over is None and share is None:
        return None
    wall = "" if over is None else f"wall clock {100 * over:+.1f}%"
    wall_why = "" if over is None else f"; {wall}{_pair_spread(s)}" + (
        ", and a negative cost can only be noise" if over < 0 else "")
    if share is not None:
        wait = s.get("training_thread_share")
        reason = (f"the checkpoint's background CPU time (copy and checksums), "
                  f"{_f(s.get('ckpt_cpu_s'), '{:.3f}')} s per save, is {100 * share:.1f}% of "
                  f"the training process's {_f(s.get('train_cpu_s'), '{:.3f}')} s of CPU per "
                  "step (every thread but the checkpoint's); it costs step time whenever no "
                  "core is spare to absorb it (GEMINI assumes spare cores)"
                  + ("" if wait is None else
                     f"; the training thread itself is blocked only {100 * wait:.1f}% of a "
                     "step") + wall_why)
        return ("step-time cost of per-step in-memory checkpoints (checkpoint CPU per save / "
                "training CPU per step)",
                f"{100 * share:.1f}%" + (f" ({wall})" if wall else ""), "<= 5%",
                share <= 0.05, reason)
    text = "step-time cost of per-step in-memory checkpoints (wall clock)"
    if over < 0:
        return (text, f"{100 * over:+.1f}%", "<= 5%", None,
                f"a negative cost can only be noise{_pair_spread(s)}, and the result has no "
                "CPU figure, so the cost is not resolved by this run")
    return (text, f"{100 * over:+.1f}%", "<= 5%", over <= 0.05,
            f"{wall_why[2:]}; the result has no CPU figure to tell the checkpoint's cost "
            "from noise")


def _verdict(met: bool | None) -> str:
    return "yes" if met else "**unresolved**" if met is None else "**no**"


def _f(v: Any, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def render_chaos_section(results: list[tuple[Path, dict[str, Any]]], rel: Any,
                         md_table: Any) -> list[str]:
    lines = ["## Failure recovery (`zentrain chaos`)", "",
             "Each trial SIGKILLs a process of a real `zentrain run` (deterministic mode) and "
             "measures the restart against an uninterrupted reference run; the same kill is "
             "repeated with in-memory checkpoints off and a persistent (DCP) checkpoint, "
             "whose recovery is charged the recomputation of the 50 steps a checkpoint every "
             "100 steps loses on average (docs/recovery.md).", "", "### Targets", ""]
    checks = [c for p, d in results for c in check_chaos_targets(p, d)]
    lines += md_table(["target", "result", "measured", "required", "met"], [
        [c["target"], f"[{c['source'].stem}]({rel(c['source'])})", c["measured"],
         c["required"], _verdict(c["met"])] for c in checks])
    missed = [c for c in checks if not c["met"]]
    if missed:
        lines += ["", "Missed or unresolved, and why:", ""]
        lines += [f"- **{c['target']}** ({c['source'].stem}): {c['measured']}; "
                  f"{c['reason'] or 'see the trials below'}." for c in missed]
    lines += ["", "### Results", ""]
    for path, d in results:
        s, m = d["summary"], d.get("machine", {})
        load = m.get("loadavg_at_end") or [float("nan")]
        lines += [f"#### {d['kill']} kill: {d.get('nodes', 1)} node(s), {d.get('world_size')} "
                  f"ranks, {d.get('steps')} steps", "", "```", str(d.get("command")), "```", "",
                  f"{m.get('cpus')} CPUs, Python {m.get('python')}, load average "
                  f"{load[0]:.1f} at the end. Data: [{path.name}]({rel(path)}).", ""]
        lines += md_table(["figure", "value"], [
            ["trials bit-identical", f"{s.get('bit_identical')}/{s.get('trials')}"],
            ["steps lost (max / mean)", f"{s.get('steps_lost_max')} / "
             f"{_f(s.get('steps_lost_mean'))}"],
            ["recovery s (mean / median)", f"{_f(s.get('recovery_s_mean'))} / "
             f"{_f(s.get('recovery_s_median'))}"],
            ["recovery from disk s, measured part (mean)",
             _f(s.get("recovery_s_disk_measured_mean"))],
            ["recovery from disk s, with the lost steps recomputed (mean)",
             _f(s.get("recovery_s_disk_mean"))],
            ["disk / memory", _f(s.get("disk_over_memory"), "{:.1f}x")],
            ["step s with / without in-memory checkpoints (median, wall)",
             f"{_f(s.get('step_time_s_memory_on'), '{:.3f}')} / "
             f"{_f(s.get('step_time_s_memory_off'), '{:.3f}')}"],
            ["checkpoint CPU s per save / training-thread CPU s per step",
             f"{_f(s.get('ckpt_cpu_s'), '{:.3f}')} / {_f(s.get('train_cpu_s'), '{:.3f}')}"],
            ["training thread blocked by the checkpoint per step s",
             _f(s.get("ckpt_training_thread_s"), "{:.4f}")],
        ]) + [""]
        bd = s.get("breakdown_mean") or {}
        if bd:
            lines += ["Mean recovery breakdown, seconds (`steps` = the lost step recomputed "
                      "and the first new one):", ""]
            lines += md_table(list(PHASES), [[_f(bd.get(k)) for k in PHASES]]) + [""]
    return lines
