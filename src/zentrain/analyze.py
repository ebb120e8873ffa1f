"""``zentrain analyze``: profile the sparsity of a config's embedding gradients (ZEN §2.1).

    zentrain analyze configs/deepfm.toml --world 8 --steps 20 --save-trace
    zentrain analyze --world 8 --set train.batch_size=8 --out runs/analyze-gpt

Runs the first ``--steps`` steps of the config's training and records, per embedding table
and step, what decides which sparse sync scheme wins: the density ``d`` (and ``d^n`` after
aggregation), the densification ``γ_k`` for ``k = 2..n`` (C2), the pairwise overlap (C1),
and the Push/Pull imbalance of contiguous (OmniReduce) vs hashed (ZEN h0) partitioning
over ``n`` servers (C3, Definition 8); definitions in ``zentrain/sync/profile.py``.

``n`` data-parallel ranks are **emulated in one process**: every step runs one backward
per rank on that rank's micro-batch (``build_data(cfg, r, n).train_batch(step, micro)``,
the batches a real ``n``-rank run would see, with the trainer's per-(step, rank) seeds),
takes each table's non-zero rows, then steps AdamW (the trainer's optimizer, LR schedule
and clipping) on the rank-averaged gradient, so the model evolves as in real training.

Writes ``analysis.json``, Fig. 2-style plots (``density.png``, ``gamma.png``,
``imbalance.png``, ``overlap.png``) and, with ``--save-trace``, ``trace.pt``: every rank's
non-zero rows per table and step, which ``zentrain bench sync --trace`` replays.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zentrain.config import Config, ConfigError, load_config
from zentrain.sync import profile as prof
from zentrain.sync.hashing import HashSeeds
from zentrain.sync.sparse import embedding_params, rows_of, tied_tables


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="profile gradient sparsity (density, γ, skew, overlap)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="TOML config (default: the debug GPT config)")
    p.add_argument("--world", type=int, default=8, help="data-parallel ranks to emulate (8)")
    p.add_argument("--steps", type=int, default=20, help="training steps to profile (20)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    p.add_argument("--out", default=None, help="output dir (default: runs/analyze-<model>-<time>)")
    p.add_argument("--save-trace", action="store_true",
                   help="also save the gradient index trace (trace.pt) for bench sync --trace")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=cmd_analyze)


# -- emulated data parallelism --------------------------------------------------------------
def table_names(model: nn.Module) -> list[str]:
    """Names of ``embedding_params(model)``, in the same order."""
    by_id = {id(p): name.removesuffix(".weight") for name, p in model.named_parameters()}
    return [by_id[id(p)] for p in embedding_params(model)]


def emulate(cfg: Config, world: int, steps: int
            ) -> Iterator[tuple[float, list[list[torch.Tensor]]]]:
    """Train ``steps`` steps of ``world`` emulated ranks; yield per step the mean loss and
    ``sets[table][rank]`` (sorted unique non-zero rows of each table's rank gradient)."""
    from zentrain.data import build_data
    from zentrain.models import build_model
    from zentrain.train import build_optimizer, lr_at

    # Rank 0 builds the caches (tokenizer, token memmap); the others only open them.
    bundles = [build_data(cfg, 0, world, is_builder=True)]
    bundles += [build_data(cfg, r, world, is_builder=False) for r in range(1, world)]
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    tables = embedding_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = build_optimizer(cfg, model)
    accum = cfg.train.grad_accum
    for step in range(steps):
        for g in optim.param_groups:
            g["lr"] = lr_at(cfg, step)
        total = [torch.zeros_like(p) for p in params]
        sets: list[list[torch.Tensor]] = [[] for _ in tables]
        loss_sum = 0.0
        for rank in range(world):
            # The trainer's per-(step, rank) seed, so dropout matches a real run's.
            torch.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + rank)
            for micro in range(accum):
                batch = bundles[rank].train_batch(step, micro)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
                    _, loss = model(**batch)
                (loss / accum).backward()
                loss_sum += loss.item() / accum
            for t, p in enumerate(tables):
                idx, _ = rows_of(p.grad, p.shape[0], p)
                sets[t].append(torch.unique(idx.to(torch.int64)))  # COO grads repeat rows
            for acc, p in zip(total, params):
                if p.grad is not None:
                    acc.add_(p.grad.to_dense() if p.grad.is_sparse else p.grad)
            model.zero_grad(set_to_none=True)
        for acc, p in zip(total, params):
            p.grad = acc.div_(world)
        if cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optim.step()
        optim.zero_grad(set_to_none=True)
        yield loss_sum / world, sets


# -- the command ----------------------------------------------------------------------------
def analyze(cfg: Config, world: int, steps: int, out: Path, save_trace: bool = False,
            plots: bool = True, show: bool = True, command: str = "") -> dict[str, Any]:
    """Profile, write ``analysis.json`` (+ plots, trace) into ``out``; return the analysis."""
    from zentrain.data import build_data
    from zentrain.metrics import Progress
    from zentrain.models import build_model

    if world < 2:
        raise ConfigError(f"bad --world {world} (allowed: an integer >= 2)")
    if steps < 1:
        raise ConfigError(f"bad --steps {steps} (allowed: an integer >= 1)")
    out.mkdir(parents=True, exist_ok=True)
    build_data(cfg, 0, world, is_builder=True)  # GPT: fixes cfg.model.vocab_size first
    probe = build_model(cfg.model)
    names = table_names(probe)
    tied = {n.removesuffix(".weight") for n in tied_tables(probe)}
    shapes = [(p.shape[0], p[0].numel(), str(p.dtype).removeprefix("torch."))
              for p in embedding_params(probe)]
    del probe
    if not names:
        raise ConfigError(f"model {cfg.model.name!r} has no embedding tables to profile")
    seed = HashSeeds.draw(3, cfg.train.seed).level0  # a fixed h0: reproducible analysis
    recorder = prof.TraceRecorder(world, [(nm, *s) for nm, s in zip(names, shapes)],
                                  meta={"model": cfg.model.name, "command": command,
                                        "config": cfg.to_dict()})
    per_table: list[list[dict[str, Any]]] = [[] for _ in names]
    losses: list[float] = []
    progress = Progress(steps, 0, show)
    progress.log(f"[zentrain analyze] {cfg.model.name}: {world} emulated ranks x {steps} "
                 f"steps; tables: " + ", ".join(f"{nm} {s[0]:,}x{s[1]}"
                                                for nm, s in zip(names, shapes)))
    t0 = time.perf_counter()
    try:
        for step, (loss, sets) in enumerate(emulate(cfg, world, steps)):
            losses.append(loss)
            for t, table_sets in enumerate(sets):
                per_table[t].append({"step": step, **prof.profile_step(
                    table_sets, shapes[t][0], world, seed)})
            if save_trace:
                recorder.add(sets)
            d = per_table[0][-1]
            progress.update(step + 1, f"loss {loss:.3f}  {names[0]} d {d['density']:.2%} "
                                      f"γ {d['gamma'][str(world)]:.2f}")
    finally:
        progress.close()
    result: dict[str, Any] = {
        "model": cfg.model.name, "world": world, "steps": steps, "hash_seed": seed,
        "command": command, "wall_s": time.perf_counter() - t0,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "loss": losses, "config": cfg.to_dict(),
        "tables": {nm: {"num_rows": s[0], "row_numel": s[1], "dtype": s[2],
                        "summary": prof.summarize(rows), "per_step": rows,
                        "tied_to_output": nm in tied}
                   for nm, s, rows in zip(names, shapes, per_table)},
    }
    result["advice"] = advice(result, cfg.sync.dense_threshold)
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    if save_trace:
        prof.save_trace(out / "trace.pt", recorder.trace())
    if plots:
        write_plots(result, out)
    if show:
        print_table(result, out)
    return result


def advice(result: dict[str, Any], dense_threshold: float) -> list[str]:
    """One line per table that sparse sync cannot help: mean density above
    ``sync.dense_threshold``, where every sparse scheme all-reduces the table dense
    (ZEN §2.2). The way to send less is then lossy (docs/compression.md)."""
    lines = []
    for name, tab in result["tables"].items():
        d = tab["summary"]["density"]
        if d <= dense_threshold:
            continue
        why = ("it is tied to the output layer, whose gradient covers every row"
               if tab["tied_to_output"] else "most rows are in every batch")
        fix = ("sync.compress=auto gives a tied table top-k" if tab["tied_to_output"]
               else f"compress.method_for='{name}.weight=topk'")
        lines.append(f"{name}: {d:.0%} of rows have a gradient per rank (above "
                     f"sync.dense_threshold={dense_threshold:g}): {why}, so sparse sync "
                     f"sends it dense; to send less, compress it ({fix})")
    return lines


def cmd_analyze(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"analyze-{cfg.model.name}-{stamp}"
    analyze(cfg, args.world, args.steps, out, args.save_trace, plots=not args.no_plot,
            show=cfg.metrics.progress, command="zentrain " + " ".join(sys.argv[1:]))
    return 0


# -- output ---------------------------------------------------------------------------------
def print_table(result: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    n = result["world"]
    t = Table(title=f"zentrain analyze: {result['model']}, {n} ranks, {result['steps']} steps "
                    f"(means over steps; imbalance: push / pull, Def. 8)")
    for col in ("table", "rows x width", "d", f"d^{n}", f"γ_{n}", "overlap",
                "contiguous push / pull", "hashed (h0) push / pull"):
        t.add_column(col, justify="left" if col == "table" else "right", no_wrap=True)
    for name, tab in result["tables"].items():
        s = tab["summary"]
        t.add_row(name, f"{tab['num_rows']:,} x {tab['row_numel']}", f"{s['density']:.3%}",
                  f"{s['density_agg']:.3%}", f"{s['gamma'][str(n)]:.2f}",
                  f"{s['overlap']:.3f}",
                  f"{s['contiguous']['push_imbalance']:.2f} / "
                  f"{s['contiguous']['pull_imbalance']:.2f}",
                  f"{s['hashed']['push_imbalance']:.2f} / {s['hashed']['pull_imbalance']:.2f}")
    con = Console(width=max(120, Console().width))
    con.print(t)
    for line in result.get("advice", []):
        con.print(f"advice: {line}", markup=False)
    con.print(f"wrote {out}/analysis.json" + ("" if not (out / "trace.pt").exists()
                                               else f" and {out}/trace.pt"))


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """The four Fig. 2-style PNGs; returns their paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("zentrain analyze: matplotlib not installed (pip install 'zentrain[plot]'); "
              "no plots", file=sys.stderr)
        return []
    n, tables = result["world"], result["tables"]
    title = f"{result['model']}, {n} ranks"
    paths = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        paths.append(out / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, tab in tables.items():
        steps = [r["step"] for r in tab["per_step"]]
        line, = ax.plot(steps, [r["density"] for r in tab["per_step"]], label=f"{name}: d")
        ax.plot(steps, [r["density_agg"] for r in tab["per_step"]], "--",
                color=line.get_color(), label=f"{name}: d^{n} (aggregated)")
    ax.set(yscale="log", xlabel="step", ylabel="density (non-zero rows / rows)",
           title=f"Density over steps ({title})")
    ax.legend(fontsize=8, loc="center right")
    save(fig, "density.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = list(range(1, n + 1))
    ax.plot(ks, ks, ":", color="gray", label="no overlap (γ = k)")
    ax.axhline(1, ls=":", color="black", label="full overlap (γ = 1)")
    for name, tab in tables.items():
        rows = tab["per_step"]
        mean = [sum(r["gamma"][str(k)] for r in rows) / len(rows) for k in ks]
        lo = [min(r["gamma"][str(k)] for r in rows) for k in ks]
        hi = [max(r["gamma"][str(k)] for r in rows) for k in ks]
        line, = ax.plot(ks, mean, "o-", label=name)
        ax.fill_between(ks, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="ranks aggregated k", ylabel="densification γ_k",
           title=f"Densification after aggregation (C2; {title})")
    ax.legend(fontsize=8, loc="upper left")
    save(fig, "gamma.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    labels, width = list(tables), 0.2
    series = [("contiguous", "push_imbalance"), ("contiguous", "pull_imbalance"),
              ("hashed", "push_imbalance"), ("hashed", "pull_imbalance")]
    for i, (part, key) in enumerate(series):
        vals = [tables[nm]["summary"][part][key] for nm in labels]
        tops = [tables[nm]["summary"][part][key + "_max"] for nm in labels]
        xs = [j + (i - 1.5) * width for j in range(len(labels))]
        ax.bar(xs, vals, width, label=f"{part}: {key.split('_')[0]}",
               yerr=[[0] * len(vals), [t - v for t, v in zip(tops, vals)]], capsize=3)
    ax.axhline(1.1, ls="--", color="red", lw=0.8, label="1.1")
    ax.set_xticks(range(len(labels)), labels)
    ax.set(ylabel="imbalance ratio (Def. 8; 1 = balanced)",
           title=f"Contiguous vs hashed partitions over {n} servers (C3; {title})")
    ax.legend(fontsize=8, loc="upper right")
    save(fig, "imbalance.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, tab in tables.items():
        vals = [v for r in tab["per_step"] for v in r["overlap_pairs"]]
        ax.hist(vals, bins=30, range=(0, 1), density=True, alpha=0.5, label=name)
    ax.set(xlabel="overlap |I_a ∩ I_b| / |I_a ∪ I_b|", ylabel="density (PDF)",
           title=f"Overlap between ranks' gradients (C1; {title})")
    ax.legend(fontsize=8, loc="upper right")
    save(fig, "overlap.png")
    return paths
