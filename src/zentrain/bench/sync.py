"""``zentrain bench sync``: every sparse sync scheme on the same inputs, side by side.

    zentrain bench sync --world 4 --numel 16M --density 0.01           # synthetic tensor
    zentrain bench sync --sweep-world 2,4,8 --numel 4M --skew 1.1 --json sync.json
    zentrain bench sync --trace runs/analyze-gpt/trace.pt --sweep-world 2,4,8

Starts N gloo ranks on loopback (``zentrain.testing.run_ranks``) and gives every scheme
the same inputs: a synthetic row-sparse tensor (seeded: ``--numel`` elements in rows of
``--row-width``, a ``--density`` fraction of rows non-zero on each rank, row popularity
Zipf(``--skew``) with row 0 the hottest, ``--overlap`` of each rank's rows drawn from one
common set), or the gradient index traces of a real run (``zentrain analyze
--save-trace``; values are seeded normals, one call per table and step). Every result is
compared with ``dense`` (the all-reduce reference) and must match within float-sum
tolerance (the schemes sum in different orders) and be bit-identical across ranks.

Per scheme it reports bytes sent/received per rank (max and mean over ranks, counted by
``zentrain.sync.comm``: the algorithm's payload, metadata included), time (median over
``--repeat`` of the slowest rank; warm-up calls excluded), hashing/encoding time (the
same statistic of the reducers' ``hash_s``/``codec_s``: partition + index encode/decode), Push
and Pull imbalance (Definition 8; Parallelism schemes only), the cost model's predicted
bytes received by the busiest rank (``model_bytes``, from the inputs' exact density, γ
and skew) and ratios against ``dense`` and ``agsparse``. With a trace, every figure is
per training step (all tables). ``M`` in ``--numel`` is 2^20.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from zentrain.config import ConfigError
from zentrain.sync import comm, cost
from zentrain.sync import profile as prof
from zentrain.sync.comm import ByteCounter
from zentrain.sync.reducers import build_reducer

SCHEMES = ("dense", "agsparse", "sparcml", "omnireduce", "zen", "auto")
_REDUCER = {"dense": "allreduce"}
_OPTS: dict[str, dict[str, Any]] = {"auto": {"profile_steps": 1, "recheck_every": 0}}
_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sync", help="sparse gradient sync schemes on the same inputs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4, help="ranks (4)")
    p.add_argument("--sweep-world", default=None, help="comma list of ranks, e.g. 2,4,8")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma list from "
                   + ",".join(SCHEMES))
    p.add_argument("--numel", default="4M", help="tensor elements, e.g. 16M (= 16·2^20)")
    p.add_argument("--density", type=float, default=0.01, help="non-zero rows per rank (0.01)")
    p.add_argument("--skew", type=float, default=0.0,
                   help="Zipf exponent of row popularity, row 0 hottest (0: uniform)")
    p.add_argument("--overlap", type=float, default=0.0,
                   help="fraction of each rank's rows from a common set (0)")
    p.add_argument("--row-width", type=int, default=1, help="elements per row (1)")
    p.add_argument("--trace", default=None, help="replay a trace from zentrain analyze")
    p.add_argument("--trace-steps", type=int, default=0, help="replay at most K steps (0: all)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first (1)")
    p.add_argument("--seed", type=int, default=0, help="input and hash seed (0)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="PNG of bytes vs ranks (with --sweep-world)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per world size")
    p.set_defaults(func=cmd_sync)


def parse_numel(text: str) -> int:
    t = text.strip().upper()
    try:
        if t and t[-1] in _SUFFIX:
            return int(float(t[:-1]) * _SUFFIX[t[-1]])
        return int(float(t))
    except ValueError:
        raise ConfigError(f"bad --numel {text!r} (allowed: a count like 1000000, 4M, 1e6)") \
            from None


# -- inputs --------------------------------------------------------------------------------
def zipf_sample(num_rows: int, k: int, skew: float, gen: torch.Generator) -> torch.Tensor:
    """``k`` distinct rows, drawn without replacement with P(row i) ∝ (i+1)^-skew.

    Exponential-keys sampling: the ``k`` rows with the smallest ``E_i·(i+1)^skew``
    (``E_i ~ Exp(1)``), in key order (the first ones are the most "certain" picks).
    """
    key = torch.empty(num_rows).exponential_(generator=gen).log_()
    if skew:
        key += skew * torch.arange(1, num_rows + 1, dtype=torch.float32).log_()
    return torch.topk(key, k, largest=False, sorted=True).indices


def synthetic_rows(rank: int, num_rows: int, density: float, skew: float, overlap: float,
                   seed: int) -> torch.Tensor:
    """Rank ``rank``'s sorted non-zero rows (same on every run; module doc)."""
    nnz = max(1, min(num_rows, round(density * num_rows)))
    own = zipf_sample(num_rows, nnz, skew, torch.Generator().manual_seed(seed * 7919 + rank + 1))
    n_shared = round(overlap * nnz)
    if n_shared == 0:
        return own.sort().values
    shared = zipf_sample(num_rows, nnz, skew, torch.Generator().manual_seed(seed * 7919))
    shared = shared[:n_shared]
    rest = own[~torch.isin(own, shared)][: nnz - n_shared]
    return torch.cat([shared, rest]).sort().values


def _values(nnz: int, width: int, *key: int) -> torch.Tensor:
    mixed = 0
    for k in key:  # a fixed mix of the key (Python's hash() of tuples may change)
        mixed = (mixed * 1_000_003 + k + 1) % (1 << 62)
    g = torch.Generator().manual_seed(mixed)
    return torch.randn((nnz, width) if width > 1 else (nnz,), generator=g)


def _calls(rank: int, spec: dict[str, Any]) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """This rank's ``(table, num_rows, indices, values)`` per call, in order."""
    if spec["trace"] is None:
        rows, width = spec["num_rows"], spec["row_width"]
        idx = synthetic_rows(rank, rows, spec["density"], spec["skew"], spec["overlap"],
                             spec["seed"])
        return [(0, rows, idx, _values(idx.numel(), width, spec["seed"], rank))]
    trace = prof.load_trace(spec["trace"])
    out = []
    for step in range(spec["steps"]):
        for t, tab in enumerate(trace.tables):
            idx = trace.rows(t, step, rank)
            out.append((t, tab.num_rows, idx,
                        _values(idx.numel(), tab.row_numel, spec["seed"], step, t, rank)))
    return out


def _facts(idx: torch.Tensor, num_rows: int, width: int, world: int) -> dict[str, Any]:
    """Exact workload figures from every rank's rows (uncounted side collectives)."""
    nnz = torch.empty(world, dtype=torch.int64)
    comm.all_gather_single(nnz, torch.tensor([idx.numel()]))
    owners = torch.zeros(num_rows, dtype=torch.int32)   # bit r set: rank r has the row
    owners[idx] = 1 << dist.get_rank()
    dist.all_reduce(owners)
    present = owners != 0
    union = int(present.sum())
    counts = nnz.tolist()
    mean = sum(counts) / world
    gam = {}
    k = 2
    while k <= world:  # exact γ of aligned power-of-two groups (SparCML's stages)
        groups = [((owners >> (b * k)) & ((1 << k) - 1)) != 0 for b in range(world // k)]
        gam[k] = statistics.mean(
            int(g.sum()) / (sum(counts[b * k:(b + 1) * k]) / k or 1) for b, g in
            enumerate(groups))
        k *= 2
    servers = torch.bincount(prof.contiguous_servers(present.nonzero().squeeze(1), num_rows,
                                                     world), minlength=world)
    skew = float(servers.max()) / (union / world) if union else 1.0
    return {"num_rows": num_rows, "row_numel": width, "nnz": counts, "union": union,
            "density": mean / num_rows, "gamma": union / mean if mean else 1.0,
            "gamma_pow2": gam, "skew": skew}


def _workload(f: dict[str, Any], n: int) -> cost.Workload:
    exact = f["gamma_pow2"]
    return cost.Workload(
        num_rows=f["num_rows"], density=f["density"], gamma=f["gamma"], n=n,
        row_numel=f["row_numel"], skew=f["skew"],
        gamma_fn=lambda k: exact.get(k, cost.gamma_at(k, f["gamma"], n)) if k != n
        else f["gamma"])


def _on(rows: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    out = torch.zeros((rows.numel(), *vals.shape[1:]), dtype=torch.float64)
    out[torch.searchsorted(rows, idx)] = vals.double()
    return out


def matches(out: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor],
            world: int) -> bool:
    """``out`` equals the dense reference up to float-sum reordering (a row present on
    one side only must be zero). Compared on the union of both row sets, not densely."""
    rows = torch.unique(torch.cat([out[0], ref[0]]))
    a, b = _on(rows, *out), _on(rows, *ref)
    tol = 4 * world * 2.0**-24 * float(b.abs().max() if b.numel() else 0) + 1e-30
    return bool(((a - b).abs() <= tol + 1e-6 * b.abs()).all())


def _digest(outs: list[tuple[torch.Tensor, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for i, v in outs:
        h.update(i.numpy().tobytes())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


# -- one rank ------------------------------------------------------------------------------
def _rank_main(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    calls = _calls(rank, spec)
    facts = [_facts(idx, rows, math.prod(vals.shape[1:]), world)
             for _, rows, idx, vals in calls]
    tables = sorted({c[0] for c in calls})
    ref_counter = ByteCounter()
    ref_red = {t: build_reducer("allreduce", None, ref_counter) for t in tables}
    refs = [ref_red[t].reduce(idx, vals, rows) for t, rows, idx, vals in calls]
    out: dict[str, Any] = {"facts": facts if rank == 0 else None,
                           "ref": {"sent": ref_counter.sent, "recv": ref_counter.recv}}
    for scheme in spec["schemes"]:
        counter = ByteCounter()
        opts = dict(_OPTS.get(scheme, {}))
        if scheme in ("zen", "auto"):
            opts["seed" if scheme == "zen" else "zen_opts"] = (
                spec["seed"] if scheme == "zen" else {"seed": spec["seed"]})
        reds = {t: build_reducer(_REDUCER.get(scheme, scheme), None, counter, **opts)
                for t in tables}
        for _ in range(spec["warmup"]):
            for t, rows, idx, vals in calls:
                reds[t].reduce(idx, vals, rows)
        s0, r0 = counter.snapshot()
        times, codecs, stats, results = [], [], [], []
        for rep in range(spec["repeat"]):
            dist.barrier()
            t0 = time.perf_counter()
            codec: float | None = 0.0
            for t, rows, idx, vals in calls:
                res = reds[t].reduce(idx, vals, rows)
                st = reds[t].last_stats
                c = st.get("hash_s", st.get("codec_s"))
                codec = None if c is None or codec is None else codec + c
                if rep == spec["repeat"] - 1:
                    results.append(res)
                    stats.append(dict(st))
            times.append(time.perf_counter() - t0)
            codecs.append(codec)
        passes = spec["repeat"]
        out[scheme] = {
            "sent": (counter.sent - s0) / passes, "recv": (counter.recv - r0) / passes,
            "times": times, "codecs": codecs,
            "push": [s.get("push_imbalance") for s in stats],
            "pull": [s.get("pull_imbalance") for s in stats],
            "choice": [s.get("scheme") for s in stats] if scheme == "auto" else None,
            "correct": all(matches(r, f, world) for r, f in zip(results, refs)),
            "digest": _digest(results),
        }
        if rank == 0 and spec["verbose"]:
            print(f"  [{world} ranks] {scheme}: {statistics.median(times):.3f} s/pass",
                  file=sys.stderr, flush=True)
    return out


# -- parent: one world size ---------------------------------------------------------------
def _model_bytes(scheme: str, facts: list[dict[str, Any]], n: int,
                 choices: list[str] | None) -> float:
    total = 0.0
    for i, f in enumerate(facts):
        name = _REDUCER.get(scheme, scheme)
        if name == "auto":
            name = choices[i] if choices else "zen"
        total += cost.COST_FNS[name](_workload(f, n)).recv_bytes
    return total


def _imb(vals: list[Any]) -> tuple[float | None, float | None]:
    got = [v for v in vals if v is not None]
    return (max(got), statistics.mean(got)) if got else (None, None)


def run_world(spec: dict[str, Any], world: int) -> dict[str, Any]:
    """Run every scheme on ``world`` ranks; the summary dict of this world size."""
    from zentrain.testing import run_ranks

    ranks = run_ranks(_rank_main, world, spec, timeout=spec["timeout"])
    facts = ranks[0]["facts"]
    units = spec["steps"] if spec["trace"] else 1
    schemes: dict[str, dict[str, Any]] = {}
    ref_sent = max(r["ref"]["sent"] for r in ranks) / units
    ref_recv = max(r["ref"]["recv"] for r in ranks) / units
    for s in spec["schemes"]:
        per = [r[s] for r in ranks]
        sent = [p["sent"] / units for p in per]
        recv = [p["recv"] / units for p in per]
        slowest = [max(p["times"][i] for p in per) / units for i in range(spec["repeat"])]
        codec = None if any(c is None for p in per for c in p["codecs"]) else [
            max(p["codecs"][i] for p in per) / units for i in range(spec["repeat"])]
        push_max, push_mean = _imb([v for p in per for v in p["push"]])
        pull_max, pull_mean = _imb([v for p in per for v in p["pull"]])
        model = _model_bytes(s, facts, world, per[0]["choice"]) / units
        row = {
            "bytes_sent_max": max(sent), "bytes_sent_mean": statistics.mean(sent),
            "bytes_recv_max": max(recv), "bytes_recv_mean": statistics.mean(recv),
            "time_s": statistics.median(slowest), "time_s_min": min(slowest),
            "hash_s": statistics.median(codec) if codec else None,
            "push_imbalance": push_max, "push_imbalance_mean": push_mean,
            "pull_imbalance": pull_max, "pull_imbalance_mean": pull_mean,
            "model_bytes": model, "recv_over_model": max(recv) / model if model else None,
            "correct": all(p["correct"] for p in per),
            "identical_across_ranks": len({p["digest"] for p in per}) == 1,
        }
        if per[0]["choice"]:
            row["choice"] = sorted(set(per[0]["choice"]))
        if s == "zen":
            eq1 = sum(prof.eq1_bytes(world, statistics.mean(f["nnz"]), f["gamma"],
                                     f["row_numel"]) for f in facts) / units
            row.update(eq1_bytes=eq1, recv_over_eq1=max(recv) / eq1 if eq1 else None)
        schemes[s] = row
    for row in schemes.values():
        for base, (bs, br) in (("dense", (ref_sent, ref_recv)),
                               ("agsparse", (schemes.get("agsparse", {}).get("bytes_sent_max"),
                                             schemes.get("agsparse", {}).get("bytes_recv_max")))):
            row[f"vs_{base}_sent"] = row["bytes_sent_max"] / bs if bs else None
            row[f"vs_{base}_recv"] = row["bytes_recv_max"] / br if br else None
    nnz_mean = statistics.mean(statistics.mean(f["nnz"]) for f in facts)
    workload = {
        "calls_per_unit": len(facts) // units, "unit": "step" if spec["trace"] else "call",
        "nnz_mean": nnz_mean,
        "density": statistics.mean(f["density"] for f in facts),
        "gamma": statistics.mean(f["gamma"] for f in facts),
        "contiguous_skew": statistics.mean(f["skew"] for f in facts),
        "theorem2_push_bound": prof.theorem2_bound(world, nnz_mean),
        "tables": sorted({(f["num_rows"], f["row_numel"]) for f in facts}),
    }
    return {"world": world, "workload": workload, "schemes": schemes}


# -- output -------------------------------------------------------------------------------
def _mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.3f}"


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_world(res: dict[str, Any], what: str) -> None:
    from rich.console import Console
    from rich.table import Table

    w = res["workload"]
    unit = w["unit"]
    t = Table(title=f"bench sync: {what}, {res['world']} ranks; per {unit}; MiB per rank; "
                    f"d={w['density']:.3%} γ={w['gamma']:.2f} skew={w['contiguous_skew']:.2f}")
    cols = ("scheme", "sent max", "sent mean", "recv max", "recv mean", "model recv",
            "recv/model", "time s", "hash/enc s", "push imb", "pull imb", "vs dense",
            "vs agsparse", "ok")
    for c in cols:
        t.add_column(c, justify="left" if c == "scheme" else "right", no_wrap=c == "scheme")
    for name, r in res["schemes"].items():
        label = name + (f"→{','.join(r['choice'])}" if r.get("choice") else "")
        t.add_row(label, _mb(r["bytes_sent_max"]), _mb(r["bytes_sent_mean"]),
                  _mb(r["bytes_recv_max"]), _mb(r["bytes_recv_mean"]), _mb(r["model_bytes"]),
                  _f(r["recv_over_model"]), _f(r["time_s"], "{:.4f}"),
                  _f(r["hash_s"], "{:.4f}"), _f(r["push_imbalance"]), _f(r["pull_imbalance"]),
                  _f(r["vs_dense_recv"], "{:.3f}"), _f(r["vs_agsparse_recv"], "{:.3f}"),
                  "yes" if r["correct"] and r["identical_across_ranks"] else "NO")
    Console(width=max(170, Console().width)).print(t)


def print_sweep(runs: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="bench sync sweep: max bytes received per rank (MiB)")
    t.add_column("scheme")
    for r in runs:
        t.add_column(f"n={r['world']}", justify="right")
    for s in runs[0]["schemes"]:
        t.add_row(s, *(_mb(r["schemes"][s]["bytes_recv_max"]) for r in runs))
    for base in ("agsparse", "omnireduce"):
        if "zen" in runs[0]["schemes"] and base in runs[0]["schemes"]:
            t.add_row(f"zen / {base}", *(
                f"{r['schemes']['zen']['bytes_recv_max'] / r['schemes'][base]['bytes_recv_max']:.3f}"
                for r in runs))
    Console(width=max(100, Console().width)).print(t)


def plot_sweep(runs: list[dict[str, Any]], path: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["world"] for r in runs]
    for s in runs[0]["schemes"]:
        ax.plot(ns, [r["schemes"][s]["bytes_recv_max"] / 2**20 for r in runs], "o-", label=s)
    ax.set(xlabel="ranks n", ylabel="max MiB received per rank", yscale="log", xticks=ns)
    ax.set_title("Sync bytes vs ranks\n" + textwrap.fill(what, 70), fontsize=9)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(
            __file__).parent, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "backend": "gloo (loopback)", "git": commit or None,
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def make_spec(args: argparse.Namespace) -> tuple[dict[str, Any], list[int], str]:
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    bad = [s for s in schemes if s not in SCHEMES]
    if bad or not schemes:
        raise ConfigError(f"bad --schemes {args.schemes!r} (allowed: {','.join(SCHEMES)})")
    try:
        worlds = ([int(x) for x in args.sweep_world.split(",")] if args.sweep_world
                  else [args.world])
    except ValueError:
        raise ConfigError(f"bad --sweep-world {args.sweep_world!r} (e.g. 2,4,8)") from None
    if any(n < 2 for n in worlds) or max(worlds) > 31:
        raise ConfigError(f"ranks must be in [2, 31], got {worlds}")
    if args.repeat < 1 or args.warmup < 0:
        raise ConfigError("--repeat must be >= 1 and --warmup >= 0")
    spec: dict[str, Any] = {"schemes": schemes, "repeat": args.repeat, "warmup": args.warmup,
                            "seed": args.seed, "trace": None, "steps": 1,
                            "timeout": args.timeout, "verbose": True}
    if args.trace:
        try:
            trace = prof.load_trace(args.trace)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if max(worlds) > trace.world:
            raise ConfigError(f"the trace has {trace.world} ranks; cannot replay {max(worlds)}")
        steps = min(trace.steps, args.trace_steps or trace.steps)
        spec.update(trace=str(args.trace), steps=steps)
        what = f"trace {args.trace} ({trace.meta.get('model', '?')}, {steps} steps)"
    else:
        numel = parse_numel(args.numel)
        if args.row_width < 1 or numel < args.row_width:
            raise ConfigError("--row-width must be >= 1 and <= --numel")
        if not 0 < args.density <= 1 or not 0 <= args.overlap <= 1 or args.skew < 0:
            raise ConfigError("need 0 < --density <= 1, 0 <= --overlap <= 1, --skew >= 0")
        spec.update(num_rows=numel // args.row_width, row_width=args.row_width,
                    density=args.density, skew=args.skew, overlap=args.overlap)
        what = (f"synthetic M={numel:,} ({numel // args.row_width:,} rows x {args.row_width}), "
                f"d={args.density}, skew={args.skew}, overlap={args.overlap}")
    return spec, worlds, what


def cmd_sync(args: argparse.Namespace) -> int:
    spec, worlds, what = make_spec(args)
    runs = []
    for n in worlds:
        print(f"[bench sync] {what}: {n} ranks", file=sys.stderr, flush=True)
        res = run_world(spec, n)
        print_world(res, what)
        runs.append(res)
    if len(runs) > 1:
        print_sweep(runs)
        if args.plot:
            plot_sweep(runs, Path(args.plot), what)
    result = {"command": "zentrain " + " ".join(sys.argv[1:]), "input": what,
              "spec": {k: v for k, v in spec.items() if k not in ("verbose", "timeout")},
              "created": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": _machine(), "runs": runs}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    bad = [(r["world"], s) for r in runs for s, v in r["schemes"].items()
           if not (v["correct"] and v["identical_across_ranks"])]
    if bad:
        print(f"zentrain bench sync: results differ from dense: {bad}", file=sys.stderr)
        return 1
    return 0
