"""Turn the metrics of ``bench e2e`` runs into the figures it reports, and predict them.

Pure functions (no processes): per-system averages over the steady steps, the compute vs
exposed-sync split, speed-ups, the lossless check on final losses, and what the cost
model (``zentrain.sync.cost``, ZEN §2.3 / Eq. 1-2) predicts from the density and
densification γ the reducers measured in the same run.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from zentrain.sync import cost

#: Systems and what each one runs (``--set`` overrides on top of the workload's config).
SYSTEMS: dict[str, list[str]] = {
    "ddp": ["sync.scheme=ddp", "model.sparse_embedding=false"],
    "ddp-sparse": ["sync.scheme=ddp", "model.sparse_embedding=true"],
    **{s: [f"sync.scheme={s}", "model.sparse_embedding=false"]
       for s in ("dense", "agsparse", "sparcml", "omnireduce", "zen", "auto")},
}
DDP_SYSTEMS = ("ddp", "ddp-sparse")
#: zentrain's sparse schemes (``--embedding-grads sparse`` gives them COO gradients).
SPARSE_SCHEMES = ("agsparse", "sparcml", "omnireduce", "zen", "auto")
#: Every system here is lossless: gradients are summed exactly (only the order differs).
LOSSLESS = tuple(SYSTEMS)
#: Where γ for the prediction comes from, in order of preference (all report it).
GAMMA_SOURCES = ("zen", "auto", "sparcml", "agsparse", "omnireduce")
#: TCP payload per Ethernet frame at MTU 1500: the goodput a shaped link gives (netem.md).
GOODPUT = 1448 / 1514


def warmup_steps(steps: int) -> int:
    """Steps discarded before averaging: the first 20%, at least 2."""
    return max(2, math.ceil(0.2 * steps))


def steady_figures(rows: list[dict[str, Any]], warmup: int, unit: str) -> dict[str, Any]:
    """Averages of one run's metrics rows after ``warmup`` steps."""
    steady = [r for r in rows if r["step"] > warmup] or rows[-1:]
    total_t = sum(r["step_time_s"] for r in steady)
    items = sum(r[f"{unit}_per_s"] * r["step_time_s"] for r in steady)

    def mean(key: str) -> float:
        return statistics.fmean(float(r.get(key, 0.0)) for r in steady)

    return {
        "throughput": items / total_t if total_t else 0.0,
        "step_time_s": total_t / len(steady),
        "exposed_sync_s": mean("sync_s"),
        "breakdown": {k: mean(f"{k}_s") for k in
                      ("data_wait", "forward", "backward", "sync", "optimizer")},
        "sync_bytes_per_step": mean("sync_bytes_sent"),
        "sync_bytes_per_step_max": mean("sync_bytes_sent_max"),
        "final_loss": float(rows[-1]["loss"]),
        "steps_measured": len(steady),
        "sparsity": table_sparsity(rows),
    }


def table_sparsity(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per embedding table: mean density, γ, skew and the path taken, from ``sync_stats``."""
    acc: dict[str, dict[str, list]] = {}
    for r in rows:
        for key, v in (r.get("sync_stats") or {}).items():
            table, _, name = key.partition(".")
            if not table.startswith("table") or name not in ("density", "gamma", "skew",
                                                              "path"):
                continue
            acc.setdefault(table, {}).setdefault(name, []).append(v)
    out: dict[str, dict[str, Any]] = {}
    for table, vals in sorted(acc.items()):
        paths = vals.get("path", [])
        out[table] = {k: statistics.fmean(v) for k, v in vals.items() if k != "path" and v}
        if paths:
            out[table]["path"] = max(set(paths), key=paths.count)
            out[table]["dense_fraction"] = paths.count("dense") / len(paths)
    return out


# -- the cost model -------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """What a step syncs: the embedding tables (rows, row width) and every other byte."""

    tables: tuple[tuple[int, int], ...]
    """(num_rows, row_numel) of each embedding table, in the order the trainer syncs them."""
    other_bytes: int
    """Bytes of the parameters every scheme all-reduces densely."""
    elem_bytes: int = 4


def model_layout(cfg: Any) -> Layout:
    """The model's tables and dense bytes, built on the meta device (no memory)."""
    import torch

    from zentrain.models import build_model
    from zentrain.sync.sparse import embedding_params

    with torch.device("meta"):
        model = build_model(cfg.model)
    tables = embedding_params(model)
    ids = {id(p) for p in tables}
    other = sum(p.numel() * p.element_size() for p in model.parameters()
                if p.requires_grad and id(p) not in ids)
    return Layout(tuple((p.shape[0], p[0].numel()) for p in tables), int(other))


def measured_sparsity(systems: dict[str, dict[str, Any]], n: int
                      ) -> tuple[list[dict[str, Any]] | None, str]:
    """Per-table density/γ/skew for the prediction, and a note on where they came from.

    Density and γ come from the first of ``GAMMA_SOURCES`` that ran (the reducers report
    both exactly); OmniReduce's skew from its own run (else 1). Without any sparse run
    there is nothing measured: None.
    """
    src = next((s for s in GAMMA_SOURCES if systems.get(s, {}).get("sparsity")), None)
    if src is None:
        return None, "no sparse scheme ran, so density and γ are unknown: no prediction"
    skew_rows = systems.get("omnireduce", {}).get("sparsity", {})
    out, notes = [], [f"density and γ measured by {src}"]
    for table, st in sorted(systems[src]["sparsity"].items()):
        d = float(st.get("density", 0.0))
        g = st.get("gamma")
        if g is None and d > 0:
            # The table went the dense path every step: γ unreported. Assume no overlap
            # (γ = min(n, 1/d)), the conservative end of ZEN's C1 range.
            g = min(float(n), 1.0 / d)
            notes.append(f"{table}: γ not reported (dense path), assumed min(n, 1/d)")
        skew = float(skew_rows.get(table, {}).get("skew", 1.0))
        out.append({"table": table, "density": d, "gamma": float(g or 1.0), "skew": skew,
                    "dense_path": st.get("path") == "dense"})
    if "omnireduce" not in systems:
        notes.append("OmniReduce skew not measured, taken as 1")
    return out, "; ".join(notes)


def predict_sync(system: str, layout: Layout, sparsity: list[dict[str, Any]] | None, n: int,
                 rate_bits: int | None, dense_threshold: float = 0.5
                 ) -> tuple[float, float] | None:
    """(bytes received by the busiest rank per step, seconds at ``rate_bits``) for ``system``.

    Dense parameters: ring all-reduce. Tables: the scheme's formula with the measured d, γ.
    ``ddp-sparse`` is gloo's sparse all-reduce: an all-gather of coalesced COO with int64
    indices. ``auto`` is the cheapest of its candidates. On loopback (no rate) the time is 0.
    """
    def at(c: cost.Cost) -> float:
        return c.time(rate_bits / 8 * GOODPUT) if rate_bits else 0.0

    if n < 2:
        return 0.0, 0.0
    eb = layout.elem_bytes
    dense_rest = cost.dense_allreduce(cost.Workload(num_rows=layout.other_bytes // eb,
                                                    density=1.0, gamma=1.0, n=n))
    total_b, total_t = dense_rest.recv_bytes, at(dense_rest)
    for i, (rows, width) in enumerate(layout.tables):
        whole = cost.dense_allreduce(cost.Workload(rows, 1.0, 1.0, n, row_numel=width))
        if system in ("ddp", "dense"):
            c = whole
        else:
            if sparsity is None or i >= len(sparsity):
                return None
            st = sparsity[i]
            w = cost.Workload(num_rows=rows, density=st["density"], gamma=st["gamma"], n=n,
                              row_numel=width, skew=st["skew"],
                              index_bytes=8 if system == "ddp-sparse" else 4)
            if system == "ddp-sparse":
                c = cost.agsparse(w)
            elif st["dense_path"] or st["density"] > dense_threshold:
                c = whole
            elif system == "auto":
                c = min((cost.COST_FNS[s](w) for s in ("zen", "sparcml", "agsparse",
                                                        "allreduce")),
                        key=lambda c: c.time(1.0))
            else:
                c = cost.COST_FNS[system](w)
        total_b += c.recv_bytes
        total_t += at(c)
    return total_b, total_t


def compute_reference(systems: dict[str, dict[str, Any]]) -> float | None:
    """Compute time per step: median over zentrain schemes of step time − exposed sync.

    zentrain's schemes report their exposed sync; DDP waits for its all-reduce inside
    backward, so its sync cannot be told apart from compute and is estimated against this.
    """
    own = [s["step_time_s"] - s["exposed_sync_s"] for name, s in systems.items()
           if name not in DDP_SYSTEMS and "step_time_s" in s]
    return statistics.median(own) if own else None


def finish(systems: dict[str, dict[str, Any]], layout: Layout, n: int,
           rate_bits: int | None, dense_threshold: float, loss_rtol: float
           ) -> dict[str, Any]:
    """Fill speed-ups, sync split, predictions and the loss check in place; the point's notes."""
    ok = {k: s for k, s in systems.items() if "throughput" in s}
    compute = compute_reference(ok)
    sparsity, sparsity_note = measured_sparsity(ok, n)
    preds = {name: predict_sync(name, layout, sparsity, n, rate_bits, dense_threshold)
             for name in systems}
    for name, s in ok.items():
        if name in DDP_SYSTEMS:
            est = compute is not None
            s["sync_time_s"] = max(0.0, s["step_time_s"] - compute) if est else None
            s["sync_time_estimated"] = est
        else:
            s["sync_time_s"] = s["exposed_sync_s"]
            s["sync_time_estimated"] = False
        s["compute_time_s"] = (s["step_time_s"] - s["sync_time_s"]
                               if s["sync_time_s"] is not None else None)
        p = preds[name]
        s["predicted_sync_bytes_per_step"] = p[0] if p else None
        s["predicted_sync_time_s"] = p[1] if p else None
    for base in DDP_SYSTEMS:
        b = ok.get(base)
        pb = preds.get(base) or (predict_sync(base, layout, sparsity, n, rate_bits,
                                              dense_threshold))
        for name, s in ok.items():
            key = base.replace("-", "_")
            s[f"speedup_vs_{key}"] = s["throughput"] / b["throughput"] if b else None
            p = preds[name]
            s[f"predicted_speedup_vs_{key}"] = (
                (compute + pb[1]) / (compute + p[1])
                if compute is not None and p is not None and pb is not None else None)
    loss = loss_check(ok, loss_rtol)
    return {"compute_reference_s": compute, "sparsity": sparsity,
            "prediction_note": sparsity_note + (
                "; compute time per step = median over zentrain schemes of step time minus "
                "exposed sync" if compute is not None else ""), "loss_check": loss}


def loss_check(systems: dict[str, dict[str, Any]], rtol: float) -> dict[str, Any]:
    """Final losses of the lossless systems must agree within ``rtol`` (relative)."""
    names = [n for n in LOSSLESS if n in systems]
    if not names:
        return {"reference": None, "max_rel_deviation": None, "rtol": rtol, "ok": None}
    ref = names[0]
    r = systems[ref]["final_loss"]
    worst = 0.0
    for name in names:
        dev = abs(systems[name]["final_loss"] - r) / max(abs(r), 1e-12)
        systems[name]["loss_rel_deviation"] = dev
        systems[name]["loss_matches"] = dev <= rtol
        worst = max(worst, dev)
    return {"reference": ref, "max_rel_deviation": worst, "rtol": rtol, "ok": worst <= rtol,
            "systems": names}
