"""``zentrain bench compress``: every gradient compression method, trained side by side.

    zentrain bench compress --workload gpt --world 4 --bandwidth 1gbit --steps 500
    zentrain bench compress --methods none,topk,powersgd,ddp --ratio 0.001 --rank 2
    zentrain bench compress --bandwidth none --steps 50          # plain loopback

Each method is one real training run through ``bench e2e``'s machinery (``e2e.run_system``:
N ranks, same config, seed, data order and batch; only the gradient sync differs), on an
emulated network at ``--bandwidth`` or on loopback. Methods: ``ddp`` is plain PyTorch DDP;
``none`` is zentrain's ``zen`` scheme without compression, the reference for losses and
bytes; every other method runs ``sync.scheme=zen`` with ``sync.compress=METHOD``, so the
compressed matrices go through the compressor (top-k's kept entries through ZEN's sparse
reducer) and the embedding tables through ZEN as usual.

Per method it reports bytes sent per step (busiest rank, steady state), step time, the
loss after ``--steps`` (training loss averaged over the last ``--smooth`` steps: every
method sees the same batches, so the comparison is paired) and its ratio to ``none``,
and the time to reach a target loss: the training wall time (sum of step times after the
first, which carries one-off setup) at the first step whose smoothed loss is at or below
``--target-loss`` (default: ``none``'s final loss x 1.03), with its speed-up over ``ddp``.
Output: a table, JSON (``--json``) and a plot of loss against wall time (``--plot``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zentrain.bench import e2e
from zentrain.bench import e2e_analysis as an
from zentrain.bench.cluster import RanksFailed, check_emulation, parse_bandwidth
from zentrain.bench.compress_show import BASELINE, dumps, plot, print_result
from zentrain.config import ConfigError, load_config

METHODS = ("none", "topk", "randomk", "powersgd", "qsgd", "sign", "fp16", "bf16", "ddp", "auto")
DEFAULT_METHODS = METHODS[:-1]
"""``auto`` (top-k for the output layer, PowerSGD for the rest) runs when asked for."""
REFERENCE = "none"
"""Losses, bytes and step times are compared with this method (lossless, same scheme)."""
TARGET_SLACK = 1.03
"""Default target loss = the reference's final loss x this."""
_RESERVED = (*e2e._RESERVED, "sync.compress", "compress.method", "compress.ratio",
             "compress.rank", "compress.bits")
_OWN_FLAG = {"compress.ratio": "--ratio", "compress.rank": "--rank", "compress.bits": "--bits"}


@dataclass
class CompressPlan(e2e.Plan):
    """``bench e2e``'s plan (``systems`` = the methods) plus the compression options."""

    ratio: float = 0.01
    rank: int = 4
    bits: int = 4
    target_loss: float | None = None
    smooth: int = 1
    compressed_numel: dict[str, int] = field(default_factory=dict)
    """Per method: entries of the parameters its policy compresses (0: none)."""
    compressors: dict[str, str] = field(default_factory=dict)
    """Per method: the compressors its run uses, e.g. ``topk+powersgd`` with
    ``compress.method_for`` (empty: none), then the options that change what they send
    (``topk, global top-k 2x, bf16 wire``)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="gradient compression: bytes, step time and loss of "
                       "every method", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(e2e.WORKLOADS), default="gpt",
                   help="gpt (configs/debug.toml, default) or deepfm (configs/deepfm.toml)")
    p.add_argument("--config", default=None, help="config file instead of the workload's")
    p.add_argument("--world", type=int, default=4, help="ranks (4)")
    p.add_argument("--bandwidth", default="1gbit",
                   help="link rate of the emulated cluster (1gbit), or 'none' for loopback")
    p.add_argument("--latency", default=None, help="one-way link delay (needs netem)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma list from {','.join(METHODS)} (must include none)")
    p.add_argument("--ratio", type=float, default=0.01, help="topk/randomk: kept fraction")
    p.add_argument("--rank", type=int, default=4, help="powersgd: rank (4)")
    p.add_argument("--bits", type=int, default=4, help="qsgd: bits per entry (4)")
    p.add_argument("--steps", type=int, default=500, help="training steps per method (500)")
    p.add_argument("--target-loss", type=float, default=None,
                   help=f"loss for time-to-target (default: none's final loss x {TARGET_SLACK})")
    p.add_argument("--smooth", type=int, default=None,
                   help="steps in the trailing mean of the loss (default: steps/10, 1..20)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="config override for every method")
    p.add_argument("--json", default=None, help="result JSON (default: BENCH_DIR/result.json)")
    p.add_argument("--plot", default=None, help="PNG plot (default: BENCH_DIR/result.png)")
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    p.add_argument("--bench-dir", default=None,
                   help="where each method's run directory goes "
                        "(default: runs/bench-compress-...)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per training run")
    p.set_defaults(func=cmd_compress)


def method_sets(method: str, ratio: float, rank: int, bits: int) -> list[str]:
    """The ``--set`` overrides that make a run use ``method``."""
    # Both names of the method (sync.compress, compress.method): a --config file may set
    # either, and it must not compress the reference nor clash with the method run.
    if method in (BASELINE, REFERENCE):  # uncompressed: a --set compress.method_for is not theirs
        base = list(an.SYSTEMS["ddp"]) if method == BASELINE else [
            "sync.scheme=zen", "model.sparse_embedding=false"]
        return base + ["sync.compress=none", "compress.method=none", "compress.method_for="]
    # Every option, not only the method's own: with compress.method_for a top-k run also
    # compresses some matrices by PowerSGD, which must get --rank.
    return ["sync.scheme=zen", "model.sparse_embedding=false", f"sync.compress={method}",
            f"compress.method={method}", f"compress.ratio={ratio}", f"compress.rank={rank}",
            f"compress.bits={bits}"]


def build_plan(args: argparse.Namespace) -> CompressPlan:
    """Validate every option; bad input raises a one-line ``ConfigError``."""
    methods = e2e._csv(args.methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ConfigError(f"unknown method {bad[0] if bad else '(none)'!r} in --methods "
                          f"(allowed: {', '.join(METHODS)})")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {args.methods}")
    if REFERENCE not in methods:
        raise ConfigError(f"--methods must include {REFERENCE}: losses and bytes are "
                          "compared with it")
    if args.world < 2:
        raise ConfigError(f"bad --world {args.world} (allowed: >= 2; one rank sends nothing)")
    bw = parse_bandwidth(args.bandwidth)
    check_emulation(bw, args.latency, "--bandwidth")
    if args.steps < 3:
        raise ConfigError(f"bad --steps {args.steps} (allowed: >= 3)")
    if args.target_loss is not None and not args.target_loss > 0:
        raise ConfigError(f"bad --target-loss {args.target_loss} (allowed: > 0)")
    smooth = args.smooth if args.smooth is not None else max(1, min(20, args.steps // 10))
    if not 1 <= smooth <= args.steps:
        raise ConfigError(f"bad --smooth {args.smooth} (allowed: 1..--steps)")
    for o in args.overrides:
        key = o.split("=", 1)[0].strip()
        if key in _RESERVED:
            raise ConfigError(f"--set {o}: {key} is set by the benchmark (use "
                              f"{_OWN_FLAG.get(key, '--methods / --steps')})")
    config = e2e._config_path(args.workload, args.config)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    bench_dir = Path(args.bench_dir or f"runs/bench-compress-{args.workload}-{stamp}")
    plan = CompressPlan(
        args.workload, config, [args.world], [(args.bandwidth.lower(), bw)], args.latency,
        methods, args.steps, 1, list(args.overrides), bench_dir,
        Path(args.json) if args.json else bench_dir / "result.json",
        None if args.no_plot else Path(args.plot) if args.plot else bench_dir / "result.png",
        args.timeout, 1e-3, ratio=args.ratio, rank=args.rank, bits=args.bits,
        target_loss=args.target_loss, smooth=smooth)
    plan.system_sets = {m: method_sets(m, plan.ratio, plan.rank, plan.bits) for m in methods}
    for m in methods:
        plan.compressed_numel[m], plan.compressors[m] = check_method(plan, m)
    plan.command = canonical_command(plan, args)
    return plan


def check_method(plan: CompressPlan, method: str) -> tuple[int, str]:
    """Load the method's config and apply the policy on a meta-device model, before any rank
    starts: a bad option or a policy that picks nothing is a one-line error. Returns the
    number of entries the method compresses and its compressors with the options that
    change what they send (``topk+powersgd, global top-k 2x, bf16 wire``)."""
    from zentrain.train import check_compression

    cfg = load_config(plan.config, [*plan.overrides, *plan.system_sets[method]])
    try:
        numel, comp = check_compression(cfg)
    except ConfigError as e:
        raise ConfigError(f"--methods {method}: {e}") from None
    return numel, ", ".join([comp.label, *comp.options]).strip(", ")


def canonical_command(plan: CompressPlan, args: argparse.Namespace) -> str:
    """The exact command that reproduces this run (every default spelled out)."""
    parts = ["zentrain", "bench", "compress", "--workload", plan.workload]
    if args.config:
        parts += ["--config", args.config]
    parts += ["--world", str(plan.worlds[0]), "--bandwidth", plan.bandwidths[0][0]]
    if plan.latency:
        parts += ["--latency", plan.latency]
    parts += ["--methods", ",".join(plan.systems), "--ratio", str(plan.ratio),
              "--rank", str(plan.rank), "--bits", str(plan.bits), "--steps", str(plan.steps),
              "--smooth", str(plan.smooth)]
    if plan.target_loss is not None:
        parts += ["--target-loss", str(plan.target_loss)]
    for o in plan.overrides:
        parts += ["--set", o]
    for flag, value in (("--json", args.json), ("--plot", args.plot)):
        if value:
            parts += [flag, value]
    return shlex.join(parts)


# -- analysis (pure functions of the metrics rows) ---------------------------------------------

def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def method_figures(fig: dict[str, Any], rows: list[dict[str, Any]], window: int,
                   eval_loss: float | None = None) -> dict[str, Any]:
    """One method's figures: ``e2e``'s steady-state averages plus its loss curve.

    The curve's wall time is the sum of step times after step 1: the first step carries
    one-off setup (gloo connections, allocator and thread pools; tens of seconds on a loaded
    machine) that has nothing to do with the method and would swamp short runs.
    """
    wall, t = [], 0.0
    for r in rows:
        t += r["step_time_s"] if r["step"] > 1 else 0.0
        wall.append(t)
    loss = [float(r["loss"]) for r in rows]
    sm = smooth(loss, window)
    steady = [r for r in rows if r["step"] > an.warmup_steps(len(rows))] or rows[-1:]
    comp = [r.get("sync_stats", {}).get("compress.bytes_sent") for r in steady]
    return {
        "bytes_per_step": fig["sync_bytes_per_step_max"],
        "bytes_per_step_rank0": fig["sync_bytes_per_step"],
        "compressed_bytes_per_step_rank0": (statistics.fmean(comp)
                                            if all(c is not None for c in comp) else None),
        "step_time_s": fig["step_time_s"], "exposed_sync_s": fig["exposed_sync_s"],
        "throughput": fig["throughput"], "breakdown": fig["breakdown"],
        "final_loss": sm[-1], "last_step_loss": loss[-1], "eval_loss": eval_loss,
        "train_time_s": t, "steps_measured": fig["steps_measured"], "run_dir": fig["run_dir"],
        "curve": {"step": [r["step"] for r in rows], "wall_s": wall, "loss": loss,
                  "smoothed": sm},
    }


def time_to_target(curve: dict[str, list], target: float) -> tuple[float, int] | None:
    """(wall time, step) of the first step whose smoothed loss is <= ``target``."""
    for step, wall, loss in zip(curve["step"], curve["wall_s"], curve["smoothed"]):
        if loss <= target:
            return wall, step
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(methods: dict[str, dict[str, Any]], target_loss: float | None = None
            ) -> dict[str, Any]:
    """Fill ratios, sync split and time-to-target into ``methods`` in place; the summary."""
    ok = {m: s for m, s in methods.items() if "final_loss" in s}
    ref, base = ok.get(REFERENCE), ok.get(BASELINE)
    target, source = target_loss, "--target-loss"
    if target is None and ref is not None:
        target, source = ref["final_loss"] * TARGET_SLACK, f"{REFERENCE} x {TARGET_SLACK}"
    # DDP waits for its all-reduce inside backward: its sync time is estimated against the
    # compute time the zentrain runs measure (as in bench e2e).
    compute = an.compute_reference({m: s for m, s in ok.items() if m != BASELINE})
    for m, s in ok.items():
        if m == BASELINE:
            s["sync_time_s"] = max(0.0, s["step_time_s"] - compute) if compute else None
            s["sync_time_estimated"] = compute is not None
        else:
            s["sync_time_s"], s["sync_time_estimated"] = s["exposed_sync_s"], False
        s["loss_ratio_vs_none"] = _ratio(s["final_loss"], ref and ref["final_loss"])
        s["bytes_ratio_vs_none"] = _ratio(s["bytes_per_step"], ref and ref["bytes_per_step"])
        s["bytes_ratio_vs_ddp"] = _ratio(s["bytes_per_step"], base and base["bytes_per_step"])
        s["step_time_ratio_vs_none"] = _ratio(s["step_time_s"], ref and ref["step_time_s"])
        s["step_speedup_vs_ddp"] = _ratio(base and base["step_time_s"], s["step_time_s"])
        hit = time_to_target(s["curve"], target) if target is not None else None
        s["time_to_target_s"], s["steps_to_target"] = hit if hit else (None, None)
    for s in ok.values():
        s["time_to_target_speedup_vs_ddp"] = _ratio(
            base and base["time_to_target_s"], s["time_to_target_s"])
    reached = [m for m, s in ok.items() if m != BASELINE and s["time_to_target_s"] is not None]
    best = min(reached, key=lambda m: ok[m]["time_to_target_s"]) if reached else None
    return {"reference": REFERENCE, "baseline": BASELINE, "target_loss": target,
            "target_source": source if target is not None else None,
            "compute_reference_s": compute, "best": best,
            "best_time_to_target_speedup_vs_ddp":
                ok[best]["time_to_target_speedup_vs_ddp"] if best else None}


#: The issue's targets: (text, method or "best", key, bound, "<=" or ">=").
TARGETS = (
    ("top-k 1% + EF + zen: final loss within 3% of none", "topk", "loss_ratio_vs_none",
     1.03, "<="),
    ("top-k 1% + EF + zen: <= 1/20 of none's bytes", "topk", "bytes_ratio_vs_none",
     0.05, "<="),
    ("PowerSGD rank 4: final loss within 3% of none", "powersgd", "loss_ratio_vs_none",
     1.03, "<="),
    ("PowerSGD rank 4: <= 1/20 of none's bytes", "powersgd", "bytes_ratio_vs_none",
     0.05, "<="),
    ("best method: time-to-target >= 2x better than ddp", "best",
     "time_to_target_speedup_vs_ddp", 2.0, ">="),
)
_TARGET_OPTION = {"topk": ("ratio", 0.01), "powersgd": ("rank", 4)}
"""The method's own option the issue's target fixes (top-k 1%, PowerSGD rank 4)."""


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target the result measures, with the figure; ``setting`` names any way this run
    differs from the issue's (GPT debug config, 4 ranks, 1 Gbit/s, 500 steps)."""
    c = result["config"]
    diffs = [f"{k} {c.get(k)} (issue: {v})" for k, v in (("workload", "gpt"), ("world", 4),
                                                      ("bandwidth", "1gbit"), ("steps", 500))
             if c.get(k, v) != v]
    diffs += [f"--set {o}" for o in c.get("overrides") or []]  # e.g. error feedback off
    out = []
    for text, method, key, bound, op in TARGETS:
        name = result.get("best") if method == "best" else method
        s = result["methods"].get(name or "", {})
        v = s.get(key)
        opt, want = _TARGET_OPTION.get(method, (None, None))
        setting = diffs + ([f"{opt} {c.get(opt)} (issue: {want})"]
                           if opt and c.get(opt, want) != want else [])
        if name is None or v is None:
            out.append({"target": text, "method": name, "measured": None, "required": bound,
                        "met": False if method == "best" and BASELINE in result["methods"]
                        else None, "setting": setting})
            continue
        out.append({"target": text, "method": name, "measured": v, "required": bound,
                    "met": v <= bound if op == "<=" else v >= bound, "setting": setting})
    return out


# -- running ----------------------------------------------------------------------------------

def _eval_loss(run_dir: Path) -> float | None:
    for line in reversed((run_dir / "metrics.jsonl").read_text().splitlines()):
        row = json.loads(line) if line.strip() else {}
        if "eval/eval_loss" in row:
            return float(row["eval/eval_loss"])
    return None


def cmd_compress(args: argparse.Namespace) -> int:
    from zentrain import launch

    plan = build_plan(args)
    world, bw = plan.worlds[0], plan.bandwidths[0]
    cfg = load_config(plan.config, [*plan.overrides, *plan.system_sets[REFERENCE],
                                    f"train.steps={plan.steps}"])
    plan.bench_dir.mkdir(parents=True, exist_ok=True)
    source_config = plan.config
    if plan.config:  # every method reads this copy, even if the file changes meanwhile
        snapshot = plan.bench_dir / "config.toml"
        shutil.copyfile(plan.config, snapshot)
        plan.config = str(snapshot)
    machine = {**e2e.machine_facts(), "load_avg_start": list(os.getloadavg())}
    launch.prepare_data(cfg, world)  # tokenizer and token cache, before any rank starts
    display = e2e.Display("compress")
    methods: dict[str, dict[str, Any]] = {}
    unit = "samples"
    started = time.time()
    try:
        for m in plan.systems:
            try:
                fig, unit = e2e.run_system(plan, m, world, bw, 0, display)
                run_dir = Path(fig["run_dir"])
                rows, _ = e2e.read_rows(run_dir)
                methods[m] = method_figures(fig, rows, plan.smooth, _eval_loss(run_dir))
            except RanksFailed as e:
                methods[m] = {"error": str(e)}
                display.console.print(f"[compress] {m} failed: {e}", highlight=False,
                                      markup=False)
            methods[m]["sets"] = plan.system_sets[m]
            methods[m]["compressed_numel"] = plan.compressed_numel[m]
            methods[m]["compressors"] = plan.compressors[m]
    finally:
        display.close()
    machine["load_avg_end"] = list(os.getloadavg())
    total = sum(p.numel() for p in _meta_model(cfg).parameters() if p.requires_grad)
    result: dict[str, Any] = {
        "config": {"workload": plan.workload, "config_file": source_config,
                   "resolved": cfg.to_dict(), "world": world, "bandwidth": bw[0],
                   "latency": plan.latency, "methods": plan.systems, "ratio": plan.ratio,
                   "rank": plan.rank, "bits": plan.bits, "steps": plan.steps,
                   "warmup_steps": plan.warmup, "smooth": plan.smooth,
                   "target_loss": plan.target_loss, "overrides": plan.overrides,
                   "batch_size": cfg.train.batch_size, "param_numel": total,
                   "command": plan.command, "bench_dir": str(plan.bench_dir),
                   "plot": str(plan.plot_path) if plan.plot_path else None,
                   "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "wall_time_s": round(time.time() - started, 1)},
        "machine": machine, "world": world, "bandwidth": bw[0], "bandwidth_bits": bw[1],
        "unit": unit, "methods": methods,
    }
    result.update(compare(methods, plan.target_loss))
    result["targets"] = check_targets(result)
    plan.json_path.parent.mkdir(parents=True, exist_ok=True)
    plan.json_path.write_text(dumps(result))
    print_result(result, display.console)
    if plan.plot_path is not None:
        display.console.print(plot(result, plan.plot_path), highlight=False)
    display.console.print(f"result: {plan.json_path}", highlight=False)
    failed = [m for m, s in methods.items() if "error" in s]
    if failed:
        display.console.print(f"failed runs: {', '.join(failed)}", highlight=False)
    return 1 if failed else 0


def _meta_model(cfg: Any) -> Any:
    import torch

    from zentrain.models import build_model

    with torch.device("meta"):
        return build_model(cfg.model)
