"""PNG plots of ``bench e2e`` results (matplotlib, the ``plot`` extra).

One comparison: throughput per system (labelled with the speed-up over ddp) beside each
system's step time split into compute and exposed sync. A sweep: throughput against
bandwidth (one panel per world size) and against world size (one panel per bandwidth).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_COLORS = {"ddp": "#7f7f7f", "ddp-sparse": "#bcbd22", "dense": "#1f77b4",
           "agsparse": "#ff7f0e", "sparcml": "#9467bd", "omnireduce": "#8c564b",
           "zen": "#d62728", "auto": "#2ca02c"}


def plot(result: dict[str, Any], path: Path) -> str:
    """Draw ``result`` to ``path``; returns a one-line message (also when matplotlib is absent)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'zentrain[plot]')"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _sweep(plt, result) if "points" in result else _single(plt, result)
    fig.savefig(path, dpi=72)
    plt.close(fig)
    return f"plot: {path}"


def _title(result: dict[str, Any], point: dict[str, Any]) -> str:
    bw = point["bandwidth"]
    net = "loopback" if bw == "none" else f"{bw} emulated links"
    return (f"{result['config']['workload']}: {point['world']} ranks, {net} "
            f"({result['machine']['cores']} cores shared)")


def _single(plt: Any, result: dict[str, Any]) -> Any:
    names = [n for n, s in result["systems"].items() if "throughput" in s]
    sys_ = result["systems"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = range(len(names))
    a1.bar(x, [sys_[n]["throughput"] for n in names],
           color=[_COLORS.get(n, "#333") for n in names])
    for i, n in enumerate(names):
        sp = sys_[n].get("speedup_vs_ddp")
        if sp is not None:
            a1.annotate(f"{sp:.2f}x", (i, sys_[n]["throughput"]), ha="center", va="bottom",
                        fontsize=8)
    a1.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    a1.set_ylabel(f"{result['unit']}/s (all ranks)")
    a1.set_title("throughput (label: vs ddp)", fontsize=9)
    comp = [1e3 * (sys_[n].get("compute_time_s") or sys_[n]["step_time_s"]) for n in names]
    sync = [1e3 * (sys_[n].get("sync_time_s") or 0.0) for n in names]
    a2.bar(x, comp, color="#c7c7c7", label="compute")
    a2.bar(x, sync, bottom=comp, color=[_COLORS.get(n, "#333") for n in names],
           label="exposed sync")
    for i, n in enumerate(names):
        if sys_[n].get("sync_time_estimated"):
            a2.annotate("est.", (i, comp[i] + sync[i]), ha="center", va="bottom", fontsize=7)
    a2.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    a2.set_ylabel("ms per step")
    a2.set_title("step time: compute + exposed sync", fontsize=9)
    a2.legend(fontsize=7)
    fig.suptitle(_title(result, result), fontsize=10)
    fig.tight_layout()
    return fig


def _sweep(plt: Any, result: dict[str, Any]) -> Any:
    points = result["points"]
    worlds = sorted({p["world"] for p in points})
    bws = []
    for p in points:
        if p["bandwidth"] not in bws:
            bws.append(p["bandwidth"])
    panels = ([("bandwidth", w) for w in worlds] if len(bws) > 1 else []) + \
             ([("world", b) for b in bws] if len(worlds) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    systems = result["config"]["systems"]
    for ax, (kind, fixed) in zip(axes[0], panels):
        if kind == "bandwidth":
            # By link rate, slowest first, whatever order the command listed them in;
            # loopback (no shaping, bits None) is the fastest.
            sel = sorted((p for p in points if p["world"] == fixed),
                         key=lambda p: float("inf") if p.get("bandwidth_bits") is None
                         else p["bandwidth_bits"])
            xs = list(range(len(sel)))
            ax.set_xticks(xs, [p["bandwidth"] for p in sel])
            ax.set_xlabel("link bandwidth")
            ax.set_title(f"{fixed} ranks", fontsize=9)
        else:
            sel = sorted((p for p in points if p["bandwidth"] == fixed),
                         key=lambda p: p["world"])
            xs = [p["world"] for p in sel]
            ax.set_xticks(xs)
            ax.set_xlabel("ranks")
            ax.set_title(f"bandwidth {fixed}", fontsize=9)
        for s in systems:
            ys = [p["systems"].get(s, {}).get("throughput") for p in sel]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=s, color=_COLORS.get(s))
        ax.set_ylabel(f"{points[0]['unit']}/s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{result['config']['workload']}: throughput "
                 f"({result['machine']['cores']} cores shared by all ranks)", fontsize=10)
    fig.tight_layout()
    return fig
