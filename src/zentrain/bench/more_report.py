"""Sections of docs/benchmarks.md for ``bench data`` and ``bench compress`` results.

Like the other sections: every figure comes from a JSON file the named command wrote, the
machine it ran on is stated, and each target of the issues is checked with its verdict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zentrain.bench.compress_show import label

Results = list[tuple[Path, dict[str, Any]]]


def is_data_result(d: Any) -> bool:
    return (isinstance(d, dict) and isinstance(d.get("results"), list) and bool(d["results"])
            and all("consumption_samples_per_s" in r for r in d["results"]))


def is_compress_result(d: Any) -> bool:
    return isinstance(d, dict) and "methods" in d and "reference" in d and "targets" in d


def _machine(m: dict[str, Any]) -> str:
    load = m.get("load_avg") or m.get("load_avg_start")
    return (f"{m.get('cores', m.get('cpus'))} cores, {m.get('cpu_model', '?')}, torch "
            f"{m.get('torch', '?')}" + (f"; 1-minute load average {load[0]:.1f} at the start"
                                        if load else ""))


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def render_data_section(results: Results, rel: Any, md_table: Any) -> list[str]:
    lines = ["## Data loading (`zentrain bench data`)", "",
             "Rank 0 of the config's ranks, with the trainer's thread count: the training "
             "step on batches prepared in advance (consumption), then per worker count the "
             "loader's delivery rate to a consumer that does nothing else, and `data_wait / "
             "step time` in a real training loop after warm-up (docs/data.md). *Trainer CPU "
             "in loader* is the CPU the training process spent in the loader, its read-ahead "
             "thread included.", ""]
    for path, d in results:
        t = d["targets"]
        lines += [f"### [{path.stem}]({rel(path)})", "",
                  f"`{d.get('command', 'zentrain bench data')}` on {_machine(d['machine'])}"
                  + (f", {d['date']}" if d.get("date") else "") + ".", ""]
        rows = []
        for r in d["results"]:
            for i, w in enumerate(r["workers"]):
                head = [f"{r['config']} ({r['rank_samples_per_step']} per rank)",
                        f"{1e3 * r['train_step_s']:.1f} ms"] if i == 0 else ["", ""]
                rows.append([*head, str(w["workers"]), f"{w['loader_samples_per_s']:,.0f}",
                             f"{w['ratio_to_consumption']:.1f}×", _pct(w["stall_fraction"]),
                             f"{1e3 * w['median_wait_s']:.2f} ms",
                             _pct(w["wait_cpu_fraction"]),
                             f"{w['memory_bytes'] / 2**20:.1f} MiB"])
        lines += md_table(["config", "training step", "workers", "loader samples/s",
                           "× consumption", "data_wait / step", "median wait",
                           "trainer CPU in loader", "memory"], rows)
        lines += ["", "Targets (2 workers):", ""]
        checks = []
        for r in d["results"]:
            two = [w for w in r["workers"] if w["workers"] == 2]
            if not two:
                continue
            w = two[0]
            checks.append([f"{r['config']}: data_wait ≤ {_pct(t['stall_fraction_max'])} of "
                           "the step", _pct(w["stall_fraction"]),
                           "yes" if w["stall_fraction"] <= t["stall_fraction_max"] else "**no**"])
            ok = w["ratio_to_consumption"] >= t["throughput_ratio_min_2_workers"]
            checks.append([f"{r['config']}: loader ≥ {t['throughput_ratio_min_2_workers']:g}× "
                           "consumption", f"{w['ratio_to_consumption']:.1f}×",
                           "yes" if ok else "**no**"])
        lines += md_table(["target", "measured", "met"], checks) + [""]
    return lines


def _mb(v: float | None) -> str:
    return "–" if v is None else f"{v / 1e6:.2f} MB"


def _r(v: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if v is None else fmt.format(v)


def render_compress_section(results: Results, rel: Any, md_table: Any) -> list[str]:
    lines = ["## Gradient compression (`zentrain bench compress`)", "",
             "One real training run per method on the same batches (docs/compression.md); "
             "`none` is `zen` without compression, the reference for loss and bytes; `ddp` is "
             "plain PyTorch DDP, the baseline for time to the target loss (`none`'s final "
             "loss × 1.03 unless the command set one).", ""]
    for path, d in results:
        c = d["config"]
        lines += [f"### [{path.stem}]({rel(path)})", "",
                  f"`{c.get('command', 'zentrain bench compress')}` on "
                  f"{_machine(d['machine'])}; finished {c.get('date', '?')}: {c.get('steps')} steps, "
                  f"{d['world']} ranks, {d['bandwidth']}; {c.get('wall_time_s', 0) / 60:.0f} "
                  "min in all. Target loss "
                  f"{_r(d.get('target_loss'))} ({d.get('target_source', '')}).", ""]
        rows = []
        for name, m in d["methods"].items():
            if "error" in m:
                rows.append([f"`{label(name, m)}`", m["error"], *[""] * 7])
                continue
            tt = m.get("time_to_target_s")
            rows.append([f"`{label(name, m)}`", _mb(m.get("bytes_per_step")),
                         _r(m.get("bytes_ratio_vs_none")), f"{m['step_time_s']:.2f} s",
                         _r(m.get("final_loss")), _r(m.get("loss_ratio_vs_none")),
                         _r(m.get("eval_loss")),
                         "not reached" if tt is None else f"{tt:.0f} s (step "
                         f"{m.get('steps_to_target')})",
                         _r(m.get("time_to_target_speedup_vs_ddp"), "{:.2f}×")])
        lines += md_table(["method", "bytes/step (busiest rank)", "× none", "step time",
                           "final loss", "× none", "eval loss", "time to target", "× ddp"],
                          rows)
        lines += ["", "Targets:", ""]
        lines += md_table(["target", "method", "measured", "required", "met", "differs from "
                           "the issue's setting"],
                          [[t["target"], f"`{t['method']}`", _r(t.get("measured")),
                            _r(t.get("required"), "{:g}"), "yes" if t["met"] else
                            "not measured" if t.get("measured") is None else "**no**",
                            "; ".join(t.get("setting") or []) or "–"]
                           for t in d["targets"]]) + [""]
    return lines
