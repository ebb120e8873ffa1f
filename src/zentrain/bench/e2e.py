"""``zentrain bench e2e``: whole training runs of every system, side by side, in one go.

    zentrain bench e2e --workload deepfm --world 4 --bandwidth 1gbit
    zentrain bench e2e --workload gpt --world 4 --bandwidth none --systems ddp,dense,zen
    zentrain bench e2e --bandwidth 100mbit,1gbit,10gbit --world 2,4,8     # a sweep

Each system is one real training run (``zentrain.train`` on N ranks, same config, seed,
data and batch; only the sync differs), inside an emulated cluster whose links run at
``--bandwidth`` (``zentrain.netem``: one network namespace per rank, needs root and
iproute2) or on plain loopback (``--bandwidth none``). Repetitions alternate the order of
the systems (forward, then reversed), so a drift in machine load does not favour one.
The first 20% of steps (at least 2) are discarded as warm-up. The result is printed as a
table, saved as JSON (``--json``) and drawn (``--plot``); ``zentrain bench report`` turns
JSON files into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zentrain.bench import e2e_analysis as an
from zentrain.bench.cluster import (
    RanksFailed,
    check_emulation,
    parse_bandwidth,
    rank_threads,
    run_ranks,
)
from zentrain.config import ConfigError, load_config
from zentrain.netem import format_rate

WORKLOADS = {"deepfm": "deepfm.toml", "gpt": "debug.toml"}
_RESERVED = ("sync.scheme", "model.sparse_embedding", "train.steps")
_STEP_LINE = re.compile(r"^step (\d+)/(\d+)")


@dataclass
class Plan:
    workload: str
    config: str | None
    worlds: list[int]
    bandwidths: list[tuple[str, int | None]]
    latency: str | None
    systems: list[str]
    steps: int
    repeat: int
    overrides: list[str]
    bench_dir: Path
    json_path: Path
    plot_path: Path | None
    timeout: float
    loss_rtol: float
    embedding_grads: str = "dense"
    command: str = ""
    system_sets: dict[str, list[str]] = field(default_factory=dict)
    """``--set`` overrides of systems that are not in ``e2e_analysis.SYSTEMS`` (used by
    ``bench compress``: one entry per compression method)."""
    warmup: int = field(init=False)

    def __post_init__(self) -> None:
        self.warmup = an.warmup_steps(self.steps)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("e2e", help="end-to-end training throughput of every sync system",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="deepfm",
                   help="deepfm (configs/deepfm.toml) or gpt (configs/debug.toml)")
    p.add_argument("--config", default=None, help="config file instead of the workload's")
    p.add_argument("--world", default="4", help="ranks, or a comma list for a sweep (2,4,8)")
    p.add_argument("--bandwidth", default="1gbit",
                   help="link rate of the emulated cluster (e.g. 1gbit), 'none' for plain "
                        "loopback, or a comma list for a sweep (100mbit,1gbit,10gbit)")
    p.add_argument("--latency", default=None, help="one-way link delay (needs netem)")
    p.add_argument("--systems", default=",".join(an.SYSTEMS),
                   help=f"comma list from {','.join(an.SYSTEMS)}")
    p.add_argument("--steps", type=int, default=30, help="training steps per system (30)")
    p.add_argument("--repeat", type=int, default=1,
                   help="repetitions; the order of systems alternates between them")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="config override for every system")
    p.add_argument("--json", default=None, help="result JSON (default: BENCH_DIR/result.json)")
    p.add_argument("--plot", default=None, help="PNG plot (default: BENCH_DIR/result.png)")
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    p.add_argument("--bench-dir", default=None,
                   help="where each system's run directory goes (default: runs/bench-e2e-...)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per training run")
    p.add_argument("--embedding-grads", choices=("dense", "sparse"), default="dense",
                   help="how zentrain's sparse schemes get embedding gradients: dense with "
                        "zero rows (default) or torch sparse COO (nn.Embedding(sparse=True), "
                        "as ddp-sparse does); ddp and dense always use dense ones")
    p.add_argument("--loss-rtol", type=float, default=1e-3,
                   help="relative tolerance on final losses of lossless systems (1e-3)")
    p.set_defaults(func=cmd_e2e)
    from zentrain.bench import report

    report.register(sub)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _config_path(workload: str, given: str | None) -> str | None:
    if given:
        if not Path(given).is_file():
            raise ConfigError(f"config file not found: {given}")
        return given
    name = WORKLOADS[workload]
    repo = Path(__file__).resolve().parents[3] / "configs" / name
    for cand in (Path("configs") / name, repo):
        if cand.is_file():
            return str(cand)
    if workload == "gpt":
        return None  # the dataclass defaults are configs/debug.toml's values
    raise ConfigError(f"configs/{name} not found (run from the repository, or pass --config)")


def build_plan(args: argparse.Namespace) -> Plan:
    """Validate every option into a plan; bad input raises a one-line ``ConfigError``."""
    systems = _csv(args.systems)
    bad = [s for s in systems if s not in an.SYSTEMS]
    if bad or not systems:
        raise ConfigError(f"unknown system {bad[0] if bad else '(none)'!r} in --systems "
                          f"(allowed: {', '.join(an.SYSTEMS)})")
    if len(set(systems)) != len(systems):
        raise ConfigError(f"--systems lists a system twice: {args.systems}")
    try:
        worlds = [int(w) for w in _csv(args.world)]
    except ValueError:
        raise ConfigError(f"bad --world {args.world!r} (allowed: integers >= 2, "
                          "comma-separated)") from None
    if not worlds or min(worlds) < 2:
        raise ConfigError(f"bad --world {args.world!r} (allowed: integers >= 2, "
                          "comma-separated: one rank has no gradient sync to compare)")
    bws = [(b.lower(), parse_bandwidth(b)) for b in _csv(args.bandwidth)]
    if not bws:
        raise ConfigError("--bandwidth is empty (e.g. 1gbit, or none for loopback)")
    for _, bits in bws:
        check_emulation(bits, args.latency, "--bandwidth")
    if args.steps < 3:
        raise ConfigError(f"bad --steps {args.steps} (allowed: >= 3; the first "
                          f"{an.warmup_steps(args.steps)} are warm-up)")
    if args.repeat < 1:
        raise ConfigError(f"bad --repeat {args.repeat} (allowed: >= 1)")
    if args.loss_rtol <= 0:
        raise ConfigError(f"bad --loss-rtol {args.loss_rtol} (allowed: > 0)")
    for o in args.overrides:
        if o.split("=", 1)[0].strip() in _RESERVED:
            raise ConfigError(f"--set {o}: {o.split('=')[0]} is set by the benchmark "
                              "(use --systems / --steps)")
    config = _config_path(args.workload, args.config)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    bench_dir = Path(args.bench_dir or f"runs/bench-e2e-{args.workload}-{stamp}")
    plan = Plan(args.workload, config, worlds, bws, args.latency, systems, args.steps,
                args.repeat, list(args.overrides), bench_dir,
                Path(args.json) if args.json else bench_dir / "result.json",
                None if args.no_plot else Path(args.plot) if args.plot
                else bench_dir / "result.png", args.timeout, args.loss_rtol,
                args.embedding_grads)
    plan.command = canonical_command(plan, args)
    return plan


def canonical_command(plan: Plan, args: argparse.Namespace) -> str:
    """The exact command that reproduces this run (every default spelled out)."""
    parts = ["zentrain", "bench", "e2e", "--workload", plan.workload]
    if args.config:
        parts += ["--config", args.config]
    parts += ["--world", ",".join(map(str, plan.worlds)),
              "--bandwidth", ",".join(b for b, _ in plan.bandwidths)]
    if plan.latency:
        parts += ["--latency", plan.latency]
    parts += ["--systems", ",".join(plan.systems), "--steps", str(plan.steps),
              "--repeat", str(plan.repeat)]
    if plan.embedding_grads != "dense":
        parts += ["--embedding-grads", plan.embedding_grads]
    for o in plan.overrides:
        parts += ["--set", o]
    if args.json:
        parts += ["--json", args.json]
    if args.plot:
        parts += ["--plot", args.plot]
    return shlex.join(parts)


def machine_facts() -> dict[str, Any]:
    import torch

    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts = {"cores": os.cpu_count(), "cpu_model": model, "torch": torch.__version__,
             "python": platform.python_version(), "os": f"{platform.system()} "
             f"{platform.release()}", "hostname": platform.node()}
    try:
        facts["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                 / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    return facts


# -- running ----------------------------------------------------------------------------------

class Display:
    """A rich progress bar per training run on a terminal; one plain line per run otherwise."""

    def __init__(self, tag: str = "e2e") -> None:
        from rich.console import Console

        self.tag = tag
        self.console = Console()
        if not self.console.is_terminal:  # logs and pipes: wide enough for the table
            self.console = Console(width=160)
        self.live = self.console.is_terminal and not os.environ.get("CI")
        self.bar = None
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("{task.description:<34}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(),
                                TextColumn("{task.fields[info]}"), console=self.console)
            self.bar.start()

    def start(self, label: str, steps: int) -> Any:
        if self.bar is not None:
            return self.bar.add_task(label, total=steps, info="starting ranks")
        self.console.print(f"[{self.tag}] {label}: running", highlight=False)
        return label

    def step(self, task: Any, step: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(task, completed=step, info=info)

    def done(self, task: Any, info: str) -> None:
        if self.bar is not None:
            self.bar.update(task, info=info)
        else:
            self.console.print(f"[{self.tag}] {task}: {info}", highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train_args(plan: Plan, system: str, world: int, run_dir: Path) -> list[str]:
    sets = [f"train.steps={plan.steps}", "checkpoint.at_end=false", "checkpoint.every=0",
            "train.eval_every=0", f"train.threads={rank_threads(world)}",
            "metrics.log_every=1", "metrics.progress=true", *plan.overrides,
            *(plan.system_sets[system] if system in plan.system_sets else an.SYSTEMS[system])]
    if plan.embedding_grads == "sparse" and system in an.SPARSE_SCHEMES:
        sets.append("model.sparse_embedding=true")
    return ([plan.config] if plan.config else []) + [
        a for s in sets for a in ("--set", s)] + ["--run-dir", str(run_dir)]


def read_rows(run_dir: Path) -> tuple[list[dict[str, Any]], str]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    rows = [r for r in rows if "step_time_s" in r]
    if not rows:
        raise RanksFailed(f"{run_dir}/metrics.jsonl holds no step rows")
    unit = "tokens" if "tokens_per_s" in rows[0] else "samples"
    return rows, unit


def run_system(plan: Plan, system: str, world: int, bw: tuple[str, int | None], rep: int,
               display: Display) -> tuple[dict[str, Any], str]:
    run_dir = plan.bench_dir / f"w{world}-{bw[0]}" / f"{system}-r{rep}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    label = f"w{world} {bw[0]} {system}" + (f" rep {rep + 1}" if plan.repeat > 1 else "")
    task = display.start(label, plan.steps)

    def on_output(rank: int, line: str) -> None:
        m = _STEP_LINE.match(line)
        if rank == 0 and m:
            display.step(task, int(m.group(1)), line[m.end():].strip())

    t0 = time.monotonic()
    try:
        run_ranks(train_args(plan, system, world, run_dir), world, run_dir, bandwidth=bw[1],
                  latency=plan.latency, module="zentrain.bench.worker", timeout=plan.timeout,
                  on_output=on_output)
        rows, unit = read_rows(run_dir)
    except (RanksFailed, OSError) as e:
        display.done(task, f"FAILED after {time.monotonic() - t0:.0f} s")
        raise RanksFailed(str(e)) from None
    fig = an.steady_figures(rows, plan.warmup, unit)
    fig["run_dir"] = str(run_dir)
    display.done(task, f"done in {time.monotonic() - t0:.0f} s: "
                       f"{fig['throughput']:,.0f} {unit}/s, loss {fig['final_loss']:.4f}")
    return fig, unit


def combine(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over repetitions of the per-repetition figures (each a steady-state mean)."""
    out = dict(reps[0])
    for key in ("throughput", "step_time_s", "exposed_sync_s", "sync_bytes_per_step",
                "sync_bytes_per_step_max"):
        out[key] = statistics.fmean(r[key] for r in reps)
    out["breakdown"] = {k: statistics.fmean(r["breakdown"][k] for r in reps)
                        for k in reps[0]["breakdown"]}
    out["repeats"] = [{k: r[k] for k in ("throughput", "step_time_s", "exposed_sync_s",
                                         "final_loss", "run_dir")} for r in reps]
    out.pop("run_dir", None)
    return out


def run_point(plan: Plan, world: int, bw: tuple[str, int | None], display: Display,
              layout: an.Layout, dense_threshold: float) -> dict[str, Any]:
    reps: dict[str, list[dict[str, Any]]] = {s: [] for s in plan.systems}
    errors: dict[str, str] = {}
    unit = "samples"
    for rep in range(plan.repeat):
        order = plan.systems if rep % 2 == 0 else plan.systems[::-1]
        for system in order:
            if system in errors:
                continue
            try:
                fig, unit = run_system(plan, system, world, bw, rep, display)
                reps[system].append(fig)
            except RanksFailed as e:
                errors[system] = str(e)
                display.console.print(f"[e2e] {system} failed: {e}", highlight=False,
                                      markup=False)
    systems: dict[str, dict[str, Any]] = {}
    for s in plan.systems:
        systems[s] = {"error": errors[s]} if s in errors else combine(reps[s])
    notes = an.finish(systems, layout, world, bw[1], dense_threshold, plan.loss_rtol)
    return {"world": world, "bandwidth": bw[0], "bandwidth_bits": bw[1], "unit": unit,
            "systems": systems, **notes}


def cmd_e2e(args: argparse.Namespace) -> int:
    from zentrain import launch
    from zentrain.bench import report

    plan = build_plan(args)
    cfg = load_config(plan.config, [*plan.overrides, f"train.steps={plan.steps}"])
    plan.bench_dir.mkdir(parents=True, exist_ok=True)
    source_config = plan.config
    if plan.config:  # every system reads this copy, even if the file changes meanwhile
        snapshot = plan.bench_dir / "config.toml"
        shutil.copyfile(plan.config, snapshot)
        plan.config = str(snapshot)
    machine = {**machine_facts(), "load_avg_start": list(os.getloadavg())}
    for world in plan.worlds:  # builds the tokenizer/token cache once, before any rank starts
        launch.prepare_data(cfg, world)
    layout = an.model_layout(cfg)
    display = Display()
    points = []
    started = time.time()
    try:
        for world in plan.worlds:
            for bw in plan.bandwidths:
                points.append(run_point(plan, world, bw, display, layout,
                                        cfg.sync.dense_threshold))
    finally:
        display.close()
    machine["load_avg_end"] = list(os.getloadavg())
    result = {
        "config": {"workload": plan.workload, "config_file": source_config,
                   "resolved": cfg.to_dict(),
                   "world": plan.worlds, "bandwidth": [b for b, _ in plan.bandwidths],
                   "latency": plan.latency, "systems": plan.systems, "steps": plan.steps,
                   "embedding_grads": plan.embedding_grads,
                   "warmup_steps": plan.warmup, "repeat": plan.repeat,
                   "overrides": plan.overrides, "batch_size": cfg.train.batch_size,
                   "command": plan.command, "bench_dir": str(plan.bench_dir),
                   "plot": str(plan.plot_path) if plan.plot_path else None,
                   "date": datetime.datetime.now().isoformat(timespec="seconds"),
                   "wall_time_s": round(time.time() - started, 1),
                   "layout": {"tables": [list(t) for t in layout.tables],
                              "other_bytes": layout.other_bytes}},
        "machine": machine,
    }
    if len(points) == 1:
        result.update({k: v for k, v in points[0].items()})
    else:
        result["points"] = points
    plan.json_path.parent.mkdir(parents=True, exist_ok=True)
    plan.json_path.write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
    report.print_result(result, display.console)
    if plan.plot_path is not None:
        msg = report.plot(result, plan.plot_path)
        display.console.print(msg, highlight=False)
    display.console.print(f"result: {plan.json_path}", highlight=False)
    failed = [f"w{p['world']} {p['bandwidth']} {s}" for p in points
              for s, v in p["systems"].items() if "error" in v]
    loss_bad = [p for p in points if p["loss_check"].get("ok") is False]
    if failed:
        display.console.print(f"failed runs: {', '.join(failed)}", highlight=False)
    return 1 if failed or loss_bad else 0


def _jsonable(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    return str(o)


def rate_label(bits: int | None) -> str:
    return "loopback" if bits is None else format_rate(bits)
