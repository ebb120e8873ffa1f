"""What ``zentrain bench compress`` shows: its JSON, its table and its plot."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

BASELINE = "ddp"
"""Time-to-target speed-ups are against this method."""


def dumps(result: dict[str, Any]) -> str:
    """Indented JSON with each loss curve's lists on one line each (a few KB, not 10k lines)."""
    curves = {}
    for m, s in result["methods"].items():
        if "curve" in s:
            curves[m] = s["curve"]
            s["curve"] = f"@@curve:{m}@@"
    text = json.dumps(result, indent=1, default=str)
    for m, c in curves.items():
        result["methods"][m]["curve"] = c
        compact = json.dumps({k: [round(v, 5) if isinstance(v, float) else v for v in vals]
                              for k, vals in c.items()}, separators=(",", ":"))
        text = text.replace(f'"@@curve:{m}@@"', compact.replace("],", "],\n   "))
    return text + "\n"


# -- output -----------------------------------------------------------------------------------

def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def label(method: str, s: dict[str, Any]) -> str:
    """The method's name, with its compressors when ``compress.method_for`` mixed them in
    and the options that change what they send: ``topk: topk+powersgd (bf16 wire)``."""
    names, _, opts = (s.get("compressors") or method).partition(", ")
    head = method if names == method else f"{method}: {names}"
    return f"{head} ({opts})" if opts else head


def print_result(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    c = result["config"]
    net = "loopback" if result["bandwidth_bits"] is None else f"{result['bandwidth']} links"
    t = Table(title=f"bench compress: {c['workload']}, {result['world']} ranks, {net}, "
                    f"{c['steps']} steps (target loss {result['target_loss'] or float('nan'):.4f}"
                    f" = {result['target_source']})", title_justify="left")
    for col in ("method", "bytes/step", "vs none", "step", "sync", "loss", "vs none",
                "eval loss", "to target", "vs ddp"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for m, s in result["methods"].items():
        if "error" in s:
            t.add_row(label(m, s), "FAILED", *[""] * 8)
            continue
        tt = s["time_to_target_s"]
        t.add_row(label(m, s), _fmt_bytes(s["bytes_per_step"]), _x(s["bytes_ratio_vs_none"], 3),
                  f"{1e3 * s['step_time_s']:.0f} ms",
                  "-" if s["sync_time_s"] is None else
                  f"{1e3 * s['sync_time_s']:.0f} ms" + ("*" if s["sync_time_estimated"] else ""),
                  f"{s['final_loss']:.4f}", _x(s["loss_ratio_vs_none"], 3),
                  "-" if s["eval_loss"] is None else f"{s['eval_loss']:.4f}",
                  "not reached" if tt is None else f"{tt:.1f} s (step {s['steps_to_target']})",
                  _x(s["time_to_target_speedup_vs_ddp"]))
    console.print(t)
    console.print("bytes: sent per step by the busiest rank; step/sync: steady-state means "
                  "(* ddp's sync = step - compute of the others); loss: mean of the last "
                  f"{c['smooth']} steps", highlight=False)
    for r in result["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[r["met"]]
        got = "-" if r["measured"] is None else f"{r['measured']:.3f}"
        where = f" [{', '.join(r['setting'])}]" if r["setting"] else ""
        console.print(f"target: {r['target']}: {got} ({r['method']}) -> {verdict}{where}",
                      highlight=False, markup=False)


_COLORS = {"ddp": "#7f7f7f", "none": "#d62728", "topk": "#1f77b4", "randomk": "#aec7e8",
           "powersgd": "#2ca02c", "qsgd": "#ff7f0e", "sign": "#9467bd", "fp16": "#8c564b",
           "bf16": "#e377c2"}


def plot(result: dict[str, Any], path: Path) -> str:
    """Loss (smoothed) against training wall time per method, beside bytes per step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'zentrain[plot]')"
    ok = {m: s for m, s in result["methods"].items() if "curve" in s}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for m, s in ok.items():
        a1.plot(s["curve"]["wall_s"], s["curve"]["smoothed"], label=label(m, s), lw=1.2,
                color=_COLORS.get(m), ls="--" if m == BASELINE else "-")
    if result["target_loss"]:
        a1.axhline(result["target_loss"], color="k", lw=0.7, ls=":",
                   label=f"target {result['target_loss']:.3f}")
    losses = [v for s in ok.values() for v in s["curve"]["smoothed"]]
    if losses and result["target_loss"]:  # the interesting part: the end of training
        a1.set_ylim(min(losses) - 0.05 * abs(min(losses)),
                    min(max(losses), 1.6 * result["target_loss"]))
    a1.set_xlabel("training wall time (s, sum of step times after step 1)")
    a1.set_ylabel(f"training loss (mean of last {result['config']['smooth']} steps)")
    a1.legend(fontsize=7, ncol=2)
    names = list(ok)
    a2.bar(range(len(names)), [ok[m]["bytes_per_step"] for m in names],
           color=[_COLORS.get(m, "#333") for m in names])
    for i, m in enumerate(names):
        r = ok[m]["bytes_ratio_vs_none"]
        if r is not None:
            a2.annotate(f"{r:.3f}", (i, ok[m]["bytes_per_step"]), ha="center", va="bottom",
                        fontsize=7)
    a2.set_yscale("log")
    # wrapped: a long label (method + options) would squeeze both panels
    a2.set_xticks(range(len(names)), [textwrap.fill(label(m, ok[m]), 26) for m in names],
                  rotation=30, ha="right", fontsize=8)
    a2.set_ylabel("bytes sent per step (busiest rank)")
    a2.set_title("bytes per step (label: vs none)", fontsize=9)
    c = result["config"]
    net = "loopback" if result["bandwidth_bits"] is None else f"{result['bandwidth']} emulated"
    fig.suptitle(f"bench compress: {c['workload']}, {result['world']} ranks, {net}, "
                 f"{c['steps']} steps ({result['machine']['cores']} cores shared)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return f"plot: {path}"

